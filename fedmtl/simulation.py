"""Run an experiment through Flower's simulation engine (Ray) in this process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from fedmtl.config import Experiment, FedMuscleConfig
from fedmtl.results import RunDirectory
from fedmtl.strategies.loop import Observer, RunInterrupted

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


class _HideRunSimulationDeprecation(logging.Filter):
    """Drop Flower's notice that ``run_simulation`` is deprecated.

    fedmtl runs the ServerApp in this process on purpose (live progress, no detached
    SuperLink left behind); ``flwr run .`` remains available for users who prefer it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


class _SilentWhileStopping(logging.Filter):
    """Drop Flower's records once the run is stopping (Ctrl-C).

    Messages still in flight when Ray shuts down fail with ``ActorDiedError``; Flower's engine
    threads log each as an error with a traceback, which says nothing about the run.
    """

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.stop.is_set()


def backend_config(experiment: Experiment) -> dict[str, Any]:
    """Ray resources: ``num_cpus_per_client`` and ``num_gpus_per_client`` per virtual node.

    With FedMuscle's stream every client needs an actor at the same time (see the body).

    Raises
    ------
    RuntimeError
        If GPUs per client are requested but no CUDA device is visible (Flower would otherwise
        fail later with "ActorPool is empty").
    """
    sim = experiment.simulation
    cpus = os.cpu_count() or 1
    if sim.num_cpus_per_client > cpus:
        raise RuntimeError(
            f"simulation.num_cpus_per_client={sim.num_cpus_per_client} exceeds the {cpus} CPUs "
            "of this machine: no client could be scheduled"
        )
    clients = len(experiment.clients)
    algorithm = experiment.algorithm
    # FedMuscle's stream runs one synchronous exchange per public batch: every client must be
    # in a ClientApp at the same time, so the actor pool must hold them all. Ray's CPU count is
    # a logical budget; declaring more than the cores lets the clients share them.
    concurrent = isinstance(algorithm, FedMuscleConfig) and algorithm.channel == "stream"
    logical_cpus = max(cpus, clients * sim.num_cpus_per_client) if concurrent else cpus
    init_args: dict[str, Any] = {
        "num_cpus": logical_cpus,
        "logging_level": "ERROR",
        "log_to_driver": True,
    }
    if sim.num_gpus_per_client > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise RuntimeError(
                f"simulation.num_gpus_per_client={sim.num_gpus_per_client} but no CUDA device "
                "is visible; set it to 0 to run on CPU"
            )
        if concurrent and clients * sim.num_gpus_per_client > gpus + 1e-9:
            raise RuntimeError(
                f"simulation.num_gpus_per_client={sim.num_gpus_per_client}: FedMuscle's stream "
                f"needs all {clients} clients at once but {gpus} GPU(s) hold only "
                f"{int(gpus / sim.num_gpus_per_client)}; set it to at most {gpus / clients:.3g}"
            )
        init_args["num_gpus"] = gpus
    return {
        "client_resources": {
            "num_cpus": sim.num_cpus_per_client,
            "num_gpus": sim.num_gpus_per_client,
        },
        "init_args": init_args,
    }


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while Ray starts its processes, which inherit the disposition.

    A terminal's Ctrl-C goes to the whole process group: Ray's daemons and workers died of it
    in any order (two agents were left running, ~210 MB). Ignoring it there leaves the stop
    to this process, which shuts Ray down in order.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_ray(config: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend does it (which then reuses this instance)."""
    import ray

    if ray.is_initialized():
        return
    init_args = dict(config.get("init_args", {}))
    init_args.setdefault("include_dashboard", False)
    # As Flower: Ray's workers inherit the environment, not this process's sys.path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    with _sigint_ignored(), warnings.catch_warnings():
        # Ray's notice that a future version stops hiding GPUs from num_gpus=0 actors: the
        # current behaviour is the one fedmtl wants, the notice only cluttered every start.
        warnings.filterwarnings(
            "ignore", message="Tip: In future versions of Ray", category=FutureWarning
        )
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C: set ``stop`` (the server loop ends) and interrupt the main thread once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            return  # already stopping: a second Ctrl-C must not break the clean-up
        stop.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def simulate(
    experiment: Experiment,
    run_dir: RunDirectory,
    *,
    resume: bool = False,
    observer: Observer | None = None,
) -> RunDirectory:
    """Run (or resume) ``experiment`` with one simulated SuperNode per client.

    Raises
    ------
    RunInterrupted
        On Ctrl-C, after the server stopped and Ray shut down; its message is the run folder,
        which ``fedmtl simulate --resume`` continues from the last finished round.
    FederationFailed
        If no client completed round 1 (the message lists each client's error).
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    config = backend_config(experiment)
    from flwr.simulation import run_simulation

    from fedmtl.client_app import app as client_app
    from fedmtl.server_app import make_server_app

    stop, done = threading.Event(), threading.Event()
    server_app = make_server_app(
        experiment, run_dir, resume=resume, observer=observer, stop=stop, done=done
    )
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_HideRunSimulationDeprecation())
    silent = _SilentWhileStopping(stop)
    flwr_logger.addFilter(silent)
    interrupted = False
    try:
        _start_ray(config)
        with _stop_on_sigint(stop), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(experiment.clients),
                backend_config=config,
            )
    except (KeyboardInterrupt, RunInterrupted):
        interrupted = True
    finally:
        stop.set()  # the server thread, if still polling, ends now
        with _sigint_ignored():
            # the server's last write (metrics, checkpoint) finishes before Ray goes
            done.wait(timeout=30 if not done.is_set() and interrupted else 0)
            _stop_ray()
        flwr_logger.removeFilter(silent)
    if interrupted:
        raise RunInterrupted(str(run_dir.path))
    if run_dir.read_summary() is None:
        raise RuntimeError(
            f"the simulation ended without a summary; see the log above. Run folder: {run_dir.path}"
        )
    return run_dir


def run_in_process(
    experiment: Experiment,
    run_dir: RunDirectory,
    *,
    resume: bool = False,
    observer: Observer | None = None,
) -> RunDirectory:
    """Run (or resume) ``experiment`` in this process, the clients one after the other.

    The same ServerApp code (:func:`fedmtl.server_app.run_experiment`), the same ClientApp and
    the same message serialisation as Flower's engines, over :class:`fedmtl.testing.FakeGrid`
    instead of Ray: no actor start-up and no process per client, so small federations and
    repeated benchmark runs (``benchmarks/efficacy.py``) start in a second. The metrics equal a
    simulation's for the same seed. Not for FedMuscle's ``channel = "stream"`` (its clients must
    run at the same time).
    """
    from fedmtl.client_app import app as client_app
    from fedmtl.server_app import run_experiment
    from fedmtl.testing import FakeGrid

    algorithm = experiment.algorithm
    if isinstance(algorithm, FedMuscleConfig) and algorithm.channel == "stream":
        raise RuntimeError("the in-process engine runs clients one by one: use channel='flower'")
    grid = FakeGrid(client_app, len(experiment.clients))
    return run_experiment(grid, experiment, run_dir, resume=resume, observer=observer)
