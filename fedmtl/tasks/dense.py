"""Dense per-pixel task kinds: semantic segmentation, depth and surface normals."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmtl.tasks.base import Task, TaskMetrics, masked_mean, register_task


@register_task("semseg")
class SemanticSegmentation(Task):
    """Semantic segmentation: pixel-wise cross-entropy, scored by mIoU and pixel accuracy.

    Notes
    -----
    Option ``ignore_index`` (default 255): target value of unlabelled pixels, skipped by the loss
    and the metrics.
    """

    dense: ClassVar[bool] = True
    modality: ClassVar[str] = "image"
    primary_metric: ClassVar[str] = "miou"
    higher_is_better: ClassVar[bool] = True
    min_outputs: ClassVar[int] = 2
    default_options: ClassVar[dict[str, Any]] = {"ignore_index": 255}

    def target_shape(self, output_shape: torch.Size) -> tuple[int, ...]:
        """One class index per pixel: ``[B, H, W]``."""
        return (*output_shape[:1], *output_shape[2:])

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy averaged over the labelled pixels."""
        self.check_shapes(output, target)
        ignore = self.options["ignore_index"]
        total = F.cross_entropy(output, target, ignore_index=ignore, reduction="sum")
        return total / (target != ignore).sum().clamp_min(1)

    def new_metrics(self) -> TaskMetrics:
        """A fresh mIoU / pixel-accuracy accumulator."""
        return _SegmentationMetrics(self)


class _SegmentationMetrics(TaskMetrics):
    """Dataset-level mIoU (torchmetrics JaccardIndex) and pixel accuracy, fractions in [0, 1].

    mIoU is TP / (TP + FP + FN) per class from the confusion matrix of the whole pass, averaged
    over the classes that occur in the targets or the predictions.
    """

    def __init__(self, task: SemanticSegmentation) -> None:
        # Imported on first use: see fedmtl.tasks.classification._AccuracyMetrics.
        from torchmetrics.classification import MulticlassJaccardIndex

        self.task = task
        self.ignore_index: int = task.options["ignore_index"]
        self.jaccard = MulticlassJaccardIndex(
            num_classes=task.num_outputs, average="macro", ignore_index=self.ignore_index
        )
        self.correct = 0
        self.valid = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate logits ``[B, C, H, W]`` and labels ``[B, H, W]``."""
        self.task.check_shapes(output, target)
        prediction = output.detach().argmax(dim=1)
        valid = target != self.ignore_index
        self.jaccard = self.jaccard.to(output.device)
        self.jaccard.update(prediction, target)
        self.correct += int(((prediction == target) & valid).sum())
        self.valid += int(valid.sum())

    def compute(self) -> dict[str, float]:
        """``{"miou": ..., "pixel_accuracy": ...}``; NaN if no pixel was labelled."""
        if self.valid == 0:
            return {"miou": math.nan, "pixel_accuracy": math.nan}
        return {
            "miou": float(self.jaccard.compute()),
            "pixel_accuracy": self.correct / self.valid,
        }


@register_task("depth")
class DepthEstimation(Task):
    """Monocular depth: L1 loss over valid pixels, scored by RMSE pooled over the pass.

    Notes
    -----
    A pixel is valid when its target is finite and > 0. Option ``max_depth`` (default None):
    targets at or above it are invalid too (FedHCA2 scores NYUD with 0 < depth < 80, which also
    drops padding marked 255).
    """

    dense: ClassVar[bool] = True
    modality: ClassVar[str] = "image"
    primary_metric: ClassVar[str] = "rmse"
    higher_is_better: ClassVar[bool] = False
    default_options: ClassVar[dict[str, Any]] = {"max_depth": None}

    def valid_mask(self, target: Tensor) -> Tensor:
        """True at pixels with a usable depth target."""
        valid = torch.isfinite(target) & (target > 0)
        if self.options["max_depth"] is not None:
            valid &= target < self.options["max_depth"]
        return valid

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean absolute error over valid pixels."""
        self.check_shapes(output, target)
        return masked_mean((output - target).abs(), self.valid_mask(target))

    def new_metrics(self) -> TaskMetrics:
        """A fresh RMSE accumulator."""
        return _DepthMetrics(self)


