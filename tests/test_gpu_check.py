"""benchmarks/gpu_check.py: the dry run (every part on CPU, Ray included) and failure handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedmtl.simulation import FLOWER_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ["simulation", "throughput", "fedhca2", "muscle", "machine"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **FLOWER_ENV, **(env or {})},
        cwd=ROOT,
        timeout=280,
    )


@pytest.mark.slow  # Flower's Ray engine starts in part 1: about a minute on 2 quiet cores
@pytest.mark.timeout(300)
def test_dry_run_measures_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    # A private Ray temp dir: its path is in every process Ray starts, so leftovers are found.
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are bounded
    result = _run("--dry-run", "--out", str(out), env={"RAY_TMPDIR": ray_dir})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text  # no machine paths
    record = json.loads(text)
    assert list(record["parts"]) == PARTS and record["failed"] == []
    assert all(part["ok"] and part["seconds"] >= 0 for part in record["parts"].values())

    sim = record["parts"]["simulation"]
    assert sim["rounds_completed"] == sim["rounds_requested"] == 1
    assert sim["clients"] == 3 and len(sim["round_seconds"]) == 1 and sim["round_seconds"][0] > 0
    assert all(sim["checks"].values()) and sim["leftover_gpu_processes"] == []

    models = record["parts"]["throughput"]["models"]
    assert set(models) == {"vit_small_patch16_224", "swin_tiny_patch4_window7_224"}
    for m in models.values():
        assert m["ratio"] > 0 and min(m["fedmtl_samples_per_s"] + m["timm_samples_per_s"]) > 0

    hca = record["parts"]["fedhca2"]
    assert max(hca["max_abs_difference"].values()) < 1e-4 and hca["speedup"] > 0

    rows = record["parts"]["muscle"]["rows"]
    assert [r["M"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["loss"] > 0 and r["cpu_s"] > 0 and r["device_s"] > 0
        assert r["loss_difference"] < 1e-4 and r["grad_max_abs_difference"] < 1e-4

    machine = record["parts"]["machine"]
    assert machine["torch"] == torch.__version__ and len(machine["load_average"]) == 3
    assert len(record["load_average"]["start"]) == len(record["load_average"]["end"]) == 3

    time.sleep(2)  # Ray's daemons exit asynchronously after shutdown
    leftover = subprocess.run(["pgrep", "-f", ray_dir], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"Ray processes left behind: {leftover.stdout}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = _run("--parts", "muscle,machine", "--out", str(out))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["failed"] == ["muscle"]
    assert "CUDA" in record["parts"]["muscle"]["error"]
    assert record["parts"]["machine"]["ok"]
