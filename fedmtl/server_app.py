"""Flower ServerApp: read the experiment from the run config, run its strategy's loop."""

from __future__ import annotations

import contextlib
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
from fedmtl.config import Experiment, load_experiment, resolve_experiment, with_tracking
from fedmtl.preflight import check_models
from fedmtl.progress import LogLineObserver, render_text
from fedmtl.report import plot_runs, summarize, summary_table
from fedmtl.results import RunDirectory, client_failures
from fedmtl.strategies import FederatedLoop, create_strategy
from fedmtl.strategies.loop import LogObserver, Observer, RunInterrupted
from fedmtl.tracking import check_trackers, open_trackers, read_state

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
    The trackers ``experiment.tracking`` turns on (TensorBoard, MLflow, W&B) see every round
    and, at the end, the summary and plots; where they wrote is logged and kept in
    ``tracking.json``.
    """
    strategy = create_strategy(experiment)
    # A missing tracker extra fails here, before the first round.
    tracked = open_trackers(experiment, run_dir, observer or LogObserver())
    loop = FederatedLoop(
        grid,
        experiment,
        strategy,
        run_dir,
        observer=tracked,
        state_root=state_root,
        run_config=run_config,
        stop=stop,
    )
    status = "FAILED"
    try:
        loop.run(resume=resume)
        summary = summarize(run_dir)
        plot_runs({experiment.algorithm.name: run_dir}, run_dir.path / "metrics.png")
        clients = Path(state_root) if state_root is not None else None
        disk = tidy_client_state(run_dir, keep=experiment.state.keep, clients=clients)
        run_dir.write_summary({**summary, "disk": disk})
        status = "FINISHED"
    except RunInterrupted:
        status = "KILLED"
        raise
    finally:
        for line in tracked.finish(status):
            log.info("tracking: %s", line)
    return run_dir


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tidy_client_state(
    run_dir: RunDirectory, *, keep: bool, clients: Path | None = None
) -> dict[str, int]:
    """After a finished run: measure the run folder, then drop or prune ``<run>/clients/``.

    The last round is checkpointed, so no resume can need a client's older versions: with
    ``keep`` each client keeps only its newest; without, the folder goes (simulation; a
    deployed node keeps its state under its own ``state-dir``, which is not this folder).
    ``clients``: the run's personal-state folder when it is not ``<run>/clients`` (a
    simulation's ``[simulation] state_root``); ``run_bytes`` then leaves it out.

    Returns
    -------
    dict
        ``run_bytes`` (the whole folder at the end of the run), ``client_state_bytes`` and
        ``checkpoint_bytes`` (its parts), and ``kept_bytes`` (the folder afterwards).
    """
    clients = clients if clients is not None else run_dir.clients_dir
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
            if clients != run_dir.clients_dir:
                with contextlib.suppress(OSError):  # <state_root>/<experiment>, if now empty
                    clients.parent.rmdir()
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
    state_root: str | None = None,
) -> ServerApp:
    """A ServerApp bound to one experiment and run folder (``fedmtl simulate`` uses this).

    ``done`` is set when the ServerApp returns or raises (its last file written);
    ``state_root`` is the clients' personal-state folder (default ``<run>/clients``).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_experiment(
                grid,
                experiment,
                run_dir,
                resume=resume,
                observer=observer,
                stop=stop,
                state_root=state_root,
            )
        finally:
            if done is not None:
                done.set()

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``.

    Run config keys: ``experiment``, ``output-dir``, ``resume``, ``tracking`` (comma-separated
    trackers to turn on, e.g. ``tensorboard,mlflow``), ``mlflow-uri``, and FedMuscle's stream
    settings ``stream-address`` (``host[:port]`` clients connect to), ``stream-bind``,
    ``stream-port``, ``stream-certfile``, ``stream-keyfile``, ``stream-ca-certfile``.

    Progress is logged one line per phase, then the final table at 80 columns: what
    ``flwr run . --stream`` and ``flwr log <run-id>`` show.
    """
    config = context.run_config
    progress = LogLineObserver()
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
        experiment = with_tracking(
            experiment,
            [t.strip() for t in str(config.get("tracking", "") or "").split(",") if t.strip()],
            mlflow_uri=str(config.get("mlflow-uri", "") or "") or None,
        )
        check_models(experiment, read_files=False)
        check_trackers(experiment)
        run_dir = RunDirectory.create(str(config.get("output-dir", "runs")), experiment)
    progress.logger.info("fedmtl run folder: %s", run_dir.path)
    run_experiment(
        grid,
        experiment,
        run_dir,
        resume=bool(resume_dir),
        run_config=config,
        observer=progress,
    )
    summary = run_dir.read_summary()
    if summary is not None:
        progress.logger.info("\n%s", render_text(summary_table(summary)))
    for line in read_state(run_dir).get("where", {}).get("lines", []):
        progress.logger.info("tracking: %s", line)
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
