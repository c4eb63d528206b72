"""Task registry, task losses and task metrics against hand-computed values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from fedmtl.tasks import TASK_REGISTRY, Task, TaskMetrics, create_task, register_task


def _t(values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _stream(task: Task, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    metrics = task.new_metrics()
    for output, target in batches:
        metrics.update(output, target)
    return metrics.compute()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- registry


KINDS = {
    # kind: (num_outputs, primary metric, higher_is_better, dense, modality)
    "classification": (3, "accuracy", True, False, "image"),
    "text_classification": (3, "accuracy", True, False, "text"),
    "multilabel": (3, "micro_f1", True, False, "any"),
    "semseg": (3, "miou", True, True, "image"),
    "depth": (1, "rmse", False, True, "image"),
    "normals": (3, "mean_angular_error", False, True, "image"),
    "saliency": (1, "max_f", True, True, "image"),
    "edge": (1, "odsF", True, True, "image"),
}


def _example(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid (output, target) batch of two samples for ``kind``."""
    gen = torch.Generator().manual_seed(0)
    if kind in ("classification", "text_classification"):
        return torch.randn(2, 3, generator=gen), _t([0, 2], torch.long)
    if kind == "multilabel":
        return torch.randn(2, 3, generator=gen), _t([[1, 0, 1], [0, 1, 0]])
    if kind == "semseg":
        return torch.randn(2, 3, 2, 2, generator=gen), torch.randint(0, 3, (2, 2, 2), generator=gen)
    if kind == "depth":
        return torch.rand(2, 1, 2, 2, generator=gen), torch.rand(2, 1, 2, 2, generator=gen) + 0.5
    if kind == "normals":
        target = torch.nn.functional.normalize(torch.randn(2, 3, 2, 2, generator=gen), dim=1)
        return torch.randn(2, 3, 2, 2, generator=gen), target
    return torch.randn(2, 1, 2, 2, generator=gen), _t([[[[1, 0], [0, 1]]], [[[0, 0], [1, 0]]]])


def test_registry_holds_every_kind_after_package_import() -> None:
    assert set(KINDS) <= set(TASK_REGISTRY)
    for kind, cls in TASK_REGISTRY.items():
        assert cls.kind == kind


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_flags(kind: str) -> None:
    num_outputs, primary, higher, dense, modality = KINDS[kind]
    task = create_task(kind, "t", num_outputs)
    assert (task.primary_metric, task.higher_is_better) == (primary, higher)
    assert (task.dense, task.modality) == (dense, modality)
    assert task.loss_weight == 1.0
    assert task.out_channels == num_outputs


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loss_is_scalar_with_gradient_and_metrics_report_primary(kind: str) -> None:
    num_outputs = KINDS[kind][0]
    task = create_task(kind, "t", num_outputs)
    output, target = _example(kind)
    output.requires_grad_(True)
    loss = task.loss(output, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert output.grad is not None and torch.isfinite(output.grad).all()
    result = _stream(task, [(output, target)])
    assert math.isfinite(result[task.primary_metric])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_empty_pass_gives_nan(kind: str) -> None:
    task = create_task(kind, "t", KINDS[kind][0])
    assert math.isnan(task.new_metrics().compute()[task.primary_metric])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shape_mismatch_names_task_and_both_shapes(kind: str) -> None:
    task = create_task(kind, "my_task", KINDS[kind][0])
    output, target = _example(kind)
    bad_target = target[:1]  # batch of 1 against a batch of 2
    for call in (task.loss, task.new_metrics().update):
        with pytest.raises(ValueError, match="my_task") as info:
            call(output, bad_target)
        assert str(tuple(output.shape)) in str(info.value)
        assert str(tuple(bad_target.shape)) in str(info.value)


def test_wrong_channel_count_raises() -> None:
    task = create_task("semseg", "seg", 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\)"):
        task.loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long))


def test_unknown_kind_is_named() -> None:
    with pytest.raises(KeyError, match="dpeth"):
        create_task("dpeth", "d", 1)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="ignore_idx"):
        create_task("semseg", "seg", 3, ignore_idx=0)


def test_loss_weight_option_overrides_default() -> None:
    task = create_task("edge", "edge", 1, loss_weight=50)
    assert task.loss_weight == 50.0
    assert "loss_weight" not in task.options
    assert create_task("edge", "edge", 1).loss_weight == 1.0


