"""Scale: N ∈ {10, 30, 100} small heterogeneous clients through Flower's simulation engine.

Every run is one experiment file with three client groups (``count = …``, issue 19): image
classification (``digit``), semantic segmentation and depth regression on the bundled 16-px
digits, with two encoder sizes (a 1-block 32-wide and a 2-block 64-wide ViT; FedHCA² mixes
every client's encoder update, so its clients all take the small one). Each (algorithm, N,
participation) runs ``--rounds`` rounds with ``clients_per_round = max(2, round(p·N))`` in a
fresh process, through ``fedmtl.simulation.simulate`` (Ray: one actor per CPU), and records

- seconds of every round (round 1 includes discovery: ``describe`` of all N nodes), and the
  median of rounds 2..R as the steady per-round time;
- server peak RSS: the peak resident memory of that process (the ServerApp, the strategy and
  Flower's in-memory link state; Ray's driver lives there too), from ``VmHWM``;
- per-actor peak RSS: the largest ``VmHWM`` among the Ray actor processes descended from it
  (polled every second while the run lasts);
- disk per run: ``summary.json``'s ``disk`` (run folder at the end, client state, checkpoints;
  ``clients/`` is deleted afterwards).

Then, per algorithm, a least-squares fit of the steady per-round seconds against the number of
participating clients (``seconds ≈ a + b·k``, with R²), and the FedAvg server-RSS ratio
N = 100 : N = 10. FedHCA² runs with ``memory_budget_mb`` (``--fedhca2-budget-mb``): above it
its two ``[N, d]`` buffers are memory-mapped; the result records their size and whether they
were.

Usage::

    python benchmarks/scale.py                                   # everything (hours on 2 cores)
    python benchmarks/scale.py --n 10,30 --participation 0.1,1.0 --algorithms fedavg,fedhca2
    python benchmarks/scale.py --n 100 --algorithms fedavg --participation 0.1 --append

Configurations run interleaved (N outer, participation, then algorithm), one at a time, and
``benchmarks/results/scale.json`` is rewritten after each, so an interrupted run keeps what it
measured; ``--append`` adds to the file's earlier runs (same key: replaced).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "scale.json"

SMALL = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
LARGE = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
GROUPS = [("cls", ["digit"], SMALL), ("seg", ["segmentation"], LARGE), ("dep", ["depth"], SMALL)]


def experiment_data(
    algorithm: str, n: int, participation: float, rounds: int, budget_mb: float
) -> dict[str, Any]:
    """The experiment of one configuration (three client groups, sizes as even as N allows)."""
    counts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    clients = []
    for (name, tasks, kwargs), count in zip(GROUPS, counts, strict=True):
        model = {
            "backbone": "vit_tiny_patch16_224",
            "kwargs": SMALL if algorithm == "fedhca2" else kwargs,
            "decoder_channels": 8,
            "decoder_hidden": 16,
        }
        clients.append(
            {
                "client_id": name,
                "count": count,
                "dataset": "digits",
                "tasks": tasks,
                "samples": 16,
                "test_samples": 8,
                "model": model,
            }
        )
    hyper: dict[str, Any] = {"name": algorithm}
    if algorithm == "fedhca2":
        hyper["memory_budget_mb"] = budget_mb
    if algorithm == "fedmuscle":
        hyper.update({"projector_dim": 16, "num_peers": 1})
    return {
        "name": f"scale-{algorithm}-{n}",
        "seed": 0,
        "rounds": rounds,
        "device": "cpu",
        "evaluate_every": rounds,  # evaluation once, at the end: the rounds time training
        "average_last_rounds": 1,
        "clients_per_round": max(2, round(participation * n)),
        "round_timeout": 3600.0,
        "algorithm": hyper,
        "datasets": {"digits": {"kind": "quickstart", "image_size": 16}},
        "public": {"dataset": "digits", "size": 16, "batch_size": 8},
        "defaults": {"local_epochs": 1, "batch_size": 8, "lr": 0.05, "max_batches": 2},
        "clients": clients,
    }


# --------------------------------------------------------------------------- memory probes


def _status(pid: int | str, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """Pids descended from ``root`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


class ActorProbe:
    """Polls the peak RSS (``VmHWM``) of this process's Ray actor processes every second."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        for pid in _descendants(os.getpid()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if b"ClientAppActor" in cmdline:
                self.peaks[pid] = max(self.peaks.get(pid, 0), _status(pid, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()


# --------------------------------------------------------------------------- one configuration


def run_one(args: tuple[str, int, float, int, float]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and measure it."""
    algorithm, n, participation, rounds, budget_mb = args
    from fedmtl.config import parse_experiment
    from fedmtl.results import RunDirectory
    from fedmtl.simulation import FLOWER_ENV, simulate

    os.environ.update(FLOWER_ENV)
    experiment = parse_experiment(experiment_data(algorithm, n, participation, rounds, budget_mb))
    ends: list[float] = []

    class Timer:
        start = time.perf_counter()

        def on_start(self, experiment: Any, first_round: int) -> None:
            Timer.start = time.perf_counter()

        def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
            pass

        def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
            ends.append(time.perf_counter())

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ActorProbe() as probe:
        run_dir = simulate(experiment, RunDirectory.create(tmp, experiment), observer=Timer())
        probe.poll()
        summary = run_dir.read_summary() or {}
        rows = run_dir.read_metrics()
    edges = [Timer.start, *ends]
    seconds = [round(b - a, 3) for a, b in itertools.pairwise(edges)]
    failed = sum(1 for row in rows if row.get("status") == "failed")
    result: dict[str, Any] = {
        "algorithm": algorithm,
        "n": n,
        "participation": participation,
        "participants": experiment.clients_per_round,
        "rounds": rounds,
        "round_seconds": seconds,
        "steady_round_seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
        "server_peak_rss_mb": round(_status(os.getpid(), "VmHWM") / 2**20, 1),
        "actor_peak_rss_mb": round(max(probe.peaks.values(), default=0) / 2**20, 1),
        "actors": len(probe.peaks),
        "disk": summary.get("disk", {}),
        "failed_rows": failed,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if algorithm == "fedhca2":
        from fedmtl.models.factory import shared_structure

        client = experiment.clients[0]
        encoder = shared_structure(experiment, client, ("encoder",))
        d = sum(t.numel() for t in encoder.values())
        result["fedhca2_budget_mb"] = budget_mb
        result["fedhca2_buffers_mb"] = round(2 * n * d * 4 / 2**20, 2)
        result["fedhca2_spilled"] = 2 * n * d * 4 > budget_mb * 2**20
    return result


# --------------------------------------------------------------------------- analysis


def linear_fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares ``y ≈ a + b·x`` with R² (None with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for _, y in points)
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"intercept_s": round(a, 3), "seconds_per_client": round(b, 4), "r2": round(r2, 4)}


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-algorithm fits and the targets' checks."""
    out: dict[str, Any] = {"fits": {}, "checks": {}}
    for algorithm in sorted({r["algorithm"] for r in runs}):
        points = [
            (float(r["participants"]), float(r["steady_round_seconds"]))
            for r in runs
            if r["algorithm"] == algorithm and r["steady_round_seconds"] is not None
        ]
        out["fits"][algorithm] = linear_fit(points)
    fedavg = {r["n"]: r["server_peak_rss_mb"] for r in runs if r["algorithm"] == "fedavg"}
    if 10 in fedavg and 100 in fedavg:
        ratio = fedavg[100] / fedavg[10]
        out["checks"]["fedavg_server_rss_100_over_10"] = round(ratio, 3)
        out["checks"]["fedavg_server_rss_target_1.5x_met"] = ratio <= 1.5
    hca = [r for r in runs if r["algorithm"] == "fedhca2"]
    if hca:
        out["checks"]["fedhca2_spilled_runs"] = sum(bool(r["fedhca2_spilled"]) for r in hca)
    return out


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table of the runs."""
    lines = [
        "| algorithm | N | part. | k | round 1 s | steady s/round | server RSS MB | actor RSS MB "
        "| disk MB (state) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["algorithm"], r["n"], r["participation"])):
        disk = r["disk"]
        steady = r["steady_round_seconds"]
        lines.append(
            f"| {r['algorithm']} | {r['n']} | {r['participation']:.0%} | {r['participants']} "
            f"| {r['round_seconds'][0]:.1f} | {'-' if steady is None else f'{steady:.1f}'} "
            f"| {r['server_peak_rss_mb']:.0f} | {r['actor_peak_rss_mb']:.0f} "
            f"| {disk.get('run_bytes', 0) / 2**20:.1f} "
            f"({disk.get('client_state_bytes', 0) / 2**20:.1f}) |"
        )
    return "\n".join(lines)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="10,30,100")
    parser.add_argument("--algorithms", default="fedavg,fedhca2,fedmuscle")
    parser.add_argument("--participation", default="0.1,0.5,1.0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fedhca2-budget-mb", type=float, default=4.0)
    parser.add_argument("--append", action="store_true", help="keep the file's earlier runs")
    parser.add_argument("--out", default=str(OUT), help="relative paths are kept in the file")
    args = parser.parse_args()
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    commands: list[str] = []
    if args.append and out.exists():
        earlier = json.loads(out.read_text(encoding="utf-8"))
        runs, commands = earlier.get("runs", []), earlier.get("commands", [])
    commands.append("python benchmarks/scale.py " + " ".join(sys.argv[1:]))
    configs = [
        (algorithm, n, p, args.rounds, args.fedhca2_budget_mb)
        for n in (int(x) for x in args.n.split(","))
        for p in (float(x) for x in args.participation.split(","))
        for algorithm in args.algorithms.split(",")
    ]
    context = multiprocessing.get_context("spawn")
    for index, config in enumerate(configs, start=1):
        start = time.perf_counter()
        with context.Pool(1, maxtasksperchild=1) as pool:  # a fresh process: its own peak RSS
            result = pool.apply(run_one, (config,))
        key = (result["algorithm"], result["n"], result["participation"])
        runs = [r for r in runs if (r["algorithm"], r["n"], r["participation"]) != key]
        runs.append(result)
        print(
            f"[{index}/{len(configs)}] {key[0]} N={key[1]} p={key[2]:.0%}: rounds "
            f"{result['round_seconds']} s, server {result['server_peak_rss_mb']} MB, actor "
            f"{result['actor_peak_rss_mb']} MB ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        document = {
            "commands": commands,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "runs": runs,
            "analysis": analyse(runs),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(table(runs))
    print(json.dumps(analyse(runs), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
