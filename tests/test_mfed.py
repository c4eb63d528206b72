"""M-Fed end to end on a FakeGrid: what clients receive, λ per round, switch, checks, configs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmtl.cli import main, with_algorithm
from fedmtl.client_app import app
from fedmtl.clients.mfed import MFedClient, validation_split
from fedmtl.clients.session import ClientSession
from fedmtl.config import ConfigError, Experiment, load_experiment, parse_experiment
from fedmtl.data import SampleSet
from fedmtl.protocols.mfed import pull_strength, split_received
from fedmtl.testing import FakeGrid
from tests.helpers import run_in_process, tiny_experiment
from tests.layouts import write_pascal_context

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ("a-digit", "b-digit", "c-seg-depth")


def mfed_experiment(
    rounds: int, clients: dict[str, dict[str, Any]] | None = None, /, **algorithm: Any
) -> Experiment:
    """``tiny_experiment("mfed")`` with algorithm settings and per-client overrides."""
    data = tiny_experiment("mfed", rounds=rounds).model_dump(mode="json")
    data["algorithm"].update(algorithm)
    data["evaluate_every"] = rounds  # evaluation only after the last round (speed)
    for client in data["clients"]:
        client["training"]["max_batches"] = 1  # speed: one local step per round
        for key, value in (clients or {}).get(client["client_id"], {}).items():
            if isinstance(value, dict):
                client[key] = {**client[key], **value}
            else:
                client[key] = value
    return parse_experiment(data)


def round_of(message: Message) -> int:
    return int(str(message.content["config"]["server-round"]))


class Recorder:
    """FakeGrid tamper hook that records every reply and may rewrite its metrics."""

    def __init__(self, experiment: Experiment, metric_overrides: Any = None) -> None:
        self.ids = [c.client_id for c in experiment.clients]
        self.replies: dict[tuple[int, str, str], RecordDict] = {}
        self.metric_overrides = metric_overrides

    def __call__(self, node: int, message: Message, content: RecordDict) -> RecordDict | None:
        kind = message.metadata.message_type
        round_ = round_of(message)
        client = self.ids[node - 101]
        if self.metric_overrides is not None and kind == "train":
            extra = self.metric_overrides(round_, client)
            metrics = dict(content.metric_records["metrics"])
            content = RecordDict(
                {**dict(content.items()), "metrics": MetricRecord({**metrics, **extra})}
            )
        self.replies[(round_, kind, client)] = content
        return content


def sent(grid: FakeGrid, experiment: Experiment, kind: str) -> dict[tuple[int, str], RecordDict]:
    """``(round, client) → content`` of every message of type ``kind`` the server sent."""
    ids = [c.client_id for c in experiment.clients]
    return {
        (round_of(m), ids[m.metadata.dst_node_id - 101]): m.content
        for m in grid.sent
        if m.metadata.message_type == kind
    }


def arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    if "arrays" not in content.array_records:
        return {}
    return dict(content.array_records["arrays"].to_torch_state_dict())


def run(experiment: Experiment, tmp_path: Path, recorder: Recorder) -> tuple[Any, FakeGrid]:
    grid = FakeGrid(app, len(experiment.clients))
    grid.tamper = recorder
    return run_in_process(experiment, tmp_path, grid=grid)


def mean(*pairs: tuple[float, torch.Tensor]) -> torch.Tensor:
    """Hand-written weighted mean in float64."""
    total = sum(w for w, _ in pairs)
    return torch.stack([w * t.double() for w, t in pairs]).sum(dim=0) / total


# -- a 3-round run with unequal data sizes: tiers, λ, bytes -----------------------------

SCHEDULE = {"lambda_0": 0.01, "growth": 2.0, "lambda_max": 0.03}
EXPECTED_LAMBDA = {1: 0.01, 2: 0.02, 3: 0.03}  # min(0.03, 0.01 · 2^(r−1))


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    experiment = mfed_experiment(3, {"b-digit": {"samples": 16}}, **SCHEDULE)
    recorder = Recorder(experiment)
    run_dir, grid = run(experiment, tmp_path_factory.mktemp("mfed"), recorder)
    return {"experiment": experiment, "recorder": recorder, "grid": grid, "run_dir": run_dir}


def tier1_digit(replies: dict, round_: int) -> dict[str, torch.Tensor]:
    """Hand-computed digit task-global model after ``round_``: (24·θ_a + 16·θ_b) / 40."""
    a, b = (arrays(replies[(round_, "train", c)]) for c in ("a-digit", "b-digit"))
    n_a, n_b = (
        int(replies[(round_, "train", c)]["metrics"]["num-examples"])
        for c in ("a-digit", "b-digit")
    )
    assert (n_a, n_b) == (24, 16)
    return {k: mean((24, a[k]), (16, b[k])) for k in a}


def assert_equal_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value.double(), rtol=1e-6, atol=1e-7)


def test_clients_receive_tier1_task_models_and_tier2_global_encoder(three_rounds: dict) -> None:
    experiment, grid = three_rounds["experiment"], three_rounds["grid"]
    replies = three_rounds["recorder"].replies
    train = sent(grid, experiment, "train")
    assert arrays(train[(1, "a-digit")]) == {}  # round 1: equal seeded inits, nothing sent
    for round_ in (2, 3):
        digit = tier1_digit(replies, round_ - 1)
        assert any(k.startswith("heads.digit.") for k in digit)  # heads are part of it
        c_up = arrays(replies[(round_ - 1, "train", "c-seg-depth")])
        # tier 2, uniform over the task groups digit, segmentation and depth; c is alone in the
        # last two, so both of their task-global encoders are c's encoder
        g = {
            k: (v + 2 * c_up[k].double()) / 3 for k, v in digit.items() if k.startswith("encoder.")
        }
        for client in ("a-digit", "b-digit"):
            received, reference = split_received(arrays(train[(round_, client)]))
            assert_equal_state(received, digit)
            assert_equal_state(reference, g)
        # the multi-task client: the mean of its two task-global encoders, i.e. its own upload
        received, _ = split_received(arrays(train[(round_, "c-seg-depth")]))
        assert_equal_state(received, c_up)


def test_evaluation_uses_the_next_start_model_without_g(three_rounds: dict) -> None:
    experiment, grid = three_rounds["experiment"], three_rounds["grid"]
    evaluate = sent(grid, experiment, "evaluate")
    assert set(evaluate) == {(3, c) for c in CLIENTS}  # evaluate_every = rounds
    digit = tier1_digit(three_rounds["recorder"].replies, 3)
    for client in ("a-digit", "b-digit"):
        assert_equal_state(arrays(evaluate[(3, client)]), digit)


def test_lambda_follows_the_schedule_and_multitask_client_uses_the_mean(three_rounds: dict) -> None:
    experiment, grid = three_rounds["experiment"], three_rounds["grid"]
    replies = three_rounds["recorder"].replies
    train = sent(grid, experiment, "train")
    for round_, lam in EXPECTED_LAMBDA.items():
        assert train[(round_, "a-digit")]["config"]["lambda/digit"] == pytest.approx(lam)
        config = train[(round_, "c-seg-depth")]["config"]
        assert config["lambda/segmentation"] == pytest.approx(lam)
        assert config["lambda/depth"] == pytest.approx(lam)
        reported = replies[(round_, "train", "c-seg-depth")]["metrics"]["train/lambda"]
        assert reported == pytest.approx(lam)


def test_bytes_up_and_down_are_recorded_per_round(three_rounds: dict) -> None:
    experiment, grid = three_rounds["experiment"], three_rounds["grid"]
    replies = three_rounds["recorder"].replies
    train, evaluate = sent(grid, experiment, "train"), sent(grid, experiment, "evaluate")

    def within(recorded: int, *contents: RecordDict) -> bool:
        # tensor payload plus a bounded per-tensor overhead (npy header and key name)
        tensors = [t for content in contents for t in arrays(content).values()]
        payload = sum(t.numel() * t.element_size() for t in tensors)
        return payload <= recorded <= payload + 256 * len(tensors)

    rows = three_rounds["run_dir"].read_metrics()
    assert len(rows) == 9
    for row in rows:
        key = (row["round"], row["client_id"])
        assert within(row["bytes_up"], replies[(key[0], "train", key[1])])
        down = [train[key], *([evaluate[key]] if key in evaluate else [])]
        assert within(row.get("bytes_down", 0), *down)
    # from round 2 on, a-digit downloads its task model and g: the encoder twice
    a_digit = arrays(train[(2, "a-digit")])
    encoder = sum(t.numel() for k, t in a_digit.items() if k.startswith("encoder."))
    assert sum(t.numel() for k, t in a_digit.items() if k.startswith("global/")) == encoder


# -- keep_local_encoder and the negative-transfer switch ---------------------------------


def test_keep_local_encoder_and_threshold_switch(tmp_path: Path) -> None:
    experiment = mfed_experiment(3, keep_local_encoder=True, threshold=0.1, patience=1, **SCHEDULE)

    def stub(round_: int, client: str) -> dict[str, float]:
        # digit's accuracy falls from 0.9 to 0.5 in round 2 (−44 % > 10 %): the pull goes off
        # for digit from round 3; segmentation and depth stay flat.
        if client == "c-seg-depth":
            return {"val/segmentation/miou": 0.5, "val/depth/rmse": 0.3}
        return {"val/digit/accuracy": 0.9 if round_ == 1 else 0.5}

    recorder = Recorder(experiment, stub)
    run_dir, grid = run(experiment, tmp_path, recorder)
    train = sent(grid, experiment, "train")

    # the switch: λ of digit is 0 from round 3, the other tasks keep the schedule
    assert [train[(r, "a-digit")]["config"]["lambda/digit"] for r in (1, 2, 3)] == [
        pytest.approx(0.01),
        pytest.approx(0.02),
        0.0,
    ]
    assert train[(3, "b-digit")]["config"]["lambda/digit"] == 0.0
    assert train[(3, "c-seg-depth")]["config"]["lambda/segmentation"] == pytest.approx(0.03)
    rows = {(r["round"], r["client_id"]): r for r in run_dir.read_metrics()}
    assert rows[(2, "a-digit")]["server/mfed/val/digits/digit"] == pytest.approx(0.5)
    # held out: round(0.1 · 24) = 2 of a-digit's 24 train samples
    assert recorder.replies[(1, "train", "a-digit")]["metrics"]["num-examples"] == 22

    # keep_local_encoder: no encoder is sent, g still is
    for (round_, _), content in train.items():
        received, reference = split_received(arrays(content))
        assert not any(k.startswith("encoder.") for k in received)
        assert bool(reference) == (round_ > 1)
    for content in sent(grid, experiment, "evaluate").values():
        assert not any(k.startswith("encoder.") for k in arrays(content))

    # ...and the client trains on from its own encoder: replay a-digit's round 3 with no local
    # step (local_epochs = 0) on a copy of its state: it uploads its round-2 encoder unchanged.
    state = tmp_path / "replay"
    shutil.copytree(run_dir.clients_dir / "a-digit", state)
    replay = mfed_experiment(
        3, {"a-digit": {"training": {"local_epochs": 0}}}, keep_local_encoder=True, threshold=0.1
    )
    client = MFedClient(ClientSession(replay, "a-digit", state))
    config = dict(train[(3, "a-digit")]["config"])
    outcome = client.train(3, arrays(train[(3, "a-digit")]), config)
    own = arrays(recorder.replies[(2, "train", "a-digit")])
    received, _ = split_received(arrays(train[(3, "a-digit")]))
    for key, value in outcome.arrays.items():
        expected = own[key] if key.startswith("encoder.") else received[key]
        assert torch.equal(value, expected), key


# -- architecture checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 2}}}, "'b-digit'"),
        ({"model": {"decoder_hidden": 32}}, "task 'digits/digit'"),
    ],
)
def test_architecture_mismatch_fails_before_training(
    override: dict, message: str, tmp_path: Path
) -> None:
    experiment = mfed_experiment(1, {"b-digit": override})
    grid = FakeGrid(app, len(experiment.clients))
    with pytest.raises(ValueError, match=message) as raised:
        run_in_process(experiment, tmp_path, grid=grid)
    assert "b-digit" in str(raised.value)
    assert {m.metadata.message_type for m in grid.sent} == {"query.describe"}


# -- client helpers ------------------------------------------------------------------------


def test_client_helpers() -> None:
    g, w = torch.ones(2), torch.zeros(2)
    task_model, reference = split_received({"global/encoder.x": g, "encoder.x": w})
    assert task_model == {"encoder.x": w} and reference == {"encoder.x": g}
    assert pull_strength({"lambda/seg": 0.1, "lambda/depth": 0.0}, ["seg", "depth"]) == 0.05
    with pytest.raises(KeyError, match="lambda/depth"):
        pull_strength({"lambda/seg": 0.1}, ["seg", "depth"])

    data = SampleSet(lambda key, tasks: (torch.tensor(key), {}), list(range(100, 130)), ())
    train, held_out = validation_split(data, seed=0, client_id="x")
    assert (len(train), len(held_out)) == (27, 3)  # round(0.1 · 30) = 3
    assert set(train.keys).isdisjoint(held_out.keys)
    assert sorted([*train.keys, *held_out.keys]) == list(range(100, 130))
    again = validation_split(data, seed=0, client_id="x")[1]
    assert list(again.keys) == list(held_out.keys)
    assert len(validation_split(data.subset([0, 1]), seed=0, client_id="x")[0]) == 1


# -- configs -------------------------------------------------------------------------------


def test_quickstart_config_is_mfed_with_one_encoder_architecture() -> None:
    experiment = load_experiment(ROOT / "configs" / "mfed.toml")
    assert experiment.algorithm.name == "mfed"
    assert (
        with_algorithm(experiment, "mfed").algorithm == experiment.algorithm
    )  # compare = simulate
    assert len({(c.model.backbone, str(c.model.kwargs)) for c in experiment.clients}) == 1
    tasks = [t for c in experiment.clients for t in c.tasks]
    assert all(tasks.count(t) >= 2 for t in ("digit", "segmentation", "depth"))


def test_paper_config_validates_once_root_exists(tmp_path: Path) -> None:
    path = ROOT / "configs" / "mfed_pascal_context_paper.toml"
    text = path.read_text()
    assert 'root = "/data/PASCALContext"' in text
    root = tmp_path / "PASCALContext"
    for sub in ("JPEGImages", "ImageSets/Context"):
        (root / sub).mkdir(parents=True)
    rewritten = tmp_path / "paper.toml"
    rewritten.write_text(text.replace('"/data/PASCALContext"', f'"{root}"'))
    # validate reads the index too: empty folders are not a dataset (issue 12)
    assert main(["validate", str(rewritten)]) == 2
    write_pascal_context(root)
    if not torch.cuda.is_available():  # as the file's comment says for CPU-only machines
        assert main(["validate", str(rewritten)]) == 2  # simulation.num_gpus_per_client
        text = text.replace("num_gpus_per_client = 0.5", "num_gpus_per_client = 0.0")
        rewritten.write_text(text.replace('"/data/PASCALContext"', f'"{root}"'))
    experiment = load_experiment(rewritten)
    assert experiment.algorithm.name == "mfed"
    assert {c.model.backbone for c in experiment.clients} == {"resnet50"}
    assert {t for c in experiment.clients for t in c.tasks} == {
        "semseg",
        "human_parts",
        "saliency",
        "normals",
        "edge",
    }
    assert main(["validate", str(rewritten)]) == 0
    missing = tmp_path / "missing.toml"
    missing.write_text(text.replace('"/data/PASCALContext"', f'"{tmp_path / "nowhere"}"'))
    with pytest.raises(ConfigError, match=r"datasets\.pascal\.root"):
        load_experiment(missing)