def test_too_few_outputs_rejected() -> None:
    with pytest.raises(ValueError, match="num_outputs"):
        create_task("classification", "c", 1)


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="semseg"):

        @register_task("semseg")
        class Again(Task):
            def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return output.sum()

            def new_metrics(self) -> TaskMetrics:
                raise NotImplementedError

    assert TASK_REGISTRY["semseg"].__name__ != "Again"


# --------------------------------------------------------------------------- classification


def test_classification_cross_entropy_by_hand() -> None:
    task = create_task("classification", "c", 3)
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(2), labels].mean()
    loss = task.loss(_t(logits), _t(labels, torch.long))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["classification", "text_classification"])
def test_accuracy_streams_over_batches(kind: str) -> None:
    task = create_task(kind, "c", 3)
    # Batch 1: argmax 0, 2 vs labels 0, 1 -> 1 of 2. Batch 2: argmax 1, 1, 0 vs 1, 1, 0 -> 3 of 3.
    batches = [
        (_t([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), _t([0, 1], torch.long)),
        (_t([[0.0, 5.0, 1.0], [0.0, 2.0, 1.0], [9.0, 0.0, 0.0]]), _t([1, 1, 0], torch.long)),
    ]
    assert _stream(task, batches)["accuracy"] == pytest.approx(4 / 5)


# --------------------------------------------------------------------------- multi-label


def test_multilabel_bce_by_hand_with_ignored_entries() -> None:
    task = create_task("multilabel", "m", 3, ignore_index=-1)
    logits = np.array([[1.5, -0.5, 0.2], [-2.0, 0.3, 4.0]])
    labels = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    p = _sigmoid(logits)
    known = labels >= 0
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    expected = bce[known].mean()
    assert task.loss(_t(logits), _t(labels)).item() == pytest.approx(expected, rel=1e-6)
    # Decisions at 0.5: [1, 0, (1, ignored)], [0, 1, 1] -> TP 3, FP 0, FN 0; counting the ignored
    # entry as a negative label would add a false positive.
    assert _stream(task, [(_t(logits), _t(labels))])["micro_f1"] == pytest.approx(1.0)


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = Σ_k (R_k − R_{k−1}) P_k over the score-sorted list (no ties in the tests)."""
    order = np.argsort(-scores)
    hits = labels[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def test_multilabel_micro_f1_and_map_by_hand_over_two_batches() -> None:
    task = create_task("multilabel", "m", 3)
    # The first batch lies inside [0, 1]: read as probabilities (no sigmoid) it would give other
    # decisions at 0.5 than the logits it is.
    logits = np.array(
        [[0.3, 0.1, 0.9], [0.2, 0.6, 0.05], [1.2, 0.1, -0.4], [-0.7, -0.6, 0.8]],
    )
    labels = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=float)
    predicted = _sigmoid(logits) > 0.5
    tp = (predicted & (labels == 1)).sum()
    fp = (predicted & (labels == 0)).sum()
    fn = (~predicted & (labels == 1)).sum()
    micro_f1 = 2 * tp / (2 * tp + fp + fn)
    mean_ap = np.mean([_average_precision(logits[:, j], labels[:, j]) for j in range(3)])
    batches = [(_t(logits[:2]), _t(labels[:2])), (_t(logits[2:]), _t(labels[2:]))]
    result = _stream(task, batches)
    assert result["micro_f1"] == pytest.approx(micro_f1)
    assert result["mAP"] == pytest.approx(mean_ap)


# --------------------------------------------------------------------------- semseg


def test_semseg_cross_entropy_skips_ignored_pixels() -> None:
    task = create_task("semseg", "seg", 3)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 2, 2))
    labels = np.array([[[0, 255], [2, 1]]])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    picked = [log_softmax[0, labels[0, i, j], i, j] for i, j in [(0, 0), (1, 0), (1, 1)]]
    expected = -np.mean(picked)
    loss = task.loss(_t(logits), _t(labels, torch.long))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_semseg_all_ignored_batch_gives_zero_loss_with_gradient() -> None:
    task = create_task("semseg", "seg", 3)
    output = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = task.loss(output, torch.full((1, 2, 2), 255, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert output.grad is not None and (output.grad == 0).all()


def _one_hot_logits(prediction: np.ndarray, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``prediction`` ([B, H, W] -> [B, C, H, W])."""
    return torch.nn.functional.one_hot(_t(prediction, torch.long), num_classes).permute(0, 3, 1, 2)


def test_semseg_miou_and_pixel_accuracy_by_confusion_matrix() -> None:
    task = create_task("semseg", "seg", 4)
    # Class 3 occurs nowhere, so it is left out of the mean; 255 pixels are skipped even where
    # the prediction is class 3.
    pred_a, target_a = np.array([[[0, 0], [1, 3]]]), np.array([[[0, 1], [1, 255]]])
    pred_b, target_b = np.array([[[2, 2], [0, 1]]]), np.array([[[2, 0], [0, 1]]])
    # Confusion over valid pixels (target, prediction): (0,0) (1,0) (1,1) (2,2) (0,2) (0,0) (1,1)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 0, FN 1 -> 2/3; class 2: TP 1, FP 1,
    # FN 0 -> 1/2. Pixel accuracy 5/7.
    expected_miou = (2 / 4 + 2 / 3 + 1 / 2) / 3
    batches = [
        (_one_hot_logits(pred_a, 4).float(), _t(target_a, torch.long)),
        (_one_hot_logits(pred_b, 4).float(), _t(target_b, torch.long)),
    ]
    result = _stream(task, batches)
    assert result["miou"] == pytest.approx(expected_miou)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)
    joined = _stream(
        task, [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    )
    assert joined == pytest.approx(result)


def test_semseg_ignore_index_inside_class_range() -> None:
    task = create_task("semseg", "seg", 3, ignore_index=0)
    prediction, target = np.array([[[0, 1], [2, 0]]]), np.array([[[0, 1], [1, 2]]])
    # Valid pixels (target, prediction): (1, 1), (1, 2), (2, 0); the ignored class 0 leaves the
    # mean: class 1 IoU 1/2, class 2 IoU 0/2. The ignored (0, 0) pixel is not a correct one.
    result = _stream(task, [(_one_hot_logits(prediction, 3).float(), _t(target, torch.long))])
    assert result["miou"] == pytest.approx(0.25)
    assert result["pixel_accuracy"] == pytest.approx(1 / 3)


def test_semseg_all_ignored_pass_is_nan() -> None:
    task = create_task("semseg", "seg", 3)
    result = _stream(task, [(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 255))])
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])