class _DepthMetrics(TaskMetrics):
    """RMSE = sqrt(Σ err² / N) over every valid pixel of the pass (not a mean of batch RMSEs)."""

    def __init__(self, task: DepthEstimation) -> None:
        self.task = task
        self.squared_error = 0.0
        self.valid = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate depth predictions and targets ``[B, 1, H, W]``."""
        self.task.check_shapes(output, target)
        valid = self.task.valid_mask(target)
        error = output.detach().double()[valid] - target.double()[valid]
        self.squared_error += float(error.square().sum())
        self.valid += int(valid.sum())

    def compute(self) -> dict[str, float]:
        """``{"rmse": ...}``; NaN if no pixel was valid."""
        if self.valid == 0:
            return {"rmse": math.nan}
        return {"rmse": math.sqrt(self.squared_error / self.valid)}


@register_task("normals")
class SurfaceNormals(Task):
    """Surface normals: L1 on the L2-normalised prediction, scored by angular error in degrees.

    Notes
    -----
    A pixel is valid when its target vector has a non-zero norm and no component equal to option
    ``ignore_index`` (default 255, the padding value of the ATRC/FedHCA2 pipelines). The loss is
    the per-pixel L1 distance Σ_c |n̂_c − t_c| averaged over valid pixels, as in ATRC/FedHCA2.
    """

    dense: ClassVar[bool] = True
    modality: ClassVar[str] = "image"
    primary_metric: ClassVar[str] = "mean_angular_error"
    higher_is_better: ClassVar[bool] = False
    default_options: ClassVar[dict[str, Any]] = {"ignore_index": 255}

    def valid_mask(self, target: Tensor) -> Tensor:
        """``[B, 1, H, W]``: True at pixels with a usable normal target."""
        valid = target.norm(dim=1, keepdim=True) > 0
        if self.options["ignore_index"] is not None:
            valid &= ~(target == self.options["ignore_index"]).any(dim=1, keepdim=True)
        return valid

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-pixel L1 distance of the normalised prediction to the target, mean over valid."""
        self.check_shapes(output, target)
        distance = (F.normalize(output, dim=1) - target).abs().sum(dim=1, keepdim=True)
        return masked_mean(distance, self.valid_mask(target))

    def new_metrics(self) -> TaskMetrics:
        """A fresh angular-error accumulator."""
        return _NormalsMetrics(self)


class _NormalsMetrics(TaskMetrics):
    """Mean and median angle between predicted and target normals, in degrees.

    The angle is 2·atan2(‖p − g‖, ‖p + g‖) of the unit vectors p, g (as FedHCA2; stable near 0°
    and 180°, where arccos of the dot product loses precision). The mean is exact; the median
    comes from a histogram with ``BIN_DEGREES`` bins, so it is within half a bin of the exact one
    while memory stays fixed over the pass.
    """

    BIN_DEGREES: ClassVar[float] = 0.01
    NUM_BINS: ClassVar[int] = round(180 / BIN_DEGREES)

    def __init__(self, task: SurfaceNormals) -> None:
        self.task = task
        self.error_sum = 0.0
        self.valid = 0
        self.histogram: Tensor | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate normals predictions and targets ``[B, 3, H, W]``."""
        self.task.check_shapes(output, target)
        valid = self.task.valid_mask(target).squeeze(1)
        # [N, 3] unit vectors of the valid pixels.
        prediction = F.normalize(output.detach().double().movedim(1, -1)[valid], dim=-1)
        truth = F.normalize(target.double().movedim(1, -1)[valid], dim=-1)
        angle = torch.rad2deg(
            2 * torch.atan2((prediction - truth).norm(dim=-1), (prediction + truth).norm(dim=-1))
        )
        bins = (angle / self.BIN_DEGREES).long().clamp(0, self.NUM_BINS - 1)
        counts = torch.bincount(bins, minlength=self.NUM_BINS)
        self.histogram = counts if self.histogram is None else self.histogram + counts
        self.error_sum += float(angle.sum())
        self.valid += angle.numel()

    def compute(self) -> dict[str, float]:
        """``{"mean_angular_error": ..., "median_angular_error": ...}``; NaN if nothing valid."""
        if self.valid == 0 or self.histogram is None:
            return {"mean_angular_error": math.nan, "median_angular_error": math.nan}
        cumulative = self.histogram.cpu().cumsum(0)
        # 1-based ranks of the middle element(s); the median is the mean of their bin centres.
        ranks = torch.tensor([(self.valid + 1) // 2, self.valid // 2 + 1])
        middle_bins = torch.searchsorted(cumulative, ranks)
        median = float(((middle_bins.double() + 0.5) * self.BIN_DEGREES).mean())
        return {"mean_angular_error": self.error_sum / self.valid, "median_angular_error": median}
