"""FedHeNN client: the task loss plus ``η·(1 − CKA(K_local, K̄))``; uploads its kernel.

The server (``fedmtl.strategies.fedhenn``) sends ``K̄``, the global kernel on this round's
public batch ``S_r`` (:mod:`fedmtl.protocols.fedhenn`). Every training step recomputes the
client's representations of ``S_r`` (pooled encoder features: the penultimate layer, whatever
the architecture) and adds the CKA distance of their linear kernel to ``K̄``, so the gradient
pulls the encoder's geometry toward the federation's (Makhija et al., ICML 2022). That forward
runs in eval mode (running BatchNorm statistics, no dropout): the kernel the client uploads is
computed the same way, so both sides compare like with like, and BatchNorm buffers are not
moved by the public batch. Nothing is loaded into the model; the model stays personal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.public import public_batch, public_view
from fedmtl.clients.training import autocast, to_device
from fedmtl.losses.cka import cka_distance, linear_kernel
from fedmtl.models import MultiTaskModel
from fedmtl.protocols.fedhenn import KERNEL, alignment_batch


@register_client_algorithm("fedhenn")
class FedHeNNClient(ClientAlgorithm):
    """Personal model pulled toward the global representation kernel (module docstring)."""

    uses_received_for_eval = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._round = 0
        self._distances: list[float] = []

    def _kernel(self, model: nn.Module, round_: int) -> Tensor:
        """Linear kernel of the pooled features of ``S_round`` (eval mode, graph kept)."""
        assert isinstance(model, MultiTaskModel)
        session = self.session
        inputs = to_device(
            public_batch(public_view(session), *alignment_batch(round_)), session.device
        )
        was_training = model.training
        model.eval()
        try:
            with autocast(session.device):
                pooled = model.features(inputs).pooled
        finally:
            model.train(was_training)
        return linear_kernel(pooled.float())

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Keep ``K̄`` as the target of the CKA term; nothing goes into the model."""

    def before_training(
        self,
        model: nn.Module,
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Remember the round (it names ``S_r``)."""
        self._round, self._distances = round_, []
        return {}

    def extra_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> Callable[[nn.Module], Tensor] | None:
        """``η·(1 − CKA(K(S_r), K̄))``; none in round 1 (no ``K̄`` yet) or when η = 0."""
        eta = float(self.hyper.eta)
        target = received.get(KERNEL)
        if target is None or eta == 0:
            return None

        def loss(model: nn.Module) -> Tensor:
            local = self._kernel(model, self._round)
            distance = cka_distance(local, target.to(local.device, local.dtype))
            self._distances.append(float(distance.detach()))
            return eta * distance

        return loss

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """The mean CKA distance to ``K̄`` over the round's steps."""
        if not self._distances:
            return {}
        return {"fedhenn/cka_distance": sum(self._distances) / len(self._distances)}

    def extra_uploads(
        self, model: nn.Module, round_: int, config: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The kernel on next round's batch ``S_{r+1}``, from the trained model."""
        with torch.no_grad():
            return {KERNEL: self._kernel(model, round_ + 1).cpu()}
