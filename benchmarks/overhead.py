"""Framework overhead: fedmtl through Flower's simulation engine vs a plain PyTorch loop.

Both run the same quickstart clients, the same local training (same code path for the maths:
``train_epochs``) and the same FedAvg aggregation. (a) goes through ``fedmtl simulate``
(Ray actors, Flower messages, serialisation, validation, checkpoints); (b) is one process that
loops over clients and averages in memory. The steady-state ratio excludes start-up: it is
the median per-round wall time of rounds 2..R of (a) over the same of (b).

Usage::

    python benchmarks/overhead.py --rounds 4 [--config configs/quickstart.toml]

Prints a table and writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedmtl.aggregation.fedavg import weighted_average
from fedmtl.clients.session import ClientSession
from fedmtl.clients.training import train_epochs
from fedmtl.config import Experiment, load_experiment
from fedmtl.messages import TensorSpec
from fedmtl.models.multitask import load_tensors, shared_parameters
from fedmtl.results import RunDirectory
from fedmtl.strategies.base import ClientInfo

ROOT = Path(__file__).resolve().parents[1]


def _portable(path: str | Path) -> str:
    """``path`` as a result file records it: relative to the repository, never absolute."""
    full = Path(path).resolve()
    return full.relative_to(ROOT).as_posix() if full.is_relative_to(ROOT) else full.name


class RoundTimer:
    """Observer recording the wall-clock end of every round."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = time.perf_counter()

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        self.start = time.perf_counter()

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        pass

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        self.ends.append(time.perf_counter())


def run_flower(experiment: Experiment, out: Path) -> list[float]:
    from fedmtl.simulation import simulate

    timer = RoundTimer()
    run_dir = RunDirectory.create(out, experiment)
    simulate(experiment, run_dir, observer=timer)
    edges = [timer.start, *timer.ends]
    return [b - a for a, b in itertools.pairwise(edges)]


def run_plain(experiment: Experiment, out: Path) -> list[float]:
    """Same clients, same training and evaluation maths, no Flower: one process, in memory."""
    torch.set_num_threads(experiment.simulation.num_cpus_per_client)
    sessions = [
        ClientSession(experiment, c.client_id, out / "plain" / c.client_id)
        for c in experiment.clients
    ]
    models = {s.client_id: s.new_model() for s in sessions}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    shares = ("encoder", "decoders")
    infos = {}
    for s in sessions:
        specs = {
            k: TensorSpec.of(v) for k, v in shared_parameters(models[s.client_id], shares).items()
        }
        infos[s.client_id] = ClientInfo(
            s.client_id,
            0,
            s.client.dataset,
            list(s.client.tasks),
            len(s.split("train")),
            len(s.split("test")),
            specs,
        )
    from fedmtl.clients.training import evaluate_model

    times = []
    for round_ in range(1, experiment.rounds + 1):
        start = time.perf_counter()
        members: dict[str, list[tuple[dict[str, torch.Tensor], float]]] = {}
        for s in sessions:
            model, info = models[s.client_id], infos[s.client_id]
            received = {}
            for group in info.group_specs(shares):
                received.update(groups.get(info.group_key(group), {}))
            if received:
                load_tensors(model, received)
            train_epochs(model, s.batches("train", round_), s.tasks, s.client.training, s.device)
            shared = shared_parameters(model, shares)
            for group, specs in info.group_specs(shares).items():
                members.setdefault(info.group_key(group), []).append(
                    ({k: shared[k].clone() for k in specs}, float(len(s.split("train"))))
                )
        for key, entries in members.items():
            groups[key] = weighted_average([t for t, _ in entries], [w for _, w in entries])
        for s in sessions:
            evaluate_model(models[s.client_id], s.eval_batches(), s.tasks, s.device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.toml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        os.environ.setdefault(key, "0" if "TELEMETRY" in key else "1")
    # A generous phase timeout: with one actor the clients train one after another, and a
    # client left out by a timeout would change the work being compared.
    experiment = load_experiment(args.config).model_copy(
        update={"rounds": args.rounds, "round_timeout": 7200.0}
    )
    # One client at a time in both modes, so the comparison is of framework cost, not of
    # parallelism: Flower runs one actor with all cores, the plain loop uses all cores too.
    cpus = os.cpu_count() or 1
    experiment = experiment.model_copy(
        update={
            "simulation": experiment.simulation.model_copy(update={"num_cpus_per_client": cpus})
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        flower = run_flower(experiment, Path(tmp) / "flower")
        plain = run_plain(experiment, Path(tmp))
    steady_flower = statistics.median(flower[1:])
    steady_plain = statistics.median(plain[1:])
    result = {
        "config": _portable(args.config),
        "rounds": args.rounds,
        "clients": len(experiment.clients),
        "cpus": cpus,
        "flower_round_seconds": flower,
        "plain_round_seconds": plain,
        "flower_steady_median_s": steady_flower,
        "plain_steady_median_s": steady_plain,
        "ratio": steady_flower / steady_plain,
        "target": 1.3,
    }
    print(f"{'round':>6} {'flower s':>10} {'plain s':>10}")
    for i, (a, b) in enumerate(zip(flower, plain), start=1):
        print(f"{i:>6} {a:>10.2f} {b:>10.2f}")
    print(
        f"steady-state ratio (rounds 2..{args.rounds}, median): {result['ratio']:.3f} "
        f"(target ≤ 1.3)"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
