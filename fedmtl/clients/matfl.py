"""MaT-FL client: FedAvg's, plus its start encoder when the server does not know it yet.

The server (``fedmtl.strategies.matfl``) clusters encoder updates ``θ_new − θ_start``; once it
has sent the client an encoder it knows θ_start. Before that it sets
:data:`~fedmtl.protocols.matfl.REPORT_START` and the client adds the encoder it started
training from under ``start/`` to its reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fedmtl.clients.base import ClientAlgorithm, TrainOutcome, register_client_algorithm
from fedmtl.models.multitask import shared_parameters
from fedmtl.protocols.matfl import REPORT_START, START_PREFIX


@register_client_algorithm("matfl")
class MaTFLClient(ClientAlgorithm):
    """Loads its cluster's encoder and the task's decoders, trains, uploads (module docstring)."""

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle ``train``; add ``start/encoder.…`` when ``config`` asks for it."""
        self.start: dict[str, Tensor] | None = {} if config.get(REPORT_START, False) else None
        outcome = super().train(round_, received, config)
        outcome.arrays.update(self.start or {})
        return outcome

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load what the server sent; copy the start encoder when it is asked for."""
        super().receive(model, received)
        if self.start is not None:
            encoder = shared_parameters(model, ("encoder",))
            self.start = {START_PREFIX + name: t.detach().clone() for name, t in encoder.items()}
