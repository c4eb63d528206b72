"""Binary dense task kinds (saliency, edge) and their threshold-sweep F-measure."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmtl.tasks.base import Task, TaskMetrics, masked_mean, register_task


def threshold_grid(num_thresholds: int) -> Tensor:
    """Thresholds ``k / (n + 1)``, ``k = 1..n``: 19 gives 0.05…0.95, 99 gives BSDS's 0.01…0.99."""
    return torch.arange(1, num_thresholds + 1, dtype=torch.float64) / (num_thresholds + 1)


class BinaryDenseTask(Task):
    """Shared layout of one-channel logit maps with 0/1 targets and an optional ignore value."""

    dense: ClassVar[bool] = True
    modality: ClassVar[str] = "image"
    higher_is_better: ClassVar[bool] = True
    # beta² of the F-measure reported as the primary metric.
    beta_squared: ClassVar[float] = 1.0

    def __init__(self, name: str, num_outputs: int, **options: Any) -> None:
        super().__init__(name, num_outputs, **options)
        if self.options["num_thresholds"] < 1:
            raise ValueError(
                f"task {name!r} ({self.kind}): num_thresholds must be >= 1, "
                f"got {self.options['num_thresholds']}"
            )

    def valid_mask(self, target: Tensor) -> Tensor:
        """True at labelled pixels (target not ``ignore_index``)."""
        ignore = self.options["ignore_index"]
        if ignore is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != ignore

    def new_metrics(self) -> TaskMetrics:
        """A fresh threshold-sweep F-measure accumulator."""
        return ThresholdSweepF(
            self,
            key=self.primary_metric,
            thresholds=threshold_grid(self.options["num_thresholds"]),
            beta_squared=self.beta_squared,
        )


@register_task("saliency")
class Saliency(BinaryDenseTask):
    """Salient-object detection: BCE-with-logits, scored by max F-measure (β² = 0.3).

    Notes
    -----
    Options: ``ignore_index`` (default 255) marks unlabelled pixels; ``num_thresholds`` (default
    19, i.e. 0.05…0.95 in steps of 0.05 as ATRC/FedHCA2) sets the threshold grid of ``max_f``.
    """

    primary_metric: ClassVar[str] = "max_f"
    beta_squared: ClassVar[float] = 0.3
    default_options: ClassVar[dict[str, Any]] = {"ignore_index": 255, "num_thresholds": 19}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy with logits, mean over labelled pixels."""
        self.check_shapes(output, target)
        valid = self.valid_mask(target)
        clean = torch.where(valid, target, torch.zeros_like(target)).to(output.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(output, clean, reduction="none")
        return masked_mean(per_pixel, valid)


@register_task("edge")
class EdgeDetection(BinaryDenseTask):
    """Edge detection: class-balanced BCE (ATRC/FedHCA2), scored by a pixel-exact odsF.

    Notes
    -----
    Loss: ``-(w·y·log p + (1 − w)(1 − y)·log(1 − p))`` averaged over labelled pixels, with
    ``w`` = option ``pos_weight`` (default 0.95); ``pos_weight=None`` takes ``w`` as the
    fraction of negative labelled pixels in the batch (HED). Option ``ignore_index`` (default
    255) marks unlabelled pixels.

    Metric ``odsF``: F1 at the single best threshold of the whole pass from a fixed grid
    (option ``num_thresholds``, default 99 as BSDS). It is a pixel-exact approximation: unlike
    the BSDS/SEISM benchmark the papers use, there is no non-maximum suppression and no
    distance-tolerant matching of predicted to ground-truth edge pixels, so values are lower than
    published odsF and comparable only with each other.
    """

    primary_metric: ClassVar[str] = "odsF"
    beta_squared: ClassVar[float] = 1.0
    default_options: ClassVar[dict[str, Any]] = {
        "ignore_index": 255,
        "pos_weight": 0.95,
        "num_thresholds": 99,
    }

    def __init__(self, name: str, num_outputs: int, **options: Any) -> None:
        super().__init__(name, num_outputs, **options)
        weight = self.options["pos_weight"]
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ValueError(f"task {name!r} (edge): pos_weight must lie in [0, 1], got {weight}")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Class-balanced binary cross-entropy with logits, mean over labelled pixels."""
        self.check_shapes(output, target)
        valid = self.valid_mask(target)
        label = torch.where(valid, target, torch.zeros_like(target)).to(output.dtype)
        weight = self.options["pos_weight"]
        if weight is None:
            weight = masked_mean(1.0 - label, valid).detach()
        # log-sigmoid form: stable for large logits, unlike log(sigmoid(x)).
        per_pixel = -(
            weight * label * F.logsigmoid(output)
            + (1.0 - weight) * (1.0 - label) * F.logsigmoid(-output)
        )
        return masked_mean(per_pixel, valid)


