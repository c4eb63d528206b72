"""Strategy base: the per-algorithm hooks a server loop calls (template-method style)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from fedmtl.config import Experiment
from fedmtl.messages import TensorSpec
from fedmtl.models.multitask import group_of

if TYPE_CHECKING:
    from fedmtl.strategies.loop import FederatedLoop

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Register the server side of algorithm ``name``."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return decorator


def create_strategy(experiment: Experiment) -> Strategy:
    """The server side of the experiment's algorithm."""
    name = experiment.algorithm.name
    if name not in STRATEGIES:
        raise KeyError(f"unknown algorithm {name!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[name](experiment)


@dataclass
class ClientInfo:
    """What the server learnt about a client from its ``describe`` reply."""

    client_id: str
    node_id: int
    dataset: str
    tasks: list[str]
    num_train: int
    num_test: int
    specs: dict[str, TensorSpec]

    def group_specs(self, shares: tuple[str, ...]) -> dict[str, dict[str, TensorSpec]]:
        """Specs of the shared tensors, by group (only groups named in ``shares``)."""
        out: dict[str, dict[str, TensorSpec]] = {}
        for name, spec in self.specs.items():
            group = group_of(name)
            if group.partition(".")[0] in shares:
                out.setdefault(group, {})[name] = spec
        return out

    def group_key(self, group: str) -> str:
        """Return the key that decides who is averaged with whom.

        Same group, same tensor names/shapes/dtypes, and for a decoder also the same dataset
        (a task is a dataset's task).
        """
        specs = {
            k: [list(s.shape), s.dtype] for k, s in self.specs.items() if k.startswith(group + ".")
        }
        signature = json.dumps(specs, sort_keys=True)
        digest = hashlib.sha256(signature.encode()).hexdigest()[:16]
        scope = f"{self.dataset}/" if group.startswith("decoders.") else ""
        return f"{scope}{group}@{digest}"


@dataclass
class Reply:
    """A validated client reply."""

    client_id: str
    metrics: dict[str, Any]
    arrays: dict[str, Tensor] = field(default_factory=dict)
    records: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Server side of one algorithm.

    The loop (:class:`fedmtl.strategies.loop.FederatedLoop`) owns Flower, selection,
    validation, metrics and checkpoints; a strategy decides what each client receives, checks
    what it must send back, and aggregates. Multi-phase algorithms override :meth:`run_round`.
    """

    name: ClassVar[str] = ""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.hyper: Any = experiment.algorithm
        self.shares: tuple[str, ...] = type(self.hyper).shares

    # -- hooks -------------------------------------------------------------------------

    def train_config(self, round_: int, client: ClientInfo) -> dict[str, Any]:
        """Extra scalars for a client's ``train`` message."""
        return {}

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Tensors a client receives before training in ``round_``."""
        return {}

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Tensors a client evaluates with after ``round_`` (default: next round's train arrays)."""
        return self.train_arrays(round_ + 1, client)

    def upload_groups(self, client: ClientInfo) -> list[str] | None:
        """The shared groups a client must send back after training (``None``: all of them)."""
        return None

    def expected_reply(self, client: ClientInfo) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes a client's ``train`` reply must carry."""
        wanted = self.upload_groups(client)
        return {
            name: spec
            for group, specs in client.group_specs(self.shares).items()
            if wanted is None or group in wanted
            for name, spec in specs.items()
        }

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Fold this round's good replies into the server state; return server metrics."""
        return {}

    def run_round(self, loop: FederatedLoop, round_: int, clients: list[ClientInfo]) -> None:
        """One round: the ``train`` phase, then aggregation of the good replies."""
        replies = loop.train_phase(round_, clients)
        server_metrics = self.aggregate(round_, replies, loop.clients)
        loop.record_server(round_, server_metrics)

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON metadata to checkpoint (everything :meth:`aggregate` builds)."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""

    def close(self) -> None:
        """Release what the strategy opened for the run (FedMuscle's stream port)."""
