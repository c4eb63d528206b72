"""Simulation on an existing Ray cluster: its nodes, the actor pool, and the checks before a run.

The functions here take what ``ray.nodes()`` and Ray's actor table return as plain mappings, so
they are tested without Ray. :mod:`fedmtl.simulation` connects, calls them and prints their
lines; the ClientApp calls :func:`check_state_root_visible` on every node.

Where things live on a cluster: the ServerApp runs in the driver (the process that runs
``fedmtl simulate``), so the run folder, metrics and checkpoints are written on the driver's
machine. The clients run in Ray actors on any node, and Flower's actor pool is shared: a client
is served by whichever actor is free, on whichever node, round after round. Its personal state
must therefore be on a path every node sees at the same place (``[simulation] state_root`` on a
shared filesystem); node-local state needs a client pinned to its machine, which is what a
deployment (one SuperNode per client, ``state-dir``) gives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmtl.config import ConfigError, SimulationConfig

# A file the driver writes into the personal-state root before a cluster run; a ClientApp that
# does not find it is on a node that does not see that folder (see check_state_root_visible).
STATE_MARKER = ".fedmtl-state-root"
# Set in the Ray job's environment of a cluster run only: the ClientApp checks the marker then.
CHECK_STATE_ENV = "FEDMTL_CHECK_STATE_ROOT"
# The class of the actors Flower's Ray backend runs ClientApps in.
CLIENT_ACTOR_CLASS = "ClientAppActor"
HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class RayNode:
    """One live node of a Ray cluster and the logical resources it offers."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    head: bool = False

    def label(self) -> str:
        """``node 30d8dd302ab9 (10.0.0.5, head)``: short id, address, role."""
        return f"node {self.node_id[:12]} ({self.ip}{', head' if self.head else ''})"


def live_nodes(raw: Iterable[Mapping[str, Any]]) -> list[RayNode]:
    """The live nodes of ``ray.nodes()`` that offer resources, head first.

    A node that left stays in Ray's list, marked dead (its resources may be listed or empty);
    it can host no actor, so it is left out.
    """
    nodes = [
        RayNode(
            node_id=str(entry["NodeID"]),
            ip=str(entry.get("NodeManagerAddress", "?")),
            cpus=float(entry["Resources"].get("CPU", 0)),
            gpus=float(entry["Resources"].get("GPU", 0)),
            head=HEAD_RESOURCE in entry["Resources"],
        )
        for entry in raw
        if entry.get("Alive", True) and entry.get("Resources")
    ]
    return sorted(nodes, key=lambda n: (not n.head, n.node_id))


def actors_per_node(nodes: Sequence[RayNode], num_cpus: float, num_gpus: float) -> list[int]:
    """How many ClientApp actors Flower's pool places on each node.

    Flower's own rule (``pool_size_from_resources``): ``int(CPUs / num_cpus)`` per node, and,
    when clients ask for a GPU, at most ``int(GPUs / num_gpus)``; a node without GPUs then
    holds none. Computed per node because an actor cannot span two (two nodes of 2 CPUs hold
    no client that needs 3). The same float division as Flower's, so the count printed is the
    count Flower builds.
    """
    counts = []
    for node in nodes:
        actors = int(node.cpus / num_cpus)
        if num_gpus > 0:
            actors = min(actors, int(node.gpus / num_gpus)) if node.gpus else 0
        counts.append(actors)
    return counts


def check_cluster(
    nodes: Sequence[RayNode],
    simulation: SimulationConfig,
    *,
    clients: int,
    device: str,
    all_at_once: bool = False,
    driver_ip: str | None = None,
) -> list[int]:
    """Check that the cluster can run the experiment; return the actors per node.

    Parameters
    ----------
    nodes : sequence of RayNode
        The cluster's live nodes (:func:`live_nodes`).
    simulation : SimulationConfig
        The resources each client asks for and the cluster's address (for the messages).
    clients : int
        How many clients the experiment has.
    device : str
        The experiment's ``device`` (``cuda`` needs a GPU on the cluster).
    all_at_once : bool
        Every client must hold an actor at the same time (FedMuscle's stream).
    driver_ip : str, optional
        This machine's address in the cluster: FedMuscle's stream listens on its loopback in
        simulation, which a client on another machine cannot reach.

    Raises
    ------
    ConfigError
        Naming the field (``simulation.num_gpus_per_client``, ...) and the resource (CPU, GPU)
        the cluster lacks.
    """
    where = f"the Ray cluster at {simulation.ray_address}"
    if not nodes:
        raise ConfigError(f"simulation.ray_address: {where} has no live node with resources")
    cpus, gpus = simulation.num_cpus_per_client, simulation.num_gpus_per_client
    most_cpus = max(n.cpus for n in nodes)
    most_gpus = max(n.gpus for n in nodes)
    if cpus > most_cpus:
        raise ConfigError(
            f"simulation.num_cpus_per_client: {cpus} CPUs per client, but no node of {where} "
            f"has more than {_amount(most_cpus)} (resource CPU); an actor cannot span nodes"
        )
    if gpus > 0 and most_gpus == 0:
        raise ConfigError(
            f"simulation.num_gpus_per_client: {gpus} GPU per client, but {where} has no GPU "
            "(resource GPU); set it to 0 to run on CPU"
        )
    if gpus > most_gpus:
        raise ConfigError(
            f"simulation.num_gpus_per_client: {gpus} GPUs per client, but no node of {where} "
            f"has more than {_amount(most_gpus)} (resource GPU); an actor cannot span nodes"
        )
    if device.startswith("cuda") and most_gpus == 0:
        raise ConfigError(f"device: {device!r} but {where} has no GPU (resource GPU)")
    counts = actors_per_node(nodes, cpus, gpus)
    if sum(counts) == 0:
        raise ConfigError(
            f"simulation.num_cpus_per_client: no node of {where} has both {cpus} CPUs and "
            f"{gpus} GPU (resources CPU and GPU) for one client"
        )
    if all_at_once:
        if sum(counts) < clients:
            raise ConfigError(
                f"simulation.num_cpus_per_client: FedMuscle's stream needs all {clients} clients "
                f"at once, but {where} holds {sum(counts)} actors of {cpus} CPU, {gpus} GPU "
                "(resources CPU, GPU); lower the request or add nodes"
            )
        remote = sorted({n.ip for n in nodes} - {driver_ip}) if driver_ip else []
        if remote:
            raise ConfigError(
                f"algorithm.channel: FedMuscle's stream listens on this machine's loopback in "
                f"simulation, which clients on {remote} cannot reach; use channel = 'flower' "
                "on a multi-machine cluster"
            )
    return counts


