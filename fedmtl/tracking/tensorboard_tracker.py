"""TensorBoard: event files under ``<run folder>/tensorboard``, one scalar per tag and round."""

from __future__ import annotations

import json
from typing import Any

from fedmtl.config import Experiment, TensorBoardConfig
from fedmtl.results import RunDirectory
from fedmtl.tracking.base import final_scalars, round_scalars, write_state

LOG_DIR = "tensorboard"


class TensorBoardTracker:
    """Write the run's scalars with ``torch.utils.tensorboard.SummaryWriter``.

    Parameters
    ----------
    run_dir : RunDirectory
        The run folder; events go to its ``tensorboard/`` subfolder, so
        ``tensorboard --logdir runs/<experiment>`` overlays every run of an experiment.
    config : TensorBoardConfig
        The ``[tracking.tensorboard]`` section (no options yet).
    """

    name = "tensorboard"

    def __init__(self, run_dir: RunDirectory, config: TensorBoardConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.log_dir = run_dir.path / LOG_DIR
        self.writer: Any = None
        self.last_round = 0

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Open the writer; on resume, drop events of rounds the resumed run redoes."""
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events at or after it from the earlier file,
        # so a round that was logged but not checkpointed before a crash is not shown twice.
        purge = first_round if first_round > 1 else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        if first_round == 1:
            text = json.dumps(experiment.model_dump(mode="json"), indent=2)
            # four-space indent: TensorBoard renders text as markdown; this keeps it verbatim
            self.writer.add_text("experiment", "    " + text.replace("\n", "\n    "), 0)
        write_state(self.run_dir, self.name, {"log_dir": LOG_DIR})

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Nothing per phase."""

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """One scalar per tag at step ``round_``, flushed (a crash keeps the finished rounds)."""
        for tag, value in round_scalars(rows).items():
            self.writer.add_scalar(tag, value, round_)
        self.writer.flush()
        self.last_round = round_

    def finish(self, status: str) -> None:
        """Log the reported values (``final/...``) at the last round and close the writer."""
        if self.writer is None:
            return
        summary = self.run_dir.read_summary()
        if summary is not None and status == "FINISHED":
            for tag, value in final_scalars(summary).items():
                self.writer.add_scalar(tag, value, self.last_round)
        self.writer.close()
        self.writer = None

    def where(self) -> str:
        """The command that shows these events (and those of the experiment's other runs)."""
        return f"tensorboard --logdir {self.run_dir.path.parent}"
