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


@pytest.mark.timeout(600)
def test_ctrl_c_stops_cleanly_and_the_printed_command_resumes(tmp_path: Path) -> None:
    import re
    import signal

    config = tmp_path / "exp.toml"
    config.write_text((ROOT / "tests" / "data" / "tiny.toml").read_text())
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # as above: finds this run's Ray
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_TMPDIR": ray_dir, "COLUMNS": "500"}
    output = tmp_path / "runs"
    argv = [sys.executable, "-m", "fedmtl.cli", "simulate", str(config), "--output", str(output)]
    # Its own process group, like a terminal's foreground job: Ctrl-C reaches every process.
    process = subprocess.Popen(
        [*argv, "--rounds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not any(output.glob("*/*/checkpoints/round-1.safetensors")):
            assert process.poll() is None and time.monotonic() < deadline, "round 1 never ended"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stdout[-3000:]
    assert "Traceback" not in stdout, stdout[-3000:]
    found = re.search(r"resume with: fedmtl simulate --resume (\S+)", stdout)
    assert found is not None, stdout[-3000:]
    run_dir = RunDirectory(found.group(1))
    assert run_dir.checkpoint_rounds()[0] >= 1 and run_dir.read_summary() is None
    time.sleep(2)  # Ray's daemons exit asynchronously after shutdown
    leftover = subprocess.run(["pgrep", "-f", ray_dir], capture_output=True, text=True)
    assert leftover.stdout == "", f"Ctrl-C left Ray processes running: {leftover.stdout}"

    resumed = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "simulate", "--resume", str(run_dir.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert run_dir.is_finished()
    rounds = [r["round"] for r in run_dir.read_metrics()]
    assert rounds == sorted(rounds) and set(rounds) == {1, 2, 3}
    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.timeout(600)
def test_flwr_run_stream_and_log_show_progress_and_the_final_table(tmp_path: Path) -> None:
    """`flwr run . --stream` against the local SuperLink it starts; `flwr log` shows the same.

    A private FLWR_HOME and ports keep this SuperLink apart from any other on the machine; it
    is stopped by its own PID at the end (it outlives `flwr run` by design).
    """
    import re
    import signal

    home = tmp_path / "flwr-home"
    home.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
        "FLWR_LOCAL_CONTROL_API_PORT": "39193",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    output = tmp_path / "runs"
    flwr = [str(Path(bin_dir) / "flwr")]
    run_config = f"experiment='tests/data/tiny.toml' output-dir='{output}' tracking='tensorboard'"
    try:
        result = subprocess.run(
            [*flwr, "run", ".", "--stream", "--federation-config", "num-supernodes=3",
             "-c", run_config],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=500,
        )  # fmt: skip
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        for line in (
            "fedmtl tiny-e2e · fedavg: rounds 1–2, 3 clients",
            "[ROUND 1/2] train: 3/3 clients replied",
            "[ROUND 1/2] evaluate: 3/3 clients replied",
            "[ROUND 2/2] done in",
            "tracking: tensorboard: tensorboard --logdir",
        ):
            assert line in out, out[-3000:]
        table = out[out.rindex("tiny-e2e · fedavg") :]  # the final table's title
        assert "  a  " in table and "segmentation" in table and "models:" in table
        run_id = re.search(r"Successfully started run (\d+)", out)
        assert run_id is not None, out[-3000:]
        log = subprocess.run(
            [*flwr, "log", run_id.group(1), "--show"],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert "[ROUND 2/2] done in" in log.stdout and "segmentation" in log.stdout, log.stdout
        (run_dir,) = output.glob("tiny-e2e/*")
        assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    finally:
        found = subprocess.run(
            ["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True
        )
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGTERM)
