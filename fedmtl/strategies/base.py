"""Strategy base: the per-algorithm hooks a server loop calls (template-method style).

A strategy sees the round loop only through :class:`Federation`, declared here, so this module
and the algorithm modules never import :mod:`fedmtl.strategies.loop` (which imports them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from flwr.app import RecordDict
from torch import Tensor

from fedmtl.catalog import ALGORITHM_NAMES
from fedmtl.config import Experiment
from fedmtl.messages import TensorSpec
from fedmtl.models.multitask import group_of
from fedmtl.registry import Registry

STRATEGIES: Registry[type[Strategy]] = Registry(
    "algorithm", attribute="name", allowed=ALGORITHM_NAMES
)


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Register the server side of algorithm ``name``."""
    return STRATEGIES.register(name)


def create_strategy(experiment: Experiment) -> Strategy:
    """The server side of the experiment's algorithm."""
    return STRATEGIES[experiment.algorithm.name](experiment)


@dataclass
class ClientInfo:
    """What the server learnt about a client from its ``describe`` reply."""

    client_id: str
    node_id: int
    dataset: str
    tasks: list[str]
    num_train: int
    num_test: int
    specs: dict[str, TensorSpec]  # every group's shared parameters (describe announces them)
    # task → (primary metric, higher is better), as the client's task table defines them
    primary_metrics: dict[str, tuple[str, bool]] = field(default_factory=dict)

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
    # train replies: the groups the server asked this client for (None: every shared group)
    upload_groups: list[str] | None = None


Validator = Callable[[ClientInfo, Reply], None]
# Called with each good reply as it arrives (client id, reply); True: the callee folded the
# reply's tensors in, and the loop drops them instead of holding every upload to the end.
ReplyHandler = Callable[[str, Reply], bool]


class Federation(Protocol):
    """What a strategy sees of the round loop (:class:`fedmtl.strategies.loop.FederatedLoop`)."""

    @property
    def clients(self) -> Mapping[str, ClientInfo]:
        """Every client that described itself, by id."""
        ...

    @property
    def run_config(self) -> Mapping[str, Any]:
        """Flower's run config: settings of the deployment (e.g. the stream's address)."""
        ...

    def base_config(self, round_: int, client_id: str | None = None) -> dict[str, Any]:
        """The config entries every message to ``client_id`` carries."""
        ...

    def train_phase(
        self, round_: int, clients: list[ClientInfo], on_reply: ReplyHandler | None = None
    ) -> dict[str, Reply]:
        """Send ``train`` with the strategy's tensors; return the validated good replies.

        ``on_reply`` sees each good reply as it arrives (with its upload plan set); when it
        returns True the returned reply keeps its metrics but not its tensors.
        """
        ...

    def exchange(
        self,
        round_: int,
        phase: str,
        message_type: str,
        contents: Mapping[str, RecordDict],
        validate: Validator | None = None,
        on_reply: ReplyHandler | None = None,
    ) -> dict[str, Reply]:
        """Send one message per client; return the good replies (failures are recorded)."""
        ...

    def record_client(self, round_: int, client_id: str, metrics: Mapping[str, float]) -> None:
        """Add a client's metrics of ``round_`` to its row."""
        ...

    def record_server(self, round_: int, metrics: Mapping[str, float]) -> None:
        """Attach server-side metrics of ``round_`` to every row of the round."""
        ...


class Strategy:
    """Server side of one algorithm.

    The loop (:class:`fedmtl.strategies.loop.FederatedLoop`) owns Flower, selection,
    validation, metrics and checkpoints; a strategy decides what each client receives, checks
    what it must send back, and aggregates. Multi-phase algorithms override :meth:`run_round`,
    which sees the loop as a :class:`Federation`.
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

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes a client's ``train`` reply must carry.

        ``upload`` is what :meth:`upload_groups` planned for the client this round (the loop
        asks once per round and client, and passes the plan on).
        """
        return {
            name: spec
            for group, specs in client.group_specs(self.shares).items()
            if upload is None or group in upload
            for name, spec in specs.items()
        }

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Fold this round's good replies into the server state; return server metrics."""
        return {}

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """One round: the ``train`` phase, then aggregation of the good replies."""
        replies = federation.train_phase(round_, clients)
        server_metrics = self.aggregate(round_, replies, federation.clients)
        federation.record_server(round_, server_metrics)

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON metadata to checkpoint (everything :meth:`aggregate` builds)."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""

    def close(self) -> None:
        """Release what the strategy opened for the run (FedMuscle's stream port)."""


def checkpoint_tensors(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Namespace tensors for a checkpoint (``prefix/name``)."""
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def split_checkpoint(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`checkpoint_tensors` over several prefixes."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        out.setdefault(prefix, {})[name] = value
    return out