def _amount(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def describe_pool(nodes: Sequence[RayNode], counts: Sequence[int], verb: str = "") -> str:
    """``3 actors: 2 on node 30d8dd302ab9 (10.0.0.5, head), 1 on node 1a64…`` (busy nodes only)."""
    parts = [f"{count} on {node.label()}" for node, count in zip(nodes, counts) if count]
    total = sum(counts)
    return f"{total} actor{'s' if total != 1 else ''}{verb}: " + (", ".join(parts) or "none")


def actor_placement(
    actors: Iterable[Mapping[str, Any]], nodes: Sequence[RayNode]
) -> tuple[list[RayNode], list[int]]:
    """Where the live ClientApp actors are, from Ray's actor table (``ray._private.state``).

    Returns
    -------
    nodes, counts
        The nodes hosting at least one actor and how many each; a node missing from ``nodes``
        (it joined after the plan) is listed by its id and the address Ray reports.
    """
    known = {n.node_id: n for n in nodes}
    counts: dict[str, int] = {}
    addresses: dict[str, str] = {}
    for actor in actors:
        if actor.get("ActorClassName", "").rsplit(".", 1)[-1] != CLIENT_ACTOR_CLASS:
            continue
        if actor.get("State") != "ALIVE":
            continue
        address = actor.get("Address", {})
        node_id = str(address.get("NodeID", ""))
        counts[node_id] = counts.get(node_id, 0) + 1
        addresses[node_id] = str(address.get("IPAddress", "?"))
    hosts = [known.get(i, RayNode(i, addresses[i], math.nan, math.nan)) for i in counts]
    hosts.sort(key=lambda n: (not n.head, n.node_id))
    return hosts, [counts[n.node_id] for n in hosts]


def personal_state_dir(run_path: Path, state_root: str | None) -> Path:
    """The absolute folder under which each client keeps ``<client_id>/round-<r>.safetensors``.

    ``<run folder>/clients`` by default; with ``state_root``,
    ``<state_root>/<experiment>/<run folder name>``, so runs sharing a root never share a
    folder and a resumed run (same folder name) finds its state. Absolute, because a Ray
    worker resolves a relative path against its own working directory, which on a cluster is
    wherever ``ray start`` ran.
    """
    run_path = Path(os.path.abspath(run_path))
    if state_root is None:
        return run_path / "clients"
    root = Path(os.path.abspath(Path(state_root).expanduser()))
    return root / run_path.parent.name / run_path.name


def mark_state_root(directory: Path) -> None:
    """Create ``directory`` with the marker a ClientApp looks for (see the module's notes)."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / STATE_MARKER
    if not marker.exists():
        marker.write_text(f"{directory}\n", encoding="utf-8")


def check_state_root_visible(directory: str | Path) -> None:
    """Raise unless this process sees the personal-state folder the driver prepared.

    Without the check, a client on a node that does not mount the folder would find no state
    of its previous round and silently start again from a fresh model.

    Raises
    ------
    RuntimeError
        Naming the folder, this node and what to set.
    """
    if (Path(directory) / STATE_MARKER).is_file():
        return
    raise RuntimeError(
        f"the personal-state folder {directory} is not visible on {_this_node()}: on a "
        "multi-node Ray cluster it must be on a filesystem every node mounts at the same path "
        "(set [simulation] state_root or --state-root to such a path)"
    )


def _this_node() -> str:
    """``Ray node <id> (<ip>)`` inside a Ray worker, else ``this machine``."""
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a Ray instance
            return "this machine"
        node = ray.get_runtime_context().get_node_id()
        return f"Ray node {node[:12]} ({ray.util.get_node_ip_address()})"
    except Exception:  # not in a Ray worker: the message still names the folder
        return "this machine"
