"""How the quickstart's ViT-Tiny clients are trained, chosen on validation data only.

The quickstart promises that local training of every digit client reaches what its model can
on its data (local digit accuracy ≥ 0.85). This script compares training recipes for one
client at a time, trained locally as the quickstart runs it (a fresh optimiser per round,
``rounds`` rounds), scored on a held-out validation carve-out of the client's own train
partition (10 %, seeded; the carve-out M-Fed's switch uses). The test split is never read, so
the choice cannot be tuned to it. The score is the mean of the task's primary metric over the
last ``average_last_rounds`` rounds, per seed, as the efficacy benchmark reports test metrics.

    python benchmarks/quickstart_validation.py            # digit client, all recipes, 3 seeds
    python benchmarks/quickstart_validation.py --clients attrs-vit-tiny,seg-vit-tiny \
        --recipes current,regularised
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each recipe is a change to the client's entry in configs/quickstart.toml (model kwargs merged,
# training keys replaced). "current" is the file as it is.
RECIPES: dict[str, dict[str, Any]] = {
    "current": {},
    # DeiT-style regularisation for a from-scratch ViT on little data: stochastic depth and a
    # stronger decoupled weight decay.
    "regularised": {"kwargs": {"drop_path_rate": 0.1}, "training": {"weight_decay": 0.05}},
    # Three local epochs instead of two (more compute, same data).
    "epochs3": {"training": {"local_epochs": 3}},
    # Twice the depth (four blocks): more capacity, about twice the compute.
    "depth4": {"kwargs": {"depth": 4}},
}


def _experiment(client_id: str, recipe: str, seed: int) -> Any:
    """The quickstart experiment with ``recipe`` applied to client ``client_id``."""
    from fedmtl.config import load_experiment

    experiment = load_experiment(ROOT / "configs" / "quickstart.toml")
    change = RECIPES[recipe]
    clients = []
    for client in experiment.clients:
        if client.client_id == client_id:
            model = client.model.model_copy(
                update={"kwargs": {**client.model.kwargs, **change.get("kwargs", {})}}
            )
            training = client.training.model_copy(update=change.get("training", {}))
            client = client.model_copy(update={"model": model, "training": training})
        clients.append(client)
    return experiment.model_copy(update={"seed": seed, "clients": clients})


def run(client_id: str, recipe: str, seed: int, state_dir: Path) -> dict[str, Any]:
    """Train one client locally for the experiment's rounds; its validation score per round."""
    import torch

    from fedmtl.clients.mfed import validation_split
    from fedmtl.clients.session import ClientSession
    from fedmtl.clients.training import evaluate_model, train_epochs
    from fedmtl.seeding import derive_seed

    experiment = _experiment(client_id, recipe, seed)
    session = ClientSession(experiment, client_id, state_dir)
    train, validation = validation_split(session.split("train"), experiment.seed, client_id)
    (task,) = session.tasks  # the recipes are for single-task clients
    model = session.new_model()  # seeded by (experiment seed, client), as in a run
    curve: list[float] = []
    start = time.perf_counter()
    for round_ in range(1, experiment.rounds + 1):
        # Stochastic depth draws from torch's global RNG, seeded per round as the ClientApp does.
        torch.manual_seed(derive_seed(experiment.seed, client_id, round_, "validation-recipe"))
        train_epochs(
            model,
            session.batches(train, round_),
            session.tasks,
            session.client.training,
            session.device,
        )
        metrics, _, _ = evaluate_model(
            model, session.eval_batches(validation), session.tasks, session.device
        )
        curve.append(float(metrics[task.name][task.primary_metric]))
    k = experiment.average_last_rounds
    return {
        "client": client_id,
        "metric": f"{task.name}/{task.primary_metric}",
        "higher_is_better": task.higher_is_better,
        "recipe": recipe,
        "seed": seed,
        "train_samples": len(train),
        "validation_samples": len(validation),
        "validation_per_round": curve,
        "validation_last_k": sum(curve[-k:]) / k,
        "seconds": time.perf_counter() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="digit-vit-tiny")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--json", default=str(ROOT / "benchmarks" / "results" / "quickstart_validation.json")
    )
    args = parser.parse_args()

    import tempfile

    import torch

    torch.set_num_threads(1)
    clients = args.clients.split(",")
    recipes = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    load_start = os.getloadavg()
    results: list[dict[str, Any]] = []
    # Interleaved: every recipe once per seed before the next seed, so load drifts hit all alike.
    with tempfile.TemporaryDirectory() as tmp:
        for client_id in clients:
            for seed in seeds:
                for recipe in recipes:
                    row = run(client_id, recipe, seed, Path(tmp) / f"{client_id}-{recipe}-{seed}")
                    results.append(row)
                    print(
                        f"{client_id} {recipe:12s} seed {seed}: validation {row['metric']} "
                        f"(last rounds) {row['validation_last_k']:.4f}  ({row['seconds']:.0f} s)",
                        flush=True,
                    )
    out = Path(args.json)
    # One file for every client measured: a run for other clients keeps the earlier ones.
    document = json.loads(out.read_text()) if out.exists() else {"clients": {}}
    print("\n| client | metric | recipe | mean | per seed | seconds per run |")
    print("|---|---|---|---|---|---|")
    for client_id in clients:
        entry: dict[str, Any] = {"seeds": seeds, "recipes": {}}
        for recipe in recipes:
            rows = [r for r in results if r["client"] == client_id and r["recipe"] == recipe]
            values = [r["validation_last_k"] for r in rows]
            entry["metric"] = rows[0]["metric"]
            entry["higher_is_better"] = rows[0]["higher_is_better"]
            entry["recipes"][recipe] = {
                "change": RECIPES[recipe],
                "mean": statistics.fmean(values),
                "per_seed": values,
                "seconds_mean": statistics.fmean(r["seconds"] for r in rows),
                "runs": rows,
            }
            print(
                f"| {client_id} | {entry['metric']} | {recipe} | "
                f"{entry['recipes'][recipe]['mean']:.4f} | "
                f"{', '.join(f'{v:.3f}' for v in values)} | "
                f"{entry['recipes'][recipe]['seconds_mean']:.0f} |"
            )
        entry["machine"] = {
            "cpus": os.cpu_count(),
            "threads": 1,
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        }
        document["clients"][client_id] = entry
    document.update(
        config="configs/quickstart.toml",
        split="10 % validation carve-out of each client's train partition; test split unread",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
