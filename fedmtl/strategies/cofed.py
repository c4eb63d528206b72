"""CoFED server: per-task majority votes on the public set's predicted classes.

Cao et al., "CoFED: Cross-silo Heterogeneous Federated Multi-task Learning via Co-training"
(arXiv 2202.08603). Each round the clients of a vote task (a dataset classification task two
or more clients hold, :func:`~fedmtl.protocols.cofed.vote_tasks`) upload their predicted class
of every public sample; the server takes the majority per sample
(:func:`~fedmtl.aggregation.votes.majority_vote`) and sends the labels whose majority share is
above ``min_agreement`` with the next round's ``train`` message. No weights are exchanged, so
the clients' architectures are free. Tasks of other kinds, and a classification task no other
client holds, are not voted on: such a client trains locally (its own predictions would be its
only vote).

Server metrics: ``cofed/agreement_mean`` (mean majority share over samples and vote tasks) and
``cofed/pseudo_labels`` (labels kept, summed over vote tasks). State: the labels per task
group and the round they are for, checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmtl.aggregation.votes import majority_vote
from fedmtl.config import Experiment
from fedmtl.messages import TensorSpec
from fedmtl.protocols.cofed import (
    labels_key,
    prediction_key,
    public_size,
    task_group,
    vote_tasks,
)
from fedmtl.strategies.base import ClientInfo, Reply, Strategy, register_strategy


@register_strategy("cofed")
class CoFED(Strategy):
    """Majority votes per task group (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.size = public_size(experiment)
        self.labels: dict[str, Tensor] = {}  # task group → voted labels [P] (−1: none)
        self.labels_round = 0  # the round whose train message carries them

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The voted labels of the client's vote tasks (from the previous round's votes)."""
        if self.labels_round != round_:
            return {}
        out = {}
        for task in vote_tasks(self.experiment, client.client_id):
            group = task_group(self.experiment, client.client_id, task)
            if group in self.labels:
                out[labels_key(task)] = self.labels[group]
        return out

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Nothing: each client evaluates its own model."""
        return {}

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """One ``[P]`` float32 prediction vector per vote task."""
        return {
            prediction_key(task): TensorSpec((self.size,), "float32")
            for task in vote_tasks(self.experiment, client.client_id)
        }

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Vote per task group among this round's repliers; the labels go out next round."""
        ballots: dict[str, list[Tensor]] = {}
        for client_id in sorted(replies):
            for task in vote_tasks(self.experiment, client_id):
                group = task_group(self.experiment, client_id, task)
                ballots.setdefault(group, []).append(
                    replies[client_id].arrays[prediction_key(task)]
                )
        self.labels, self.labels_round = {}, round_ + 1
        shares, kept = [], 0
        for group, votes in sorted(ballots.items()):
            if len(votes) < 2:
                continue  # the partner did not reply: a lone vote is no consensus
            labels, share = majority_vote(torch.stack(votes), self.hyper.min_agreement)
            self.labels[group] = labels.float()
            shares.append(float(share.mean()))
            kept += int((labels >= 0).sum())
        metrics = {"cofed/vote_tasks": float(len(shares)), "cofed/pseudo_labels": float(kept)}
        if shares:
            metrics["cofed/agreement_mean"] = sum(shares) / len(shares)
        return metrics

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The voted labels per task group, and the round they are for."""
        groups = sorted(self.labels)
        tensors = {f"labels{i}": self.labels[g] for i, g in enumerate(groups)}
        return tensors, {"groups": groups, "labels_round": self.labels_round}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.labels = {g: tensors[f"labels{i}"] for i, g in enumerate(meta.get("groups", []))}
        self.labels_round = int(meta.get("labels_round", 0))