# --------------------------------------------------------------------------- depth


def test_depth_l1_over_valid_pixels_only() -> None:
    task = create_task("depth", "depth", 1)
    output = _t([[[[1.0, 2.0], [100.0, 4.0]]]])
    target = _t([[[[1.5, 1.0], [0.0, 5.0]]]])  # the 0 pixel (huge error) is invalid
    assert task.loss(output, target).item() == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def test_depth_rmse_pools_pixels_not_batches() -> None:
    task = create_task("depth", "depth", 1)
    # Batch 1: errors 1, 3 (one invalid pixel); batch 2: one valid pixel, error 2.
    batch_1 = (_t([[[[2.0, 5.0], [9.0, 1.0]]]]), _t([[[[1.0, 2.0], [0.0, 0.0]]]]))
    batch_2 = (_t([[[[4.0, 7.0], [7.0, 7.0]]]]), _t([[[[2.0, 0.0], [0.0, 0.0]]]]))
    pooled = math.sqrt((1 + 9 + 4) / 3)
    result = _stream(task, [batch_1, batch_2])
    assert result["rmse"] == pytest.approx(pooled)
    mean_of_batches = (math.sqrt((1 + 9) / 2) + 2.0) / 2
    assert result["rmse"] != pytest.approx(mean_of_batches)


def test_depth_max_depth_drops_padding() -> None:
    task = create_task("depth", "depth", 1, max_depth=80.0)
    output, target = _t([[[[1.0, 0.0]]]]), _t([[[[3.0, 255.0]]]])
    assert task.loss(output, target).item() == pytest.approx(2.0)
    assert _stream(task, [(output, target)])["rmse"] == pytest.approx(2.0)


def test_depth_no_valid_pixel_gives_nan_rmse_and_zero_loss() -> None:
    task = create_task("depth", "depth", 1)
    output, target = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert task.loss(output, target).item() == 0.0
    assert math.isnan(_stream(task, [(output, target)])["rmse"])


# --------------------------------------------------------------------------- normals


