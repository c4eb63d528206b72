"""Experiment trackers: TensorBoard, MLflow and Weights & Biases on the loop's Observer interface.

Turned on by ``[tracking]`` in the experiment file or by ``--track`` on the command line; each
needs its optional extra (``pip install 'fedmtl[tensorboard]'``, ``[mlflow]``, ``[wandb]``).
:func:`open_trackers` wraps the run's observer so every tracker sees the rows metrics.jsonl
gets; ``finish`` attaches summary.json and the plots once they exist.
"""

from __future__ import annotations

from fedmtl.config import Experiment
from fedmtl.results import RunDirectory
from fedmtl.strategies.loop import Observer
from fedmtl.tracking.base import (
    EXTRAS,
    MissingExtraError,
    Tracker,
    TrackingObserver,
    check_trackers,
    final_scalars,
    flatten,
    read_state,
    require_extra,
    round_scalars,
)

__all__ = [
    "EXTRAS",
    "MissingExtraError",
    "Tracker",
    "TrackingObserver",
    "check_trackers",
    "final_scalars",
    "flatten",
    "open_trackers",
    "read_state",
    "require_extra",
    "round_scalars",
]


def open_trackers(
    experiment: Experiment, run_dir: RunDirectory, observer: Observer
) -> TrackingObserver:
    """``observer`` plus a tracker for each one ``experiment.tracking`` turns on.

    Raises
    ------
    MissingExtraError
        If a tracker's extra is not installed (a :class:`~fedmtl.config.ConfigError` naming
        the extra), before anything is logged.
    """
    check_trackers(experiment)
    tracking = experiment.tracking
    trackers: list[Tracker] = []
    if tracking.tensorboard is not None:
        from fedmtl.tracking.tensorboard_tracker import TensorBoardTracker

        trackers.append(TensorBoardTracker(run_dir, tracking.tensorboard))
    if tracking.mlflow is not None:
        from fedmtl.tracking.mlflow_tracker import MLflowTracker

        trackers.append(MLflowTracker(run_dir, tracking.mlflow))
    if tracking.wandb is not None:
        from fedmtl.tracking.wandb_tracker import WandbTracker

        trackers.append(WandbTracker(run_dir, tracking.wandb))
    return TrackingObserver(observer, trackers, run_dir)
