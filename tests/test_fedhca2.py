"""FedHCA² end to end on a FakeGrid: personalised tensors recomputed by hand, drops, configs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message, RecordDict

from fedmtl.aggregation.conflict_averse import conflict_averse_direction
from fedmtl.cli import main, with_algorithm
from fedmtl.client_app import app
from fedmtl.config import Experiment, load_experiment, parse_experiment
from fedmtl.messages import TensorSpec
from fedmtl.models.factory import shared_structure
from fedmtl.protocols.fedhca2 import REPORT_START, START_PREFIX
from fedmtl.strategies.base import ClientInfo
from fedmtl.strategies.fedhca2 import FedHCA2, client_order, decoder_order
from fedmtl.testing import FakeGrid
from tests.helpers import described_clients, run_in_process, tiny_experiment
from tests.layouts import write_nyud, write_pascal_context

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM, WD, INIT = 0.01, 0.9, 1e-4, 0.1
# The multi-task client comes first in the file: the strategy must still order it last.
FILE_ORDER = ("c-seg-depth", "a-digit", "b-digit")
ORDER = ("a-digit", "b-digit", "c-seg-depth")
DECODERS = {"a-digit": ["digit"], "b-digit": ["digit"], "c-seg-depth": ["depth", "segmentation"]}


HOMO_ALL = {"a-digit": ORDER[:2], "b-digit": ORDER[:2], "c-seg-depth": ORDER[2:]}


def hca_experiment(rounds: int, changes: dict[str, dict[str, Any]] | None = None) -> Experiment:
    """``tiny_experiment("fedhca2")`` with the multi-task client first and per-client changes."""
    data = tiny_experiment("fedhca2", rounds=rounds).model_dump(mode="json")
    by_id = {c["client_id"]: c for c in data["clients"]}
    data["clients"] = [by_id[cid] for cid in FILE_ORDER]
    data["evaluate_every"] = rounds
    for cid, change in (changes or {}).items():
        by_id[cid].update(change)
    return parse_experiment(data)


class Recorder:
    """FakeGrid tamper hook that keeps every reply's content by (round, type, client)."""

    def __init__(self, experiment: Experiment) -> None:
        self.ids = [c.client_id for c in experiment.clients]
        self.replies: dict[tuple[int, str, str], RecordDict] = {}

    def __call__(self, node: int, message: Message, content: RecordDict) -> None:
        round_ = int(str(message.content["config"]["server-round"]))
        self.replies[(round_, message.metadata.message_type, self.ids[node - 101])] = content


def arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    if "arrays" not in content.array_records:
        return {}
    return {k: v.double() for k, v in content.array_records["arrays"].to_torch_state_dict().items()}


