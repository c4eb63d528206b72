"""Classification task kinds: single-label (image or text) and multi-label."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmtl.tasks.base import Task, TaskMetrics, masked_mean, register_task


@register_task("classification")
class ImageClassification(Task):
    """Single-label classification: cross-entropy on ``[B, C]`` logits, scored by accuracy."""

    modality: ClassVar[str] = "image"
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    min_outputs: ClassVar[int] = 2

    def target_shape(self, output_shape: torch.Size) -> tuple[int, ...]:
        """One class index per sample: ``[B]``."""
        return tuple(output_shape[:1])

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over the batch (0 for an empty batch)."""
        self.check_shapes(output, target)
        return F.cross_entropy(output, target, reduction="sum") / max(target.numel(), 1)

    def new_metrics(self) -> TaskMetrics:
        """A fresh accuracy accumulator."""
        return _AccuracyMetrics(self)


@register_task("text_classification")
class TextClassification(ImageClassification):
    """Single-label classification of text; the same maths as image classification."""

    modality: ClassVar[str] = "text"


class _AccuracyMetrics(TaskMetrics):
    """Top-1 accuracy (fraction in [0, 1]) over the pass via torchmetrics."""

    def __init__(self, task: Task) -> None:
        # Imported here: torchmetrics takes seconds to import and only evaluation needs it (a
        # deployed ClientApp is a new process per message; train messages skip the cost).
        from torchmetrics.classification import MulticlassAccuracy

        self.task = task
        self.accuracy = MulticlassAccuracy(num_classes=task.num_outputs, average="micro")
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate one batch of logits ``[B, C]`` and labels ``[B]``."""
        self.task.check_shapes(output, target)
        self.accuracy = self.accuracy.to(output.device)
        self.accuracy.update(output.detach().argmax(dim=1), target)
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        """``{"accuracy": ...}``; NaN if no sample was seen."""
        if self.count == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float(self.accuracy.compute())}


@register_task("multilabel")
class MultiLabelClassification(Task):
    """Multi-label classification: BCE-with-logits, scored by micro-F1 at 0.5 and macro mAP.

    Notes
    -----
    Option ``ignore_index`` (default None): a target value marking an unknown label (e.g. VOC
    "difficult"); such entries are skipped by the loss and the metrics.
    """

    primary_metric: ClassVar[str] = "micro_f1"
    higher_is_better: ClassVar[bool] = True
    # torchmetrics' multi-label metrics need at least two labels.
    min_outputs: ClassVar[int] = 2
    default_options: ClassVar[dict[str, Any]] = {"ignore_index": None}

    def valid_mask(self, target: Tensor) -> Tensor:
        """True where a label is known (not ``ignore_index``)."""
        ignore = self.options["ignore_index"]
        if ignore is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != ignore

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean binary cross-entropy over the known (sample, label) entries."""
        self.check_shapes(output, target)
        valid = self.valid_mask(target)
        clean = torch.where(valid, target, torch.zeros_like(target)).to(output.dtype)
        per_entry = F.binary_cross_entropy_with_logits(output, clean, reduction="none")
        return masked_mean(per_entry, valid)

    def new_metrics(self) -> TaskMetrics:
        """A fresh micro-F1 / mAP accumulator."""
        return _MultiLabelMetrics(self)


class _MultiLabelMetrics(TaskMetrics):
    """Micro-F1 at probability 0.5 and macro average precision (mAP) via torchmetrics.

    mAP keeps every score of the pass (exact average precision); a classification test set
    (samples × labels floats) is small enough for that. A label without any positive in the
    pass scores AP 0 (torchmetrics' convention).
    """

    def __init__(self, task: MultiLabelClassification) -> None:
        from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

        quiet_no_positive_warnings()

        self.task = task
        ignore = task.options["ignore_index"]
        self.f1 = MultilabelF1Score(
            num_labels=task.num_outputs, threshold=0.5, average="micro", ignore_index=ignore
        )
        self.average_precision = MultilabelAveragePrecision(
            num_labels=task.num_outputs, average="macro", ignore_index=ignore
        )
        self.known = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate one batch of logits ``[B, L]`` and 0/1 targets ``[B, L]``."""
        self.task.check_shapes(output, target)
        # Probabilities, not logits: torchmetrics only applies a sigmoid itself when some value
        # lies outside [0, 1], so logits that happen to lie inside it would be misread.
        probabilities = torch.sigmoid(output.detach().float())
        labels = target.long()
        self.f1 = self.f1.to(output.device)
        self.average_precision = self.average_precision.to(output.device)
        self.f1.update(probabilities, labels)
        self.average_precision.update(probabilities, labels)
        self.known += int(self.task.valid_mask(target).sum())

    def compute(self) -> dict[str, float]:
        """``{"micro_f1": ..., "mAP": ...}``; NaN if no known label was seen."""
        if self.known == 0:
            return {"micro_f1": float("nan"), "mAP": float("nan")}
        return {
            "micro_f1": float(self.f1.compute()),
            "mAP": float(self.average_precision.compute()),
        }


# torchmetrics warns at every compute() in which a label has no positive sample ("No positive
# samples found in target, recall is undefined ..."): with a few hundred test samples that is
# every evaluation of every client, and the warnings drowned the progress output. The AP-0
# convention for such a label is documented above; the warning adds nothing.
NO_POSITIVE_WARNING = r"No positive samples"


def quiet_no_positive_warnings() -> None:
    """Ignore torchmetrics' "No positive samples" warnings in this process (once)."""
    for action, message, *_ in warnings.filters:
        if action == "ignore" and message is not None and message.pattern == NO_POSITIVE_WARNING:
            return
    warnings.filterwarnings("ignore", message=NO_POSITIVE_WARNING, category=UserWarning)
