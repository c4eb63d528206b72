"""FedHCA² client: plain local training, plus its start point when the server does not know it.

The server (``fedmtl.strategies.fedhca2``) keeps every client's last parameters θ^last and
computes the update Δ = θ^local − θ^last itself, so a client normally just loads the personalised
encoder and decoders it receives, trains, and uploads its new encoder and decoder parameters.
Heads and every buffer (BatchNorm statistics) stay on the client. When the server does not know
θ^last yet it asks for the start point too (:mod:`fedmtl.protocols.fedhca2`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, TrainOutcome, register_client_algorithm
from fedmtl.models.multitask import shared_parameters
from fedmtl.protocols.fedhca2 import REPORT_START, START_PREFIX


@register_client_algorithm("fedhca2")
class FedHCA2Client(ClientAlgorithm):
    """Default local training; reports its start parameters when asked (module docstring)."""

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle a ``train`` message; add ``start/…`` tensors if ``config`` asks for them."""
        self.start: dict[str, Tensor] | None = {} if config.get(REPORT_START, False) else None
        outcome = super().train(round_, received, config)
        outcome.arrays.update(self.start or {})
        return outcome

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load the personalised tensors; keep a copy of the start point when it is asked for."""
        super().receive(model, received)
        if self.start is not None:
            shared = shared_parameters(model, self.shares)
            self.start = {START_PREFIX + name: tensor.clone() for name, tensor in shared.items()}
