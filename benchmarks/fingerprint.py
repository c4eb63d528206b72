"""Fingerprint the metrics of every bundled federation × algorithm, to prove a refactor inert.

Runs each (federation, algorithm) pair of ``benchmarks/efficacy.py``'s table for a few rounds
with a fixed seed on the in-process engine (one torch thread per run, so the arithmetic is the
same from run to run) and records every metric value of ``metrics.jsonl`` except wall-clock
timings. Comparing two fingerprints value by value (``--against``) shows whether a change of
structure changed any number: a pure refactor must give exactly equal values (bit-identical
floats), not merely close ones.

Usage::

    python benchmarks/fingerprint.py --out before.json          # on the old commit
    python benchmarks/fingerprint.py --against before.json      # on the new one
    python benchmarks/fingerprint.py --diff before.json after.json   # two saved fingerprints

Writes ``benchmarks/results/fingerprint.json`` by default; exits 1 when ``--against`` finds a
difference, and prints each differing value.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy import FEDERATIONS  # noqa: E402


def _is_timing(key: str) -> bool:
    """Wall-clock measurements differ from run to run by nature; everything else must not.

    Their keys name seconds: ``seconds/train``, ``train/seconds``,
    ``server/fedmuscle/exchange_seconds_median``, ...
    """
    return "seconds" in key


def _init_worker() -> None:
    import torch

    from fedmtl.simulation import FLOWER_ENV

    os.environ.update(FLOWER_ENV)
    torch.set_num_threads(1)


def run_pair(config: str, algorithm: str, seed: int, rounds: int) -> list[dict[str, Any]]:
    """Run one pair in a temporary folder; its metric rows without timings."""
    from fedmtl.config import load_experiment, with_algorithm
    from fedmtl.results import RunDirectory
    from fedmtl.simulation import run_in_process

    experiment = with_algorithm(load_experiment(ROOT / config), algorithm)
    experiment = experiment.model_copy(update={"seed": seed, "rounds": rounds})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_in_process(experiment, RunDirectory.create(tmp, experiment))
        lines = run_dir.metrics_path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [{k: v for k, v in row.items() if not _is_timing(k)} for row in rows]


def _job(args: tuple[str, str, str, int, int]) -> tuple[str, list[dict[str, Any]], float]:
    name, config, algorithm, seed, rounds = args
    start = time.perf_counter()
    rows = run_pair(config, algorithm, seed, rounds)
    return f"{name}/{algorithm}", rows, time.perf_counter() - start


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every value that differs between two fingerprints' runs, as readable lines."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            out.append(f"{key}: only in {'new' if key in new else 'old'}")
            continue
        old_rows, new_rows = old[key], new[key]
        if len(old_rows) != len(new_rows):
            out.append(f"{key}: {len(old_rows)} rows before, {len(new_rows)} now")
            continue
        for before, after in zip(old_rows, new_rows, strict=True):
            for metric in sorted(set(before) | set(after)):
                if not _is_timing(metric) and before.get(metric) != after.get(metric):
                    where = f"round {before.get('round')} {before.get('client_id')}"
                    out.append(
                        f"{key} {where} {metric}: {before.get(metric)!r} → {after.get(metric)!r}"
                    )
    return out


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--federations", default=",".join(FEDERATIONS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fingerprint.json"))
    parser.add_argument("--against", help="an earlier fingerprint to compare with, value by value")
    parser.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="compare two saved files")
    args = parser.parse_args()
    if args.diff:
        old, new = (json.loads(Path(f).read_text(encoding="utf-8"))["runs"] for f in args.diff)
        return report(old, new)

    jobs = [
        (name, FEDERATIONS[name][0], algorithm, args.seed, args.rounds)
        for name in args.federations.split(",")
        for algorithm in FEDERATIONS[name][1]
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, initializer=_init_worker) as pool:
        for done, (key, rows, wall) in enumerate(pool.imap_unordered(_job, jobs), start=1):
            runs[key], seconds[key] = rows, round(wall, 1)
            print(f"[{done}/{len(jobs)}] {key}: {len(rows)} rows in {wall:.0f} s", flush=True)
    result = {
        "seed": args.seed,
        "rounds": args.rounds,
        "load_average": list(os.getloadavg()),
        "seconds": dict(sorted(seconds.items())),
        "runs": dict(sorted(runs.items())),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if args.against:
        return report(json.loads(Path(args.against).read_text(encoding="utf-8"))["runs"], runs)
    return 0


def report(old: dict[str, Any], new: dict[str, Any]) -> int:
    """Print the comparison of two fingerprints' runs; 1 when a value differs."""
    diff = differences(old, new)
    compared = sum(1 for rows in new.values() for row in rows for key in row if not _is_timing(key))
    if diff:
        print(f"{len(diff)} values differ:")
        print("\n".join(diff[:200]))
        return 1
    print(f"identical: {len(new)} runs, {compared} values, every one bit-equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
