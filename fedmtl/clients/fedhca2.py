"""FedHCA² client: plain local training, plus its start point when the server does not know it.

The server (``fedmtl.strategies.fedhca2``) keeps every client's last parameters θ^last and
computes the update Δ = θ^local − θ^last itself, so a client normally just loads the personalised
encoder and decoders it receives, trains, and uploads its new encoder and decoder parameters.
Heads and every buffer (BatchNorm statistics) stay on the client.

Before a client's first accepted reply the server has no θ^last for it (round 1: clients start
from their seeded initial models, which the server never sees). Its ``train`` message then sets
:data:`REPORT_START` and sends no tensors; the client adds the parameters it starts training from
under :data:`START_PREFIX` (``start/encoder.…``, ``start/decoders.<task>.…``) to its reply, in the
same record, so the loop validates them like the rest. This doubles that one upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmtl.clients.base import ClientAlgorithm, TrainOutcome, register_client_algorithm
from fedmtl.clients.session import load_tensors, shared_parameters

START_PREFIX = "start/"
REPORT_START = "fedhca2/report-start"


@register_client_algorithm("fedhca2")
class FedHCA2Client(ClientAlgorithm):
    """Default local training; reports its start parameters when asked (module docstring)."""

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle a ``train`` message; add ``start/…`` tensors if ``config`` asks for them."""
        start: dict[str, Tensor] = {}
        if config.get(REPORT_START, False):
            # The same model the default training starts from: personal state plus received.
            model, _, _ = self.session.load(round_ - 1)
            if received:
                load_tensors(model, received)
            start = {
                START_PREFIX + name: tensor.clone()
                for name, tensor in shared_parameters(model, self.shares).items()
            }
        outcome = super().train(round_, received, config)
        outcome.arrays.update(start)
        return outcome
