"""CoFED client: predict the public set, then train on the federation's voted labels too.

Wire format: :mod:`fedmtl.protocols.cofed` (server: ``fedmtl.strategies.cofed``). After its
private epochs the client trains ``public_epochs`` passes over the public batches on the voted
labels it received (samples without a label are skipped), then predicts the class of every
public sample with the trained model (eval mode) for the next vote. Nothing is loaded into the
model; a client without a vote task trains locally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.public import public_batch, public_outputs, public_view
from fedmtl.clients.training import autocast, make_optimizer, optimizer_step, to_device
from fedmtl.protocols.cofed import labels_key, prediction_key, vote_tasks


@register_client_algorithm("cofed")
class CoFEDClient(ClientAlgorithm):
    """Co-training on voted pseudo-labels of the public set (module docstring)."""

    uses_received_for_eval = False

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Keep the voted labels for :meth:`after_training`; nothing goes into the model."""

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """``public_epochs`` passes on the voted labels of the public set, if any came."""
        session, hyper = self.session, self.hyper
        tasks = {t.name: t for t in session.tasks}
        labels = {
            task: received[labels_key(task)].long()
            for task in vote_tasks(session.experiment, session.client_id)
            if labels_key(task) in received
        }
        if not labels:
            return {}
        view = public_view(session)
        training = session.client.training
        optimizer = make_optimizer(model.parameters(), training)
        model.train()
        losses = []
        for e in range(hyper.public_epochs):
            epoch = (round_ - 1) * hyper.public_epochs + e
            for batch, positions in enumerate(view.batch_indices(epoch)):
                index = torch.as_tensor(positions, dtype=torch.long)
                wanted = {t: y[index] for t, y in labels.items() if bool((y[index] >= 0).any())}
                if not wanted:
                    continue
                inputs = to_device(public_batch(view, epoch, batch), session.device)
                with autocast(session.device):
                    outputs = model(inputs)
                loss = torch.zeros((), device=session.device)
                for task, target in wanted.items():
                    target = target.to(session.device)
                    keep = target >= 0
                    part = tasks[task].loss(outputs[task][keep].float(), target[keep])
                    loss = loss + part * tasks[task].loss_weight
                loss = hyper.public_weight * loss
                losses.append(
                    optimizer_step(
                        loss, optimizer, model, training.grad_clip, what="public-set loss"
                    )
                )
        metrics = {
            "cofed/labels": float(sum(int((y >= 0).sum()) for y in labels.values())),
            "cofed/public_steps": float(len(losses)),
        }
        if losses:
            metrics["cofed/public_loss"] = sum(losses) / len(losses)
        return metrics

    def extra_uploads(
        self, model: nn.Module, round_: int, config: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The predicted class of every public sample, per vote task (float32 indices)."""
        session = self.session
        tasks = vote_tasks(session.experiment, session.client_id)
        if not tasks:
            return {}
        outputs = public_outputs(session, model, tasks)
        return {prediction_key(t): out.argmax(dim=-1).float() for t, out in outputs.items()}
