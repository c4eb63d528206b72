"""FedDF server: FedAvg per prototype, and the ensemble's mean logits on the public set.

Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated Learning" (NeurIPS
2020). Groups are averaged as FedAvg's (:class:`GroupAveraging`): the encoder among equal
architectures (a *prototype*), decoders among equal ones of the same dataset task; heads stay
personal, as in fedmtl's FedAvg. For every distillation task (a classification task two or
more clients of a dataset hold) the clients also upload their logits of the public set; the
server averages them per task, uniformly, into the ensemble's target. In the paper the server
then distils that target into each prototype on the public set; fedmtl's server builds no
model, so the step runs where the prototype arrives: each client distils the target into the
averaged model it received (same public batches, seeded by round, not by client) before its
local epochs (``fedmtl.clients.feddf``). A client with no same-task partner has no ensemble:
it gets FedAvg's groups, or trains locally when no group has a partner either. Clients
evaluate their own model.

Server metrics: FedAvg's ``groups``, ``feddf/ensembles`` (tasks with a target) and
``feddf/ensemble_spread``, the mean over tasks of the clients' mean squared distance to the
ensemble's logits (falls as distillation makes the members agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmtl.config import Experiment
from fedmtl.messages import TensorSpec
from fedmtl.protocols.feddf import distill_tasks, logits_key, num_classes, target_key, task_group
from fedmtl.strategies.base import ClientInfo, Reply, register_strategy, split_checkpoint
from fedmtl.strategies.baselines import GroupAveraging


@register_strategy("feddf")
class FedDF(GroupAveraging):
    """FedAvg's groups plus per-task ensemble logits (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        assert experiment.public is not None  # config refuses feddf without [public]
        self.size = experiment.public.size
        self.targets: dict[str, Tensor] = {}  # task group → mean logits [P, C]
        self.targets_round = 0  # the round whose train message carries them
        self._logits: dict[str, dict[str, Tensor]] = {}  # this round: group → client → logits
        self._logits_round = 0

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """FedAvg's groups and, for each distillation task, the ensemble's target."""
        out = super().train_arrays(round_, client)
        if self.targets_round == round_:
            for task in distill_tasks(self.experiment, client.client_id):
                group = task_group(self.experiment, client.client_id, task)
                if group in self.targets:
                    out[target_key(task)] = self.targets[group]
        return out

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Nothing: each client evaluates its own (distilled, then trained) model."""
        return {}

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """FedAvg's planned groups plus ``[P, C]`` float32 logits per distillation task."""
        expected = super().expected_reply(client, upload)
        for task in distill_tasks(self.experiment, client.client_id):
            classes = num_classes(self.experiment, client.client_id, task)
            expected[logits_key(task)] = TensorSpec((self.size, classes), "float32")
        return expected

    def fold(self, round_: int, reply: Reply, info: ClientInfo) -> bool:
        """FedAvg's running sums, and keep the reply's logits for the round's ensembles."""
        if self._logits_round != round_:
            self._logits, self._logits_round = {}, round_
        for task in distill_tasks(self.experiment, info.client_id):
            group = task_group(self.experiment, info.client_id, task)
            self._logits.setdefault(group, {})[info.client_id] = reply.arrays[logits_key(task)]
        return super().fold(round_, reply, info)

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """FedAvg's averages; the ensembles' mean logits for the next round."""
        if self._logits_round != round_:  # called on its own: the replies still hold tensors
            self._logits, self._logits_round = {}, round_
            for client_id, reply in replies.items():
                for task in distill_tasks(self.experiment, client_id):
                    group = task_group(self.experiment, client_id, task)
                    self._logits.setdefault(group, {})[client_id] = reply.arrays[logits_key(task)]
        metrics = super().aggregate(round_, replies, clients)
        self.targets, self.targets_round = {}, round_ + 1
        spreads = []
        for group, members in sorted(self._logits.items()):
            if len(members) < 2:
                continue  # the partner did not reply: one model is no ensemble
            stacked = torch.stack([members[c].double() for c in sorted(members)])
            target = stacked.mean(dim=0)
            self.targets[group] = target.float()
            spreads.append(float((stacked - target).pow(2).mean()))
        self._logits = {}
        metrics["feddf/ensembles"] = float(len(spreads))
        if spreads:
            metrics["feddf/ensemble_spread"] = sum(spreads) / len(spreads)
        return metrics

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """FedAvg's averages, and the ensemble targets with the round they are for."""
        tensors, meta = super().state_dict()
        groups = sorted(self.targets)
        tensors.update({f"t{i}/logits": self.targets[g] for i, g in enumerate(groups)})
        return tensors, {**meta, "target_groups": groups, "targets_round": self.targets_round}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        super().load_state_dict(tensors, meta)
        parts = split_checkpoint(tensors)
        groups = meta.get("target_groups", [])
        self.targets = {g: parts[f"t{i}"]["logits"] for i, g in enumerate(groups)}
        self.targets_round = int(meta.get("targets_round", 0))
