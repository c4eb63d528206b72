"""M-Fed client: start from the task-global model and train with the pull ``λ·‖w_enc − g‖²``.

Wire format of a ``train`` message (built by ``fedmtl.strategies.mfed``):

- ``arrays`` holds the task-global model the client starts from (``encoder.…`` unless the
  experiment sets ``keep_local_encoder``, ``decoders.<task>.…`` and ``heads.<task>.…``) and the
  global encoder ``g`` under :data:`GLOBAL_ENCODER_PREFIX` (``global/encoder.…``). Both travel in
  the one record the ClientApp hands to client algorithms.
- ``config`` holds ``lambda/<task>`` for each of the client's tasks.

The regulariser is ``λ·‖w_enc − g‖²`` (λ, not λ/2, see ``aggregation.lambda_schedule``) with
``g`` frozen. A multi-task client has one encoder: it is pulled with the **mean** of its tasks'
λ, so a task whose pull the server switched off halves the client's pull instead of cancelling
the other task's (or being ignored, as with the max). Before the first aggregation there is no
``g``: the pull then targets the encoder the round starts from, which in round 1 is the shared
seeded initial encoder every client starts from (``init_model``), i.e. ``g_0``.

Validation for the negative-transfer switch: when the experiment sets ``algorithm.threshold``,
the client holds out a seeded :data:`VALIDATION_FRACTION` of its train split, trains on the rest
and reports ``val/<task>/<primary metric>`` of the trained model on the held-out part in its
reply (non-finite values are left out). Without a threshold it trains on the whole split and
reports no validation metric, exactly like the baselines it is compared with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmtl.clients.base import ClientAlgorithm, TrainOutcome, register_client_algorithm
from fedmtl.clients.session import load_tensors, shared_parameters
from fedmtl.clients.training import evaluate_model, train_epochs
from fedmtl.data import SampleSet
from fedmtl.losses.proximal import proximal_term
from fedmtl.seeding import derive_seed

GLOBAL_ENCODER_PREFIX = "global/"
LAMBDA_PREFIX = "lambda/"
VALIDATION_FRACTION = 0.1


def lambda_key(task: str) -> str:
    """Config key of the pull strength λ of ``task`` in a ``train`` message."""
    return f"{LAMBDA_PREFIX}{task}"


def split_received(received: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate a ``train`` message's arrays into the task-global model and ``g``.

    Returns
    -------
    task_model, global_encoder
        State-dict-keyed tensors to load, and ``g`` keyed ``encoder.…`` (prefix removed).
    """
    task_model: dict[str, Tensor] = {}
    global_encoder: dict[str, Tensor] = {}
    for name, tensor in received.items():
        if name.startswith(GLOBAL_ENCODER_PREFIX):
            global_encoder[name.removeprefix(GLOBAL_ENCODER_PREFIX)] = tensor
        else:
            task_model[name] = tensor
    return task_model, global_encoder


def pull_strength(config: Mapping[str, Any], tasks: list[str]) -> float:
    """The λ a client with ``tasks`` uses on its one encoder: the mean of its tasks' λ.

    Raises
    ------
    KeyError
        If the message lacks the λ of one of the tasks.
    """
    missing = [t for t in tasks if lambda_key(t) not in config]
    if missing:
        raise KeyError(f"train message lacks {[lambda_key(t) for t in missing]}")
    return sum(float(config[lambda_key(t)]) for t in tasks) / len(tasks)


def validation_split(
    data: SampleSet, seed: int, client_id: str, fraction: float = VALIDATION_FRACTION
) -> tuple[SampleSet, SampleSet]:
    """Split a client's train partition into a training part and a held-out validation part.

    The validation part is a seeded ``fraction`` of the samples (at least one, and at least one
    left to train on); the same samples in every round.

    Raises
    ------
    ValueError
        If ``data`` has fewer than two samples.
    """
    if len(data) < 2:
        raise ValueError(f"client {client_id!r}: {len(data)} train sample(s) cannot be split")
    size = min(len(data) - 1, max(1, round(fraction * len(data))))
    order = np.random.default_rng(derive_seed(seed, client_id, "validation")).permutation(len(data))
    return data.subset(np.sort(order[size:])), data.subset(np.sort(order[:size]))


@register_client_algorithm("mfed")
class MFedClient(ClientAlgorithm):
    """M-Fed client: task-global start, ``task loss + λ·‖w_enc − g‖²``, uploads the task model.

    It uploads encoder, decoders and heads (``MFedConfig.shares``).
    """

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle a ``train`` message (see the module docstring for its content)."""
        session = self.session
        start = time.perf_counter()
        model, extras, _ = session.load(round_ - 1)
        task_model, global_encoder = split_received(received)
        if task_model:
            load_tensors(model, task_model)
        reference = global_encoder or {
            k: v.clone() for k, v in shared_parameters(model, ("encoder",)).items()
        }
        lam = pull_strength(config, session.client.tasks)
        train_data, validation = session.split("train"), None
        batches = session.batches("train", round_)
        if self.hyper.threshold is not None:
            train_data, validation = validation_split(
                train_data, session.experiment.seed, session.client_id
            )
            batches = session.batches(train_data, round_)
        stats = train_epochs(
            model,
            batches,
            session.tasks,
            session.client.training,
            session.device,
            extra_loss=(
                None if lam == 0 else lambda m: proximal_term(m.named_parameters(), reference, lam)
            ),
        )
        metrics: dict[str, float | int] = {
            "num-examples": len(train_data),
            "train/loss": stats.loss,
            "train/batches": stats.batches,
            "train/lambda": lam,
        }
        metrics.update({f"train/loss/{k}": v for k, v in stats.task_losses.items()})
        if validation is not None:
            metrics.update(self._validate(model, validation))
        session.save(round_, model, extras)
        metrics["train/seconds"] = time.perf_counter() - start
        return TrainOutcome(arrays=shared_parameters(model, self.shares), metrics=metrics)

    def _validate(self, model: torch.nn.Module, validation: SampleSet) -> dict[str, float]:
        """``val/<task>/<primary metric>`` of ``model`` on the held-out part (finite only)."""
        session = self.session
        loader = session.eval_batches(validation)
        results, _, _ = evaluate_model(model, loader, session.tasks, session.device)
        out: dict[str, float] = {}
        for task in session.tasks:
            value = float(results[task.name][task.primary_metric])
            if np.isfinite(value):
                out[f"val/{task.name}/{task.primary_metric}"] = value
        return out
