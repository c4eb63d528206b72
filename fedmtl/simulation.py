"""Run an experiment through Flower's simulation engine (Ray) in this process.

The engine runs on a private Ray instance this process starts and stops, or, with
``[simulation] ray_address``, on an existing Ray cluster it only connects to (what lives where
then: :mod:`fedmtl.cluster`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fedmtl.cluster import (
    CHECK_STATE_ENV,
    RayNode,
    actor_placement,
    actors_per_node,
    check_cluster,
    describe_pool,
    live_nodes,
    mark_state_root,
    personal_state_dir,
)
from fedmtl.config import ConfigError, Experiment, FedMuscleConfig
from fedmtl.results import RunDirectory
from fedmtl.strategies.loop import LogObserver, Observer, RunInterrupted

log = logging.getLogger("fedmtl.simulation")

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


def _all_at_once(experiment: Experiment) -> bool:
    """FedMuscle's stream: every client must be in a ClientApp at the same time."""
    algorithm = experiment.algorithm
    return isinstance(algorithm, FedMuscleConfig) and algorithm.channel == "stream"


def backend_config(experiment: Experiment) -> dict[str, Any]:
    """Ray resources: ``num_cpus_per_client`` and ``num_gpus_per_client`` per virtual node.

    With FedMuscle's stream every client needs an actor at the same time (see the body). With
    ``simulation.ray_address`` the init arguments only name the cluster: its nodes declare
    their own resources, Flower sizes the pool from them, and :func:`connect` checks them.

    Raises
    ------
    RuntimeError
        If GPUs per client are requested but no CUDA device is visible (Flower would otherwise
        fail later with "ActorPool is empty").
    """
    sim = experiment.simulation
    client_resources = {"num_cpus": sim.num_cpus_per_client, "num_gpus": sim.num_gpus_per_client}
    if sim.ray_address is not None:
        init_args: dict[str, Any] = {"address": sim.ray_address}
        if not sim.ray_address.startswith("ray://"):
            # Ray Client (ray://) forwards options it does not know to the cluster, with a
            # warning; these two only shape this driver's log.
            init_args.update(logging_level="ERROR", log_to_driver=True)
        return {"client_resources": client_resources, "init_args": init_args}
    cpus = os.cpu_count() or 1
    if sim.num_cpus_per_client > cpus:
        raise RuntimeError(
            f"simulation.num_cpus_per_client={sim.num_cpus_per_client} exceeds the {cpus} CPUs "
            "of this machine: no client could be scheduled"
        )
    clients = len(experiment.clients)
    # FedMuscle's stream runs one synchronous exchange per public batch: every client must be
    # in a ClientApp at the same time, so the actor pool must hold them all. Ray's CPU count is
    # a logical budget; declaring more than the cores lets the clients share them.
    concurrent = _all_at_once(experiment)
    logical_cpus = max(cpus, clients * sim.num_cpus_per_client) if concurrent else cpus
    init_args = {
        # "local": a new instance even when RAY_ADDRESS is set or `ray start` left its address
        # in /tmp/ray (without it Ray joins that cluster, and refuses num_cpus there).
        "address": "local",
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
    return {"client_resources": client_resources, "init_args": init_args}


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
    """``ray.init`` as Flower's Ray backend does it (which then reuses this instance).

    With a cluster's address Ray connects and starts nothing; the job's ClientApps then check
    that they see the personal-state folder (``CHECK_STATE_ENV``).
    """
    import ray

    if ray.is_initialized():
        return
    init_args = dict(config.get("init_args", {}))
    cluster = init_args.get("address", "local") != "local"
    if not cluster:
        init_args.setdefault("include_dashboard", False)
    # As Flower: Ray's workers inherit the environment, not this process's sys.path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath}
    if cluster:
        env_vars[CHECK_STATE_ENV] = "1"
    with _sigint_ignored(), warnings.catch_warnings():
        # Ray's notice that a future version stops hiding GPUs from num_gpus=0 actors: the
        # current behaviour is the one fedmtl wants, the notice only cluttered every start.
        warnings.filterwarnings(
            "ignore", message="Tip: In future versions of Ray", category=FutureWarning
        )
        ray.init(runtime_env={"env_vars": env_vars}, **init_args)


def _stop_ray() -> None:
    """Shut the private instance down; from a cluster, Ray only disconnects (it runs on)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass
class RayConnection:
    """The Ray this process uses, private or a cluster's, and Flower's actor pool on it.

    Attributes
    ----------
    address : str or None
        The cluster's address; ``None`` for the private instance fedmtl started.
    config : dict
        Flower's backend config (``client_resources``, ``init_args``).
    nodes : list of RayNode
        The live nodes when connecting.
    actors : list of int
        How many actors Flower's pool places on each of ``nodes``.
    placement : tuple of (list of RayNode, list of int), optional
        Where this run's ClientApp actors are (Ray's actor table, read after each round);
        ``None`` until read, and where Ray cannot tell (Ray Client).
    """

    address: str | None
    config: dict[str, Any]
    nodes: list[RayNode]
    actors: list[int]
    placement: tuple[list[RayNode], list[int]] | None = None

    def lines(self) -> list[str]:
        """What a run says when it starts: which Ray, and the actor pool per node."""
        if self.address is None:
            return [f"Ray: a private instance on this machine, {sum(self.actors)} actors"]
        resources = self.config["client_resources"]
        each = f"{resources['num_cpus']} CPU, {resources['num_gpus']:g} GPU each"
        count = len(self.nodes)
        return [
            f"Ray: connected to the Ray cluster at {self.address}; fedmtl will not start or "
            f"stop it ({count} live node{'s' if count != 1 else ''})",
            f"Ray: pool of {describe_pool(self.nodes, self.actors)} ({each})",
        ]

    def placement_line(self) -> str | None:
        """Where the actors ran, once known."""
        if self.placement is None:
            return None
        return "Ray: " + describe_pool(*self.placement, verb=" ran")

    def close(self) -> None:
        """Stop the private instance, or disconnect from the cluster (which keeps running)."""
        _stop_ray()


def connect(experiment: Experiment) -> RayConnection:
    """Start a private Ray instance, or connect to ``simulation.ray_address``; size the pool.

    Call it before creating a run folder, so that a cluster that cannot run the experiment is
    refused before anything is written; :func:`simulate` calls it when not given a connection.

    Raises
    ------
    ConfigError
        If the cluster cannot be reached, or cannot host a client as the experiment asks
        (naming the field and the resource it lacks).
    RuntimeError
        If GPUs per client are requested but this machine has none (private instance).
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    config = backend_config(experiment)
    sim = experiment.simulation
    if sim.ray_address is not None:
        _probe(sim.ray_address)
    try:
        _start_ray(config)
    except ConnectionError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"simulation.ray_address: cannot connect to {sim.ray_address}: {message}"
        ) from None
    import ray

    try:
        nodes = live_nodes(ray.nodes())
        if sim.ray_address is None:
            actors = actors_per_node(nodes, sim.num_cpus_per_client, sim.num_gpus_per_client)
        else:
            actors = check_cluster(
                nodes,
                sim,
                clients=len(experiment.clients),
                device=experiment.device,
                all_at_once=_all_at_once(experiment),
                driver_ip=_driver_ip(),
            )
    except BaseException:
        _stop_ray()
        raise
    connection = RayConnection(sim.ray_address, config, nodes, actors)
    for line in connection.lines():
        log.info("%s", line)
    return connection


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at the cluster's address.

    Ray retries an unreachable head for minutes (measured: still waiting after 5 min), which
    reads as a hang; a TCP connection says in seconds whether a head is there. ``auto`` is
    resolved as Ray does (``RAY_ADDRESS``, then the address ``ray start`` left on this machine).

    Raises
    ------
    ConfigError
        Naming ``simulation.ray_address`` and what to start.
    """
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto") or ""
        except Exception:
            target = ""
        if not target:
            raise ConfigError(
                "simulation.ray_address: 'auto' found no Ray cluster started on this machine "
                "(`ray start --head`) and RAY_ADDRESS is not set"
            )
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"simulation.ray_address: nothing answers at {target} ({exc}); start the head "
            "there first (`ray start --head --port=...`)"
        ) from None


def _driver_ip() -> str | None:
    """The driver's address in the Ray cluster; ``None`` where Ray cannot say (Ray Client)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return None


