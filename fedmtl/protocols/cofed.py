"""CoFED on the wire (``strategies.cofed`` ↔ ``clients.cofed``): predictions up, votes down.

A *vote task* is a classification task of a dataset (``classification`` or
``text_classification`` in the dataset's task table) that at least two clients hold: only
their votes can disagree. A client's ``train`` reply carries :func:`prediction_key` per vote
task: its predicted class of every public sample, in the public set's selection order
(``[P]`` float32 class indices, so the loop's finite-value check applies). The next ``train``
message carries :func:`labels_key` per vote task: the voted class, or −1 where the votes did
not agree enough. A client with no vote task sends and receives nothing: it trains locally.
"""

from __future__ import annotations

from fedmtl.config import Experiment, partnered_class_tasks, task_group


def prediction_key(task: str) -> str:
    """Array name of a client's predictions for ``task`` in a ``train`` reply."""
    return f"cofed/pred/{task}"


def labels_key(task: str) -> str:
    """Array name of the voted pseudo-labels for ``task`` in a ``train`` message."""
    return f"cofed/labels/{task}"


def vote_tasks(experiment: Experiment, client_id: str) -> list[str]:
    """The client's classification tasks another client holds too (it votes on these)."""
    return partnered_class_tasks(experiment, client_id)


def public_size(experiment: Experiment) -> int:
    """``P``, the public samples every client predicts.

    Raises
    ------
    ValueError
        If the experiment has no ``[public]`` section.
    """
    if experiment.public is None:
        raise ValueError("public: cofed needs a [public] dataset section")
    return experiment.public.size


__all__ = [
    "labels_key",
    "prediction_key",
    "public_size",
    "task_group",
    "vote_tasks",
]
