"""Summaries, tables and plots of finished runs (``fedmtl report`` redraws them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType
from rich.table import Table

from fedmtl.config import Experiment
from fedmtl.results import RunDirectory, delta_table, final_metrics, find_reference_run
from fedmtl.tables import COMPACT, FittedTables, natural_width


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
    experiment: Experiment, rows: Sequence[Mapping[str, Any]], last_k: int | None = None
) -> dict[str, dict[str, tuple[float, bool]]]:
    """``client → task → (primary metric, higher_is_better)``: the mean of the last k rounds.

    ``last_k`` defaults to the experiment's ``average_last_rounds``.
    """
    finals = final_metrics(rows, last_k or experiment.average_last_rounds)
    out: dict[str, dict[str, tuple[float, bool]]] = {}
    for client, tasks in primary_metrics(experiment).items():
        for task, (metric, higher, _) in tasks.items():
            value = finals.get(client, {}).get(f"eval/{task}/{metric}", math.nan)
            out.setdefault(client, {})[task] = (float(value), higher)
    return out


def summarize(run: RunDirectory, reference: RunDirectory | None = None) -> dict[str, Any]:
    """Build and write summary.json: metric per client/task and Δ% vs local training.

    Each value is the mean of the run's last ``average_last_rounds`` evaluated rounds
    (``last_value`` is the newest round alone); the reference is averaged the same way.
    """
    experiment = run.experiment()
    rows = run.read_metrics()
    values = primary_values(experiment, rows)
    last_values = primary_values(experiment, rows, last_k=1)
    if reference is None and experiment.algorithm.name != "local":
        reference = find_reference_run(run)
    deltas: dict[str, dict[str, float]] = {}
    mean_delta = math.nan
    if reference is not None:
        ref_values = primary_values(
            reference.experiment(), reference.read_metrics(), experiment.average_last_rounds
        )
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
                    "last_value": last_values[cid][task][0],
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
        "average_last_rounds": experiment.average_last_rounds,
        "run_dir": str(run.path),
        "reference_run": str(reference.path) if reference is not None else None,
        "mean_delta_vs_local_pct": None if math.isnan(mean_delta) else mean_delta,
        "clients": clients,
    }
    previous = run.read_summary() if run.summary_path.exists() else None
    if previous is not None and "disk" in previous:
        # Measured once, when the run finished and its client state was tidied; summarising
        # again (the CLI's table, `fedmtl report`, compare) must not lose it.
        summary["disk"] = previous["disk"]
    run.write_summary(summary)
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


NAME_MAX = 32  # longer client/task names fold onto a second line instead of squeezing the rest


def name_column(table: Table, header: str, names: list[str]) -> None:
    """A column of client or task names: as wide as the longest (up to 32), folded beyond."""
    width = min(NAME_MAX, max([len(header), *(len(n) for n in names)]))
    table.add_column(header, min_width=width, overflow="fold")


def summary_table(summary: Mapping[str, Any]) -> FittedTables:
    """One row per client task: metric, value, Δ% vs local, model.

    Client and task names stay whole at any width down to 80 columns: when the model column
    does not fit, the models move to a legend under the table.
    """

    def build(console: Console, options: ConsoleOptions) -> list[RenderableType]:
        full = _summary_table(summary, with_model=True)
        if natural_width(console, options, full) <= options.max_width:
            return [full]
        return [_summary_table(summary, with_model=False)]

    return FittedTables(build)


def _summary_table(summary: Mapping[str, Any], *, with_model: bool) -> Table:
    table = Table(title=f"{summary['experiment']} · {summary['algorithm']}", **COMPACT)
    clients = summary["clients"]
    name_column(table, "client", list(clients))
    name_column(table, "task", [t for c in clients.values() for t in c["tasks"]])
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("Δ% vs local", justify="right", no_wrap=True)
    if with_model:
        table.add_column("model", no_wrap=True)
    for client_id, client in clients.items():
        for task, entry in client["tasks"].items():
            arrow = "↑" if entry["higher_is_better"] else "↓"
            delta = entry["delta_vs_local_pct"]
            cells = [
                client_id,
                task,
                f"{entry['metric']} {arrow}",
                _fmt(entry["value"]),
                "—" if delta is None else f"{delta:+.2f}",
            ]
            table.add_row(*cells, *([client["model"]] if with_model else []))
    mean = summary.get("mean_delta_vs_local_pct")
    k = summary.get("average_last_rounds", 1)
    caption = f"value: mean of the last {k} evaluated round(s); " + (
        f"mean Δ% vs local: {_fmt(mean)}" if mean is not None else "no local run to compare"
    )
    if not with_model:
        by_model: dict[str, list[str]] = {}
        for client_id, client in clients.items():
            by_model.setdefault(client["model"], []).append(client_id)
        caption += "\nmodels: " + "; ".join(f"{m} ({', '.join(c)})" for m, c in by_model.items())
    table.caption = caption
    return table


RunsBySeed = Mapping[str, "RunDirectory | Mapping[int, RunDirectory]"]
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _series(runs: Sequence[RunDirectory], client: str, key: str) -> dict[int, list[float]]:
    """``round → values over runs`` of ``key`` in the rows of ``client``."""
    out: dict[int, list[float]] = {}
    for run in runs:
        for row in run.read_metrics():
            if row["client_id"] == client and key in row and math.isfinite(float(row[key])):
                out.setdefault(int(row["round"]), []).append(float(row[key]))
    return out


def _draw(ax: Any, series: Mapping[int, list[float]], label: str, index: int) -> None:
    """A mean line over seeds with a min–max band when there are several seeds."""
    if not series:
        return
    xs = sorted(series)
    means = [sum(series[x]) / len(series[x]) for x in xs]
    style = {"linestyle": LINESTYLES[index % 4], "marker": MARKERS[index % len(MARKERS)]}
    # one colour per label on every panel, also where earlier labels have nothing to draw
    (line,) = ax.plot(xs, means, label=label, markersize=4, color=f"C{index % 10}", **style)
    if any(len(series[x]) > 1 for x in xs):
        low = [min(series[x]) for x in xs]
        high = [max(series[x]) for x in xs]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)


MECHANISM_FAMILIES = (
    ("server/fedmuscle/align_loss", "FedMuscle alignment loss (mean over clients)"),
    ("server/mfed/distance/", "M-Fed ‖w_group − g‖ (mean over task groups)"),
    ("server/mfed/lambda", "M-Fed λ"),
    ("server/fedhca2/alpha/", "FedHCA2 α (mean over clients)"),
    ("server/fedhca2/beta/", "FedHCA2 β (mean over clients and layers)"),
)


def mechanism_families(run: RunDirectory) -> list[tuple[str, str]]:
    """``(metrics key prefix, panel title)`` of the algorithm's own per-round signals in a run."""
    keys = {k for row in run.read_metrics() for k in row}
    return [(p, t) for p, t in MECHANISM_FAMILIES if any(k.startswith(p) for k in keys)]


