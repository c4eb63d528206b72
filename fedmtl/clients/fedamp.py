"""FedAMP client: train the personalised model with ``(λ/2)·‖θ_i − u_i‖²``.

The server (``fedmtl.strategies.fedamp``) sends the client's cloud model u_i under the
state-dict names of the groups it shares with a peer. The client does **not** load it: FedAMP's
model is personal, and u_i is only the target of the proximal pull (Huang et al., AAAI 2021,
the client step ``argmin_θ F_i(θ) + λ/(2α_k)·‖θ − u_i‖²``, run as local epochs of SGD/Adam
on it). fedmtl's ``lam`` is the paper's ``λ/α_k``: the pull does not grow when α_k is made
small to fit per-parameter distances (with the α_k = 1 of FedHCA²'s comparison both agree). The
pull is built with the
gradient-carrying :func:`~fedmtl.losses.proximal.proximal_term` (not from ``param.data``, whose
regulariser would be a constant). Where no u_i came (round 1, a group with no partner) the
target is the parameters the round starts from, u_i = θ_i by the formula. The evaluated model
is the personalised one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.losses.proximal import proximal_term
from fedmtl.models.multitask import shared_parameters


@register_client_algorithm("fedamp")
class FedAMPClient(ClientAlgorithm):
    """Personalised model pulled toward the server's cloud model (module docstring)."""

    uses_received_for_eval = False

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Keep u_i as the pull's target; the model stays the client's own θ_i."""

    def extra_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> Callable[[nn.Module], Tensor] | None:
        """``(lam/2)·‖θ − u‖²`` over the shared parameters (none when lam = 0)."""
        coefficient = float(self.hyper.lam) / 2.0
        if coefficient == 0:
            return None
        target: dict[str, Tensor] = {}

        def loss(model: nn.Module) -> Tensor:
            if not target:  # first batch: the round's start point, then u_i where it came
                shared = shared_parameters(model, self.shares)
                target.update({k: v.detach().clone() for k, v in shared.items()})
                target.update(received)
            return proximal_term(model.named_parameters(), target, coefficient)

        return loss
