"""FedDF client: distil the ensemble into the received prototype, train, upload logits.

Wire format: :mod:`fedmtl.protocols.feddf` (server: ``fedmtl.strategies.feddf``). The client
loads FedAvg's averaged groups (its prototype), then, when ensemble targets came, runs the
server step of FedDF here: ``distill_epochs`` passes over the public batches minimising
``T²·KL(softmax(target/T) ‖ softmax(student/T))`` summed over its distillation tasks. Every
forward of that step runs under a torch RNG seeded by (seed, round, epoch, batch) and not by
client, so the clients that received one prototype distil it the same way. It then trains
locally and uploads its groups and its logits of every public sample (eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.public import public_batch, public_outputs, public_view, seeded
from fedmtl.clients.training import autocast, make_optimizer, optimizer_step, to_device
from fedmtl.losses.distillation import distillation_loss
from fedmtl.models.multitask import load_tensors
from fedmtl.protocols.feddf import distill_tasks, logits_key, target_key
from fedmtl.seeding import derive_seed

PREFIX = "feddf/"


@register_client_algorithm("feddf")
class FedDFClient(ClientAlgorithm):
    """FedAvg's client with FedDF's distillation before training (module docstring)."""

    uses_received_for_eval = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._targets: dict[str, Tensor] = {}

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load the averaged groups; keep the ensemble targets for the distillation."""
        groups = {k: v for k, v in received.items() if not k.startswith(PREFIX)}
        if groups:
            load_tensors(model, groups)
        tasks = distill_tasks(self.session.experiment, self.session.client_id)
        self._targets = {t: received[target_key(t)] for t in tasks if target_key(t) in received}

    def before_training(
        self,
        model: nn.Module,
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Distil the ensemble's logits into the prototype on the public set."""
        if not self._targets:
            return {}
        session, hyper = self.session, self.hyper
        view = public_view(session)
        training = session.client.training
        lr = hyper.distill_lr or training.lr
        optimizer = make_optimizer(model.parameters(), training.model_copy(update={"lr": lr}))
        model.train()
        losses = []
        for e in range(hyper.distill_epochs):
            epoch = (round_ - 1) * hyper.distill_epochs + e
            for batch, positions in enumerate(view.batch_indices(epoch)):
                index = torch.as_tensor(positions, dtype=torch.long)
                inputs = to_device(public_batch(view, epoch, batch), session.device)
                seed = derive_seed(session.experiment.seed, "feddf", round_, e, batch)
                with seeded(seed, session.device), autocast(session.device):
                    outputs = model(inputs)
                loss = sum(
                    distillation_loss(
                        outputs[t], target[index].to(session.device), hyper.temperature
                    )
                    for t, target in self._targets.items()
                )
                assert isinstance(loss, Tensor)
                losses.append(
                    optimizer_step(
                        loss, optimizer, model, training.grad_clip, what="distillation loss"
                    )
                )
        return {"feddf/distill_loss": sum(losses) / len(losses), "feddf/distill_steps": len(losses)}

    def extra_uploads(
        self, model: nn.Module, round_: int, config: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The logits of every public sample, per distillation task (float32 ``[P, C]``)."""
        session = self.session
        tasks = distill_tasks(session.experiment, session.client_id)
        if not tasks:
            return {}
        return {logits_key(t): out for t, out in public_outputs(session, model, tasks).items()}
