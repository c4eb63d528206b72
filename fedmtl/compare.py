"""Comparing algorithms over several seeds: paired Δ% against local training, t-intervals.

``fedmtl compare CONFIG --algorithms local,fedavg --seeds 3`` runs every algorithm once per
seed. A seed fixes the partitions, the sample caps and every initialisation, so the runs of one
seed differ only in the algorithm; each algorithm's Δ% is computed against the local run *of
the same seed* (paired), and the table shows the mean over seeds with a 95 % t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType
from rich.table import Table

from fedmtl.config import ConfigError, Experiment, with_algorithm
from fedmtl.report import name_column
from fedmtl.tables import COMPACT, FittedTables

CONFIDENCE = 0.95


def parse_seeds(spec: str | None, base: int) -> list[int]:
    """Seeds from ``--seeds``: a count ``N`` (``base … base+N−1``) or a list ``0,1,2``.

    Parameters
    ----------
    spec : str or None
        The flag's value; ``None`` means the experiment's own seed only.
    base : int
        The experiment file's ``seed``.

    Raises
    ------
    ConfigError
        If the value is neither a positive count nor a comma-separated list of distinct ints.
    """
    if spec is None:
        return [base]
    text = spec.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return [base + i for i in range(count)]
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds: {spec!r} is neither a positive count nor a list like 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {spec!r} must list distinct seeds")
    return seeds


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t confidence interval of the mean.

    ``half = t_{(1+confidence)/2, n−1} · s / √n`` with ``s`` the sample standard deviation
    (``n − 1`` in the denominator). NaN values are dropped first.

    Returns
    -------
    mean, half_width
        ``half_width`` is NaN with fewer than two finite values.
    """
    from scipy import stats

    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return mean, float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)


def _entry(values: Sequence[float | None]) -> dict[str, Any]:
    numbers = [math.nan if v is None else float(v) for v in values]
    mean, half = t_interval(numbers)
    finite = not math.isnan(half)
    return {
        "per_seed": [None if math.isnan(v) else v for v in numbers],
        "mean": None if math.isnan(mean) else mean,
        "ci95": None if not finite else half,
        # an effect is marked only when its whole interval lies on one side of zero
        "significant": bool(finite and abs(mean) > half),
    }


def comparison_stats(
    summaries: Mapping[str, Mapping[int, Mapping[str, Any]]],
) -> dict[str, Any]:
    """Per algorithm: per client task value and Δ% over seeds, and the mean Δ%, with t-intervals.

    Parameters
    ----------
    summaries : mapping
        ``algorithm → seed → summary`` as written by :func:`fedmtl.report.summarize` (each
        non-local summary's Δ% taken against the local run of the same seed).

    Returns
    -------
    dict
        ``{"seeds": [...], "algorithms": {name: {"mean_delta": entry, "clients": {client:
        {task: {"value": entry, "delta": entry, "metric": ..., "higher_is_better": ...}}}}}}``
        where an ``entry`` holds ``per_seed``, ``mean``, ``ci95`` and ``significant``.
    """
    seeds = sorted({seed for runs in summaries.values() for seed in runs})
    out: dict[str, Any] = {"seeds": seeds, "confidence": CONFIDENCE, "algorithms": {}}
    for algorithm, runs in summaries.items():
        first = next(iter(runs.values()))
        clients: dict[str, Any] = {}
        for client_id, client in first["clients"].items():
            for task, meta in client["tasks"].items():
                cells = [runs[s]["clients"][client_id]["tasks"][task] for s in seeds if s in runs]
                clients.setdefault(client_id, {})[task] = {
                    "metric": meta["metric"],
                    "higher_is_better": meta["higher_is_better"],
                    "value": _entry([c["value"] for c in cells]),
                    "delta": _entry([c["delta_vs_local_pct"] for c in cells]),
                }
        out["algorithms"][algorithm] = {
            "mean_delta": _entry([runs[s].get("mean_delta_vs_local_pct") for s in seeds]),
            "clients": clients,
        }
    return out


def format_entry(entry: Mapping[str, Any], digits: int = 2, signed: bool = True) -> str:
    """``+3.10 ± 1.20*`` (``*``: the 95 % interval excludes 0), or the mean alone for one seed."""
    mean = entry.get("mean")
    if mean is None:
        return "—"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits + 2}g}"
    if entry.get("ci95") is not None:
        text += f" ± {entry['ci95']:.{digits}f}" if signed else f" ± {entry['ci95']:.2g}"
    return text + ("*" if signed and entry.get("significant") else "")


