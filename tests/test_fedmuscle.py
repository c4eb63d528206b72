"""FedMuscle end to end on a FakeGrid: peers per batch, protocols, schedules, drop-outs, configs."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message, RecordDict

from fedmtl.aggregation.muscle_targets import client_payload, draw_peers
from fedmtl.cli import main, with_algorithm
from fedmtl.client_app import app
from fedmtl.clients.fedmuscle import (
    GRAM_TAU,
    OPTIMIZER_EXTRA,
    FedMuscleClient,
    contrastive_objective,
    public_view,
)
from fedmtl.clients.session import ClientSession
from fedmtl.clients.state import StateStore
from fedmtl.config import Experiment, load_experiment, parse_experiment
from fedmtl.losses.muscle import gram_volume_loss, muscle_loss, pairwise_infonce_loss
from fedmtl.protocols.fedmuscle import EPOCH, REPRESENT_EPOCH, split_payloads
from fedmtl.results import RunDirectory
from fedmtl.strategies.fedmuscle import ContrastiveRound, FedMuscle
from fedmtl.testing import FakeGrid
from tests.helpers import run_in_process, tiny_experiment
from tests.layouts import write_everything

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["a-digit", "b-digit", "c-seg-depth"]
SEED = 3  # tiny_experiment's seed
DIM = 16
# Narrow ViTs keep every run to a few seconds; tiny_experiment's own are 192 wide.
NARROW_VIT = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
Payloads = dict[tuple[int, int, int], dict[str, dict[str, torch.Tensor]]]
TINY_BERT = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "vocab_size": 512, "max_position_embeddings": 64,
}  # fmt: skip


def muscle_experiment(
    rounds: int = 1, *, public_size: int = 16, text_client: bool = False, **algorithm: Any
) -> Experiment:
    """``tiny_experiment("fedmuscle")`` with narrow models, a public pool and algorithm settings."""
    public = {"dataset": "digits", "size": public_size, "batch_size": 8}
    data = tiny_experiment("fedmuscle", rounds=rounds, public=public).model_dump(mode="json")
    data["algorithm"].update({"projector_dim": DIM, **algorithm})
    data["evaluate_every"] = rounds
    for client in data["clients"]:
        client["model"]["kwargs"] = NARROW_VIT
    if text_client:
        data["datasets"]["captions"] = {"kind": "quickstart_text"}
        data["clients"][2] = {
            "client_id": "t-caption",
            "dataset": "captions",
            "tasks": ["digit"],
            "samples": 24,
            "test_samples": 16,
            "model": {"backbone": "bert", "kwargs": TINY_BERT, "decoder_hidden": 16},
            "training": data["clients"][0]["training"],
        }
    return parse_experiment(data)


def run(
    experiment: Experiment,
    out: Path,
    *,
    tamper: Any = None,
    observer: Any = None,
    grid: FakeGrid | None = None,
    run_config: dict[str, Any] | None = None,
) -> tuple[RunDirectory, FakeGrid, dict[tuple[int, int, int], dict[str, torch.Tensor]]]:
    """Run in process; return the run, the grid and every representation clients sent."""
    grid = grid or FakeGrid(app, len(experiment.clients))
    ids = [c.client_id for c in experiment.clients]
    reps: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def hook(node: int, message: Message, content: RecordDict) -> RecordDict | None:
        client = ids[node - 101]
        config = message.content.config_records["config"]
        round_ = int(str(config["server-round"]))
        if tamper is not None:
            content = tamper(round_, client, message, content) or content
        if REPRESENT_EPOCH in config and "arrays" in content.array_records:
            epoch = int(str(config[REPRESENT_EPOCH]))
            for key, z in content.array_records["arrays"].to_torch_state_dict().items():
                reps.setdefault((round_, epoch, int(key.removeprefix("z/"))), {})[client] = z
        return content

    grid.tamper = hook
    run_dir, grid = run_in_process(
        experiment, out, grid=grid, observer=observer, run_config=run_config
    )
    return run_dir, grid, reps


def sent_payloads(
    grid: FakeGrid, experiment: Experiment
) -> tuple[Payloads, dict[tuple[int, str], list[str]]]:
    """Payloads of every align message by (round, epoch, batch) → client, and message types."""
    ids = [c.client_id for c in experiment.clients]
    payloads: Payloads = {}
    kinds: dict[tuple[int, str], list[str]] = {}
    for message in grid.sent:
        client = ids[message.metadata.dst_node_id - 101]
        config = message.content.config_records["config"]
        round_ = int(str(config["server-round"]))
        kind = message.metadata.message_type
        if kind != "query.describe":
            kinds.setdefault((round_, client), []).append(kind)
        if kind == "train.align" and "arrays" in message.content.array_records:
            arrays = dict(message.content.array_records["arrays"].to_torch_state_dict())
            for batch, payload in split_payloads(arrays).items():
                payloads.setdefault((round_, int(str(config[EPOCH])), batch), {})[client] = payload
    return payloads, kinds


def final_state(run_dir: RunDirectory, client_id: str) -> dict[str, torch.Tensor]:
    store = StateStore(run_dir.clients_dir / client_id)
    loaded = store.load(store.rounds()[-1])
    assert loaded is not None
    return loaded[0]


def expected_peers(
    reps: dict[str, torch.Tensor], round_: int, batch_number: int, num_peers: int, anchor: str
) -> torch.Tensor:
    """The peers' matrices FedMuscle must send ``anchor``: a draw among clients with a valid Z."""
    draws = draw_peers(
        CLIENTS, num_peers, seed=SEED, round=round_, batch=batch_number, available=reps.keys()
    )
    return torch.stack([reps[p] for p in draws[anchor]])


