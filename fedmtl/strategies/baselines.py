"""Baselines: Local, and FedAvg adapted to heterogeneous clients (plus FedProx, FedPer, Ditto).

Heterogeneous FedAvg: a parameter group (``encoder``, ``decoders.<task>``) is averaged among the
clients whose tensors of that group have the same names, shapes and dtypes — encoders among
equal architectures, decoders among clients of the same dataset task whose decoders match.
Heads, buffers and groups outside ``shares`` stay personal. FedProx and Ditto differ only on the
client; FedPer shares the encoder only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmtl.aggregation.fedavg import RunningAverage
from fedmtl.messages import TensorSpec
from fedmtl.strategies.base import (
    ClientInfo,
    Federation,
    Reply,
    Strategy,
    checkpoint_tensors,
    register_strategy,
    split_checkpoint,
)


@register_strategy("local")
class Local(Strategy):
    """No exchange at all: every client trains on its own data (the Δ% reference)."""


@register_strategy("pseudolabel")
class PseudoLabel(Local):
    """Local: each client pseudo-labels the public set on its own (nothing exchanged)."""


@register_strategy("simclr")
class SimCLR(Local):
    """Local: each client pretrains with SimCLR on the public set (nothing exchanged)."""


class HolderCounting(Strategy):
    """Knows how many known clients hold each shared group; uploads only groups held twice.

    A group only one client holds has no partner: it is neither uploaded nor sent, and the
    client keeps training its own copy (FedAvg's, FedAMP's and MaT-FL's singletons).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holders: dict[str, int] = {}  # group key → how many known clients hold it

    def _count_holders(self, clients: Mapping[str, ClientInfo]) -> None:
        self.holders = {}
        for info in clients.values():
            for group in info.group_specs(self.shares):
                key = info.group_key(group)
                self.holders[key] = self.holders.get(key, 0) + 1

    def upload_groups(self, client: ClientInfo) -> list[str] | None:
        """The groups at least one other known client holds.

        A group only this client has averages to its own tensors: uploading it would cost
        bytes (a whole encoder) for nothing.
        """
        return [
            group
            for group in client.group_specs(self.shares)
            if self.holders.get(client.group_key(group), 0) >= 2
        ]


class GroupAveraging(HolderCounting):
    """Averages every shared group among the clients that hold an identical copy of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_groups: dict[str, dict[str, Tensor]] = {}  # group key → averaged tensors
        # The round being folded: group key → its running average (None between rounds).
        self._sums: dict[str, RunningAverage] | None = None
        self._round = 0

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The client's groups as averaged in the previous round (none in round 1).

        A group no other client holds is not sent: its average is the client's own tensors,
        which its personal state already has.
        """
        out: dict[str, Tensor] = {}
        for group in self.averaged_groups(client):
            key = client.group_key(group)
            if self.holders.get(key, 0) >= 2:
                out.update(self.global_groups.get(key, {}))
        return out

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Count who holds each group (decides what is uploaded), then FedAvg's round.

        Replies fold into running sums as they arrive (:meth:`fold`): the server holds one
        float64 accumulator per group, not every upload until the phase ends.
        """
        self._count_holders(federation.clients)
        self.start_round(round_, clients)

        def fold(client_id: str, reply: Reply) -> bool:
            return self.fold(round_, reply, federation.clients[client_id])

        replies = federation.train_phase(round_, clients, on_reply=fold)
        server_metrics = self.aggregate(round_, replies, federation.clients)
        federation.record_server(round_, server_metrics)

    def averaged_groups(self, client: ClientInfo) -> dict[str, dict[str, TensorSpec]]:
        """The client's groups this class averages (all shared ones; MaT-FL leaves out one)."""
        return client.group_specs(self.shares)

    def start_round(self, round_: int, clients: list[ClientInfo]) -> None:
        """Open one running average per group key the round's participants will upload.

        Each is told the weight total it should see (the planned uploaders' training examples
        from ``describe``), so replies fold in as they arrive and the result equals
        :func:`~fedmtl.aggregation.fedavg.weighted_average` over the same replies bit for bit
        (see :class:`~fedmtl.aggregation.fedavg.RunningAverage`).
        """
        expected: dict[str, float] = {}
        for info in clients:
            planned = self.upload_groups(info)
            for group in self.averaged_groups(info):
                if planned is None or group in planned:
                    key = info.group_key(group)
                    expected[key] = expected.get(key, 0.0) + float(info.num_train)
        self._round = round_
        self._sums = {key: RunningAverage(total or None) for key, total in expected.items()}

    def fold(self, round_: int, reply: Reply, info: ClientInfo) -> bool:
        """Add one good ``train`` reply to the round's running averages.

        Returns ``True``: the reply's tensors are folded in and need not be kept.
        """
        if self._sums is None or self._round != round_:
            self._sums, self._round = {}, round_
        weight = float(reply.metrics["num-examples"])
        uploaded = reply.upload_groups
        for group, specs in self.averaged_groups(info).items():
            if uploaded is not None and group not in uploaded:
                continue
            key = info.group_key(group)
            if key not in self._sums:  # not planned (a direct fold): plain running sum
                self._sums[key] = RunningAverage()
            self._sums[key].add({name: reply.arrays[name] for name in specs}, weight)
        return True

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Weighted (by training examples) average per group key among repliers.

        Each reply carries the groups it was asked for (the round's upload plan). In a round
        run by :meth:`run_round` the replies were folded as they arrived (:meth:`fold`) and
        carry no tensors; called on its own, it folds ``replies`` here, in their order.
        """
        if self._sums is None or self._round != round_:
            sums: dict[str, list[tuple[dict[str, Tensor], float]]] = {}
            for client_id, reply in replies.items():
                info = clients[client_id]
                uploaded = reply.upload_groups
                for group, specs in self.averaged_groups(info).items():
                    if uploaded is None or group in uploaded:
                        tensors = {name: reply.arrays[name] for name in specs}
                        weight = float(reply.metrics["num-examples"])
                        sums.setdefault(info.group_key(group), []).append((tensors, weight))
            # The exact total up front, as weighted_average normalises: bit-identical to it.
            self._round = round_
            self._sums = {}
            for key, entries in sums.items():
                running = self._sums[key] = RunningAverage(sum(w for _, w in entries) or None)
                for tensors, weight in entries:
                    running.add(tensors, weight)
        done = {key: running for key, running in self._sums.items() if running.count}
        for key, running in done.items():
            self.global_groups[key] = running.result()
        self._sums = None
        return {"groups": float(len(done))}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every group average, namespaced by group key."""
        tensors: dict[str, Tensor] = {}
        for index, (_, group) in enumerate(sorted(self.global_groups.items())):
            tensors.update(checkpoint_tensors(f"g{index}", group))
        keys = [key for key, _ in sorted(self.global_groups.items())]
        return tensors, {"group_keys": keys, "holders": self.holders}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the group averages."""
        parts = split_checkpoint(tensors)
        self.holders = dict(meta.get("holders", {}))
        self.global_groups = {
            key: parts.get(f"g{index}", {}) for index, key in enumerate(meta.get("group_keys", []))
        }


@register_strategy("fedavg")
class FedAvg(GroupAveraging):
    """FedAvg over encoders (by architecture) and decoders (by task)."""


@register_strategy("fedprox")
class FedProx(GroupAveraging):
    """FedAvg on the server; clients add the proximal term."""


@register_strategy("fedper")
class FedPer(GroupAveraging):
    """FedAvg over encoders only; decoders and heads are personal."""


@register_strategy("fedrcl")
class FedRCL(GroupAveraging):
    """FedAvg on the server; clients add the relaxed supervised contrastive loss."""


@register_strategy("ditto")
class Ditto(GroupAveraging):
    """FedAvg of the global model; each client also keeps a regularised personal model."""
