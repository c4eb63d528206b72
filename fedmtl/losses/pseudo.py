"""Pseudo-labels from a model's own outputs, per task kind (Lee, ICML-W 2013).

A label is kept where the model is confident: a class whose softmax probability, or a binary
label whose probability of its side, is at least ``threshold``. Regression kinds (depth,
normals) have no pseudo-label: a target equal to the prediction teaches nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmtl.config import CLASS_KINDS
from fedmtl.tasks import Task

BINARY_DENSE_KINDS = ("saliency", "edge")


def pseudo_targets(task: Task, output: Tensor, threshold: float) -> tuple[Tensor, Tensor] | None:
    """``(target, keep)`` for one batch of ``task``'s outputs, or ``None`` (regression).

    ``keep`` is a ``bool [B]`` mask of the samples that carry at least one confident label;
    dense kinds also mark their unconfident pixels with the task's ``ignore_index``, which the
    task's loss skips. ``target`` has the task's target layout (see :class:`~fedmtl.tasks.Task`).
    """
    output = output.detach().float()
    if task.kind in CLASS_KINDS:
        confidence, label = output.softmax(dim=-1).max(dim=-1)
        return label, confidence >= threshold
    if task.kind == "multilabel":
        probability = output.sigmoid()
        sure = torch.maximum(probability, 1 - probability) >= threshold
        # multilabel's ignore_index may be None: a sample counts only if every label is sure
        return (probability >= 0.5).float(), sure.all(dim=-1)
    if task.kind == "semseg":
        confidence, label = output.softmax(dim=1).max(dim=1)
        sure = confidence >= threshold
        label = label.masked_fill(~sure, int(task.options["ignore_index"]))
        return label, sure.flatten(1).any(dim=1)
    if task.kind in BINARY_DENSE_KINDS:
        probability = output.sigmoid()
        sure = torch.maximum(probability, 1 - probability) >= threshold
        target = (
            (probability >= 0.5).float().masked_fill(~sure, float(task.options["ignore_index"]))
        )
        return target, sure.flatten(1).any(dim=1)
    return None