def stats_table(
    stats: Mapping[str, Any],
    last_k: int,
    title: str = "",
    algorithms: Sequence[str] | None = None,
    caption: bool = True,
    reference_column: bool = True,
) -> Table:
    """Rows: client tasks and the mean; columns: local's value, each algorithm's Δ% ± CI.

    ``algorithms`` limits the Δ% columns to those (default: every algorithm but local) and
    ``reference_column`` shows local's value; :func:`stats_tables` uses them to split a wide
    comparison over several tables.
    """
    names = list(stats["algorithms"])
    seeds = stats["seeds"]
    table = Table(title=title or "Δ% vs local (+ is better), mean ± 95 % CI over seeds", **COMPACT)
    first = stats["algorithms"][names[0]]["clients"]
    name_column(table, "client", [*first, "mean Δ%"])
    name_column(table, "task (metric)", [t for tasks in first.values() for t in tasks])
    others = [a for a in names if a != "local"] if algorithms is None else list(algorithms)
    reference = "local" if "local" in names and reference_column else None
    if reference:
        table.add_column("local value", justify="right", no_wrap=True)
    for algorithm in others:
        table.add_column(algorithm, justify="right", no_wrap=True)
    for client_id, tasks in first.items():
        for task, meta in tasks.items():
            arrow = "↑" if meta["higher_is_better"] else "↓"
            cells = []
            if reference:
                ref = stats["algorithms"][reference]["clients"][client_id][task]["value"]
                cells.append(format_entry(ref, signed=False))
            for algorithm in others:
                cell = stats["algorithms"][algorithm]["clients"][client_id][task]["delta"]
                cells.append(format_entry(cell))
            # the task name on its own line when the column is narrow: never cut
            table.add_row(client_id, f"{task} ({meta['metric']} {arrow})", *cells)
    means = [format_entry(stats["algorithms"][a]["mean_delta"]) for a in others]
    table.add_row("mean Δ%", "", *([""] if reference else []), *means, style="bold")
    if caption:
        table.caption = (
            f"{len(seeds)} seed(s) {seeds}; each run's metric is the mean of its last {last_k} "
            "evaluated rounds; Δ% paired with the local run of the same seed; "
            "* = the 95 % t-interval excludes 0"
        )
    return table


def stats_tables(stats: Mapping[str, Any], last_k: int, title: str = "") -> FittedTables:
    """:func:`stats_table` split over as many tables as the console width needs.

    Each table repeats the client and task columns (and local's value) and takes as many
    algorithm columns as fit; the caption goes under the last one.
    """
    names = list(stats["algorithms"])
    others = [a for a in names if a != "local"] if "local" in names else names

    def build(console: Console, options: ConsoleOptions) -> list[RenderableType]:
        # local's value only in the first table: the later ones have room for more columns
        groups: list[list[str]] = []
        for algorithm in others:
            if groups:
                first = len(groups) == 1
                wider = stats_table(stats, last_k, title, [*groups[-1], algorithm], False, first)
                if _minimum_width(wider) <= options.max_width:
                    groups[-1].append(algorithm)
                    continue
            groups.append([algorithm])
        groups = groups or [[]]
        return [
            stats_table(
                stats,
                last_k,
                title if i == 0 else f"{title or 'Δ% vs local'} (continued)",
                group,
                caption=i == len(groups) - 1,
                reference_column=i == 0,
            )
            for i, group in enumerate(groups)
        ]

    return FittedTables(build)


def _minimum_width(table: Table) -> int:
    """Columns ``table`` needs: one-line columns at their widest cell, the others at ``min_width``.

    (Rich's own measurement counts a one-line cell at its longest word; this table is printed
    with no cell cut, so that would under-count.)
    """
    widths = []
    for column in table.columns:
        if column.no_wrap:
            texts = [str(column.header), *(str(cell) for cell in column.cells)]
            widths.append(max(cell_len(text) for text in texts))
        else:
            widths.append(column.min_width or 1)
    # box.SIMPLE_HEAD with padding 1: a space each side of every cell, a separator between
    # columns and one at each edge
    return sum(widths) + 3 * len(widths) + 1


Runner = Callable[[Experiment], Any]


def run_comparison(
    experiment: Experiment,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    run: Runner,
    summarize: Callable[[Any, Any], dict[str, Any]],
    on_run: Callable[[str, int, Any], None] | None = None,
) -> tuple[dict[str, dict[int, Any]], dict[str, dict[int, dict[str, Any]]]]:
    """Run every algorithm once per seed, local first, and summarise each against its seed's local.

    Parameters
    ----------
    experiment : Experiment
        The experiment file (its ``seed`` is replaced by each seed in turn).
    algorithms : sequence of str
        Algorithm names, each with its ``[hyperparameters.<name>]`` (see
        :func:`fedmtl.config.with_algorithm`).
    seeds : sequence of int
        One full comparison per seed.
    run : callable
        ``run(experiment) → run folder``.
    summarize : callable
        ``summarize(run_folder, reference_or_None) → summary`` (writes summary.json).
    on_run : callable, optional
        Called as ``on_run(algorithm, seed, run_folder)`` after each run.

    Returns
    -------
    runs, summaries
        ``algorithm → seed → run folder`` and ``algorithm → seed → summary``.
    """
    order = (
        ["local", *[a for a in algorithms if a != "local"]]
        if "local" in algorithms
        else list(algorithms)
    )
    # Resolve every algorithm's hyper-parameters before anything runs: a typo fails in seconds.
    resolved = {name: with_algorithm(experiment, name) for name in order}
    runs: dict[str, dict[int, Any]] = {name: {} for name in order}
    summaries: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in order}
    for seed in seeds:
        for name in order:
            folder = run(resolved[name].model_copy(update={"seed": seed}))
            runs[name][seed] = folder
            reference = runs["local"][seed] if name != "local" and "local" in runs else None
            summaries[name][seed] = summarize(folder, reference)
            if on_run is not None:
                on_run(name, seed, folder)
    return runs, summaries
