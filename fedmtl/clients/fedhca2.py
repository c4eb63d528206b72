"""FedHCA² client: plain local training, plus its start point when the server does not know it.

The server (``fedmtl.strategies.fedhca2``) keeps every client's last parameters θ^last and
computes the update Δ = θ^local − θ^last itself, so a client normally just loads the personalised
encoder and decoders it receives, trains, and uploads its new encoder and decoder parameters.
Heads and every buffer (BatchNorm statistics) stay on the client. When the server does not know
θ^last yet it asks for the start point too (:mod:`fedmtl.protocols.fedhca2`).
"""

from __future__ import annotations

from fedmtl.clients.base import StartReporting, register_client_algorithm
from fedmtl.protocols.fedhca2 import REPORT_START, START_PREFIX


@register_client_algorithm("fedhca2")
class FedHCA2Client(StartReporting):
    """Default local training; reports its start parameters when asked (module docstring)."""

    report_start = REPORT_START
    start_prefix = START_PREFIX
