"""Per-task FedAvg, M-Fed's "traditional FL": whole task models averaged inside task groups.

A *task group* is M-Fed's: the clients of one dataset's task (``<dataset>/<task>``), here
further split by architecture, since the whole task model is averaged: its members have equal
encoders and equal decoders and heads of that task (same names, shapes and dtypes, from
``describe``). Nothing crosses groups: no encoder average across tasks (M-Fed's tier 2) and no
pull toward one.

Per round:

- Upload: the encoder and that task's decoder and head, for each task whose group has another
  known member; nothing for a task alone in its group (its average would be its own model).
- Aggregation: FedAvg (weights: training examples) of encoder, decoder and head inside each
  group among this round's repliers, folded as the replies arrive.
- Downlink: each task's averaged decoder and head; the encoder is the uniform mean of the
  averaged encoders of the client's task groups (M-Fed's tier 1: a multi-task client took part
  in each of its groups with its one encoder). A group of one contributes the client's own
  encoder, as in M-Fed.
- A client none of whose tasks has a partner sends and receives nothing: it trains locally,
  as FedAvg's singleton groups do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmtl.aggregation.fedavg import RunningAverage, weighted_average
from fedmtl.strategies.base import (
    ClientInfo,
    Federation,
    Reply,
    Strategy,
    checkpoint_tensors,
    register_strategy,
    split_checkpoint,
)

ENCODER_PREFIX = "encoder."


def task_prefixes(task: str) -> tuple[str, str]:
    """The state-dict prefixes of ``task``'s decoder and head."""
    return f"decoders.{task}.", f"heads.{task}."


def task_group_key(client: ClientInfo, task: str) -> str:
    """``<dataset>/<task>@<digest>``: who averages task ``task`` of ``client`` with whom.

    The digest covers the names, shapes and dtypes of the encoder and of the task's decoder
    and head, so only whole task models of one architecture are averaged.
    """
    prefixes = (ENCODER_PREFIX, *task_prefixes(task))
    specs = {
        name: [list(spec.shape), spec.dtype]
        for name, spec in client.specs.items()
        if name.startswith(prefixes)
    }
    digest = hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{client.dataset}/{task}@{digest}"


@register_strategy("fedavg_task")
class FedAvgTask(Strategy):
    """FedAvg of whole task models inside each task group, nothing across (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_models: dict[str, dict[str, Tensor]] = {}  # group key → averaged task model
        self.holders: dict[str, int] = {}  # group key → known clients in the group
        self._sums: dict[str, RunningAverage] = {}
        self._round = 0

    # -- groups and plans --------------------------------------------------------------

    def _count_holders(self, clients: Mapping[str, ClientInfo]) -> None:
        self.holders = {}
        for info in clients.values():
            for task in info.tasks:
                key = task_group_key(info, task)
                self.holders[key] = self.holders.get(key, 0) + 1

    def shared_tasks(self, client: ClientInfo) -> list[str]:
        """The client's tasks whose group has another known member."""
        return [t for t in client.tasks if self.holders.get(task_group_key(client, t), 0) >= 2]

    def upload_groups(self, client: ClientInfo) -> list[str] | None:
        """Encoder, decoders and heads of the shared tasks; nothing when no task is shared."""
        tasks = self.shared_tasks(client)
        if not tasks:
            return []
        return ["encoder", *(f"{kind}.{t}" for t in tasks for kind in ("decoders", "heads"))]

    # -- what clients receive ----------------------------------------------------------

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Averaged decoders and heads of its tasks, the mean of its groups' encoders."""
        models = [
            (task, self.task_models[key])
            for task in client.tasks
            if (key := task_group_key(client, task)) in self.task_models
        ]
        if not models or not self.shared_tasks(client):
            return {}
        out: dict[str, Tensor] = {}
        encoders = [{k: v for k, v in m.items() if k.startswith(ENCODER_PREFIX)} for _, m in models]
        out.update(weighted_average(encoders, [1.0] * len(encoders)))
        for task, model in models:
            out.update({k: v for k, v in model.items() if k.startswith(task_prefixes(task))})
        return out

    # -- the round ---------------------------------------------------------------------

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Count each group's members, then train, folding replies as they arrive."""
        self._count_holders(federation.clients)
        self._round, self._sums = round_, {}

        def fold(client_id: str, reply: Reply) -> bool:
            return self.fold(round_, reply, federation.clients[client_id])

        replies = federation.train_phase(round_, clients, on_reply=fold)
        federation.record_server(round_, self.aggregate(round_, replies, federation.clients))

    def fold(self, round_: int, reply: Reply, info: ClientInfo) -> bool:
        """Add one reply's task models to their groups' running averages (True: folded)."""
        if self._round != round_:
            self._round, self._sums = round_, {}
        weight = float(reply.metrics["num-examples"])
        encoder = {k: v for k, v in reply.arrays.items() if k.startswith(ENCODER_PREFIX)}
        if not encoder:
            return True  # nothing shared this round
        for task in info.tasks:
            own = {k: v for k, v in reply.arrays.items() if k.startswith(task_prefixes(task))}
            key = task_group_key(info, task)
            self._sums.setdefault(key, RunningAverage()).add({**encoder, **own}, weight)
        return True

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Each group's average among this round's repliers (folding ``replies`` if needed)."""
        if self._round != round_:
            self._round, self._sums = round_, {}
            for client_id, reply in replies.items():
                self.fold(round_, reply, clients[client_id])
        sizes = {key: running.count for key, running in self._sums.items()}
        for key, running in self._sums.items():
            self.task_models[key] = running.result()
        self._sums = {}
        shared = [n for n in sizes.values() if n >= 2]
        return {
            "fedavg_task/shared_groups": float(len(shared)),
            "fedavg_task/largest_group": float(max(sizes.values(), default=0)),
        }

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every group's averaged task model, namespaced by its position."""
        keys = sorted(self.task_models)
        tensors: dict[str, Tensor] = {}
        for index, key in enumerate(keys):
            tensors.update(checkpoint_tensors(f"t{index}", self.task_models[key]))
        return tensors, {"group_keys": keys}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the groups' averaged task models."""
        parts = split_checkpoint(tensors)
        self.task_models = {
            key: parts.get(f"t{index}", {}) for index, key in enumerate(meta.get("group_keys", []))
        }
