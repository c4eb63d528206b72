"""M-Fed server: FedAvg inside task groups, encoder average across them, scheduled λ.

Per round ``r``, each selected client receives (wire format: :mod:`fedmtl.protocols.mfed`)

- the task-global model ``θ_t^glob`` of each of its tasks as produced by tier 1 so far (nothing
  in round 1: clients start from equal seeded inits): the decoders and heads of its tasks and an
  encoder. A single-task client gets ``enc(θ_t^glob)``; a multi-task client gets the uniform
  mean of its tasks' task-global encoders (it took part in each of those groups with its one
  encoder). With ``keep_local_encoder`` no encoder is sent and the client keeps its own;
- the global encoder ``g`` (``global/encoder.…``), the target of the pull, also with
  ``keep_local_encoder``;
- ``λ_r`` of each of its tasks (``lambda/<task>`` in the config) from the :class:`LambdaSchedule`.

Aggregation of the good replies (weights from ``num-examples``): tier 1 averages encoder,
decoder and head of every task group (``intra_task_weighting``); tier 2 averages the encoders of
the task-global models produced this round into ``g`` (``inter_task_weighting``). A task whose
clients all failed this round keeps its last task-global model but does not vote in ``g``.
A task is a dataset's task (``<dataset>/<task>``): equal task names of different datasets are
different groups.

Every client must share one encoder architecture and every client of a task the whole task
model: checked on the ``describe`` information before any training, naming the client.

Negative-transfer switch (``threshold`` set): clients report ``val/<task>/<primary metric>`` of
their trained model on a held-out slice of their train split; the task's metric is the mean over
its clients that reported it this round, fed to the schedule after aggregation, so a switch
decided after round ``r`` applies from round ``r + 1``. The test split is never used for it.

Heads are part of the task-global model: a reply must carry the encoder, decoder and head
parameters each client announced in ``describe``; the task's primary metric and its direction
for the switch come from ``describe`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from fedmtl.aggregation.fedavg import weighted_average
from fedmtl.aggregation.lambda_schedule import LambdaSchedule
from fedmtl.aggregation.two_tier import (
    ENCODER_PREFIX,
    TaskMember,
    check_single_encoder_architecture,
    inter_task_average,
    intra_task_average,
    relative_squared_distance,
    task_example_counts,
)
from fedmtl.config import Experiment
from fedmtl.messages import NUM_EXAMPLES
from fedmtl.protocols.mfed import GLOBAL_ENCODER_PREFIX, lambda_key, validation_key
from fedmtl.strategies.base import (
    ClientInfo,
    Federation,
    Reply,
    Strategy,
    checkpoint_tensors,
    register_strategy,
    split_checkpoint,
)


def task_key(client: ClientInfo, task: str) -> str:
    """The task group of ``task`` of ``client``: ``<dataset>/<task>``."""
    return f"{client.dataset}/{task}"


def check_architectures(clients: Iterable[ClientInfo]) -> None:
    """Check that all clients share one encoder and each task group one decoder architecture.

    Raises
    ------
    ValueError
        Naming the client(s) whose encoder differs from the majority, or the task and every
        member's decoder signature when the members of a task disagree.
    """
    infos = list(clients)
    check_single_encoder_architecture({c.client_id: c.group_key("encoder") for c in infos})
    decoders: dict[str, dict[str, str]] = {}
    for client in infos:
        for task in client.tasks:
            signature = client.group_key(f"decoders.{task}")
            decoders.setdefault(task_key(client, task), {})[client.client_id] = signature
    for key, signatures in decoders.items():
        if len(set(signatures.values())) > 1:
            raise ValueError(
                f"M-Fed averages whole task models, so the clients of task {key!r} must share "
                f"one decoder architecture; got {signatures}"
            )


@register_strategy("mfed")
class MFed(Strategy):
    """Two-tier aggregation and the λ-scheduled encoder pull (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        hyper = self.hyper
        self.schedule = LambdaSchedule(
            kind=hyper.lambda_schedule,
            lambda_0=hyper.lambda_0,
            growth=hyper.growth,
            lambda_max=hyper.lambda_max,
            constant=hyper.lambda_constant,
            threshold=hyper.threshold,
            patience=hyper.patience,
        )
        self.task_models: dict[str, dict[str, Tensor]] = {}  # task key → θ_t^glob
        self.global_encoder: dict[str, Tensor] = {}  # g, keyed encoder.…

    # -- what clients receive --------------------------------------------------------------

    def start_model(self, client: ClientInfo) -> dict[str, Tensor]:
        """The task-global tensors ``client`` starts its next training from."""
        models = [
            self.task_models[key]
            for key in (task_key(client, t) for t in client.tasks)
            if key in self.task_models
        ]
        out: dict[str, Tensor] = {}
        if models and not self.hyper.keep_local_encoder:
            encoders = [
                {k: v for k, v in m.items() if k.startswith(ENCODER_PREFIX)} for m in models
            ]
            out.update(weighted_average(encoders, [1.0] * len(encoders)))
        for model in models:
            out.update({k: v for k, v in model.items() if not k.startswith(ENCODER_PREFIX)})
        return out

    def train_config(self, round_: int, client: ClientInfo) -> dict[str, Any]:
        """``lambda/<task>`` of each of the client's tasks in ``round_``."""
        return {
            lambda_key(t): self.schedule.lambda_for(task_key(client, t), round_)
            for t in client.tasks
        }

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The start model plus ``g`` under ``global/`` (nothing before the first aggregation)."""
        reference = {GLOBAL_ENCODER_PREFIX + k: v for k, v in self.global_encoder.items()}
        return {**self.start_model(client), **reference}

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The model the client would start the next round from (without ``g``)."""
        return self.start_model(client)

    # -- the round ---------------------------------------------------------------------

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Check the architectures of every known client, then train and aggregate."""
        check_architectures(federation.clients.values())
        super().run_round(federation, round_, clients)

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Tier 1 per task group, tier 2 into ``g``, then feed the negative-transfer switch."""
        by_dataset: dict[str, list[TaskMember]] = {}
        for client_id, reply in replies.items():
            info = clients[client_id]
            encoder = {k: v for k, v in reply.arrays.items() if k.startswith(ENCODER_PREFIX)}
            for task in info.tasks:
                own = (f"decoders.{task}.", f"heads.{task}.")
                by_dataset.setdefault(info.dataset, []).append(
                    TaskMember(
                        client_id=client_id,
                        task=task,
                        encoder=encoder,
                        task_tensors={k: v for k, v in reply.arrays.items() if k.startswith(own)},
                        num_examples=int(reply.metrics[NUM_EXAMPLES]),
                    )
                )
        fresh: dict[str, dict[str, Tensor]] = {}
        sizes: dict[str, int] = {}
        for dataset, members in by_dataset.items():
            averaged = intra_task_average(members, weighting=self.hyper.intra_task_weighting)
            fresh.update({f"{dataset}/{task}": model for task, model in averaged.items()})
            counts = task_example_counts(members)
            sizes.update({f"{dataset}/{task}": n for task, n in counts.items()})
        if not fresh:
            return {}
        self.task_models.update(fresh)
        self.global_encoder = inter_task_average(
            fresh, weighting=self.hyper.inter_task_weighting, task_sizes=sizes
        )
        metrics = {"mfed/task_groups": float(len(fresh))}
        for key, model in fresh.items():
            distance = relative_squared_distance(model, self.global_encoder)
            metrics[f"mfed/distance/{key}"] = distance
        for key, (value, higher_is_better) in self.validation_metrics(replies, clients).items():
            self.schedule.observe(key, round_, value, higher_is_better)
            metrics[f"mfed/val/{key}"] = value
        return metrics

    def validation_metrics(
        self, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, tuple[float, bool]]:
        """``task key → (mean reported validation metric, higher_is_better)`` of this round."""
        values: dict[str, list[float]] = {}
        direction: dict[str, bool] = {}
        for client_id, reply in replies.items():
            info = clients[client_id]
            for task, (metric, higher_is_better) in info.primary_metrics.items():
                value = reply.metrics.get(validation_key(task, metric))
                if value is None:
                    continue
                key = task_key(info, task)
                values.setdefault(key, []).append(float(value))
                direction[key] = higher_is_better
        return {key: (sum(v) / len(v), direction[key]) for key, v in values.items()}

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Task-global models, ``g`` and the λ schedule's state."""
        keys = sorted(self.task_models)
        tensors = checkpoint_tensors("g", self.global_encoder)
        for index, key in enumerate(keys):
            tensors.update(checkpoint_tensors(f"t{index}", self.task_models[key]))
        return tensors, {"task_keys": keys, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        parts = split_checkpoint(tensors)
        self.task_models = {key: parts[f"t{index}"] for index, key in enumerate(meta["task_keys"])}
        self.global_encoder = parts.get("g", {})
        self.schedule.load_state_dict(dict(meta["schedule"]))
