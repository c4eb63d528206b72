"""FedDF on the wire (``strategies.feddf`` ↔ ``clients.feddf``): groups and public-set logits.

Besides per-task FedAvg's groups, a client's ``train`` reply carries :func:`logits_key` per
*distillation task* (a classification task another client of its dataset holds,
:func:`~fedmtl.config.partnered_class_tasks`): its logits of every public sample, in the public
set's selection order (``[P, C]`` float32). The next ``train`` message carries
:func:`target_key` per distillation task: the ensemble's mean logits, which the client distils
into the prototype it received before training. A client without a distillation task gets
FedAvg's groups only.
"""

from __future__ import annotations

from fedmtl.config import Experiment, partnered_class_tasks, task_group


def logits_key(task: str) -> str:
    """Array name of a client's public-set logits for ``task`` in a ``train`` reply."""
    return f"feddf/logits/{task}"


def target_key(task: str) -> str:
    """Array name of the ensemble's mean logits for ``task`` in a ``train`` message."""
    return f"feddf/target/{task}"


def distill_tasks(experiment: Experiment, client_id: str) -> list[str]:
    """The client's classification tasks with a same-dataset partner (the ensemble's tasks).

    A task whose classes come from the data (``text_classification``: 0 in the static table)
    is left out: the server could not check the logits' width.
    """
    tasks = partnered_class_tasks(experiment, client_id)
    return [t for t in tasks if num_classes(experiment, client_id, t) > 0]


def num_classes(experiment: Experiment, client_id: str, task: str) -> int:
    """``C`` of a distillation task, from the dataset's static task table (0: data-defined)."""
    from fedmtl.data import dataset_task_table

    client = next(c for c in experiment.clients if c.client_id == client_id)
    dataset = experiment.datasets[client.dataset]
    return int(dataset_task_table(dataset.kind, **dataset.options)[task].num_outputs)


__all__ = [
    "distill_tasks",
    "logits_key",
    "num_classes",
    "target_key",
    "task_group",
]