# --------------------------------------------------------------------------- peers and schedules


@pytest.mark.parametrize("schedule", ["batch", "epoch"])
def test_peers_per_batch_match_draw_peers(schedule: str, tmp_path: Path) -> None:
    # T = 2 epochs of 2 batches, M = 1 of 2 others: each batch's draw decides who is sent.
    experiment = muscle_experiment(num_peers=1, contrastive_epochs=2, schedule=schedule)
    _, grid, reps = run(experiment, tmp_path)
    payloads, kinds = sent_payloads(grid, experiment)
    assert sorted(payloads) == [(1, e, b) for e in (0, 1) for b in (0, 1)]
    drawn = set()
    for (round_, epoch, batch), by_client in payloads.items():
        assert sorted(by_client) == CLIENTS
        for client, payload in by_client.items():
            expected = expected_peers(
                reps[(round_, epoch, batch)], round_, 2 * epoch + batch, 1, client
            )
            assert torch.equal(payload["peers"], expected)
            drawn.add((client, tuple(payload["peers"].flatten()[:4].tolist())))
    assert len(drawn) > len(CLIENTS)  # re-drawn per batch: some client changes peer
    # batch: one represent, then one align per public batch, each built from the Z sent just
    # before it; epoch: per epoch one represent carrying every batch's Z (all payloads of the
    # epoch come from these epoch-start matrices), then one align.
    expected_kinds = {
        "batch": ["query.represent"] + ["train.align"] * 4,
        "epoch": ["query.represent", "train.align"] * 2,
    }[schedule]
    for client in CLIENTS:
        assert kinds[(1, client)] == ["train", *expected_kinds, "evaluate"]


@pytest.mark.slow
def test_schedules_agree_when_each_epoch_has_one_batch(tmp_path: Path) -> None:
    # With one public batch per epoch no representation is stale in either schedule (the only
    # specified difference), so both must give bit-identical personal states.
    states = {}
    for schedule in ("batch", "epoch"):
        experiment = muscle_experiment(public_size=8, contrastive_epochs=2, schedule=schedule)
        run_dir, grid, _ = run(experiment, tmp_path / schedule)
        states[schedule] = {c: final_state(run_dir, c) for c in CLIENTS}
        _, kinds = sent_payloads(grid, experiment)
        assert kinds[(1, "a-digit")].count("train.align") == 2
    for client in CLIENTS:
        batch, epoch = states["batch"][client], states["epoch"][client]
        assert batch.keys() == epoch.keys()
        assert all(torch.equal(batch[k], epoch[k]) for k in batch), client


# --------------------------------------------------------------------------- protocols


