"""MaT-FL's addition to ``train`` (``fedmtl.strategies.matfl`` ↔ ``fedmtl.clients.matfl``).

The server clusters encoder *updates* ``θ_new − θ_start``, so it must know the encoder each
client started from. It does once it has sent one (the client's cluster average); before that
(round 1: the seeded initial encoder) the ``train`` message sets :data:`REPORT_START` in the
config and the client adds the encoder parameters it started from under :data:`START_PREFIX`
(``start/encoder.…``) to the reply's ``arrays``, validated like the rest. That one upload
carries the encoder twice.
"""

from __future__ import annotations

START_PREFIX = "start/"
REPORT_START = "matfl/report-start"
