"""MaT-FL client: FedAvg's, plus its start encoder when the server does not know it yet.

The server (``fedmtl.strategies.matfl``) clusters encoder updates ``θ_new − θ_start``; once it
has sent the client an encoder it knows θ_start. Before that it sets
:data:`~fedmtl.protocols.matfl.REPORT_START` and the client adds the encoder it started
training from under ``start/`` to its reply.
"""

from __future__ import annotations

from fedmtl.clients.base import StartReporting, register_client_algorithm
from fedmtl.protocols.matfl import REPORT_START, START_PREFIX


@register_client_algorithm("matfl")
class MaTFLClient(StartReporting):
    """Loads its cluster's encoder and the task's decoders, trains, uploads (module docstring)."""

    report_start = REPORT_START
    start_prefix = START_PREFIX

    def start_groups(self) -> tuple[str, ...]:
        """Only the encoder: the server clusters encoder updates."""
        return ("encoder",)