def _read_placement(nodes: list[RayNode]) -> tuple[list[RayNode], list[int]] | None:
    """Where this job's ClientApp actors are, from Ray's actor table (the GCS; no dashboard).

    ``None`` where the table cannot be read (Ray Client): the plan printed at the start stands.
    """
    try:
        import ray
        from ray._private.state import actors as actor_table

        job = ray.get_runtime_context().get_job_id()
        table = actor_table()
    except Exception:
        return None
    return actor_placement((a for a in table.values() if a.get("JobID") == job), nodes)


class _PlacementObserver:
    """Pass every event on; after each round, note where the ClientApp actors run.

    Read in the server thread while the pool is alive: Flower ends the actors, and the
    connection, before ``run_simulation`` returns.
    """

    def __init__(self, inner: Observer, connection: RayConnection) -> None:
        self.inner = inner
        self.connection = connection

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        self.inner.on_start(experiment, first_round)

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        self.inner.on_phase(round_, phase, done, total)

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        placement = _read_placement(self.connection.nodes)
        if placement is not None and placement[0]:
            self.connection.placement = placement
        self.inner.on_round_end(round_, rows)


def state_dir_for(experiment: Experiment, run_dir: RunDirectory, *, resume: bool) -> str:
    """The clients' personal-state folder of this run (absolute), prepared for a cluster.

    Raises
    ------
    ConfigError
        If a fresh run's folder under ``simulation.state_root`` already exists (another run's).
    """
    sim = experiment.simulation
    directory = personal_state_dir(run_dir.path, sim.state_root)
    if sim.state_root is not None and not resume and directory.exists():
        raise ConfigError(
            f"simulation.state_root: {directory} already holds another run's personal state"
        )
    if sim.ray_address is not None:
        mark_state_root(directory)  # what each ClientApp checks it sees (cluster.py)
    return str(directory)


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
    connection: RayConnection | None = None,
) -> RunDirectory:
    """Run (or resume) ``experiment`` with one simulated SuperNode per client.

    Parameters
    ----------
    experiment, run_dir, resume, observer
        What to run, where its results go, whether to continue a stopped run, and who hears
        of its progress.
    connection : RayConnection, optional
        From :func:`connect`, called before the run folder was created; by default this
        function connects. Either way Ray is left (stopped, or disconnected from a cluster)
        when the run ends; ``connection.placement`` then tells where the actors ran.

    Raises
    ------
    RunInterrupted
        On Ctrl-C, after the server stopped and Ray shut down; its message is the run folder,
        which ``fedmtl simulate --resume`` continues from the last finished round.
    FederationFailed
        If no client completed round 1 (the message lists each client's error).
    ConfigError
        If the Ray cluster cannot run the experiment (see :func:`connect`).
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    from fedmtl.client_app import app as client_app
    from fedmtl.server_app import make_server_app

    if connection is None:
        connection = connect(experiment)
    try:
        state_root = state_dir_for(experiment, run_dir, resume=resume)
    except BaseException:
        connection.close()
        raise
    if connection.address is not None:
        observer = _PlacementObserver(observer or LogObserver(), connection)
    stop, done = threading.Event(), threading.Event()
    server_app = make_server_app(
        experiment,
        run_dir,
        resume=resume,
        observer=observer,
        stop=stop,
        done=done,
        state_root=state_root,
    )
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_HideRunSimulationDeprecation())
    silent = _SilentWhileStopping(stop)
    flwr_logger.addFilter(silent)
    interrupted = False
    try:
        with _stop_on_sigint(stop), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(experiment.clients),
                backend_config=connection.config,
            )
    except (KeyboardInterrupt, RunInterrupted):
        interrupted = True
    finally:
        stop.set()  # the server thread, if still polling, ends now
        with _sigint_ignored():
            # the server's last write (metrics, checkpoint) finishes before Ray goes
            done.wait(timeout=30 if not done.is_set() and interrupted else 0)
            connection.close()
        flwr_logger.removeFilter(silent)
    line = connection.placement_line()
    if line is not None:
        log.info("%s", line)
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
