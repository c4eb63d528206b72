"""FedAMP server: each client's cloud model u_i by attention over parameter distances.

The maths is :mod:`fedmtl.aggregation.fedamp` (Huang et al., "Personalized Cross-Silo
Federated Learning on Non-IID Data", AAAI 2021). Applied, as in FedHCA²'s comparison, group by
group among architecture-compatible clients: encoders among equal encoders, each decoder among
the equal decoders of the same dataset task (``ClientInfo.group_key``). Heads and buffers stay
on the client.

Per round:

- Upload: each shared group another known client also holds, the client's personalised θ_i
  after local training. The server keeps every client's latest θ_i per group (partial
  participation: an absent client's last upload still counts), so it holds N models.
- Aggregation: for every group that received an upload, ξ over all its stored members
  (``attention_weights`` on ``‖θ_i − θ_j‖²/P``, log space, see the maths module).
- Downlink (``train``): per group, u_i = Σ_j ξ_ij θ_j, the target of the client's pull
  ``(λ/2)·‖θ_i − u_i‖²``; the client does not load it, it trains its own θ_i. Nothing is
  sent for evaluation: each client evaluates its personalised model.
- A group no other client holds (no partner) is neither uploaded nor sent: by the formula
  u_i = θ_i, and the client pulls toward the parameters it starts the round from, as FedProx's
  anchor does. Round 1 (no θ_j known yet) is the same.

Server metrics, to watch the attention act, for encoder groups (``fedamp/encoder/…``) and
decoder groups (``fedamp/decoders/…``) apart: the mean self weight ξ_ii and peer weight ξ_ij
(i ≠ j) over the groups aggregated this round, the mean per-parameter distance d̄²; how many
rows were capped; and each client's encoder self weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmtl.aggregation.fedamp import attention_weights, cloud_model, squared_distances
from fedmtl.config import Experiment
from fedmtl.strategies.base import (
    ClientInfo,
    Federation,
    Reply,
    checkpoint_tensors,
    register_strategy,
    split_checkpoint,
)
from fedmtl.strategies.baselines import HolderCounting


@register_strategy("fedamp")
class FedAMP(HolderCounting):
    """Attentive message passing among equal groups (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        # group key → client id → its latest uploaded tensors θ_i of that group
        self.models: dict[str, dict[str, dict[str, Tensor]]] = {}
        # group key → (member ids in ξ's order, ξ [n, n] float64)
        self.xi: dict[str, tuple[list[str], Tensor]] = {}
        self._touched: set[str] = set()  # groups that received an upload this round
        self._round = 0

    # -- what clients receive ----------------------------------------------------------

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The client's cloud model u_i of every group it shares with a known peer."""
        out: dict[str, Tensor] = {}
        for group in client.group_specs(self.shares):
            key = client.group_key(group)
            members, xi = self.xi.get(key, ([], torch.zeros(0, 0)))
            if client.client_id not in members or len(members) < 2:
                continue
            row = xi[members.index(client.client_id)]
            out.update(cloud_model([self.models[key][m] for m in members], row))
        return out

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Nothing: a client evaluates its own personalised model."""
        return {}

    # -- the round ---------------------------------------------------------------------

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Count who holds each group (decides the uploads), train, store θ_i, recompute ξ."""
        self._count_holders(federation.clients)
        self._round, self._touched = round_, set()

        def fold(client_id: str, reply: Reply) -> bool:
            return self.fold(round_, reply, federation.clients[client_id])

        replies = federation.train_phase(round_, clients, on_reply=fold)
        federation.record_server(round_, self.aggregate(round_, replies, federation.clients))

    def fold(self, round_: int, reply: Reply, info: ClientInfo) -> bool:
        """Store the reply's uploaded groups as the client's latest θ_i (True: kept here)."""
        if self._round != round_:
            self._round, self._touched = round_, set()
        uploaded = reply.upload_groups
        for group, specs in info.group_specs(self.shares).items():
            if uploaded is not None and group not in uploaded:
                continue
            key = info.group_key(group)
            self.models.setdefault(key, {})[info.client_id] = {n: reply.arrays[n] for n in specs}
            self._touched.add(key)
        return True

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """ξ of every group that received an upload this round; server metrics."""
        if self._round != round_:
            self._round, self._touched = round_, set()
            for client_id, reply in replies.items():
                self.fold(round_, reply, clients[client_id])
        hyper = self.hyper
        # encoder groups and decoder groups apart: their sizes and distances differ
        pools: dict[str, dict[str, list[float]]] = {}
        capped = 0
        metrics: dict[str, float] = {}
        for key in sorted(self._touched):
            members = sorted(self.models[key])
            states = [self.models[key][m] for m in members]
            squared, numel = squared_distances(states)
            xi, rows_capped = attention_weights(
                squared, numel, alpha_k=hyper.alpha_k, sigma=hyper.sigma
            )
            self.xi[key] = (members, xi)
            if len(members) < 2:
                continue
            off = ~torch.eye(len(members), dtype=torch.bool)
            kind = "encoder" if key.startswith("encoder@") else "decoders"
            pool = pools.setdefault(kind, {})
            pool.setdefault("xi_self_mean", []).extend(xi.diagonal().tolist())
            pool.setdefault("xi_peer_mean", []).extend(xi[off].tolist())
            pool.setdefault("distance_mean", []).extend((squared[off] / numel).tolist())
            capped += int(rows_capped.sum())
            if kind == "encoder":
                for member, weight in zip(members, xi.diagonal().tolist()):
                    metrics[f"fedamp/encoder/self_weight/{member}"] = weight
        self._touched = set()
        for kind, pool in pools.items():
            for name, values in pool.items():
                metrics[f"fedamp/{kind}/{name}"] = sum(values) / len(values)
        if pools:
            metrics["fedamp/capped_rows"] = float(capped)
        return metrics

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every stored θ_i and every group's ξ (group keys and members in the metadata)."""
        keys = sorted(self.models)
        tensors: dict[str, Tensor] = {}
        members: dict[str, list[str]] = {}  # group key → ids of the stored θ_i, in slot order
        xi_members: dict[str, list[str]] = {}  # group key → ξ's row and column order
        for k, key in enumerate(keys):
            members[key] = sorted(self.models[key])
            for m, client_id in enumerate(members[key]):
                tensors.update(checkpoint_tensors(f"g{k}.{m}", self.models[key][client_id]))
            if key in self.xi:
                xi_members[key], tensors[f"xi{k}/xi"] = self.xi[key]
        return tensors, {"group_keys": keys, "members": members, "xi_members": xi_members}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        parts = split_checkpoint(tensors)
        members, xi_members = meta.get("members", {}), meta.get("xi_members", {})
        self.models, self.xi = {}, {}
        for k, key in enumerate(meta.get("group_keys", [])):
            self.models[key] = {
                client_id: parts.get(f"g{k}.{m}", {})
                for m, client_id in enumerate(members.get(key, []))
            }
            if f"xi{k}" in parts:
                self.xi[key] = (list(xi_members[key]), parts[f"xi{k}"]["xi"])