def _normals_batch(seed: int, invalid: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    output = rng.normal(size=(1, 3, 3, 3))
    target = rng.normal(size=(1, 3, 3, 3))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    for k, (i, j) in enumerate(invalid):
        target[0, :, i, j] = 0.0 if k % 2 == 0 else 255.0  # zero vector or padding
    return output, target


def _angles_by_arccos(output: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = output[0].reshape(3, -1).T
    tgt = target[0].reshape(3, -1).T
    valid = (np.linalg.norm(tgt, axis=1) > 0) & ~(tgt == 255).any(axis=1)
    out, tgt = out[valid], tgt[valid]
    cos = (out * tgt).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(tgt, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_normals_loss_by_hand() -> None:
    task = create_task("normals", "normals", 3)
    output, target = _normals_batch(0, invalid=[(0, 0), (2, 1)])
    unit = output / np.linalg.norm(output, axis=1, keepdims=True)
    per_pixel = np.abs(unit - target).sum(axis=1)[0]
    valid = np.ones((3, 3), dtype=bool)
    valid[0, 0] = valid[2, 1] = False
    expected = per_pixel[valid].mean()
    assert task.loss(_t(output), _t(target)).item() == pytest.approx(expected, rel=1e-5)


def test_normals_angular_error_by_arccos_over_two_batches() -> None:
    task = create_task("normals", "normals", 3)
    batch_1 = _normals_batch(1, invalid=[(1, 1)])
    batch_2 = _normals_batch(2, invalid=[(0, 2), (2, 2)])
    angles = np.concatenate([_angles_by_arccos(*batch_1), _angles_by_arccos(*batch_2)])
    assert angles.size == 8 + 7  # invalid pixels really are excluded from the reference
    result = _stream(task, [(_t(o), _t(t)) for o, t in (batch_1, batch_2)])
    assert result["mean_angular_error"] == pytest.approx(angles.mean(), abs=1e-4)
    # Histogram median: within half a 0.01° bin of the exact one.
    assert result["median_angular_error"] == pytest.approx(np.median(angles), abs=0.006)


def test_normals_known_angles() -> None:
    task = create_task("normals", "normals", 3)
    # Unnormalised predictions at 0°, 90°, 180° and 45° from the target +z.
    output = _t([[[[0.0, 1.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]], [[2.0, 0.0, -3.0, 1.0]]]])
    target = _t([[[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]]])
    result = _stream(task, [(output, target)])
    assert result["mean_angular_error"] == pytest.approx((0 + 90 + 180 + 45) / 4, abs=1e-6)
    assert result["median_angular_error"] == pytest.approx((45 + 90) / 2, abs=0.006)


# --------------------------------------------------------------------------- saliency, edge


def _brute_force_max_f(
    probabilities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, beta_squared: float
) -> tuple[float, float]:
    best = (-1.0, math.nan)
    for t in thresholds:
        predicted = probabilities >= t
        tp = float((predicted & labels).sum())
        precision = tp / predicted.sum() if predicted.sum() else 0.0
        recall = tp / labels.sum() if labels.sum() else 0.0
        denominator = beta_squared * precision + recall
        f = (1 + beta_squared) * precision * recall / denominator if denominator else 0.0
        if f > best[0]:
            best = (f, float(t))
    return best


def _binary_batches(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for size in (2, 3):
        logits = rng.normal(scale=2.0, size=(size, 1, 5, 5))
        labels = rng.random(size=(size, 1, 5, 5)) < _sigmoid(logits + rng.normal(size=logits.shape))
        target = labels.astype(float)
        target[:, :, 0, :2] = 255.0  # unlabelled pixels
        logits[:, :, 0, :2] = 8.0  # confident positives there would change P if counted
        batches.append((logits, target))
    return batches


@pytest.mark.parametrize(
    ("kind", "key", "grid", "beta_squared"),
    [
        ("saliency", "max_f", np.arange(1, 20) / 20, 0.3),
        ("edge", "odsF", np.arange(1, 100) / 100, 1.0),
    ],
)
def test_max_f_matches_brute_force(
    kind: str, key: str, grid: np.ndarray, beta_squared: float
) -> None:
    task = create_task(kind, "t", 1)
    batches = _binary_batches(seed=4)
    valid = [t != 255 for _, t in batches]
    probabilities = np.concatenate([_sigmoid(o)[v] for (o, _), v in zip(batches, valid)])
    labels = np.concatenate([t[v] == 1 for (_, t), v in zip(batches, valid)])
    expected, threshold = _brute_force_max_f(probabilities, labels, grid, beta_squared)
    result = _stream(task, [(_t(o), _t(t)) for o, t in batches])
    assert result[key] == pytest.approx(expected)
    assert result[f"{key}_threshold"] == pytest.approx(threshold)
    joined = (
        torch.cat([_t(o) for o, _ in batches]),
        torch.cat([_t(t) for _, t in batches]),
    )
    assert _stream(task, [joined]) == pytest.approx(result)


def test_max_f_small_case_by_hand() -> None:
    task = create_task("saliency", "sal", 1)
    # Probabilities 0.92, 0.62, 0.32, 0.12 with labels 1, 0, 1, 0; F = 1.3·P·R / (0.3·P + R):
    # t <= 0.12: P 1/2, R 1 -> 0.565; t in (0.12, 0.32]: P 2/3, R 1 -> 0.722;
    # t in (0.32, 0.62]: P 1/2, R 1/2 -> 0.5; t in (0.62, 0.92]: P 1, R 1/2 -> 0.65 / 0.8 = 0.8125.
    probabilities = torch.tensor([0.92, 0.62, 0.32, 0.12])
    logits = torch.log(probabilities / (1 - probabilities)).reshape(1, 1, 2, 2)
    target = _t([[[[1.0, 0.0], [1.0, 0.0]]]])
    result = _stream(task, [(logits, target)])
    assert result["max_f"] == pytest.approx(0.8125)
    assert result["max_f_threshold"] == pytest.approx(0.65)  # first grid value above 0.62


def test_threshold_counts_probability_equal_to_it_as_positive() -> None:
    task = create_task("saliency", "sal", 1, num_thresholds=1)  # the grid is {0.5}
    # sigmoid(0) is exactly 0.5: predicted positive (p >= t, as ATRC), so P = R = 1.
    result = _stream(task, [(_t([[[[0.0, -2.0]]]]), _t([[[[1.0, 0.0]]]]))])
    assert result["max_f"] == pytest.approx(1.0)
    assert result["max_f_threshold"] == 0.5


def test_saliency_bce_skips_ignored_pixels() -> None:
    task = create_task("saliency", "sal", 1)
    logits = np.array([[[[0.5, -1.0], [2.0, 30.0]]]])
    target = np.array([[[[1.0, 0.0], [0.0, 255.0]]]])
    p = _sigmoid(np.array([0.5, -1.0, 2.0]))
    y = np.array([1.0, 0.0, 0.0])
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert task.loss(_t(logits), _t(target)).item() == pytest.approx(expected, rel=1e-6)


def _weighted_bce(logits: np.ndarray, labels: np.ndarray, w: float) -> float:
    p = _sigmoid(logits)
    return float(-(w * labels * np.log(p) + (1 - w) * (1 - labels) * np.log(1 - p)).mean())


def test_edge_weighted_bce_by_hand() -> None:
    task = create_task("edge", "edge", 1)
    logits = np.array([[[[1.0, -2.0], [0.5, 7.0]]]])
    target = np.array([[[[1.0, 0.0], [0.0, 255.0]]]])
    expected = _weighted_bce(np.array([1.0, -2.0, 0.5]), np.array([1.0, 0.0, 0.0]), 0.95)
    assert task.loss(_t(logits), _t(target)).item() == pytest.approx(expected, rel=1e-6)


def test_edge_batch_balanced_weight() -> None:
    task = create_task("edge", "edge", 1, pos_weight=None)
    logits = np.array([[[[1.0, -2.0], [0.5, -1.0]]]])
    labels = np.array([[[[1.0, 0.0], [0.0, 0.0]]]])
    expected = _weighted_bce(logits.ravel(), labels.ravel(), 3 / 4)  # 3 of 4 pixels negative
    assert task.loss(_t(logits), _t(labels)).item() == pytest.approx(expected, rel=1e-6)


def test_edge_loss_stable_for_large_logits() -> None:
    task = create_task("edge", "edge", 1)
    loss = task.loss(_t([[[[100.0, -100.0]]]]), _t([[[[0.0, 1.0]]]]))
    # -log(1 - sigmoid(100)) ≈ 100 and -log(sigmoid(-100)) ≈ 100.
    assert loss.item() == pytest.approx((0.05 * 100 + 0.95 * 100) / 2, rel=1e-5)


def test_edge_pos_weight_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="pos_weight"):
        create_task("edge", "edge", 1, pos_weight=1.5)
    with pytest.raises(ValueError, match="num_thresholds"):
        create_task("edge", "edge", 1, num_thresholds=0)


@pytest.mark.parametrize("kind", ["saliency", "edge"])
def test_binary_all_ignored_gives_nan_metric_and_zero_loss(kind: str) -> None:
    task = create_task(kind, "t", 1)
    output, target = torch.randn(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255.0)
    assert task.loss(output, target).item() == 0.0
    assert math.isnan(_stream(task, [(output, target)])[task.primary_metric])