@pytest.mark.slow
def test_protocols_give_the_same_client_updates(tmp_path: Path) -> None:
    states = {}
    for protocol in ("peers", "targets", "gradient"):
        experiment = muscle_experiment(protocol=protocol, schedule="batch")
        run_dir, _, _ = run(experiment, tmp_path / protocol)
        states[protocol] = {c: final_state(run_dir, c) for c in CLIENTS}
    experiment = muscle_experiment(loss="infonce", schedule="batch")
    run_dir, _, _ = run(experiment, tmp_path / "infonce")
    infonce = {c: final_state(run_dir, c) for c in CLIENTS}
    gaps = []
    for client in CLIENTS:
        reference = states["peers"][client]
        aligned = [k for k in reference if k.startswith(("model.encoder.", "model.projector."))]
        for protocol in ("targets", "gradient"):
            for key in aligned:
                torch.testing.assert_close(
                    states[protocol][client][key], reference[key], rtol=0, atol=1e-6,
                    msg=f"{protocol} {key}",
                )  # fmt: skip
        gaps.append(max((infonce[client][k] - reference[k]).abs().max().item() for k in aligned))
    # The comparison is sensitive: γ = 0 (pairwise InfoNCE) moves the same weights elsewhere, by
    # far more than the 1e-6 within which the protocols must agree (a 100× margin; the gap is
    # about 9e-4 on the stratified 24-sample clients, 1e-3 on the former first-24 samples).
    assert max(gaps) > 1e-4


def test_gram_needs_the_peers_protocol() -> None:
    with pytest.raises(ValueError, match="protocol 'peers'"):
        FedMuscle(muscle_experiment(loss="gram", protocol="gradient"))
    with pytest.raises(ValueError, match="needs protocol 'peers'"):
        contrastive_objective("gram", "targets", torch.zeros(2, 3), {}, 0.2, 0.15)


def test_objectives_match_the_loss_definitions() -> None:
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 5, generator=gen), dim=1)
    peers = F.normalize(torch.randn(2, 6, 5, generator=gen), dim=2)
    reps = {"n": z, "p": peers[0], "q": peers[1]}
    pairwise = pairwise_infonce_loss(z, list(peers.unbind(0)), tau=0.2)
    muscle = muscle_loss(z, list(peers.unbind(0)), tau=0.2, tau_prev=0.15)
    assert abs(float(muscle) - float(pairwise)) > 1e-3  # γ ≠ 0 matters
    # The server builds infonce payloads with tau_prev = tau (γ = 0); the client sets it too.
    for loss, tau_prev, expected in (("infonce", 0.2, pairwise), ("muscle", 0.15, muscle)):
        for protocol in ("peers", "targets", "gradient"):
            payload = client_payload(protocol, "n", reps, ["p", "q"], 0.2, tau_prev)
            _, reported = contrastive_objective(loss, protocol, z, payload, 0.2, 0.15)
            assert reported == pytest.approx(float(expected), rel=1e-6), (loss, protocol)
    _, reported = contrastive_objective("gram", "peers", z, {"peers": peers}, 0.2, 0.15)
    expected_gram = gram_volume_loss(z, list(peers.unbind(0)), tau=GRAM_TAU)
    assert reported == pytest.approx(float(expected_gram), rel=1e-6)


# --------------------------------------------------------------------------- validation, drop-outs


