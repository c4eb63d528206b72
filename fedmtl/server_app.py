"""Flower ServerApp: read the experiment from the run config, run its strategy's loop."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmtl.clients.state import StateStore
from fedmtl.config import Experiment, load_experiment, resolve_experiment
from fedmtl.preflight import check_models
from fedmtl.report import plot_runs, summarize
from fedmtl.results import RunDirectory, client_failures
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
    stop: threading.Event | None = None,
) -> RunDirectory:
    """Run every round of ``experiment`` over ``grid``, then write summary.json and plots.

    ``stop`` (set on Ctrl-C) ends the run with :class:`~fedmtl.strategies.loop.RunInterrupted`.
    """
    strategy = create_strategy(experiment)
    loop = FederatedLoop(
        grid,
        experiment,
        strategy,
        run_dir,
        observer=observer,
        state_root=state_root,
        run_config=run_config,
        stop=stop,
    )
    loop.run(resume=resume)
    summary = summarize(run_dir)
    plot_runs({experiment.algorithm.name: run_dir}, run_dir.path / "metrics.png")
    disk = tidy_client_state(run_dir, keep=experiment.state.keep)
    run_dir.write_summary({**summary, "disk": disk})
    return run_dir


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tidy_client_state(run_dir: RunDirectory, *, keep: bool) -> dict[str, int]:
    """After a finished run: measure the run folder, then drop or prune ``<run>/clients/``.

    The last round is checkpointed, so no resume can need a client's older versions: with
    ``keep`` each client keeps only its newest; without, the folder goes (simulation; a
    deployed node keeps its state under its own ``state-dir``, which is not this folder).

    Returns
    -------
    dict
        ``run_bytes`` (the whole folder at the end of the run), ``client_state_bytes`` and
        ``checkpoint_bytes`` (its parts), and ``kept_bytes`` (the folder afterwards).
    """
    clients = run_dir.clients_dir
    disk = {
        "run_bytes": folder_bytes(run_dir.path),
        "client_state_bytes": folder_bytes(clients),
        "checkpoint_bytes": folder_bytes(run_dir.checkpoint_dir),
    }
    if clients.is_dir():
        if keep:
            last = run_dir.checkpoint_rounds()[-1:]
            for folder in (p for p in clients.iterdir() if p.is_dir()):
                if last:
                    StateStore(folder).commit(last[0])
        else:
            shutil.rmtree(clients, ignore_errors=True)
    disk["kept_bytes"] = folder_bytes(run_dir.path)
    return disk


def resolve_experiment_path(value: str) -> Path:
    """Find the experiment file: as given, else in the app directory, else a bundled name.

    The app directory is the FAB's, on ``sys.path`` under ``flwr run``, so the default
    ``configs/quickstart.toml`` is the file the FAB carries; a bare name such as ``quickstart``
    is the installed package's copy (:func:`fedmtl.config.resolve_experiment`).

    Raises
    ------
    ConfigError
        If none of them exists; the message lists the bundled names.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute():
        for entry in sys.path:
            candidate = Path(entry or ".") / path
            if candidate.is_file():
                return candidate
    return resolve_experiment(value)


def make_server_app(
    experiment: Experiment,
    run_dir: RunDirectory,
    *,
    resume: bool = False,
    observer: Observer | None = None,
    stop: threading.Event | None = None,
    done: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to one experiment and run folder (``fedmtl simulate`` uses this).

    ``done`` is set when the ServerApp returns or raises (its last file written).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_experiment(grid, experiment, run_dir, resume=resume, observer=observer, stop=stop)
        finally:
            if done is not None:
                done.set()

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
        # Dataset roots and pretrained weights live on the client machines (each checks its
        # own, under its data-dir): the server checks everything else, models included.
        experiment = load_experiment(
            resolve_experiment_path(str(config.get("experiment", "configs/quickstart.toml"))),
            check_files=False,
        )
        check_models(experiment)
        run_dir = RunDirectory.create(str(config.get("output-dir", "runs")), experiment)
    log.info("fedmtl run folder: %s", run_dir.path)
    run_experiment(grid, experiment, run_dir, resume=bool(resume_dir), run_config=config)
    never = {
        c: f
        for c, f in client_failures(experiment, run_dir.read_metrics()).items()
        if not f["completed"]
    }
    if never:
        # The run's status then says "failed": a client that never worked is not a success.
        raise RuntimeError(
            "clients that never completed a round: "
            + "; ".join(f"{c}: {f['last_error']}" for c, f in never.items())
        )
