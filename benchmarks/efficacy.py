"""Efficacy: does collaboration help on the bundled federations, and by how much?

Every algorithm runs on every bundled federation it applies to, once per seed; each run's
metric is the mean of its last ``average_last_rounds`` evaluated rounds, Δ% is paired with the
local run of the same seed, and the table gives the mean over seeds with a 95 % t-interval.
Beside the Δ%, the JSON keeps each algorithm's own signal (FedMuscle's alignment loss against
its chance level, M-Fed's encoder distances, FedHCA2's α, FedAMP's ξ, MaT-FL's clusters), so a
reader can see the mechanism act.

Runs use fedmtl's in-process engine (the same ServerApp, ClientApp and message serialisation
as the simulation engine, clients one after the other, no Ray start-up per run), ``--jobs``
runs at a time with one torch thread each. Hyper-parameters are the configs' own
``[hyperparameters.*]``, fixed before this benchmark ran, and recorded in the JSON.

    python benchmarks/efficacy.py                       # everything, 3 seeds (long: see README)
    python benchmarks/efficacy.py --federations quickstart --algorithms local,fedavg --seeds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINES = ["local", "fedavg", "fedprox", "fedper", "ditto"]
# Which algorithms apply where: M-Fed and FedHCA2 mix encoders across every client, so they need
# one encoder architecture (not the quickstart's ViT-Tiny/ViT-Small/ResNet mix); FedMuscle needs
# a public dataset ([public]), which only its own federation declares. FedHCA2's and M-Fed's
# comparison baselines (FedAMP, MaT-FL, per-task FedAvg) run on those two federations, where
# the papers' tables are reproduced (on the quickstart, per-task FedAvg finds no task group).
COMPARISON = ["fedavg_task", "fedamp", "matfl"]
# FedMuscle's comparison baselines (its Table 1) read the public set: its federation only.
FEDMUSCLE_COMPARISON = ["fedhenn", "cofed", "feddf", "fedrcl", "simclr", "pseudolabel"]
FEDERATIONS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("configs/quickstart.toml", BASELINES),
    "mfed": ("configs/mfed.toml", [*BASELINES, *COMPARISON, "mfed", "fedhca2"]),
    "fedhca2": ("configs/fedhca2.toml", [*BASELINES, *COMPARISON, "mfed", "fedhca2"]),
    "fedmuscle": (
        "configs/fedmuscle.toml",
        ["local", "fedavg", "fedper", "fedmuscle", *FEDMUSCLE_COMPARISON],
    ),
}


def _init_worker() -> None:
    import threading

    import torch

    from fedmtl.simulation import FLOWER_ENV

    os.environ.update(FLOWER_ENV)
    torch.set_num_threads(1)
    parent = os.getppid()

    def exit_with_parent() -> None:  # a killed benchmark must not leave runs going on
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _experiment(config: str, algorithm: str, seed: int, rounds: int | None) -> Any:
    """The resolved experiment of one run."""
    from fedmtl.config import load_experiment, with_algorithm

    experiment = with_algorithm(load_experiment(ROOT / config), algorithm)
    update: dict[str, Any] = {"seed": seed}
    if rounds is not None:
        update["rounds"] = rounds
    return experiment.model_copy(update=update)


def finished_run(experiment: Any, output: str) -> dict[str, Any] | None:
    """A finished run of exactly this resolved experiment under ``output``, if one exists.

    The benchmark is long; rerunning it reuses what an interrupted invocation finished.
    """
    from fedmtl.config import experiment_from_json, experiment_to_json
    from fedmtl.results import RunDirectory

    wanted = json.loads(experiment_to_json(experiment))
    # `hyperparameters` lists every algorithm's table; the run used only its own, already
    # resolved into `algorithm`, so tables added for other algorithms do not make a finished run
    # stale.
    wanted.pop("hyperparameters", None)
    folder = Path(output) / experiment.name
    for path in sorted(folder.glob(f"*-{experiment.algorithm.name}*")):
        run = RunDirectory(path)
        timing = path / "wall_seconds.txt"
        if not (run.summary_path.exists() and timing.exists() and run.config_path.exists()):
            continue
        # Read through today's schema: fields added after the run was written take their
        # defaults (what the older code did); a run whose file sets anything else differently,
        # or no longer validates, does not count.
        try:
            written = json.loads(
                experiment_to_json(experiment_from_json(run.config_path.read_text("utf-8")))
            )
        except ValueError:
            continue
        written.pop("hyperparameters", None)
        if written == wanted:
            return {"path": str(path), "seconds": float(timing.read_text()), "reused": True}
    return None


def _run(config: str, algorithm: str, seed: int, rounds: int | None, output: str) -> dict[str, Any]:
    """One run in a worker process; returns where it wrote and how long it took."""
    from fedmtl.results import RunDirectory
    from fedmtl.simulation import run_in_process

    experiment = _experiment(config, algorithm, seed, rounds)
    start = time.perf_counter()
    run_dir = run_in_process(experiment, RunDirectory.create(output, experiment))
    seconds = time.perf_counter() - start
    (run_dir.path / "wall_seconds.txt").write_text(f"{seconds:.3f}\n")
    return {"path": str(run_dir.path), "seconds": seconds}


def mechanism(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """First and last round of the algorithm's own per-round signals (server metrics)."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("server/") and isinstance(value, int | float):
                by_round.setdefault(int(row["round"]), {})[key.removeprefix("server/")] = value
    if not by_round:
        return {}
    out: dict[str, Any] = {}
    first, last = by_round[min(by_round)], by_round[max(by_round)]
    families = {
        "fedmuscle/align_loss": lambda k: k == "fedmuscle/align_loss",
        "fedmuscle/chance_loss": lambda k: k == "fedmuscle/chance_loss",
        "fedhenn/cka_distance_mean": lambda k: k == "fedhenn/cka_distance_mean",
        "cofed/agreement_mean": lambda k: k == "cofed/agreement_mean",
        "feddf/ensemble_spread": lambda k: k == "feddf/ensemble_spread",
        "mfed/distance (mean over task groups)": lambda k: k.startswith("mfed/distance/"),
        "fedhca2/alpha (mean over clients)": lambda k: k.startswith("fedhca2/alpha/"),
        "fedhca2/beta (mean)": lambda k: k.startswith("fedhca2/beta/"),
        "fedamp/encoder/xi_self_mean": lambda k: k == "fedamp/encoder/xi_self_mean",
        "fedamp/encoder/distance_mean (per parameter)": lambda k: (
            k == "fedamp/encoder/distance_mean"
        ),
        "matfl/clusters": lambda k: k == "matfl/clusters",
        "matfl/update_cosine_distance_mean": lambda k: k == "matfl/update_cosine_distance_mean",
        "fedavg_task/shared_groups": lambda k: k == "fedavg_task/shared_groups",
    }
    for name, match in families.items():
        values = [[v for k, v in r.items() if match(k)] for r in (first, last)]
        if values[0] and values[1]:
            out[name] = {
                "first_round": sum(values[0]) / len(values[0]),
                "last_round": sum(values[1]) / len(values[1]),
            }
    return out


