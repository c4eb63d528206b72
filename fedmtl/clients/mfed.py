"""M-Fed client: start from the task-global model and train with the pull ``λ·‖w_enc − g‖²``.

Wire format: :mod:`fedmtl.protocols.mfed` (built by ``fedmtl.strategies.mfed``).

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

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.training import evaluate_model
from fedmtl.data import SampleSet
from fedmtl.losses.proximal import proximal_term
from fedmtl.models.multitask import load_tensors, shared_parameters
from fedmtl.protocols.mfed import pull_strength, split_received, validation_key
from fedmtl.seeding import derive_seed

VALIDATION_FRACTION = 0.1


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

    def receive(self, model: torch.nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load the task-global model; keep ``g`` (or the start encoder) as the pull's target."""
        task_model, global_encoder = split_received(received)
        if task_model:
            load_tensors(model, task_model)
        self.reference = global_encoder or {
            k: v.clone() for k, v in shared_parameters(model, ("encoder",)).items()
        }

    def train_split(self) -> tuple[SampleSet, SampleSet | None]:
        """A held-out validation part when the negative-transfer switch needs one."""
        session = self.session
        if self.hyper.threshold is None:
            return session.split("train"), None
        return validation_split(session.split("train"), session.experiment.seed, session.client_id)

    def extra_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> Callable[[nn.Module], Tensor] | None:
        """``λ·‖w_enc − g‖²`` with λ the mean of the client's tasks' λ (none when λ = 0)."""
        lam = self.lam = pull_strength(config, self.session.client.tasks)
        reference = self.reference
        if lam == 0:
            return None
        return lambda m: proximal_term(m.named_parameters(), reference, lam)

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """``train/lambda`` and the validation metrics of the trained model."""
        metrics = {"train/lambda": self.lam}
        if self.validation is not None:
            metrics.update(self._validate(model, self.validation))
        return metrics

    def _validate(self, model: nn.Module, validation: SampleSet) -> dict[str, float]:
        """``val/<task>/<primary metric>`` of ``model`` on the held-out part (finite only)."""
        session = self.session
        loader = session.eval_batches(validation)
        results, _, _ = evaluate_model(model, loader, session.tasks, session.device)
        out: dict[str, float] = {}
        for task in session.tasks:
            value = float(results[task.name][task.primary_metric])
            if np.isfinite(value):
                out[validation_key(task.name, task.primary_metric)] = value
        return out