def _family_series(runs: Sequence[RunDirectory], prefix: str) -> dict[int, list[float]]:
    """``round → per-run mean over every server key starting with prefix``."""
    out: dict[int, list[float]] = {}
    for run in runs:
        by_round: dict[int, list[float]] = {}
        for row in run.read_metrics():
            values = [float(v) for k, v in row.items() if k.startswith(prefix)]
            finite = [v for v in values if math.isfinite(v)]
            if finite and int(row["round"]) not in by_round:
                by_round[int(row["round"])] = finite
        for round_, values in by_round.items():
            out.setdefault(round_, []).append(sum(values) / len(values))
    return out


def plot_runs(runs: RunsBySeed, path: Path) -> Path:
    """PNG of each client task's primary metric per round, one line per algorithm.

    ``runs`` maps a label to a run folder, or to ``seed → run folder``: with several seeds the
    line is their mean and the band spans them. The algorithm's own signals (FedMuscle's
    alignment loss against its chance level, M-Fed's encoder distances, FedHCA2's α) get
    panels of their own. Each label has its own colour, line style and marker, so lines that
    coincide (FedPer and FedAvg without shared decoders) stay distinguishable; rounds are
    integer ticks.
    """
    import matplotlib.pyplot as plt

    fig = runs_figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def runs_figure(runs: RunsBySeed) -> Any:
    """The matplotlib figure :func:`plot_runs` saves (one panel per client task and signal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grouped = {
        label: list(value.values()) if isinstance(value, Mapping) else [value]
        for label, value in runs.items()
    }
    first = next(iter(grouped.values()))[0].experiment()
    meta = primary_metrics(first)
    panels: list[tuple[str | None, str, str]] = [
        (
            c,
            f"eval/{t}/{meta[c][t][0]}",
            f"{c}\n{t} ({meta[c][t][0]} {'↑' if meta[c][t][1] else '↓'})",
        )
        for c, tasks in meta.items()
        for t in tasks
    ]
    mechanism: dict[str, str] = {}
    for folders in grouped.values():
        mechanism.update(mechanism_families(folders[0]))
    panels += [(None, prefix, title) for prefix, title in mechanism.items()]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (client, key, title) in zip(axes.flat, panels):
        for index, (label, folders) in enumerate(grouped.items()):
            series = _series(folders, client, key) if client else _family_series(folders, key)
            _draw(ax, series, label, index)
        if key == "server/fedmuscle/align_loss":
            levels = [
                values[0]
                for folders in grouped.values()
                for values in _family_series(folders, "server/fedmuscle/chance_loss").values()
            ]
            if levels:
                ax.axhline(levels[0], color="grey", linestyle=":")
                ax.annotate("chance (M·log B)", (0.02, 0.92), xycoords="axes fraction", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def report(run_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Re-draw a finished run's summary, table and plot."""
    run = RunDirectory(run_dir)
    summary = summarize(run)
    plot_runs({summary["algorithm"]: run}, run.path / "metrics.png")
    (console or Console()).print(summary_table(summary))
    return summary