def markdown(results: Mapping[str, Any]) -> str:
    """The README table: mean Δ% ± 95 % CI per algorithm (rows) and federation (columns)."""
    from fedmtl.compare import format_entry

    feds = list(results["federations"])
    algorithms: list[str] = []
    for fed in feds:  # measured ones, then those that apply but were not run
        for name in [*results["federations"][fed]["algorithms"], *FEDERATIONS[fed][1]]:
            if name not in algorithms:
                algorithms.append(name)
    lines = [
        "| algorithm | " + " | ".join(feds) + " |",
        "|---|" + "---|" * len(feds),
    ]
    for name in algorithms:
        cells = []
        for fed in feds:
            entry = results["federations"][fed]["algorithms"].get(name)
            if entry is None:  # "n/a": does not apply there; "not run": applies, not measured
                cells.append("not run" if name in FEDERATIONS[fed][1] else "n/a")
                continue
            delta = "reference" if name == "local" else format_entry(entry["mean_delta"])
            cells.append(f"{delta} ({entry['wall_seconds_mean']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = results["seeds"]
    lines.append("")
    lines.append(
        f"Mean Δ% vs local over client tasks (+ is better), mean ± 95 % t-interval over "
        f"{len(seeds)} seeds {seeds}, paired by seed; each run's metric is the mean of its last "
        f"{results['average_last_rounds']} evaluated rounds; * = the interval excludes 0; "
        "in brackets the mean wall time of one run (one CPU thread); n/a: the algorithm does not "
        "apply to that federation; not run: it applies but was not measured in this run."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federations", default=",".join(FEDERATIONS))
    parser.add_argument("--algorithms", help="restrict to these (comma-separated)")
    parser.add_argument("--seeds", default="3", help="a count (0..N-1) or a list like 0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--rounds", type=int, help="override rounds (smoke tests only)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "efficacy"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "efficacy.json"))
    args = parser.parse_args()

    from fedmtl.compare import comparison_stats, parse_seeds
    from fedmtl.config import load_experiment, with_algorithm
    from fedmtl.report import plot_runs, summarize
    from fedmtl.results import RunDirectory

    seeds = parse_seeds(args.seeds, 0)
    only = set(args.algorithms.split(",")) if args.algorithms else None
    plan: list[tuple[str, str, int]] = []
    for fed in args.federations.split(","):
        config, algorithms = FEDERATIONS[fed]
        for seed in seeds:
            plan += [(fed, a, seed) for a in algorithms if only is None or a in only]
    load_start = os.getloadavg()
    start = time.perf_counter()
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    for fed, algorithm, seed in plan:
        found = finished_run(
            _experiment(FEDERATIONS[fed][0], algorithm, seed, args.rounds), args.output
        )
        if found is not None:
            done[(fed, algorithm, seed)] = found
    todo = [key for key in plan if key not in done]
    print(f"{len(plan)} runs: {len(done)} finished before, {len(todo)} to run", flush=True)
    with ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_init_worker
    ) as pool:
        futures = {
            pool.submit(_run, FEDERATIONS[f][0], a, s, args.rounds, args.output): (f, a, s)
            for f, a, s in todo
        }
        for count, future in enumerate(as_completed(futures), 1):
            key = futures[future]
            done[key] = future.result()
            print(
                f"[{count}/{len(todo)}] {key[0]} {key[1]} seed {key[2]}: "
                f"{done[key]['seconds']:.0f} s (elapsed {time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    results: dict[str, Any] = {
        "seeds": seeds,
        "average_last_rounds": None,
        "engine": "in-process (fedmtl.simulation.run_in_process), one torch thread per run",
        "machine": {
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "wall_seconds": time.perf_counter() - start,
        },
        "federations": {},
    }
    for fed in dict.fromkeys(f for f, _, _ in plan):
        config, _ = FEDERATIONS[fed]
        experiment = load_experiment(ROOT / config)
        results["average_last_rounds"] = experiment.average_last_rounds
        names = [a for f, a, s in plan if f == fed and s == seeds[0]]
        runs = {a: {s: RunDirectory(done[(fed, a, s)]["path"]) for s in seeds} for a in names}
        summaries = {
            a: {
                s: summarize(run, runs["local"][s] if a != "local" else None)
                for s, run in by.items()
            }
            for a, by in runs.items()
        }
        stats = comparison_stats(summaries)
        plot = plot_runs(runs, Path(args.output) / f"{fed}.png")
        print(f"{fed}: curves in {plot}")
        entry: dict[str, Any] = {"config": config, "rounds": args.rounds or experiment.rounds}
        entry["algorithms"] = {
            a: {
                "hyperparameters": with_algorithm(experiment, a).algorithm.model_dump(mode="json"),
                "mean_delta": stats["algorithms"][a]["mean_delta"],
                "clients": stats["algorithms"][a]["clients"],
                "wall_seconds_mean": sum(done[(fed, a, s)]["seconds"] for s in seeds) / len(seeds),
                "mechanism_per_seed": [mechanism(runs[a][s].read_metrics()) for s in seeds],
            }
            for a in names
        }
        results["federations"][fed] = entry
    out = Path(args.json)
    if out.exists():  # keep the federations this invocation did not run
        previous = json.loads(out.read_text())
        if previous.get("seeds") == seeds:
            kept = {
                k: v for k, v in previous["federations"].items() if k not in results["federations"]
            }
            results["federations"] = {**kept, **results["federations"]}
            if todo:
                results["machine_previous"] = previous.get("machine")
            else:  # nothing ran: the machine block still describes the runs summarised
                results["machine"] = previous.get("machine")
                results["machine_previous"] = previous.get("machine_previous")
    results["federations"] = {
        f: results["federations"][f] for f in FEDERATIONS if f in results["federations"]
    }
    table = markdown(results)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
