"""Client sides of the baselines: Local, FedAvg (also per task), FedProx, FedPer, Ditto."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.training import train_epochs
from fedmtl.losses.proximal import proximal_term
from fedmtl.models.multitask import shared_parameters


@register_client_algorithm("local")
class LocalClient(ClientAlgorithm):
    """Trains alone; ``shares`` is empty, so nothing is sent up."""


@register_client_algorithm("fedavg")
class FedAvgClient(ClientAlgorithm):
    """Loads the server's averages for its groups, trains, returns encoder and decoders."""


# Per-task FedAvg differs from FedAvg only in what the server averages with what: the client
# loads the task models it receives, trains, and uploads the groups the server asks for.
register_client_algorithm("fedavg_task")(FedAvgClient)


@register_client_algorithm("fedper")
class FedPerClient(ClientAlgorithm):
    """FedAvg on the encoder only (``shares = ("encoder",)``); decoders and heads stay personal."""


@register_client_algorithm("fedprox")
class FedProxClient(ClientAlgorithm):
    """FedAvg plus ``(mu/2)·‖w − w_global‖²`` over the shared parameters."""

    def extra_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> Callable[[nn.Module], Tensor] | None:
        """Return ``(mu/2)·‖w − w_start‖²`` over the shared parameters."""
        mu = float(self.hyper.mu)
        if mu == 0:
            return None
        anchor: dict[str, Tensor] = {}

        def loss(model: nn.Module) -> Tensor:
            # The anchor is the start point of this round: the received global tensors where the
            # server sent them, else the client's own (identical for equal-architecture peers in
            # round 1, see init_model).
            if not anchor:
                anchor.update(
                    {k: v.clone() for k, v in shared_parameters(model, self.shares).items()}
                )
            return proximal_term(model.named_parameters(), anchor, mu / 2)

        return loss


@register_client_algorithm("ditto")
class DittoClient(ClientAlgorithm):
    """Ditto: FedAvg's shared model plus a regularised personal model ``v``.

    ``v`` trains on ``task loss + (lam/2)·‖v − w_global‖²`` and is the one evaluated.

    ``v`` lives in the personal state as the extra ``personal`` (all parameters and buffers).
    """

    uses_received_for_eval = False

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Train the personal model toward this round's global model."""
        session = self.session
        personal = session.new_model()
        if "personal" in extras:
            personal.load_state_dict(extras["personal"])
        # w_global: the global model this round started from (received), or — in round 1 —
        # the shared initial weights, which equal the fresh personal model's.
        reference = dict(received) or {
            k: v.clone() for k, v in shared_parameters(personal, self.shares).items()
        }
        lam = float(self.hyper.lam)
        stats = train_epochs(
            personal,
            session.batches("train", round_, purpose="personal"),
            session.tasks,
            session.client.training,
            session.device,
            epochs=int(self.hyper.personal_epochs),
            extra_loss=lambda m: proximal_term(m.named_parameters(), reference, lam / 2),
        )
        extras["personal"] = {k: v.detach().clone() for k, v in personal.state_dict().items()}
        return {"train/personal_loss": stats.loss}

    def evaluation_model(
        self, model: nn.Module, extras: Mapping[str, Mapping[str, Tensor]]
    ) -> nn.Module:
        """Return the personal model ``v``."""
        if "personal" not in extras:
            return model
        personal = self.session.new_model()
        with torch.no_grad():
            personal.load_state_dict(dict(extras["personal"]))
        return personal
