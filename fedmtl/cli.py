"""The ``fedmtl`` command: simulate, compare, validate, report, list."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmtl.config import (
    ALGORITHM_NAMES,
    TRACKER_NAMES,
    ConfigError,
    Experiment,
    check_ray_address,
    load_experiment,
    resolve_experiment,
    with_algorithm,
    with_tracking,
)

console = Console()
EXIT_BAD_INPUT = 2
EXIT_CLIENT_FAILED = 1  # the run finished, but a client never completed a round
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class RichObserver:
    """Round progress bar plus one status line per phase."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.task: Any = None

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Create the round bar."""
        self.task = self.progress.add_task(
            f"{self.label} round {first_round}/{experiment.rounds}",
            total=experiment.rounds,
            completed=first_round - 1,
        )

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Show the phase that just ended."""
        self.progress.update(
            self.task, description=f"{self.label} round {round_}: {phase} {done}/{total}"
        )

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Advance the bar; print each failed client with the first line of its error."""
        failed = [r for r in rows if r.get("status") == "failed"]
        note = f" ({len(failed)} left out)" if failed else ""
        for row in failed:
            self.progress.console.print(
                f"[yellow]round {round_}[/yellow]: {escape(str(row['client_id']))} left out: "
                f"{escape(str(row.get('error', '')))}"
            )
        self.progress.update(
            self.task, completed=round_, description=f"{self.label} round {round_} done{note}"
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )


def _positive_int(text: str) -> int:
    """Parse ``--rounds``: an int >= 1 (argparse exits 2 naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ray_address(text: str) -> str:
    """Parse ``--ray-address``: a cluster's address, or ``local`` (argparse exits 2 naming it)."""
    if text == "local":
        return text
    try:
        return check_ray_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _with_cluster(experiment: Experiment, args: argparse.Namespace) -> Experiment:
    """``[simulation]`` with ``--ray-address`` and ``--state-root`` applied.

    ``--ray-address local`` drops the file's address (a private Ray instance). The in-process
    engine runs no Ray: a file's address means nothing there and is dropped, said so.
    """
    updates: dict[str, Any] = {}
    if args.ray_address is not None:
        updates["ray_address"] = None if args.ray_address == "local" else args.ray_address
    if getattr(args, "state_root", None) is not None:
        updates["state_root"] = args.state_root
    if args.engine == "inprocess" and experiment.simulation.ray_address is not None:
        console.print(
            f"note: --engine inprocess runs no Ray; simulation.ray_address "
            f"{escape(experiment.simulation.ray_address)} is not used"
        )
        updates["ray_address"] = None
    if not updates:
        return experiment
    simulation = experiment.simulation.model_copy(update=updates)
    return experiment.model_copy(update={"simulation": simulation})


_printed: set[str] = set()  # a comparison connects once per run: say each thing once


def _say_once(line: str | None) -> None:
    if line is not None and line not in _printed:
        _printed.add(line)
        console.print(escape(line), soft_wrap=True)


def report_failures(experiment: Experiment, run_dir: Any) -> int:
    """Print the clients that failed a round; the exit code (1 if one never completed one)."""
    from fedmtl.results import client_failures

    failures = client_failures(experiment, run_dir.read_metrics())
    if not failures:
        return 0
    table = Table(title="clients that failed")
    for column in ("client", "failed rounds", "first error"):
        table.add_column(column)
    for client_id, entry in failures.items():
        rounds = ", ".join(str(r) for r in entry["failed_rounds"]) or "all"
        table.add_row(client_id, rounds, escape(entry["first_error"]))
    console.print(table)
    never = [c for c, entry in failures.items() if not entry["completed"]]
    if never:
        console.print(f"[red]error[/red]: never completed a round: {', '.join(never)}")
        return EXIT_CLIENT_FAILED
    return 0


def _print_reference(summary: dict[str, Any]) -> None:
    if summary.get("algorithm") == "local":
        return
    reference = summary.get("reference_run")
    console.print(
        f"Δ% reference: {reference}"
        if reference
        else "Δ% reference: none (no finished local run with the same clients, data, seed and "
        "rounds)"
    )


def _run_one(
    experiment: Experiment,
    output: str,
    resume_dir: str | None = None,
    label: str = "",
    engine: str = "ray",
) -> Any:
    from fedmtl.results import RunDirectory
    from fedmtl.simulation import connect, run_in_process, simulate

    resume = resume_dir is not None
    if engine != "ray":
        run_dir = (
            RunDirectory(resume_dir) if resume_dir else RunDirectory.create(output, experiment)
        )
        with _progress() as progress:
            observer = RichObserver(progress, label or experiment.algorithm.name)
            run_in_process(experiment, run_dir, resume=resume, observer=observer)
        return run_dir
    # Ray first: a cluster that cannot run the experiment is refused before the run folder.
    connection = connect(experiment)
    cluster = connection.address is not None
    for line in connection.lines() if cluster else []:
        _say_once(line)
    try:
        run_dir = (
            RunDirectory(resume_dir) if resume_dir else RunDirectory.create(output, experiment)
        )
    except BaseException:
        connection.close()
        raise
    with _progress() as progress:
        observer = RichObserver(progress, label or experiment.algorithm.name)
        simulate(experiment, run_dir, resume=resume, observer=observer, connection=connection)
    if cluster:
        _say_once(connection.placement_line())
    return run_dir


def _tracking(experiment: Experiment, args: argparse.Namespace) -> Experiment:
    """The experiment with the trackers of ``--track``, ``--mlflow-uri``, ``--wandb-mode``."""
    names = [n.strip() for value in args.track or [] for n in value.split(",") if n.strip()]
    return with_tracking(experiment, names, mlflow_uri=args.mlflow_uri, wandb_mode=args.wandb_mode)


def _print_tracking(run_dirs: Sequence[Any]) -> None:
    """Where the trackers wrote (each distinct line once: a comparison shares one store)."""
    from fedmtl.tracking import read_state

    seen: list[str] = []
    for run_dir in run_dirs:
        for line in read_state(run_dir).get("where", {}).get("lines", []):
            # the run id differs between the runs of a comparison; the command does not
            short = line.split("  (")[0] if len(run_dirs) > 1 else line
            if short not in seen:
                seen.append(short)
    for line in seen:
        # soft_wrap: a command with a long path stays one line, to copy and paste
        console.print(f"tracking: {escape(line)}", soft_wrap=True)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the algorithms, task kinds, backbones, dataset kinds and bundled configs."""
    from fedmtl.listing import SECTIONS, catalog

    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"list: unknown section {unknown}; known: {list(SECTIONS)}")
    entries = catalog()
    for section in args.sections or SECTIONS:
        table = Table(title=section, title_justify="left", show_header=False, box=None)
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("description")
        for name, description in entries[section]:
            table.add_row(name, escape(description))
        console.print(table)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run one experiment in Flower's simulation engine."""
    from fedmtl.preflight import preflight
    from fedmtl.report import summarize, summary_table
    from fedmtl.results import RunDirectory

    start = time.perf_counter()
    if args.resume:
        run = RunDirectory(args.resume)
        experiment = _with_cluster(run.experiment(), args)
        preflight(experiment)
        run_dir = _run_one(
            experiment, str(run.path.parent.parent), resume_dir=args.resume, engine=args.engine
        )
    else:
        experiment = load_experiment(resolve_experiment(args.config))
        if args.algorithm:
            experiment = with_algorithm(experiment, args.algorithm)
        if args.rounds is not None:
            experiment = experiment.model_copy(update={"rounds": args.rounds})
        experiment = _with_cluster(_tracking(experiment, args), args)
        preflight(experiment)  # before the run folder exists: a bad file leaves nothing behind
        run_dir = _run_one(experiment, args.output or experiment.output_dir, engine=args.engine)
    summary = summarize(run_dir)
    console.print(summary_table(summary))
    _print_reference(summary)
    _print_tracking([run_dir])
    code = report_failures(experiment, run_dir)
    console.print(f"run folder: [bold]{run_dir.path}[/bold]  ({time.perf_counter() - start:.1f} s)")
    return code


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several algorithms on the same clients, once per seed; print the Δ% ± CI table."""
    import json

    from fedmtl.compare import comparison_stats, parse_seeds, run_comparison, stats_tables
    from fedmtl.preflight import preflight
    from fedmtl.report import plot_runs, summarize

    experiment = load_experiment(resolve_experiment(args.config))
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHM_NAMES]
    if unknown:
        raise ConfigError(f"--algorithms: unknown {unknown}; known: {list(ALGORITHM_NAMES)}")
    seeds = parse_seeds(args.seeds, experiment.seed)
    updates: dict[str, Any] = {}
    if args.rounds is not None:
        updates["rounds"] = args.rounds
    if args.last_k is not None:
        updates["average_last_rounds"] = args.last_k
    experiment = _with_cluster(_tracking(experiment.model_copy(update=updates), args), args)
    # Every algorithm's experiment is checked before the first one runs.
    preflight(experiment, variants=[with_algorithm(experiment, name) for name in algorithms])
    output = args.output or experiment.output_dir
    runs, summaries = run_comparison(
        experiment,
        algorithms,
        seeds,
        run=lambda exp: _run_one(
            exp, output, label=f"{exp.algorithm.name} seed {exp.seed}", engine=args.engine
        ),
        summarize=summarize,
    )
    stats = comparison_stats(summaries)
    compare_dir = Path(output) / experiment.name / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    compare_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_runs(runs, compare_dir / "compare.png")
    record = {
        "experiment": experiment.name,
        "algorithms": list(runs),
        "average_last_rounds": experiment.average_last_rounds,
        "stats": stats,
        "runs": {
            name: {str(s): str(r.path) for s, r in by_seed.items()}
            for name, by_seed in runs.items()
        },
        "summaries": {
            name: {str(s): v for s, v in by_seed.items()} for name, by_seed in summaries.items()
        },
    }
    (compare_dir / "summary.json").write_text(json.dumps(record, indent=2, allow_nan=True))
    console.print(stats_tables(stats, experiment.average_last_rounds))
    console.print(
        f"plot: [bold]{plot}[/bold]\ncomparison: [bold]{compare_dir / 'summary.json'}[/bold]"
    )
    _print_tracking([run for by_seed in runs.values() for run in by_seed.values()])
    # Never exit 0 when a client of one of the runs never completed a round.
    return max(
        (
            report_failures(run.experiment(), run)
            for by_seed in runs.values()
            for run in by_seed.values()
        ),
        default=0,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate an experiment file and what it needs on this machine (models, data, devices)."""
    from fedmtl.preflight import preflight

    experiment = load_experiment(resolve_experiment(args.config))
    variants = [with_algorithm(experiment, name) for name in experiment.hyperparameters]
    preflight(experiment, variants=variants)
    console.print(
        f"[green]ok[/green]: {experiment.name}: {len(experiment.clients)} clients, "
        f"algorithm {experiment.algorithm.name}, {experiment.rounds} rounds"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-draw the table and plots of a finished run."""
    from fedmtl.report import report
    from fedmtl.results import RunDirectory

    if not (Path(args.run_dir) / "config.json").is_file():
        raise ConfigError(f"{args.run_dir}: not a fedmtl run folder (no config.json)")
    summary = report(args.run_dir, console)
    _print_reference(summary)
    run = RunDirectory(args.run_dir)
    report_failures(run.experiment(), run)  # shown again; the run's outcome is not report's
    console.print(f"plot: {Path(args.run_dir) / 'metrics.png'}")
    return 0


def _add_engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("ray", "inprocess"),
        default="ray",
        help="ray: Flower's simulation engine, clients in parallel actors (default); "
        "inprocess: the same apps and messages, clients one by one in this process (no start-up)",
    )
    parser.add_argument(
        "--ray-address",
        type=_ray_address,
        metavar="ADDRESS",
        help="run on an existing Ray cluster: auto (the one `ray start` started here), "
        "HOST:PORT or ray://HOST:PORT; fedmtl neither starts nor stops it. local: a private "
        "Ray instance (default, or overrides the file's simulation.ray_address)",
    )
    parser.add_argument(
        "--state-root",
        metavar="DIR",
        help="clients' personal state under DIR/<experiment>/<run folder name>/ instead of "
        "<run folder>/clients (on a multi-node cluster: a path every node mounts)",
    )


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--track",
        action="append",
        metavar="NAME[,NAME]",
        help=f"turn on trackers besides the file's [tracking]: {', '.join(TRACKER_NAMES)} "
        "(each needs its extra, e.g. pip install 'fedmtl[tensorboard]')",
    )
    parser.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow tracking URI (turns MLflow on; default sqlite:///<output>/mlflow.db)",
    )
    parser.add_argument(
        "--wandb-mode",
        choices=("auto", "offline", "online"),
        help="W&B mode (turns W&B on); auto: online only when logged in",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from fedmtl import __version__

    try:
        flwr = version("flwr")
    except PackageNotFoundError:  # pragma: no cover - flwr is a dependency
        flwr = "not installed"
    return f"fedmtl {__version__} (Flower {flwr}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedmtl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run an experiment in Flower's simulation engine")
    sim.add_argument("config", nargs="?", help="experiment TOML file")
    sim.add_argument("--output", help="output directory (default: the file's output_dir)")
    sim.add_argument("--algorithm", choices=ALGORITHM_NAMES, help="override algorithm.name")
    sim.add_argument("--rounds", type=_positive_int, help="override rounds (>= 1)")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    _add_engine(sim)
    _add_tracking(sim)
    sim.set_defaults(func=cmd_simulate)

    cmp = sub.add_parser("compare", help="run several algorithms; Δ%% table and plot")
    cmp.add_argument("config", help="experiment TOML file")
    cmp.add_argument("--algorithms", default="local,fedavg", help="comma-separated names")
    cmp.add_argument("--output", help="output directory")
    cmp.add_argument(
        "--seeds",
        help="a count N (the file's seed and the N-1 after it) or a list like 0,1,2; "
        "every algorithm runs once per seed on that seed's partitions and initialisation",
    )
    cmp.add_argument("--rounds", type=_positive_int, help="override rounds (>= 1)")
    cmp.add_argument(
        "--last-k",
        type=_positive_int,
        help="report each run's metric as the mean of its last K evaluated rounds "
        "(default: the file's average_last_rounds, 3)",
    )
    _add_engine(cmp)
    _add_tracking(cmp)
    cmp.set_defaults(func=cmd_compare)

    val = sub.add_parser("validate", help="check an experiment file (exit 2 if invalid)")
    val.add_argument("config")
    val.set_defaults(func=cmd_validate)

    rep = sub.add_parser("report", help="re-draw a finished run's table and plots")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    lst = sub.add_parser(
        "list", help="the algorithms, task kinds, backbones, dataset kinds and bundled configs"
    )
    lst.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help="algorithms, tasks, backbones, datasets or configs (default: all)",
    )
    lst.set_defaults(func=cmd_list)

    from fedmtl.deploy.cli import add_deploy_parser

    add_deploy_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "simulate" and not (args.config or args.resume):
        parser.error("simulate needs CONFIG or --resume RUN_DIR")
    if (
        args.command == "simulate"
        and args.resume
        and (args.track or args.mlflow_uri or args.wandb_mode)
    ):
        parser.error("--track/--mlflow-uri/--wandb-mode: a resumed run keeps its own tracking")
    if args.command == "simulate" and args.resume and args.state_root is not None:
        parser.error("--state-root: a resumed run keeps its own (its clients' state is there)")
    if args.command in ("simulate", "compare") and args.engine == "inprocess" and args.ray_address:
        parser.error("--ray-address: the in-process engine runs no Ray (use --engine ray)")
    from fedmtl.strategies.loop import FederationFailed, RunInterrupted

    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]error[/red]: {escape(str(exc))}")
        return EXIT_BAD_INPUT
    except FederationFailed as exc:
        console.print(f"[red]error[/red]: {escape(str(exc))}")
        return EXIT_CLIENT_FAILED
    except RunInterrupted as exc:
        run = str(exc)
        console.print(
            f"\n[yellow]interrupted[/yellow]: run folder [bold]{escape(run)}[/bold]\n"
            f"resume with: fedmtl simulate --resume {escape(run)}"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Flower's worker threads may still wait on Ray futures that the shutdown cancelled;
        # interpreter exit would join them forever. Files are written and Ray is down: leave.
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
