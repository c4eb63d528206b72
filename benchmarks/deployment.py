"""Deployment vs simulation: per-round wall time, Flower latency vs compute, bytes on the wire.

The same experiment runs (a) in Flower's simulation engine (``fedmtl.simulation.simulate``) and
(b) as a real deployment on loopback: a SuperLink and one SuperNode per client as separate
processes, TLS and SuperNode authentication on (``fedmtl.deploy.local``). Both write the same
``metrics.jsonl``; from it, per round and phase:

- ``seconds``: the phase's wall time (``seconds/<phase>``, identical in every row of a round);
- ``compute``: the slowest client's own training time (``train/seconds``), train phase only;
- ``flower``: ``seconds − compute``, i.e. message delivery, process start-up and polling.

Bytes: payload = Σ ``bytes_up + bytes_down`` of the rows (tensor bytes the loop sent and
received); wire = the SuperLink's own count of Fleet API traffic for the run (``flwr ls``:
``network-traffic.total-bytes``, including discovery, configs and Flower's framing). The target
is wire / payload ≤ 1.05.

Usage::

    python benchmarks/deployment.py [--experiment tests/data/tiny.toml] [--rounds 3]

Prints a table and writes ``benchmarks/results/deployment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import flwr
import tomli_w

from fedmtl.config import load_experiment
from fedmtl.deploy.local import LocalDeployment
from fedmtl.results import RunDirectory
from fedmtl.simulation import FLOWER_ENV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "deployment.json"
TARGET_RATIO = 1.05


def phase_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: each phase's wall time, the slowest client's compute, the difference."""
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_round[int(row["round"])].append(row)
    table = []
    for round_, members in sorted(by_round.items()):
        phases: dict[str, dict[str, float]] = {}
        for key in sorted({k for r in members for k in r if k.startswith("seconds/")}):
            phase = key.removeprefix("seconds/")
            seconds = max(float(r[key]) for r in members if key in r)
            entry = {"seconds": round(seconds, 3)}
            if phase == "train":
                compute = max(float(r.get("train/seconds", 0.0)) for r in members)
                entry.update(compute=round(compute, 3), flower=round(seconds - compute, 3))
            phases[phase] = entry
        payload = sum(int(r.get("bytes_up", 0)) + int(r.get("bytes_down", 0)) for r in members)
        table.append(
            {
                "round": round_,
                "seconds": round(sum(p["seconds"] for p in phases.values()), 3),
                "phases": phases,
                "payload_bytes": payload,
            }
        )
    return table


def summarise(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Steady state (rounds after the first, which pays start-up): medians."""
    later = table[1:] or table
    train = [r["phases"]["train"] for r in later if "train" in r["phases"]]
    return {
        "median_round_seconds": statistics.median(r["seconds"] for r in later),
        "median_train_flower_seconds": statistics.median(t["flower"] for t in train),
        "median_train_compute_seconds": statistics.median(t["compute"] for t in train),
        "payload_bytes": sum(r["payload_bytes"] for r in table),
    }


def write_experiment(source: Path, rounds: int, out: Path) -> Path:
    """A copy of ``source`` with ``rounds`` and CPU execution (the same file for both modes)."""
    data = tomllib.loads(source.read_text())
    data.update(rounds=rounds, device="cpu")
    path = out / "experiment.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def run_simulation(experiment_path: Path, out: Path) -> list[dict[str, Any]]:
    from fedmtl.simulation import simulate

    experiment = load_experiment(experiment_path)
    run_dir = simulate(experiment, RunDirectory.create(out, experiment))
    return run_dir.read_metrics()


def run_deployment(
    experiment_path: Path, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    experiment = load_experiment(experiment_path)
    app_dir = out / "app"
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    clients = [c.client_id for c in experiment.clients]
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    with LocalDeployment(out / "deployment", clients, env=env, num_threads=1) as cluster:
        cluster.start(timeout=600)
        start = time.perf_counter()
        run_id = cluster.submit(
            {"experiment": str(experiment_path), "output-dir": str(out / "runs")}, app_dir
        )
        info = cluster.wait_run(run_id, timeout=3600)
        wall = time.perf_counter() - start
    if info.get("status") != "finished:completed":
        raise RuntimeError(f"deployment run did not complete: {info}")
    (run_path,) = [p for p in (out / "runs").glob("*/*") if (p / "config.json").exists()]
    return RunDirectory(run_path).read_metrics(), info, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default=str(ROOT / "tests" / "data" / "tiny.toml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        experiment_path = write_experiment(Path(args.experiment), args.rounds, work)
        start = time.perf_counter()
        sim_rows = run_simulation(experiment_path, work / "sim")
        sim_wall = time.perf_counter() - start
        dep_rows, info, dep_wall = run_deployment(experiment_path, work / "dep")

    sim_table, dep_table = phase_table(sim_rows), phase_table(dep_rows)
    wire = int(info["network-traffic"]["total-bytes"])
    payload = sum(r["payload_bytes"] for r in dep_table)
    result = {
        # relative to the repository: result files hold no absolute paths of the machine
        "experiment": os.path.relpath(args.experiment, ROOT),
        "rounds": args.rounds,
        "clients": len({r["client_id"] for r in dep_rows}),
        "machine": {
            "cpus": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "flwr": flwr.__version__,
        },
        "simulation": {
            "wall_seconds": round(sim_wall, 2),
            "rounds": sim_table,
            **summarise(sim_table),
        },
        "deployment": {
            "security": "TLS + SuperNode auth",
            "wall_seconds": round(dep_wall, 2),
            "rounds": dep_table,
            **summarise(dep_table),
            "flwr_ls": {k: info[k] for k in ("network-traffic", "compute-time") if k in info},
        },
        "bytes": {
            "payload": payload,
            "wire": wire,
            "wire_over_payload": round(wire / payload, 4) if payload else None,
            "wire_per_round": round(wire / args.rounds),
            "payload_per_round": [r["payload_bytes"] for r in dep_table],
            "target": TARGET_RATIO,
        },
    }
    print(f"{'round':>5} {'sim s':>8} {'dep s':>8} {'dep train flower s':>19} {'compute s':>10}")
    for sim, dep in zip(sim_table, dep_table):
        train = dep["phases"].get("train", {})
        print(
            f"{dep['round']:>5} {sim['seconds']:>8.2f} {dep['seconds']:>8.2f} "
            f"{train.get('flower', 0):>19.2f} {train.get('compute', 0):>10.2f}"
        )
    ratio = result["bytes"]["wire_over_payload"]
    print(f"bytes: wire {wire:,} / payload {payload:,} = {ratio} (target <= {TARGET_RATIO})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
