"""MaT-FL server: encoders averaged inside clusters of their updates, decoders by task.

The maths is :mod:`fedmtl.aggregation.matfl` (Cai et al., "Many-Task Federated Learning: A New
Problem Setting and A Simple Baseline", CVPR Workshops 2023).

- Encoders: among the clients of one encoder architecture that replied this round, the updates
  ``Δ_i = θ_i − θ_i^start`` are clustered (agglomerative, average linkage, cosine distance;
  ``num_clusters`` or ``distance_threshold``), and each client's next encoder is the FedAvg
  (weights: training examples) of its cluster. A cluster of one gives the client its own
  encoder back. θ^start is the encoder the server last sent the client; before it has sent
  one the client reports it (:mod:`fedmtl.protocols.matfl`: round 1's upload carries the
  encoder twice). The server holds this round's uploads and updates until the clustering,
  and every client's current encoder.
- Decoders: FedAvg among the equal decoders of the same dataset task, as FedAvg does
  (:class:`~fedmtl.strategies.baselines.GroupAveraging`, folded as replies arrive).
- A group (encoder or decoder) no other known client holds is neither uploaded nor sent: that
  client trains it locally, as FedAvg's singletons.

Server metrics: the number of encoder clusters, the largest cluster, each client's cluster
label (numbered by first appearance among the members, sorted by client id) and the mean
pairwise cosine distance of the updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmtl.aggregation.matfl import cluster_averages, cluster_labels, cosine_distances
from fedmtl.config import Experiment
from fedmtl.messages import TensorSpec
from fedmtl.protocols.matfl import REPORT_START, START_PREFIX
from fedmtl.strategies.base import (
    ClientInfo,
    Reply,
    checkpoint_tensors,
    register_strategy,
    split_checkpoint,
)
from fedmtl.strategies.baselines import GroupAveraging

ENCODER = "encoder"


@register_strategy("matfl")
class MaTFL(GroupAveraging):
    """Dynamic grouping of encoders, FedAvg of decoders (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.encoders: dict[str, dict[str, Tensor]] = {}  # client id → encoder it starts from
        # This round: encoder group key → client id → (θ_new, Δ, weight)
        self._uploads: dict[str, dict[str, tuple[dict[str, Tensor], dict[str, Tensor], float]]]
        self._uploads = {}
        self._encoder_round = 0

    def averaged_groups(self, client: ClientInfo) -> dict[str, dict[str, TensorSpec]]:
        """The decoders only: FedAvg's running averages do not see the encoder."""
        return {g: s for g, s in client.group_specs(self.shares).items() if g != ENCODER}

    def _shares_encoder(self, client: ClientInfo) -> bool:
        return self.holders.get(client.group_key(ENCODER), 0) >= 2

    def _reports_start(self, client: ClientInfo) -> bool:
        return self._shares_encoder(client) and client.client_id not in self.encoders

    # -- what clients receive and send -------------------------------------------------

    def train_config(self, round_: int, client: ClientInfo) -> dict[str, Any]:
        """Ask for the start encoder while the server does not know it."""
        return {REPORT_START: True} if self._reports_start(client) else {}

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Averaged decoders, and the client's cluster-averaged encoder once there is one."""
        out = super().train_arrays(round_, client)
        if self._shares_encoder(client):
            out.update(self.encoders.get(client.client_id, {}))
        return out

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """The planned groups, plus ``start/encoder.…`` while the start is unknown."""
        specs = super().expected_reply(client, upload)
        if self._reports_start(client):
            encoder = client.group_specs(self.shares).get(ENCODER, {})
            specs.update({START_PREFIX + name: spec for name, spec in encoder.items()})
        return specs

    # -- the round ---------------------------------------------------------------------

    def fold(self, round_: int, reply: Reply, info: ClientInfo) -> bool:
        """Keep the encoder and its update for the clustering; fold the decoders."""
        if self._encoder_round != round_:
            self._encoder_round, self._uploads = round_, {}
        uploaded = reply.upload_groups
        encoder_specs = info.group_specs(self.shares).get(ENCODER, {})
        if encoder_specs and (uploaded is None or ENCODER in uploaded):
            new = {name: reply.arrays[name] for name in encoder_specs}
            start = self.encoders.get(info.client_id) or {
                name: reply.arrays[START_PREFIX + name] for name in encoder_specs
            }
            update = {
                name: new[name].to(torch.float64) - start[name].to(torch.float64)
                for name in new
                if torch.is_floating_point(new[name])
            }
            weight = float(reply.metrics["num-examples"])
            key = info.group_key(ENCODER)
            self._uploads.setdefault(key, {})[info.client_id] = (new, update, weight)
        return super().fold(round_, reply, info)

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Decoders as FedAvg; encoders clustered by update and averaged per cluster."""
        if self._encoder_round != round_:  # called on its own: fold the replies first
            self._encoder_round, self._uploads = round_, {}
            self._round, self._sums = round_, {}
            for client_id, reply in replies.items():
                self.fold(round_, reply, clients[client_id])
        metrics = super().aggregate(round_, replies, clients)
        hyper = self.hyper
        sizes: list[int] = []
        spread: list[float] = []
        for key in sorted(self._uploads):
            members = sorted(self._uploads[key])
            entries = [self._uploads[key][m] for m in members]
            distances = cosine_distances([update for _, update, _ in entries])
            labels = cluster_labels(
                distances,
                num_clusters=hyper.num_clusters,
                distance_threshold=hyper.distance_threshold,
            )
            averages = cluster_averages(
                [new for new, _, _ in entries], [w for _, _, w in entries], labels
            )
            for member, label in zip(members, labels):
                self.encoders[member] = averages[label]
                metrics[f"matfl/cluster/{member}"] = float(label)
            sizes += [labels.count(label) for label in range(len(averages))]
            if len(members) >= 2:
                off = ~torch.eye(len(members), dtype=torch.bool)
                spread += distances[off].tolist()
        self._uploads = {}
        if sizes:
            metrics["matfl/clusters"] = float(len(sizes))
            metrics["matfl/largest_cluster"] = float(max(sizes))
        if spread:
            metrics["matfl/update_cosine_distance_mean"] = sum(spread) / len(spread)
        return metrics

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """FedAvg's decoder averages plus every client's current encoder.

        Members of one cluster share one average: it is saved once (safetensors refuses
        tensors that share memory), and the metadata maps each client to it.
        """
        tensors, meta = super().state_dict()
        slots: dict[int, int] = {}  # id of a stored encoder → its slot in the checkpoint
        owners: dict[str, int] = {}
        for client_id in sorted(self.encoders):
            encoder = self.encoders[client_id]
            if id(encoder) not in slots:
                slots[id(encoder)] = len(slots)
                tensors.update(checkpoint_tensors(f"e{slots[id(encoder)]}", encoder))
            owners[client_id] = slots[id(encoder)]
        return tensors, {**meta, "encoder_slots": owners}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the decoder averages and the clients' encoders."""
        super().load_state_dict(tensors, meta)
        parts = split_checkpoint(tensors)
        self.encoders = {
            client_id: parts[f"e{slot}"]
            for client_id, slot in meta.get("encoder_slots", {}).items()
        }
