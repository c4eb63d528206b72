"""Local baselines on the public set (FedMuscle's Table 1 references): no exchange at all.

- ``pseudolabel``: after the local epochs, the client labels public batches with its own model
  and trains on the confident labels (:func:`~fedmtl.losses.pseudo.pseudo_targets`).
- ``simclr``: in the first ``pretrain_rounds`` rounds, before the local epochs, the client
  trains encoder and projector with NT-Xent on two random views of every public batch.

Both read the public set as FedMuscle does (:mod:`fedmtl.clients.public`); their strategies
are :class:`~fedmtl.strategies.baselines.Local`'s (nothing is sent or aggregated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.public import public_batch, public_view
from fedmtl.clients.training import autocast, make_optimizer, optimizer_step, to_device
from fedmtl.data.transforms import augment_images, augment_texts
from fedmtl.losses.contrastive import nt_xent_loss
from fedmtl.losses.pseudo import pseudo_targets
from fedmtl.models import MultiTaskModel
from fedmtl.seeding import derive_seed


@register_client_algorithm("pseudolabel")
class PseudoLabelClient(ClientAlgorithm):
    """Local training, then self-training on confident pseudo-labels of the public set."""

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """``public_epochs`` passes over the public set on the labels the model is sure of.

        Labels are recomputed per batch with the model in eval mode (no dropout, running
        BatchNorm statistics), then the step runs in train mode: online pseudo-labelling.
        """
        session, hyper = self.session, self.hyper
        view = public_view(session)
        training = session.client.training
        optimizer = make_optimizer(model.parameters(), training)
        kept = offered = steps = 0
        loss_sum = 0.0
        for e in range(hyper.public_epochs):
            epoch = (round_ - 1) * hyper.public_epochs + e
            for batch in range(len(view.batch_indices(epoch))):
                inputs = to_device(public_batch(view, epoch, batch), session.device)
                model.eval()
                with torch.no_grad(), autocast(session.device):
                    outputs = model(inputs)
                labels = {}
                for task in session.tasks:
                    made = pseudo_targets(task, outputs[task.name], hyper.threshold)
                    if made is not None:
                        labels[task.name] = made
                        kept += int(made[1].sum())
                        offered += int(made[1].numel())
                if not any(bool(keep.any()) for _, keep in labels.values()):
                    continue  # nothing confident in this batch (early rounds): no step
                model.train()
                with autocast(session.device):
                    predicted = model(inputs)
                loss = sum(
                    task.loss(predicted[task.name][keep].float(), target[keep]) * task.loss_weight
                    for task in session.tasks
                    if task.name in labels
                    for target, keep in [labels[task.name]]
                    if bool(keep.any())
                )
                assert isinstance(loss, Tensor)
                loss_sum += optimizer_step(
                    hyper.public_weight * loss,
                    optimizer,
                    model,
                    training.grad_clip,
                    what="public-set loss",
                )
                steps += 1
        metrics = {"pseudolabel/kept_fraction": kept / offered if offered else 0.0}
        metrics["pseudolabel/steps"] = float(steps)
        if steps:
            metrics["pseudolabel/loss"] = loss_sum / steps
        return metrics


@register_client_algorithm("simclr")
class SimCLRClient(ClientAlgorithm):
    """SimCLR pretraining on the public set in the first rounds, then the tasks."""

    def before_training(
        self,
        model: nn.Module,
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """``contrastive_epochs`` NT-Xent passes over the public set (first rounds only)."""
        session, hyper = self.session, self.hyper
        if round_ > hyper.pretrain_rounds:
            return {}
        assert isinstance(model, MultiTaskModel)
        view = public_view(session)
        training = session.client.training
        params = [
            p
            for name, p in model.named_parameters()
            if name.startswith(("encoder.", "projector.")) and p.requires_grad
        ]
        lr = hyper.contrastive_lr or training.lr
        optimizer = make_optimizer(params, training.model_copy(update={"lr": lr}))
        model.train()
        losses = []
        for e in range(hyper.contrastive_epochs):
            epoch = (round_ - 1) * hyper.contrastive_epochs + e
            # The views' randomness is the client's own, seeded: identical seeds, identical runs.
            generator = torch.Generator().manual_seed(
                derive_seed(session.experiment.seed, session.client_id, "simclr", round_, e)
            )
            for batch in range(len(view.batch_indices(epoch))):
                inputs = public_batch(view, epoch, batch)
                views: list[Any] = (
                    [augment_images(inputs, generator) for _ in range(2)]
                    if isinstance(inputs, Tensor)
                    else [augment_texts(list(inputs), generator) for _ in range(2)]
                )
                with autocast(session.device):
                    z1, z2 = (
                        model.project(model.features(to_device(v, session.device))) for v in views
                    )
                loss = nt_xent_loss(z1.float(), z2.float(), hyper.tau)
                losses.append(
                    optimizer_step(
                        loss, optimizer, model, training.grad_clip, what="public-set loss"
                    )
                )
        return {"simclr/loss": sum(losses) / len(losses), "simclr/steps": float(len(losses))}