class ThresholdSweepF(TaskMetrics):
    """Dataset-level F-measure at the best threshold of a fixed grid, streaming.

    For each threshold t, a pixel is predicted positive when sigmoid(output) ≥ t; TP, predicted
    and actual positives are pooled over every labelled pixel of the pass, then
    F_β = (1 + β²)·P·R / (β²·P + R) is maximised over t. P (or R) is 0 when nothing is predicted
    (or labelled) positive, and F is 0 when P + R = 0. Memory is two histograms over the grid:
    each pixel is counted in the bin of the number of thresholds at or below its probability.

    Parameters
    ----------
    task : BinaryDenseTask
        The task (for shape checks and its ``valid_mask``).
    key : str
        Name of the F-measure in :meth:`compute`'s result.
    thresholds : Tensor
        Increasing probability thresholds.
    beta_squared : float
        β² of the F-measure (0.3 for saliency, 1 for edges).
    """

    def __init__(
        self, task: BinaryDenseTask, key: str, thresholds: Tensor, beta_squared: float
    ) -> None:
        self.task = task
        self.key = key
        self.thresholds = thresholds
        self.beta_squared = beta_squared
        self.all_counts: Tensor | None = None
        self.positive_counts: Tensor | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate logit maps and 0/1 targets ``[B, 1, H, W]``."""
        self.task.check_shapes(output, target)
        valid = self.task.valid_mask(target)
        probability = torch.sigmoid(output.detach().double()[valid])
        positive = target[valid] > 0.5
        bins = torch.bucketize(probability, self.thresholds.to(probability.device), right=True)
        size = self.thresholds.numel() + 1
        all_counts = torch.bincount(bins, minlength=size)
        positive_counts = torch.bincount(bins[positive], minlength=size)
        if self.all_counts is None or self.positive_counts is None:
            self.all_counts, self.positive_counts = all_counts, positive_counts
        else:
            self.all_counts += all_counts
            self.positive_counts += positive_counts

    def compute(self) -> dict[str, float]:
        """``{key: best F, key + "_threshold": its threshold}``; NaN if nothing was labelled."""
        if self.all_counts is None or self.positive_counts is None or self.all_counts.sum() == 0:
            return {self.key: math.nan, f"{self.key}_threshold": math.nan}
        # Pixels in bins > k have probability >= thresholds[k]: suffix sums from bin k + 1.
        predicted = self.all_counts.cpu().double().flip(0).cumsum(0).flip(0)[1:]
        true_positive = self.positive_counts.cpu().double().flip(0).cumsum(0).flip(0)[1:]
        actual = float(self.positive_counts.sum())
        precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), 0.0)
        recall = true_positive / actual if actual > 0 else torch.zeros_like(true_positive)
        denominator = self.beta_squared * precision + recall
        f_measure = torch.where(
            denominator > 0,
            (1 + self.beta_squared) * precision * recall / denominator.clamp_min(1e-300),
            0.0,
        )
        best = int(f_measure.argmax())
        return {
            self.key: float(f_measure[best]),
            f"{self.key}_threshold": float(self.thresholds[best]),
        }