def sent(grid: FakeGrid, experiment: Experiment, kind: str) -> dict[tuple[int, str], RecordDict]:
    ids = [c.client_id for c in experiment.clients]
    return {
        (int(str(m.content["config"]["server-round"])), ids[m.metadata.dst_node_id - 101]): (
            m.content
        )
        for m in grid.sent
        if m.metadata.message_type == kind
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three rounds; b-digit dies at its round-2 ``train`` message."""
    experiment = hca_experiment(3)
    grid = FakeGrid(app, len(experiment.clients))
    recorder = Recorder(experiment)
    grid.tamper = recorder
    node_b = 101 + experiment.client_index("b-digit")

    class DropBInRound2:
        def on_start(self, experiment: Experiment, first_round: int) -> None:
            pass

        def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
            pass

        def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
            if round_ == 1:
                grid.fail_next[node_b] = 1

    run_dir, _ = run_in_process(
        experiment, tmp_path_factory.mktemp("hca"), grid=grid, observer=DropBInRound2()
    )
    return {
        "experiment": experiment,
        "train": sent(grid, experiment, "train"),
        "replies": {k: arrays(v) for k, v in recorder.replies.items() if k[1] == "train"},
        "rows": run_dir.read_metrics(),
    }


# -- independent reference computations --------------------------------------------------


def flat_encoder(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder tensors of ``state`` concatenated in sorted-name order."""
    return torch.cat([state[k].reshape(-1) for k in sorted(state) if k.startswith("encoder.")])


def encoder_delta(local: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> torch.Tensor:
    return flat_encoder(local) - flat_encoder(last)


def unflat_encoder(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key in sorted(k for k in like if k.startswith("encoder.")):
        out[key] = flat[offset : offset + like[key].numel()].view(like[key].shape)
        offset += like[key].numel()
    return out


def round_1_states(replies: dict) -> tuple[dict, dict]:
    """θ^last (the reported start points) and θ^local of every client in round 1."""
    last, local = {}, {}
    for c in ORDER:
        reply = replies[(1, "train", c)]
        last[c] = {
            k[len(START_PREFIX) :]: v for k, v in reply.items() if k.startswith(START_PREFIX)
        }
        local[c] = {k: v for k, v in reply.items() if not k.startswith(START_PREFIX)}
    return last, local


def initial_beta(last: dict) -> dict[tuple[str, str, str], float]:
    """β = 0.1 for every (client, task, layer)."""
    return {(c, t, layer_of(n)): INIT for c in ORDER for (t, n) in decoder_tensors(last[c], c)}


def layer_of(name: str) -> str:
    """Layer of a decoder parameter: its parent module (``fuse.0.1.weight`` → ``fuse.0.1``)."""
    return name.rpartition(".")[0]


def decoder_tensors(state: dict[str, torch.Tensor], client: str) -> dict[tuple[str, str], Any]:
    """``(task, name relative to the decoder) → tensor`` of a client's decoders."""
    out = {}
    for task in DECODERS[client]:
        prefix = f"decoders.{task}."
        out.update({(task, k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)})
    return out


def attention_loop(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """``XA_k = Σ_j softmax_j(⟨Δ_k, Δ_j⟩ / sqrt(d)) Δ_j`` with explicit loops, in float64."""
    d = updates[0].numel()
    out = []
    for q in updates:
        logits = [float((q * u).sum()) / math.sqrt(d) for u in updates]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        out.append(
            sum((w / sum(weights) * u for w, u in zip(weights, updates)), torch.zeros_like(q))
        )
    return out


def cross_attention_by_hand(
    deltas: dict[str, dict[tuple[str, str], torch.Tensor]],
) -> dict[tuple[str, str, str], torch.Tensor]:
    """``XA`` of every ``(client, task, name)``: attend among decoders with that name and shape."""
    groups: dict[tuple[str, tuple[int, ...]], list[tuple[str, str]]] = {}
    for client, tensors in deltas.items():
        for (task, name), value in tensors.items():
            groups.setdefault((name, tuple(value.shape)), []).append((client, task))
    out = {}
    for (name, _), members in groups.items():
        updates = [deltas[c][(t, name)] for c, t in members]
        for (client, task), xa in zip(members, attention_loop(updates)):
            out[(client, task, name)] = xa
    return out


def sgd(value: float, buffer: float, gradient: float) -> tuple[float, float]:
    """One torch.optim.SGD step (momentum, weight decay) on a scalar."""
    buffer = MOMENTUM * buffer + gradient + WD * value
    return value - LR * buffer, buffer


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=2e-7, msg=key)


def expected_round(
    last: dict[str, dict[str, torch.Tensor]],
    local: dict[str, dict[str, torch.Tensor]],
    alpha: dict[str, float],
    beta: dict[tuple[str, str, str], float],
    homo: Mapping[str, tuple[str, ...]],
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, dict]:
    """Hand-computed personalised tensors of the present clients, ``U`` and ``XA``."""
    clients = list(local)
    deltas = {c: encoder_delta(local[c], last[c]) for c in clients}
    direction, _ = conflict_averse_direction(torch.stack([deltas[c] for c in clients]), c=0.4)
    dec_deltas = {
        c: {
            key: local_t - decoder_tensors(last[c], c)[key]
            for key, local_t in decoder_tensors(local[c], c).items()
        }
        for c in clients
    }
    cross = cross_attention_by_hand(dec_deltas)
    out = {}
    for c in clients:
        group_mean = sum(deltas[g] for g in homo[c]) / len(homo[c])
        state = unflat_encoder(
            flat_encoder(last[c]) + group_mean + min(max(alpha[c], 0), 1) * direction, last[c]
        )
        for (task, name), delta in dec_deltas[c].items():
            weight = min(max(beta[(c, task, layer_of(name))], 0), 1)
            base = last[c][f"decoders.{task}.{name}"]
            state[f"decoders.{task}.{name}"] = base + delta + weight * cross[(c, task, name)]
        out[c] = state
    return out, direction, cross


# -- tests -------------------------------------------------------------------------------


def test_order_single_task_clients_first() -> None:
    experiment = hca_experiment(1)
    assert client_order(experiment) == list(ORDER)
    assert decoder_order(experiment, list(ORDER)) == [
        ("a-digit", "digit"),
        ("b-digit", "digit"),
        ("c-seg-depth", "depth"),
        ("c-seg-depth", "segmentation"),
    ]


def test_each_client_receives_only_its_own_tensors(run: dict) -> None:
    train, replies = run["train"], run["replies"]
    for client in ORDER:
        first = train[(1, client)]
        assert "arrays" not in first.array_records  # θ^last unknown before the first reply
        assert bool(first["config"][REPORT_START]) is True
        names = replies[(1, "train", client)]
        own = {k for k in names if not k.startswith(START_PREFIX)}
        assert {k.removeprefix(START_PREFIX) for k in names if k.startswith(START_PREFIX)} == own
        assert {k.partition(".")[0] for k in own} == {"encoder", "decoders"}
        assert {k.split(".")[1] for k in own if k.startswith("decoders.")} == set(DECODERS[client])
        assert not any("running_" in k or "num_batches" in k for k in own)  # no buffers
        for round_ in (2, 3):
            content = train[(round_, client)]
            assert REPORT_START not in content["config"]
            assert set(arrays(content)) == own
    assert not any(k.startswith(START_PREFIX) for k in run["replies"][(2, "train", "a-digit")])


def test_round_1_personalised_encoders_and_decoders_by_hand(run: dict) -> None:
    last, local = round_1_states(run["replies"])
    train = run["train"]
    # all clients start from the same seeded encoder
    token = "encoder.model.cls_token"
    assert all(torch.equal(last["a-digit"][token], last[c][token]) for c in ORDER)
    alpha = dict.fromkeys(ORDER, INIT)  # round 1: no hyper-weight step
    expected, _, _ = expected_round(last, local, alpha, initial_beta(last), HOMO_ALL)
    for client in ORDER:
        assert_close(arrays(train[(2, client)]), expected[client])
    # a and b hold the same task: their encoders received the same mean update
    a, b = arrays(train[(2, "a-digit")]), arrays(train[(2, "b-digit")])
    assert torch.equal(a["encoder.model.cls_token"], b["encoder.model.cls_token"])


def test_round_2_hyper_step_and_dropped_client_untouched(run: dict) -> None:
    replies, train, rows = run["replies"], run["train"], run["rows"]
    # b-digit failed in round 2 and then gets its round-2 tensors again
    assert [(r["round"], r["client_id"]) for r in rows if r.get("status") == "failed"] == [
        (2, "b-digit")
    ]
    b2, b3 = arrays(train[(2, "b-digit")]), arrays(train[(3, "b-digit")])
    assert b2.keys() == b3.keys() and all(torch.equal(b2[k], b3[k]) for k in b2)

    present = ("a-digit", "c-seg-depth")
    first_last, first_local = round_1_states(replies)
    beta0 = initial_beta(first_last)
    _, u1, xa1 = expected_round(
        first_last, first_local, dict.fromkeys(ORDER, INIT), beta0, HOMO_ALL
    )

    last = {c: arrays(train[(2, c)]) for c in present}
    local = {c: replies[(2, "train", c)] for c in present}
    # hyper step first, from U¹/XA¹ and this round's updates: g = −⟨U¹, Δ²⟩
    alpha = {}
    for c in present:
        gradient = -float(u1 @ encoder_delta(local[c], last[c]))
        alpha[c], _ = sgd(INIT, 0.0, gradient)
    beta = dict(beta0)
    for c in present:
        per_layer: dict[tuple[str, str, str], float] = {}
        last_dec = decoder_tensors(last[c], c)
        for (task, name), value in decoder_tensors(local[c], c).items():
            key = (c, task, layer_of(name))
            agreement = float((xa1[(c, task, name)] * (value - last_dec[(task, name)])).sum())
            per_layer[key] = per_layer.get(key, 0.0) - agreement
        for key, gradient in per_layer.items():
            beta[key], _ = sgd(INIT, 0.0, gradient)
    round2 = [r for r in rows if r["round"] == 2]
    for row in round2:
        for c in present:  # compare the steps: α itself stays within 1e-4 of 0.1
            step = row[f"server/fedhca2/alpha/{c}"] - INIT
            assert step == pytest.approx(alpha[c] - INIT, rel=1e-3, abs=1e-11)
        assert row["server/fedhca2/alpha/b-digit"] == INIT  # absent: untouched
        assert row["server/fedhca2/beta/b-digit/digit/fc"] == INIT
        assert row["server/fedhca2/clients"] == 2
        for (c, task, layer), value in beta.items():
            if c in present:
                step = row[f"server/fedhca2/beta/{c}/{task}/{layer}"] - INIT
                assert step == pytest.approx(value - INIT, rel=1e-3, abs=1e-11)
    # the steps come from the agreement, not only from weight decay (lr·wd·0.1 = 1e-7)
    assert all(abs(a - INIT) > 1e-6 for a in alpha.values())

    # b is left out: a forms its own homo group and attends over present decoders only
    homo = {c: (c,) for c in present}
    expected, _, _ = expected_round(last, local, alpha, beta, homo)
    for c in present:
        assert_close(arrays(train[(3, c)]), expected[c])


def test_bytes_up_include_the_start_point_once(run: dict) -> None:
    rows, replies = run["rows"], run["replies"]
    for row in rows:
        if row.get("status") == "failed":
            continue
        tensors = replies[(row["round"], "train", row["client_id"])]
        payload = sum(t.numel() * 4 for t in tensors.values())  # float32 on the wire
        assert payload <= row["bytes_up"] <= payload + 256 * len(tensors)
        shared = sum(t.numel() * 4 for k, t in tensors.items() if not k.startswith(START_PREFIX))
        assert payload == (2 * shared if row["round"] == 1 else shared)


def test_architecture_mismatch_names_the_client(tmp_path: Path) -> None:
    other = {"backbone": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 8}}
    experiment = hca_experiment(1, {"b-digit": {"model": other}})
    grid = FakeGrid(app, len(experiment.clients))
    with pytest.raises(ValueError, match=r"one encoder architecture.*'b-digit'"):
        run_in_process(experiment, tmp_path, grid=grid)
    assert grid.sent == []

    strategy = FedHCA2(hca_experiment(1))
    strategy.prepare(described_clients(hca_experiment(1)))  # the shapes come from describe
    specs = dict(strategy.structure["a-digit"])
    specs["encoder.model.cls_token"] = TensorSpec((1, 1, 8), "float32")
    info = ClientInfo("a-digit", 101, "digits", ["digit"], 24, 16, specs)
    with pytest.raises(ValueError, match=r"'a-digit'.*encoder\.model\.cls_token"):
        strategy.check_clients([info])


def test_checkpoint_of_another_client_order_is_refused() -> None:
    strategy = FedHCA2(hca_experiment(1))
    tensors, meta = strategy.state_dict()
    FedHCA2(hca_experiment(1)).load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="differ from this experiment"):
        FedHCA2(hca_experiment(1)).load_state_dict(tensors, {**meta, "order": ORDER[::-1]})


# -- configs -----------------------------------------------------------------------------


def test_quickstart_config() -> None:
    experiment = load_experiment(ROOT / "configs" / "fedhca2.toml")
    assert experiment.algorithm.name == "fedhca2"
    assert with_algorithm(experiment, "fedhca2").algorithm == experiment.algorithm
    assert len({(c.model.backbone, str(c.model.kwargs)) for c in experiment.clients}) == 1
    sizes = sorted(len(c.tasks) for c in experiment.clients)
    assert sizes[0] == 1 and sizes[-1] > 1  # single-task and multi-task clients
    strategy = FedHCA2(experiment)
    strategy.prepare(described_clients(experiment))  # the shapes come from describe
    assert strategy.state.hyper.alpha.shape == (len(experiment.clients),)


@pytest.mark.parametrize(
    ("name", "single_task"),
    [("fedhca2_pascal_context_paper.toml", "pascal"), ("fedhca2_nyud_paper.toml", "nyud")],
)
def test_paper_configs_validate_once_roots_exist(
    name: str, single_task: str, tmp_path: Path
) -> None:
    text = (ROOT / "configs" / name).read_text()
    for folder, marker in (("PASCALContext", "JPEGImages"), ("NYUDv2", "images")):
        placeholder = f'"/data/{folder}"'
        assert placeholder in text
        (tmp_path / folder / marker).mkdir(parents=True)
        text = text.replace(placeholder, f'"{tmp_path / folder}"')
    path = tmp_path / name
    path.write_text(text)
    # validate reads each dataset's index too: empty folders are not a dataset (issue 12)
    assert main(["validate", str(path)]) == 2
    write_pascal_context(tmp_path / "PASCALContext")
    write_nyud(tmp_path / "NYUDv2")
    if not torch.cuda.is_available() and "num_gpus_per_client = 0." in text:
        assert main(["validate", str(path)]) == 2  # simulation.num_gpus_per_client
        text = re.sub(r"num_gpus_per_client = [0-9.]+", "num_gpus_per_client = 0.0", text)
        path.write_text(text)
    assert main(["validate", str(path)]) == 0
    experiment = load_experiment(path)
    assert experiment.algorithm.name == "fedhca2"
    assert with_algorithm(experiment, "fedhca2").algorithm == experiment.algorithm
    assert experiment.algorithm.ca_c == 0.4 and experiment.algorithm.hyper_lr == 0.01
    single = [c for c in experiment.clients if len(c.tasks) == 1]
    multi = [c for c in experiment.clients if len(c.tasks) > 1]
    assert {c.dataset for c in single} == {single_task} and len(multi) == 1
    assert multi[0].dataset != single_task
    assert len(single) == {"pascal": 5, "nyud": 4}[single_task]
    epochs = {c.dataset: c.training.local_epochs for c in experiment.clients}
    assert epochs == {"pascal": 1, "nyud": 4}  # the official FedHCA² configs
    # one Swin-T encoder for both datasets; timm accepts the kwargs (meta device: no memory)
    models = {(c.model.backbone, str(c.model.kwargs)) for c in experiment.clients}
    assert len(models) == 1 and next(iter(models))[0] == "swin_tiny_patch4_window7_224"
    encoder = shared_structure(experiment, experiment.clients[0], ("encoder",))
    assert sum(t.numel() for t in encoder.values()) == 27_519_354  # timm's Swin-T backbone
