"""Flower ServerApp: read the experiment from the run config, run its strategy's loop."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmtl.config import Experiment, load_experiment
from fedmtl.report import plot_runs, summarize
from fedmtl.results import RunDirectory
from fedmtl.strategies import FederatedLoop, create_strategy
from fedmtl.strategies.loop import Observer

log = logging.getLogger("fedmtl.server")


def run_experiment(
    grid: Grid,
    experiment: Experiment,
    run_dir: RunDirectory,
    *,
    resume: bool = False,
    observer: Observer | None = None,
    state_root: str | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> RunDirectory:
    """Run every round of ``experiment`` over ``grid``, then write summary.json and plots."""
    strategy = create_strategy(experiment)
    loop = FederatedLoop(
        grid,
        experiment,
        strategy,
        run_dir,
        observer=observer,
        state_root=state_root,
        run_config=run_config,
    )
    loop.run(resume=resume)
    summarize(run_dir)
    plot_runs({experiment.algorithm.name: run_dir}, run_dir.path / "metrics.png")
    return run_dir


def resolve_experiment_path(value: str) -> Path:
    """Find the experiment file: as given, else relative to the app directory (FAB on sys.path)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for entry in sys.path:
        candidate = Path(entry or ".") / path
        if candidate.exists():
            return candidate
    return path


def make_server_app(
    experiment: Experiment,
    run_dir: RunDirectory,
    *,
    resume: bool = False,
    observer: Observer | None = None,
) -> ServerApp:
    """A ServerApp bound to one experiment and run folder (``fedmtl simulate`` uses this)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_experiment(grid, experiment, run_dir, resume=resume, observer=observer)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``.

    Run config keys: ``experiment``, ``output-dir``, ``resume``, and FedMuscle's stream
    settings ``stream-address`` (``host[:port]`` clients connect to), ``stream-bind``,
    ``stream-port``, ``stream-certfile``, ``stream-keyfile``, ``stream-ca-certfile``.
    """
    config = context.run_config
    resume_dir = str(config.get("resume", "") or "")
    if resume_dir:
        run_dir = RunDirectory(resume_dir)
        experiment = run_dir.experiment()
    else:
        experiment = load_experiment(
            resolve_experiment_path(str(config.get("experiment", "configs/quickstart.toml")))
        )
        run_dir = RunDirectory.create(str(config.get("output-dir", "runs")), experiment)
    log.info("fedmtl run folder: %s", run_dir.path)
    run_experiment(grid, experiment, run_dir, resume=bool(resume_dir), run_config=config)
