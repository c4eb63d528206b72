"""Progress of a run as plain log lines, for ``flwr run . --stream`` and ``flwr log``.

Under ``flwr run`` the ServerApp runs in Flower's own process; what it writes to stdout/stderr
(Flower's logger included) is uploaded to the SuperLink and shown by ``flwr run --stream`` and
``flwr log``. Rich's live progress bar needs a terminal, so this observer logs one line per
phase instead, through Flower's logger (which that process prints at INFO).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

from rich.console import Console, RenderableType

from fedmtl.config import Experiment

TABLE_WIDTH = 80  # a final table that fits a default terminal and `flwr log`


def flower_logger() -> logging.Logger:
    """Flower's ``flwr`` logger (its console handler prints INFO in the ServerApp process)."""
    from flwr.common.logger import FLOWER_LOGGER

    return FLOWER_LOGGER


def render_text(renderable: RenderableType, width: int = TABLE_WIDTH) -> str:
    """A rich renderable (a table) as plain text at ``width`` columns, no colour codes."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return buffer.getvalue().rstrip("\n")


class LogLineObserver:
    """One log line at the start, per phase and per round, with elapsed seconds.

    Parameters
    ----------
    logger : logging.Logger, optional
        Where the lines go; Flower's logger by default.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or flower_logger()
        self.rounds = 0
        self.round_start = time.perf_counter()
        self.phase_start = time.perf_counter()

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """``fedmtl <experiment> · <algorithm>: rounds a–b, N clients``."""
        self.rounds = experiment.rounds
        self.round_start = self.phase_start = time.perf_counter()
        self.logger.info(
            "fedmtl %s · %s: rounds %d–%d, %d clients",
            experiment.name,
            experiment.algorithm.name,
            first_round,
            experiment.rounds,
            len(experiment.clients),
        )

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """``[ROUND r/R] train: 5/5 clients replied (3.2 s)``."""
        now = time.perf_counter()
        self.logger.info(
            "[ROUND %d/%d] %s: %d/%d clients replied (%.1f s)",
            round_,
            self.rounds,
            phase,
            done,
            total,
            now - self.phase_start,
        )
        self.phase_start = now

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """``[ROUND r/R] done in 12.0 s`` and each client left out with its error."""
        now = time.perf_counter()
        failed = [row for row in rows if row.get("status") == "failed"]
        note = f", {len(failed)} left out" if failed else ""
        self.logger.info(
            "[ROUND %d/%d] done in %.1f s%s", round_, self.rounds, now - self.round_start, note
        )
        for row in failed:
            self.logger.warning(
                "[ROUND %d/%d] %s left out: %s",
                round_,
                self.rounds,
                row["client_id"],
                row.get("error", ""),
            )
        self.round_start = self.phase_start = now
