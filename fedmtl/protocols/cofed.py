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

from fedmtl.config import Experiment
from fedmtl.data import dataset_task_table

CLASS_KINDS = ("classification", "text_classification")


def prediction_key(task: str) -> str:
    """Array name of a client's predictions for ``task`` in a ``train`` reply."""
    return f"cofed/pred/{task}"


def labels_key(task: str) -> str:
    """Array name of the voted pseudo-labels for ``task`` in a ``train`` message."""
    return f"cofed/labels/{task}"


def task_group(experiment: Experiment, client_id: str, task: str) -> str:
    """Who votes together: the clients of one dataset task (``<dataset>/<task>``)."""
    client = next(c for c in experiment.clients if c.client_id == client_id)
    return f"{client.dataset}/{task}"


def vote_tasks(experiment: Experiment, client_id: str) -> list[str]:
    """The client's classification tasks that another client holds too, in its task order."""
    client = next(c for c in experiment.clients if c.client_id == client_id)
    dataset = experiment.datasets[client.dataset]
    table = dataset_task_table(dataset.kind, **dataset.options)
    out = []
    for task in client.tasks:
        if table[task].kind not in CLASS_KINDS:
            continue
        holders = [c for c in experiment.clients if c.dataset == client.dataset and task in c.tasks]
        if len(holders) >= 2:
            out.append(task)
    return out


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
