"""Unit tests of the foundation's pure pieces against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from fedmtl.aggregation.fedavg import weighted_average
from fedmtl.client_app import app as client_app
from fedmtl.clients.state import StateStore
from fedmtl.losses.proximal import proximal_term
from fedmtl.messages import ReplyError, TensorSpec, validate_metrics, validate_tensors
from fedmtl.models.multitask import group_of
from fedmtl.results import RunDirectory, delta_table, relative_delta
from fedmtl.seeding import derive_seed
from fedmtl.strategies.base import ClientInfo
from fedmtl.testing import FakeGrid
from tests.helpers import run_in_process, tiny_experiment


def test_weighted_average_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(9)}
    out = weighted_average([a, b], [1, 3])
    # (1·[1, 2] + 3·[4, 8]) / 4 = [13/4, 26/4]
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["n"].item() == 3  # integer buffers come from the first participant
    with pytest.raises(ValueError, match="shape"):
        weighted_average([a, {"w": torch.zeros(3), "n": torch.tensor(1)}], [1, 1])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([a, b], [0, 0])


def test_proximal_gradient_is_2_lambda_w_minus_g() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    g = torch.tensor([0.0, 1.0, 0.5])
    loss = proximal_term([("enc.w", w)], {"enc.w": g}, 0.3)
    assert loss.item() == pytest.approx(0.3 * (1 + 9 + 0))
    loss.backward()
    assert torch.allclose(w.grad, 2 * 0.3 * (w.detach() - g))


def test_relative_delta_sign_follows_direction() -> None:
    assert relative_delta(0.9, 0.8, True) == pytest.approx(12.5)
    assert relative_delta(0.4, 0.5, False) == pytest.approx(20.0)  # lower RMSE is better
    assert relative_delta(0.6, 0.5, False) == pytest.approx(-20.0)
    assert math.isnan(relative_delta(1.0, 0.0, True))
    per_task, mean = delta_table(
        {"c1": {"t": (0.9, True)}, "c2": {"d": (0.4, False)}},
        {"c1": {"t": (0.8, True)}, "c2": {"d": (0.5, False)}},
    )
    assert per_task == {"c1": {"t": pytest.approx(12.5)}, "c2": {"d": pytest.approx(20.0)}}
    assert mean == pytest.approx(16.25)


def test_state_store_versions_and_atomicity(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "c", keep=2)
    for r in (1, 2, 3):
        store.save(r, {"x": torch.full((2,), float(r))}, {"round": r})
    assert store.rounds() == [2, 3]
    tensors, meta = store.load(3)
    assert tensors["x"].tolist() == [3.0, 3.0] and meta == {"round": 3}
    assert store.load(1) is None
    assert store.latest_at_most(5) == 3 and store.latest_at_most(2) == 2
    assert store.latest_at_most(1) is None
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_reply_validation_names_client_and_problem() -> None:
    spec = {"encoder.w": TensorSpec((2, 2), "float32")}
    good = {"encoder.w": torch.zeros(2, 2)}
    validate_tensors(good, spec, client_id="c")
    cases = [
        ({"encoder.w": torch.zeros(2, 3)}, "shape"),
        ({"encoder.w": torch.zeros(2, 2, dtype=torch.float64)}, "dtype"),
        ({"encoder.w": torch.tensor([[0.0, math.nan], [0, 0]])}, "NaN"),
        ({}, "missing"),
        ({**good, "heads.t.w": torch.zeros(1)}, "unexpected"),
    ]
    for tensors, word in cases:
        with pytest.raises(ReplyError, match=word) as info:
            validate_tensors(tensors, spec, client_id="bad-client")
        assert "bad-client" in str(info.value)
    with pytest.raises(ReplyError, match="num-examples"):
        validate_metrics({}, client_id="c")
    with pytest.raises(ReplyError, match="train/loss"):
        validate_metrics({"num-examples": 3, "train/loss": math.inf}, client_id="c")


def test_group_keys_match_only_identical_groups() -> None:
    def info(cid: str, dataset: str, enc_shape: tuple[int, ...]) -> ClientInfo:
        specs = {
            "encoder.w": TensorSpec(enc_shape, "float32"),
            "decoders.t.w": TensorSpec((4,), "float32"),
            "heads.t.w": TensorSpec((4,), "float32"),
        }
        return ClientInfo(cid, 1, dataset, ["t"], 10, 5, specs)

    a, b, c = info("a", "d1", (8,)), info("b", "d1", (8,)), info("c", "d2", (16,))
    assert a.group_key("encoder") == b.group_key("encoder") != c.group_key("encoder")
    assert a.group_key("decoders.t") == b.group_key("decoders.t")
    assert a.group_key("decoders.t") != c.group_key("decoders.t")  # another dataset's task
    assert set(a.group_specs(("encoder", "decoders"))) == {"encoder", "decoders.t"}


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert derive_seed(0, "a", 1) != derive_seed(0, "a", 2)
    assert 0 <= derive_seed(0, "a", 1) < 2**63


def test_run_directory_metrics_and_checkpoints(tmp_path: Path) -> None:
    from tests.helpers import tiny_experiment

    run = RunDirectory.create(tmp_path, tiny_experiment())
    run.append_metrics([{"round": 1, "client_id": "a"}, {"round": 2, "client_id": "a"}])
    run.truncate_metrics(1)
    assert run.read_metrics() == [{"round": 1, "client_id": "a"}]
    for r in (1, 2, 3):
        run.save_checkpoint(r, {"t": torch.tensor([float(r)])}, {"k": r})
    assert run.checkpoint_rounds() == [2, 3]
    round_, tensors, meta = run.load_checkpoint()
    assert round_ == 3 and tensors["t"].item() == 3.0 and meta == {"k": 3, "round": 3}
    assert run.experiment().name == "tiny"


def test_fake_grid_relies_on_flower_task_identity() -> None:
    """Fails loudly if Flower moves the internal API the FakeGrid (and run_simulation) uses."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    assert TaskIdentity.run_id == 1


