"""Summaries, tables and plots of finished runs (``fedmtl report`` redraws them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmtl.config import Experiment
from fedmtl.results import RunDirectory, delta_table, final_metrics, find_reference_run


def primary_metrics(experiment: Experiment) -> dict[str, dict[str, tuple[str, bool, str]]]:
    """``client → task → (primary metric, higher_is_better, task kind)``."""
    from fedmtl.data import dataset_task_table
    from fedmtl.tasks import TASK_REGISTRY

    out: dict[str, dict[str, tuple[str, bool, str]]] = {}
    for client in experiment.clients:
        dataset = experiment.datasets[client.dataset]
        table = dataset_task_table(dataset.kind, **dataset.options)
        for task in client.tasks:
            cls = TASK_REGISTRY[table[task].kind]
            out.setdefault(client.client_id, {})[task] = (
                cls.primary_metric,
                cls.higher_is_better,
                table[task].kind,
            )
    return out


def primary_values(
    experiment: Experiment, rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, tuple[float, bool]]]:
    """``client → task → (final primary metric, higher_is_better)`` from metrics rows."""
    finals = final_metrics(rows)
    out: dict[str, dict[str, tuple[float, bool]]] = {}
    for client, tasks in primary_metrics(experiment).items():
        for task, (metric, higher, _) in tasks.items():
            value = finals.get(client, {}).get(f"eval/{task}/{metric}", math.nan)
            out.setdefault(client, {})[task] = (float(value), higher)
    return out


def summarize(run: RunDirectory, reference: RunDirectory | None = None) -> dict[str, Any]:
    """Build and write summary.json: final metric per client/task and Δ% vs local training."""
    experiment = run.experiment()
    rows = run.read_metrics()
    values = primary_values(experiment, rows)
    if reference is None and experiment.algorithm.name != "local":
        reference = find_reference_run(run)
    deltas: dict[str, dict[str, float]] = {}
    mean_delta = math.nan
    if reference is not None:
        ref_values = primary_values(reference.experiment(), reference.read_metrics())
        deltas, mean_delta = delta_table(values, ref_values)
    elif experiment.algorithm.name == "local":
        deltas, mean_delta = delta_table(values, values)
    meta = primary_metrics(experiment)
    traffic: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = traffic.setdefault(row["client_id"], {"bytes_up": 0, "bytes_down": 0})
        entry["bytes_up"] += int(row.get("bytes_up", 0))
        entry["bytes_down"] += int(row.get("bytes_down", 0))
    clients: dict[str, Any] = {}
    for client in experiment.clients:
        cid = client.client_id
        clients[cid] = {
            "model": client.model.backbone,
            "dataset": client.dataset,
            "tasks": {
                task: {
                    "kind": meta[cid][task][2],
                    "metric": meta[cid][task][0],
                    "higher_is_better": meta[cid][task][1],
                    "value": values[cid][task][0],
                    "delta_vs_local_pct": deltas.get(cid, {}).get(task),
                }
                for task in client.tasks
            },
            **traffic.get(cid, {"bytes_up": 0, "bytes_down": 0}),
        }
    summary = {
        "experiment": experiment.name,
        "algorithm": experiment.algorithm.name,
        "seed": experiment.seed,
        "rounds": experiment.rounds,
        "run_dir": str(run.path),
        "reference_run": str(reference.path) if reference is not None else None,
        "mean_delta_vs_local_pct": None if math.isnan(mean_delta) else mean_delta,
        "clients": clients,
    }
    run.write_summary(summary)
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def summary_table(summary: Mapping[str, Any]) -> Table:
    """One row per client task: model, metric, value, Δ% vs local."""
    table = Table(title=f"{summary['experiment']} · {summary['algorithm']}")
    for column in ("client", "task", "model", "metric", "value", "Δ% vs local"):
        table.add_column(column, justify="right" if column in ("value", "Δ% vs local") else "left")
    for client_id, client in summary["clients"].items():
        for task, entry in client["tasks"].items():
            arrow = "↑" if entry["higher_is_better"] else "↓"
            delta = entry["delta_vs_local_pct"]
            table.add_row(
                client_id,
                f"{task} ({entry['kind']})",
                client["model"],
                f"{entry['metric']} {arrow}",
                _fmt(entry["value"]),
                "—" if delta is None else f"{delta:+.2f}",
            )
    mean = summary.get("mean_delta_vs_local_pct")
    table.caption = (
        f"mean Δ% vs local: {_fmt(mean)}" if mean is not None else "no local run to compare"
    )
    return table


def compare_table(summaries: Mapping[str, Mapping[str, Any]]) -> Table:
    """Δ% vs local per client task (rows) and algorithm (columns), with the mean."""
    algorithms = list(summaries)
    table = Table(title="Δ% vs local (sign: + is better)")
    table.add_column("client")
    table.add_column("task")
    for algorithm in algorithms:
        table.add_column(algorithm, justify="right")
    first = next(iter(summaries.values()))
    for client_id, client in first["clients"].items():
        for task in client["tasks"]:
            cells = []
            for algorithm in algorithms:
                entry = summaries[algorithm]["clients"][client_id]["tasks"][task]
                delta = entry["delta_vs_local_pct"]
                value = _fmt(entry["value"])
                cells.append(value if delta is None else f"{value} ({delta:+.2f})")
            table.add_row(client_id, task, *cells)
    means = []
    for algorithm in algorithms:
        mean = summaries[algorithm].get("mean_delta_vs_local_pct")
        means.append("—" if mean is None else f"{mean:+.2f}")
    table.add_row("mean Δ%", "", *means, style="bold")
    return table


def plot_runs(runs: Mapping[str, RunDirectory], path: Path) -> Path:
    """PNG of each client task's primary metric per round, one line per run (algorithm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs.values())).experiment()
    meta = primary_metrics(first)
    panels = [(c, t) for c, tasks in meta.items() for t in tasks]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (client, task) in zip(axes.flat, panels):
        metric, higher, _ = meta[client][task]
        for label, run in runs.items():
            points = [
                (int(r["round"]), float(r[f"eval/{task}/{metric}"]))
                for r in run.read_metrics()
                if r["client_id"] == client and f"eval/{task}/{metric}" in r
            ]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(f"{client}\n{task}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} {'↑' if higher else '↓'}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Re-draw a finished run's summary, table and plot."""
    run = RunDirectory(run_dir)
    summary = summarize(run)
    plot_runs({summary["algorithm"]: run}, run.path / "metrics.png")
    (console or Console()).print(summary_table(summary))
    return summary
