"""M-Fed's two-tier aggregation: FedAvg inside each task group, then encoders across tasks."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmtl.aggregation.fedavg import weighted_average

ENCODER_PREFIX = "encoder."
INTRA_TASK_WEIGHTINGS = ("data", "uniform")
INTER_TASK_WEIGHTINGS = ("uniform", "data")


@dataclass(frozen=True)
class TaskMember:
    """One client's upload for one of its tasks, as seen by tier 1.

    A client that trains several tasks contributes one ``TaskMember`` per task, each carrying the
    same (single) encoder.

    Parameters
    ----------
    client_id : str
        The client's name from the experiment file.
    task : str
        The task this upload belongs to.
    encoder : mapping
        The client's encoder tensors, keyed ``encoder.…``.
    task_tensors : mapping
        This task's decoder and head tensors, keyed ``decoders.<task>.…`` / ``heads.<task>.…``.
    num_examples : int
        The client's number of training examples for ``task``.
    """

    client_id: str
    task: str
    encoder: Mapping[str, Tensor]
    task_tensors: Mapping[str, Tensor]
    num_examples: int

    def __post_init__(self) -> None:
        who = f"client {self.client_id!r} (task {self.task!r})"
        if self.num_examples < 0:
            raise ValueError(f"{who}: num_examples must be >= 0, got {self.num_examples}")
        if not self.encoder:
            raise ValueError(f"{who}: no encoder tensors")
        stray = [k for k in self.encoder if not k.startswith(ENCODER_PREFIX)]
        if stray:
            raise ValueError(f"{who}: encoder tensors must start with 'encoder.', got {stray[:3]}")
        # Decoders are never mixed across tasks, so a tensor of another task here is a bug upstream.
        own = (f"decoders.{self.task}.", f"heads.{self.task}.")
        stray = [k for k in self.task_tensors if not k.startswith(own)]
        if stray:
            raise ValueError(f"{who}: task tensors must start with {own}, got {stray[:3]}")


def architecture_signature(state: Mapping[str, Tensor]) -> str:
    """Return a short digest of the tensor names and shapes of ``state`` (order-insensitive).

    Two states with equal signatures can be averaged key by key.
    """
    items = sorted((name, tuple(tensor.shape)) for name, tensor in state.items())
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def _mismatch_message(signatures: Mapping[str, str], noun: str, what: str) -> str | None:
    """Describe which entries of ``signatures`` differ from the majority, or None if all agree."""
    counts = Counter(signatures.values())
    if len(counts) <= 1:
        return None
    ranked = counts.most_common()
    if ranked[0][1] == ranked[1][1]:
        groups = {sig: sorted(k for k, s in signatures.items() if s == sig) for sig in counts}
        listing = "; ".join(
            f"{', '.join(map(repr, names))} ({sig})" for sig, names in groups.items()
        )
        return f"{noun}s disagree on the {what} and there is no majority: {listing}"
    majority = ranked[0][0]
    odd = sorted(k for k, s in signatures.items() if s != majority)
    return (
        f"{noun}(s) {', '.join(map(repr, odd))} have a different {what} from the other "
        f"{noun}s (majority signature {majority})"
    )


def _difference(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str:
    """Name the first few tensors whose presence or shape differs between two states."""
    missing = sorted(set(reference) - set(state))[:3]
    extra = sorted(set(state) - set(reference))[:3]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
        for k in sorted(set(state) & set(reference))
        if state[k].shape != reference[k].shape
    ][:3]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"extra {extra}")
    if reshaped:
        parts.append(f"shapes {reshaped}")
    return "; ".join(parts)


def _check_agreement(
    states: Mapping[str, Mapping[str, Tensor]], noun: str, what: str, context: str = ""
) -> None:
    """Raise naming the entries of ``states`` whose names/shapes differ from the majority."""
    signatures = {name: architecture_signature(state) for name, state in states.items()}
    message = _mismatch_message(signatures, noun, what)
    if message is None:
        return
    # With no majority the comparison is against the most common signature seen first.
    majority = Counter(signatures.values()).most_common(1)[0][0]
    reference_name = next(k for k, s in signatures.items() if s == majority)
    details = [
        f"{name!r} vs {reference_name!r}: {_difference(state, states[reference_name])}"
        for name, state in states.items()
        if signatures[name] != majority
    ]
    raise ValueError(f"{context}{message}; {' | '.join(details)}")


def check_single_encoder_architecture(signatures: Mapping[str, str]) -> None:
    """Check that every client declares the same encoder architecture.

    M-Fed averages encoders across tasks, so all clients must share one encoder architecture.

    Parameters
    ----------
    signatures : mapping
        ``client_id → encoder signature`` (e.g. from :func:`architecture_signature`).

    Raises
    ------
    ValueError
        Naming the client(s) whose signature differs from the majority, or every client with its
        signature when no signature is held by a strict plurality.
    """
    message = _mismatch_message(signatures, "client", "encoder architecture")
    if message is not None:
        raise ValueError(message)


def task_example_counts(members: Sequence[TaskMember]) -> dict[str, int]:
    """Return ``task → Σ num_examples`` over the members of each task (for tier-2 weights)."""
    counts: dict[str, int] = {}
    for member in members:
        counts[member.task] = counts.get(member.task, 0) + member.num_examples
    return counts


def _check_one_encoder_per_client(members: Sequence[TaskMember]) -> None:
    """Raise if a multi-task client uploads different encoders for its different tasks."""
    first: dict[str, TaskMember] = {}
    seen: set[tuple[str, str]] = set()
    for member in members:
        if (member.client_id, member.task) in seen:
            raise ValueError(f"client {member.client_id!r} appears twice for task {member.task!r}")
        seen.add((member.client_id, member.task))
        ref = first.setdefault(member.client_id, member)
        if ref.encoder is member.encoder:
            continue
        same = set(ref.encoder) == set(member.encoder) and all(
            torch.equal(ref.encoder[k], member.encoder[k]) for k in ref.encoder
        )
        if not same:
            raise ValueError(
                f"client {member.client_id!r} uploads different encoders for tasks "
                f"{ref.task!r} and {member.task!r}; a client has exactly one encoder"
            )


def intra_task_average(
    members: Sequence[TaskMember], *, weighting: str = "data"
) -> dict[str, dict[str, Tensor]]:
    """Tier 1: FedAvg of the whole task model (encoder, decoder, head) inside each task group.

    A multi-task client takes part in the group of every one of its tasks, with its one encoder,
    and counts once per task: in task ``t``'s group its weight is its number of training examples
    for ``t`` (``weighting="data"``), or 1 like every other member (``weighting="uniform"``).

    Parameters
    ----------
    members : sequence of TaskMember
        One entry per (client, task) pair that reported this round.
    weighting : {"data", "uniform"}
        ``"data"``: ``ω_k = n_k / Σ_{k'∈C_t} n_k'`` (FedAvg); ``"uniform"``: ``ω_k = 1 / |C_t|``.

    Returns
    -------
    dict
        ``task → {name → tensor}``: the task-global model ``θ_t^glob`` (encoder tensors and that
        task's decoder and head tensors), tasks in order of first appearance.

    Raises
    ------
    ValueError
        If the clients' encoders differ in architecture (naming the client), members of one task
        differ in decoder/head architecture (naming client and task), a client appears twice for
        one task or uploads different encoders for different tasks, or a task's examples sum to 0.
    """
    if weighting not in INTRA_TASK_WEIGHTINGS:
        raise ValueError(f"intra-task weighting must be one of {INTRA_TASK_WEIGHTINGS}")
    if not members:
        raise ValueError("intra_task_average needs at least one member")
    _check_one_encoder_per_client(members)
    encoders = {m.client_id: m.encoder for m in members}
    _check_agreement(encoders, "client", "encoder architecture")

    groups: dict[str, list[TaskMember]] = {}
    for member in members:
        groups.setdefault(member.task, []).append(member)
    out: dict[str, dict[str, Tensor]] = {}
    for task, group in groups.items():
        _check_agreement(
            {m.client_id: m.task_tensors for m in group},
            "client",
            "decoder/head architecture",
            context=f"task {task!r}: ",
        )
        if weighting == "data" and sum(m.num_examples for m in group) == 0:
            raise ValueError(f"task {task!r}: its members report zero training examples")
        # Same key order for every member: weighted_average compares key sequences.
        keys = [*group[0].encoder, *group[0].task_tensors]
        merged = [{**m.encoder, **m.task_tensors} for m in group]
        states = [{k: state[k] for k in keys} for state in merged]
        weights = [float(m.num_examples) if weighting == "data" else 1.0 for m in group]
        out[task] = weighted_average(states, weights)
    return out


def inter_task_average(
    task_encoders: Mapping[str, Mapping[str, Tensor]],
    *,
    weighting: str = "uniform",
    task_sizes: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Tier 2: average the task-global encoders into the global encoder ``g``.

    Only ``encoder.`` tensors are read, so tier-1 outputs (which also hold decoders and heads)
    can be passed as they are; decoders are never mixed across tasks.

    Parameters
    ----------
    task_encoders : mapping
        ``task → {name → tensor}``, e.g. the output of :func:`intra_task_average`.
    weighting : {"uniform", "data"}
        ``"uniform"``: ``ω_t = 1/|K|``; ``"data"``: ``ω_t ∝ Σ_{k∈C_t} n_k`` from ``task_sizes``.
    task_sizes : mapping, optional
        ``task → total training examples of the task`` (see :func:`task_example_counts`);
        required for ``weighting="data"``.

    Returns
    -------
    dict
        The global encoder ``g`` as ``encoder.… → tensor``.

    Raises
    ------
    ValueError
        Naming the task whose encoder names/shapes differ from the other tasks', or a task
        without encoder tensors or without a size.
    """
    if weighting not in INTER_TASK_WEIGHTINGS:
        raise ValueError(f"inter-task weighting must be one of {INTER_TASK_WEIGHTINGS}")
    if not task_encoders:
        raise ValueError("inter_task_average needs at least one task")
    encoders: dict[str, dict[str, Tensor]] = {}
    for task, state in task_encoders.items():
        encoders[task] = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        if not encoders[task]:
            raise ValueError(f"task {task!r} has no 'encoder.' tensors")
    _check_agreement(encoders, "task", "encoder architecture")

    if weighting == "data":
        if task_sizes is None:
            raise ValueError("inter-task weighting 'data' needs task_sizes")
        missing = [t for t in encoders if t not in task_sizes]
        if missing:
            raise ValueError(f"task_sizes has no entry for task(s) {missing}")
        weights = [float(task_sizes[t]) for t in encoders]
    else:
        weights = [1.0] * len(encoders)
    keys = list(next(iter(encoders.values())))
    return weighted_average([{k: e[k] for k in keys} for e in encoders.values()], weights)


def relative_squared_distance(
    state: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> float:
    """Return ``Σ‖w − g‖² / Σ‖g‖²`` over the floating-point tensors of ``reference``.

    Used for the λ schedule's optional freeze (stop growing λ once an encoder is close to g).

    Parameters
    ----------
    state : mapping
        ``name → tensor`` holding every floating-point name of ``reference`` (e.g. a task-global
        model).
    reference : mapping
        ``name → tensor``, e.g. the global encoder ``g``.
    """
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for name, ref in reference.items():
        if not torch.is_floating_point(ref):
            continue
        if name not in state:
            raise ValueError(f"state has no tensor {name!r}")
        g = ref.detach().to(torch.float64)
        w = state[name].detach().to(device=g.device, dtype=torch.float64)
        num = num + (w - g).pow(2).sum().cpu()
        den = den + g.pow(2).sum().cpu()
    if den == 0:
        raise ValueError("reference has zero norm; the relative distance is undefined")
    return float(num / den)
