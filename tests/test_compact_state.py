"""Issue 19: compact personal state, retention tied to the server's checkpoints, tidy runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmtl.clients.state import StateStore
from fedmtl.results import RunDirectory
from fedmtl.simulation import run_in_process as simulate_in_process
from tests.helpers import StopAfter, eval_rows, run_in_process, tiny_experiment


def test_compact_dtype_round_trips_to_each_tensors_own_dtype(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(64, 64, generator=gen),
        "d": torch.randn(8, generator=gen, dtype=torch.float64),
        "n": torch.tensor(7),
    }
    full = StateStore(tmp_path / "full").save(1, tensors)
    store = StateStore(tmp_path / "bf16", dtype=torch.bfloat16)
    half = store.save(1, tensors, {"k": 1})
    loaded, meta = store.load(1)  # type: ignore[misc]
    assert meta == {"k": 1}
    assert loaded["w"].dtype == torch.float32 and loaded["d"].dtype == torch.float64
    assert torch.equal(loaded["w"], tensors["w"].bfloat16().float())  # rounded once to bf16
    assert torch.equal(loaded["d"], tensors["d"].bfloat16().double())
    assert torch.equal(loaded["n"], tensors["n"])  # integers are stored as they are
    assert half.stat().st_size < 0.55 * full.stat().st_size
    fp16 = StateStore(tmp_path / "fp16", dtype=torch.float16)
    fp16.save(1, tensors)
    assert torch.equal(fp16.load(1)[0]["w"], tensors["w"].half().float())  # type: ignore[index]


def test_commit_keeps_what_a_repeated_round_needs(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "c")

    def message_of_round(r: int) -> None:  # what client_app does for every message
        if r > 1:
            store.commit(r - 1)

    for r in (1, 2):
        message_of_round(r)
        store.save(r, {"x": torch.full((1,), float(r))})
    message_of_round(3)  # the server checkpointed round 2
    assert store.rounds() == [2]  # round 1 can no longer be needed
    store.save(3, {"x": torch.full((1,), 3.0)})
    assert store.rounds() == [2, 3]
    # The server died before checkpointing round 3 and repeats it: round 2 must be there.
    message_of_round(3)
    assert store.rounds() == [2, 3] and store.latest_at_most(2) == 2
    store.save(3, {"x": torch.full((1,), 30.0)})  # the repeat overwrites round 3
    message_of_round(4)  # round 3 committed: only the newest is kept
    assert store.rounds() == [3]
    assert store.load(3)[0]["x"].item() == 30.0  # type: ignore[index]
    store.commit(0)  # nothing committed yet: nothing to drop
    assert store.rounds() == [3]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_repeated_round_starts_from_the_state_before_it(dtype: str, tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg", rounds=4, state={"dtype": dtype})
    full, _ = run_in_process(experiment, tmp_path / "full")
    with pytest.raises(StopAfter.Stopped):  # the server dies after round 3's training
        run_in_process(experiment, tmp_path / "died", observer=StopAfter(3, phase="train"))
    run_dir = RunDirectory(next((tmp_path / "died" / "tiny").iterdir()))
    assert run_dir.checkpoint_rounds() == [1, 2]
    for client in experiment.clients:  # round 3 trained but not committed
        assert StateStore(run_dir.clients_dir / client.client_id).rounds() == [2, 3]
    resumed, _ = run_in_process(experiment, tmp_path, run_dir=run_dir, resume=True)
    assert eval_rows(resumed) == eval_rows(full)  # round 3 repeated from round 2's state
    for client in experiment.clients:
        assert StateStore(run_dir.clients_dir / client.client_id).rounds() == [3, 4]


def test_finished_run_reports_disk_and_removes_client_state(tmp_path: Path) -> None:
    runs = {}
    for name, state in {
        "fp32": {},
        "bf16": {"dtype": "bfloat16"},
        "keep": {"keep": True},
    }.items():
        experiment = tiny_experiment("fedavg", rounds=2, state=state)
        run_dir = simulate_in_process(experiment, RunDirectory.create(tmp_path / name, experiment))
        runs[name] = run_dir
    fp32, bf16, keep = (runs[n].read_summary()["disk"] for n in ("fp32", "bf16", "keep"))  # type: ignore[index]
    # Two rounds of state per client were on disk at the end (newest two: round 1 and 2).
    assert fp32["client_state_bytes"] > 0 and fp32["run_bytes"] >= fp32["client_state_bytes"]
    assert not runs["fp32"].clients_dir.exists()
    assert fp32["kept_bytes"] == fp32["run_bytes"] - fp32["client_state_bytes"]
    assert 0.45 < bf16["client_state_bytes"] / fp32["client_state_bytes"] < 0.55
    # keep: the folder stays, each client with only its newest (committed) round.
    for client in ("a-digit", "b-digit", "c-seg-depth"):
        assert StateStore(runs["keep"].clients_dir / client).rounds() == [2]
    assert keep["client_state_bytes"] == fp32["client_state_bytes"]
    assert keep["kept_bytes"] == pytest.approx(
        fp32["kept_bytes"] + fp32["client_state_bytes"] / 2, rel=0.01
    )


def test_summarising_again_keeps_the_disk_figures(tmp_path: Path) -> None:
    """The CLI and ``fedmtl report`` re-summarise a finished run: ``disk`` must survive."""
    from fedmtl.report import summarize

    experiment = tiny_experiment("fedavg", rounds=1)
    run_dir = simulate_in_process(experiment, RunDirectory.create(tmp_path, experiment))
    disk = run_dir.read_summary()["disk"]  # type: ignore[index]
    assert disk["client_state_bytes"] > 0
    assert summarize(run_dir)["disk"] == disk
    assert run_dir.read_summary()["disk"] == disk  # type: ignore[index]