def _nan_arrays(content: RecordDict) -> RecordDict:
    records: dict[str, Any] = dict(content.items())
    tensors = content.array_records["arrays"].to_torch_state_dict()
    records["arrays"] = ArrayRecord(
        {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    )
    return RecordDict(records)


def test_nan_representation_leaves_the_client_out_of_that_epoch(tmp_path: Path) -> None:
    experiment = muscle_experiment(schedule="epoch")

    def tamper(round_: int, client: str, message: Message, content: RecordDict) -> Any:
        if client == "a-digit" and message.metadata.message_type == "query.represent":
            return _nan_arrays(content)
        return None

    run_dir, grid, reps = run(experiment, tmp_path, tamper=tamper)
    payloads, kinds = sent_payloads(grid, experiment)
    assert kinds[(1, "a-digit")] == ["train", "query.represent", "evaluate"]  # no align
    row = next(r for r in run_dir.read_metrics() if r["client_id"] == "a-digit")
    assert row["status"] == "failed" and "NaN" in row["error"] and "represent" in row["error"]
    for batch in (0, 1):
        assert sorted(payloads[(1, 0, batch)]) == ["b-digit", "c-seg-depth"]
        valid = {c: z for c, z in reps[(1, 0, batch)].items() if c != "a-digit"}
        for client, payload in payloads[(1, 0, batch)].items():
            other = "c-seg-depth" if client == "b-digit" else "b-digit"
            assert torch.equal(payload["peers"], valid[other][None])  # fewer peers, not NaN
            assert torch.equal(payload["peers"], expected_peers(valid, 1, batch, 2, client))
    assert all(
        r.get("status") != "failed" for r in run_dir.read_metrics() if r["client_id"] != "a-digit"
    )


def test_nan_representation_leaves_the_client_out_of_that_batch_only(tmp_path: Path) -> None:
    experiment = muscle_experiment(schedule="batch", contrastive_epochs=2)

    def tamper(round_: int, client: str, message: Message, content: RecordDict) -> Any:
        config = message.content.config_records["config"]
        asks_second_batch = config.get("fedmuscle.represent-batches") == [1]
        first_epoch = config.get(REPRESENT_EPOCH) == 0
        if client == "a-digit" and asks_second_batch and first_epoch:
            return _nan_arrays(content)
        return None

    _, grid, _ = run(experiment, tmp_path, tamper=tamper)
    payloads, _ = sent_payloads(grid, experiment)
    assert sorted(payloads[(1, 0, 0)]) == CLIENTS
    assert sorted(payloads[(1, 0, 1)]) == ["b-digit", "c-seg-depth"]
    for payload in payloads[(1, 0, 1)].values():
        assert payload["peers"].shape[0] == 1 and torch.isfinite(payload["peers"]).all()
    # Asked again for the next batch, it is back as anchor and as peer.
    assert sorted(payloads[(1, 1, 0)]) == CLIENTS
    assert all(payload["peers"].shape[0] == 2 for payload in payloads[(1, 1, 0)].values())


@pytest.mark.slow
def test_dropped_peer_batch_proceeds_with_the_remaining_peers(tmp_path: Path) -> None:
    experiment = muscle_experiment(rounds=2, schedule="batch")
    grid = FakeGrid(app, len(experiment.clients))

    class DropAfterRepresent:
        def on_start(self, experiment: Experiment, first_round: int) -> None:
            pass

        def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
            if round_ == 1 and phase == "represent":
                grid.fail_next[102] = 1  # b-digit dies on its first align message

        def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
            pass

    run_dir, grid, reps = run(experiment, tmp_path, grid=grid, observer=DropAfterRepresent())
    payloads, kinds = sent_payloads(grid, experiment)
    # b was asked once in round 1's contrastive phase, then left out for its rest.
    assert kinds[(1, "b-digit")] == ["train", "query.represent", "train.align"]
    failed = [
        (r["round"], r["client_id"], r["error"])
        for r in run_dir.read_metrics()
        if r.get("status") == "failed"
    ]
    assert len(failed) == 1 and failed[0][:2] == (1, "b-digit") and failed[0][2].startswith("align")
    # Batch 0 was built before b dropped (M = 2 peers); batch 1 proceeds with the one left.
    assert all(p["peers"].shape[0] == 2 for p in payloads[(1, 0, 0)].values())
    assert sorted(payloads[(1, 0, 1)]) == ["a-digit", "c-seg-depth"]
    for client, payload in payloads[(1, 0, 1)].items():
        assert torch.equal(payload["peers"], expected_peers(reps[(1, 0, 1)], 1, 1, 2, client))
        assert payload["peers"].shape[0] == 1
    # Round 2 (public epoch (2 − 1)·T = 1): b is back in the contrastive phase.
    assert sorted(payloads[(2, 1, 0)]) == sorted(payloads[(2, 1, 1)]) == CLIENTS


def test_missing_peer_is_replaced_when_enough_clients_remain() -> None:
    data = muscle_experiment().model_dump(mode="json")
    data["clients"].append({**data["clients"][0], "client_id": "d-digit"})
    strategy = FedMuscle(parse_experiment(data))
    ids = [*CLIENTS, "d-digit"]
    gen = torch.Generator().manual_seed(1)
    reps = {c: F.normalize(torch.randn(8, DIM, generator=gen), dim=1) for c in ids}
    state = ContrastiveRound(loop=None, round=1, members=ids, active=set(ids))  # type: ignore[arg-type]
    full = draw_peers(ids, 2, seed=SEED, round=1, batch=0)
    dropped = next(p for p in full["a-digit"])  # one of a's peers has no representation
    available = {c: z for c, z in reps.items() if c != dropped}
    payloads = strategy._payloads(state, 0, available)
    assert sorted(payloads) == sorted(available)
    peers = payloads["a-digit"]["peers"]
    assert peers.shape[0] == 2  # still M peers: the dropped one was replaced
    remaining = [c for c in ids if c not in ("a-digit", dropped)]
    assert torch.equal(peers, torch.stack([reps[c] for c in sorted(remaining)]))


# --------------------------------------------------------------------------- clients


def test_image_and_text_clients_align_on_the_same_public_samples(tmp_path: Path) -> None:
    experiment = muscle_experiment(text_client=True, schedule="batch")
    views = {
        c: public_view(ClientSession(experiment, c, tmp_path / "views" / c))
        for c in ("a-digit", "t-caption")
    }
    image, text = views["a-digit"], views["t-caption"]
    assert list(image.samples.keys) == list(text.samples.keys)
    assert all((a == b).all() for a, b in zip(image.batch_indices(0), text.batch_indices(0)))
    first_image = image.samples[0][0]
    assert isinstance(text.samples[0][0], str) and isinstance(first_image, torch.Tensor)
    assert first_image.shape == (3, 16, 16)
    run_dir, grid, reps = run(experiment, tmp_path / "run")
    payloads, _ = sent_payloads(grid, experiment)
    for batch in (0, 1):
        assert sorted(payloads[(1, 0, batch)]) == ["a-digit", "b-digit", "t-caption"]
        text_z = reps[(1, 0, batch)]["t-caption"]
        assert text_z.shape == (8, DIM)
        torch.testing.assert_close(text_z.norm(dim=1), torch.ones(8))
        assert any(
            torch.equal(p["peers"][m], text_z)
            for c, p in payloads[(1, 0, batch)].items()
            if c != "t-caption"
            for m in range(2)
        )
    rows = run_dir.read_metrics()
    assert all("eval/loss" in r and r.get("status") != "failed" for r in rows)


def _client(tmp_path: Path, experiment: Experiment) -> FedMuscleClient:
    session = ClientSession(experiment, "a-digit", tmp_path)
    session.save(1, session.new_model())
    return FedMuscleClient(session)


def test_align_trains_encoder_and_projector_only_and_keeps_optimiser_state(tmp_path: Path) -> None:
    data = muscle_experiment().model_dump(mode="json")
    data["clients"][0]["training"]["optimizer"] = "adamw"
    experiment = parse_experiment(data)
    gen = torch.Generator().manual_seed(2)
    payload = {
        f"{b}/peers": F.normalize(torch.randn(2, 8, DIM, generator=gen), dim=2) for b in (0, 1)
    }
    config = {EPOCH: 0}

    together = _client(tmp_path / "together", experiment)
    start = {k: v.clone() for k, v in together.session.load(1)[0].state_dict().items()}
    outcome = together.align(1, payload, config)
    assert outcome.metrics["align/steps"] == 2 and outcome.metrics["num-examples"] == 16
    one_message = together.session.load(1)[0].state_dict()

    split = _client(tmp_path / "split", experiment)
    for key in payload:
        split.align(1, {key: payload[key]}, config)
    two_messages = split.session.load(1)[0].state_dict()

    reset = _client(tmp_path / "reset", experiment)
    for key in payload:
        reset.align(1, {key: payload[key]}, config)
        store = reset.session.state
        tensors, _ = store.load(1)  # type: ignore[misc]
        store.save(1, {k: v for k, v in tensors.items() if OPTIMIZER_EXTRA not in k})
    no_state = reset.session.load(1)[0].state_dict()

    for key, value in one_message.items():
        assert torch.equal(value, two_messages[key]), key  # state carried between messages
        if key.startswith(("decoders.", "heads.")):
            assert torch.equal(value, start[key]), key  # frozen during alignment
    for group in ("encoder.", "projector."):
        assert any(not torch.equal(one_message[k], start[k]) for k in start if k.startswith(group))
    assert any(not torch.equal(one_message[k], no_state[k]) for k in one_message)

    # Local training of the next round drops the contrastive optimiser state.
    together.train(2, {}, {})
    tensors, _ = together.session.state.load(2)  # type: ignore[misc]
    assert not any(OPTIMIZER_EXTRA in k for k in tensors)
    assert any(OPTIMIZER_EXTRA in k for k in together.session.state.load(1)[0])  # type: ignore[index]


# --------------------------------------------------------------------------- configs


def test_quickstart_config_is_heterogeneous_and_compare_ready() -> None:
    experiment = load_experiment(ROOT / "configs" / "fedmuscle.toml")
    assert experiment.algorithm.name == "fedmuscle" and experiment.public is not None
    kinds = {c.client_id: experiment.datasets[c.dataset].kind for c in experiment.clients}
    images = [c for c in experiment.clients if kinds[c.client_id] == "quickstart"]
    texts = [c for c in experiment.clients if kinds[c.client_id] == "quickstart_text"]
    assert len(images) >= 5 and len(texts) >= 1
    assert len({c.model.backbone for c in images}) >= 3
    assert len({tuple(c.tasks) for c in images}) >= 4
    assert texts[0].model.backbone in ("bert", "distilbert")
    assert with_algorithm(experiment, "fedmuscle").algorithm == experiment.algorithm


@pytest.mark.parametrize("name", ["voc", "coco", "cifar"])
def test_paper_configs_validate_once_roots_exist(name: str, tmp_path: Path) -> None:
    source = ROOT / "configs" / f"fedmuscle_{name}_paper.toml"
    assert main(["validate", str(source)]) == 2  # placeholder roots do not exist
    text = source.read_text()
    roots = sorted(set(re.findall(r'^root = "([^"]+)"', text, flags=re.M)))
    for index, root in enumerate(roots):
        directory = tmp_path / f"data{index}"
        directory.mkdir()
        text = text.replace(f'root = "{root}"', f'root = "{directory}"')
    target = tmp_path / source.name
    target.write_text(text)
    # validate reads each dataset's index too: empty folders are not a dataset (issue 12)
    assert main(["validate", str(target)]) == 2
    for index in range(len(roots)):
        write_everything(tmp_path / f"data{index}")
    if not torch.cuda.is_available():  # as the file's comment says for CPU-only machines
        assert main(["validate", str(target)]) == 2  # simulation.num_gpus_per_client
        target.write_text(text.replace("num_gpus_per_client = 0.5", "num_gpus_per_client = 0.0"))
    assert main(["validate", str(target)]) == 0
    experiment = load_experiment(target)
    assert experiment.algorithm.name == "fedmuscle" and experiment.algorithm.num_peers == 3
    assert experiment.public is not None and experiment.public.size == 5000
    assert len(experiment.clients) == 6
    assert with_algorithm(experiment, "fedmuscle").algorithm == experiment.algorithm
    shutil.rmtree(tmp_path / "data0")
    assert main(["validate", str(target)]) == 2


def test_alignment_loss_falls_below_chance(tmp_path: Path) -> None:
    # Three clients, M = 2 peers, batches of B = 8: representations that carry nothing shared
    # score M·log B (every peer contributes log B). A contrastive step that does nothing (no
    # gradient, a zero rate, peers that are not the same samples) stays there.
    experiment = muscle_experiment(
        rounds=3, num_peers=2, contrastive_epochs=8, contrastive_lr=3e-3, schedule="batch"
    )
    data = experiment.model_dump(mode="json")
    for client in data["clients"]:  # AdamW, as the bundled federations use
        client["training"].update({"optimizer": "adamw", "lr": 1e-3})
    run_dir, _, _ = run(parse_experiment(data), tmp_path)
    rows = run_dir.read_metrics()
    by_round = {r["round"]: r for r in rows}
    chance = 2 * math.log(8)
    assert by_round[1]["server/fedmuscle/chance_loss"] == pytest.approx(chance)
    losses = [by_round[r]["server/fedmuscle/align_loss"] for r in (1, 2, 3)]
    assert losses[0] > chance - 0.5  # starts near chance: nothing is aligned yet
    assert losses[-1] < chance - 0.5, losses  # and ends clearly below it
