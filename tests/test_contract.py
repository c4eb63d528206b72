"""The contract every registered strategy must honour, run in-process on a FakeGrid.

Dropped client, a client replying NaNs, resume after round 2 of 4 equal to an uninterrupted
run, and identical results for identical seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedmtl.strategies import STRATEGIES
from fedmtl.testing import FakeGrid
from tests.helpers import StopAfter, eval_rows, run_in_process, tiny_experiment

ALGORITHMS = sorted(STRATEGIES)


def _final_state(run_dir, client_id: str) -> dict[str, torch.Tensor]:
    from fedmtl.clients.state import StateStore

    store = StateStore(run_dir.clients_dir / client_id)
    loaded = store.load(store.rounds()[-1])
    assert loaded is not None
    return loaded[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_identical_seeds_identical_results(algorithm: str, tmp_path: Path) -> None:
    experiment = tiny_experiment(algorithm, rounds=2)
    first, _ = run_in_process(experiment, tmp_path / "a")
    second, _ = run_in_process(experiment, tmp_path / "b")
    assert eval_rows(first) == eval_rows(second)
    assert any(k.startswith("eval/") for k in eval_rows(first)[-1])
    for client in experiment.clients:
        a, b = _final_state(first, client.client_id), _final_state(second, client.client_id)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dropped_client_is_left_out_and_run_finishes(algorithm: str, tmp_path: Path) -> None:
    experiment = tiny_experiment(algorithm, rounds=3)
    from fedmtl.client_app import app

    grid = FakeGrid(app, len(experiment.clients))

    class DropInRound2:
        def on_start(self, experiment, first_round):
            pass

        def on_phase(self, round_, phase, done, total):
            pass

        def on_round_end(self, round_, rows):
            if round_ == 1:
                grid.fail_next[102] = 1  # b-digit dies during round 2's first message

    run_dir, _ = run_in_process(experiment, tmp_path, grid=grid, observer=DropInRound2())
    rows = run_dir.read_metrics()
    failed = [(r["round"], r["client_id"]) for r in rows if r.get("status") == "failed"]
    assert failed == [(2, "b-digit")]
    last = [r for r in rows if r["round"] == 3]
    assert {r["client_id"] for r in last} == {c.client_id for c in experiment.clients}
    assert all("eval/loss" in r for r in last)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_reply_is_rejected_without_harming_others(algorithm: str, tmp_path: Path) -> None:
    experiment = tiny_experiment(algorithm, rounds=2)
    from fedmtl.client_app import app

    grid = FakeGrid(app, len(experiment.clients))
    poisoned = 101  # a-digit

    def tamper(node: int, message, content: RecordDict) -> RecordDict | None:
        if node != poisoned or message.metadata.message_type != "train":
            return None
        records: dict = {}
        for key, record in content.items():
            if isinstance(record, ArrayRecord):
                tensors = record.to_torch_state_dict()
                record = ArrayRecord({k: torch.full_like(v, math.nan) for k, v in tensors.items()})
            elif isinstance(record, MetricRecord) and not content.array_records:
                record = MetricRecord({**dict(record), "train/loss": math.nan})
            records[key] = record
        return RecordDict(records)

    grid.tamper = tamper
    run_dir, _ = run_in_process(experiment, tmp_path, grid=grid)
    rows = run_dir.read_metrics()
    failed = {(r["round"], r["client_id"]) for r in rows if r.get("status") == "failed"}
    assert failed == {(1, "a-digit"), (2, "a-digit")}
    assert all("NaN" in r["error"] or "nan" in r["error"] for r in rows if "error" in r)
    # Nothing non-finite reached the server state or the other clients.
    tensors, _ = run_dir.load_checkpoint()[1], None
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    for client in ("b-digit", "c-seg-depth"):
        state = _final_state(run_dir, client)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_after_round_2_of_4_equals_uninterrupted(algorithm: str, tmp_path: Path) -> None:
    experiment = tiny_experiment(algorithm, rounds=4)
    full, _ = run_in_process(experiment, tmp_path / "full")

    with pytest.raises(StopAfter.Stopped):
        run_in_process(experiment, tmp_path / "stopped", observer=StopAfter(2))
    stopped = next((tmp_path / "stopped" / "tiny").iterdir())
    from fedmtl.results import RunDirectory

    run_dir = RunDirectory(stopped)
    assert run_dir.checkpoint_rounds() == [1, 2]
    # A fresh grid: new node contexts, as after a real restart; state comes from disk.
    resumed, _ = run_in_process(experiment, tmp_path, run_dir=run_dir, resume=True)
    assert eval_rows(resumed) == eval_rows(full)
    for client in experiment.clients:
        a, b = _final_state(full, client.client_id), _final_state(resumed, client.client_id)
        for key in a:
            assert torch.equal(a[key], b[key]), key