def test_fedavg_uploads_only_groups_another_client_holds(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg", rounds=2)
    grid = FakeGrid(client_app, len(experiment.clients))
    uploaded: dict[str, set[str]] = {}

    def capture(node: int, message: Message, content: RecordDict) -> None:
        if message.metadata.message_type == "train":
            client = experiment.clients[node - 101].client_id
            groups = {group_of(name) for name in content.array_records["arrays"]}
            uploaded.setdefault(client, set()).update(groups)

    grid.tamper = capture
    run_dir, _ = run_in_process(experiment, tmp_path, grid=grid)
    # One ViT architecture for all three encoders; the digit decoder is shared by a and b;
    # c's segmentation and depth decoders have no partner, so they never leave the client.
    assert uploaded == {
        "a-digit": {"encoder", "decoders.digit"},
        "b-digit": {"encoder", "decoders.digit"},
        "c-seg-depth": {"encoder"},
    }
    up = {r["client_id"]: r["bytes_up"] for r in run_dir.read_metrics() if r["round"] == 1}
    assert up["c-seg-depth"] < up["a-digit"]


def test_client_sharing_nothing_uploads_nothing(tmp_path: Path) -> None:
    from fedmtl.config import load_experiment

    # tests/data/tiny.toml: a and b share a ViT encoder (different tasks); c is a ResNet.
    experiment = load_experiment(Path(__file__).parent / "data" / "tiny.toml")
    experiment = experiment.model_copy(update={"rounds": 1})
    run_dir, _ = run_in_process(experiment, tmp_path)
    rows = {r["client_id"]: r for r in run_dir.read_metrics()}
    assert all(r.get("status") != "failed" for r in rows.values())
    assert rows["c"]["bytes_up"] == 0  # an empty upload-groups list: nothing to send
    assert rows["a"]["bytes_up"] == rows["b"]["bytes_up"] > 0  # the same encoder
