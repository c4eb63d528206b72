"""FedHCA²'s additions to ``train`` (``fedmtl.strategies.fedhca2`` ↔ ``fedmtl.clients.fedhca2``).

Before a client's first accepted reply the server does not know the parameters θ^last the
client starts from (round 1: its seeded initial model). Its ``train`` message then sets
:data:`REPORT_START` in the config and carries no tensors; the client adds the shared
parameters it started training from under :data:`START_PREFIX` (``start/encoder.…``,
``start/decoders.<task>.…``) to the reply's ``arrays``, so the server validates them like the
rest. That one upload is twice the shared size.
"""

from __future__ import annotations

START_PREFIX = "start/"
REPORT_START = "fedhca2/report-start"
