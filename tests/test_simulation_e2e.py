"""End to end through Flower's real simulation engine (Ray), and `flwr run .`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedmtl.config import parse_experiment
from fedmtl.results import RunDirectory
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_simulate_through_ray(tmp_path: Path) -> None:
    from fedmtl.simulation import simulate

    experiment = tiny_experiment("fedavg", rounds=2)
    run_dir = simulate(experiment, RunDirectory.create(tmp_path, experiment))
    rows = run_dir.read_metrics()
    assert {r["client_id"] for r in rows} == {c.client_id for c in experiment.clients}
    assert [r["round"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(r.get("status") != "failed" for r in rows)
    summary = json.loads(run_dir.summary_path.read_text())
    assert summary["clients"]["a-digit"]["tasks"]["digit"]["metric"] == "accuracy"
    assert (run_dir.path / "metrics.png").stat().st_size > 1000
    # the encoder of a-digit and b-digit (same architecture) was averaged: both got bytes down
    assert all(r["bytes_down"] > 0 for r in rows if r["round"] == 2)


@pytest.mark.timeout(300)
def test_fedmuscle_stream_through_ray(tmp_path: Path) -> None:
    # The stream needs every client in a ClientApp at once: three Ray actors on 2 CPUs.
    from fedmtl.simulation import simulate

    experiment = tiny_experiment("fedmuscle", rounds=1)
    data = experiment.model_dump(mode="json")
    data["algorithm"].update(
        {"schedule": "batch", "channel": "stream", "stream_port": 0, "projector_dim": 16}
    )
    experiment = parse_experiment(data)
    run_dir = simulate(experiment, RunDirectory.create(tmp_path, experiment))
    rows = run_dir.read_metrics()
    assert len(rows) == 3 and all(r.get("status") != "failed" for r in rows), rows
    for row in rows:
        assert row["server/fedmuscle/stream_steps"] == 2  # 16 public samples, batches of 8
        assert row["server/fedmuscle/stream_clients"] == 3
        assert row["server/fedmuscle/steps"] == 6
        assert row["stream/skipped"] == 0


@pytest.mark.timeout(300)
def test_cli_simulate_leaves_no_process(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text((ROOT / "tests" / "data" / "tiny.toml").read_text())
    # A private Ray temp dir: its path appears in every process Ray starts for this run, so
    # leftovers are found without confusing them with other Ray users on the machine.
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are bounded
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_TMPDIR": ray_dir}
    result = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "simulate", str(config), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "run folder" in result.stdout
    time.sleep(2)  # Ray's daemons exit asynchronously after shutdown
    leftover = subprocess.run(["pgrep", "-f", ray_dir], capture_output=True, text=True)
    assert leftover.stdout == "", f"the CLI left Ray processes running: {leftover.stdout}"
    shutil.rmtree(ray_dir, ignore_errors=True)
