"""Task abstraction: what a task predicts, how it is trained and how it is scored."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from fedmtl.registry import Registry

TASK_REGISTRY: Registry[type[Task]] = Registry("task kind", attribute="kind")

TaskType = TypeVar("TaskType", bound="type[Task]")


def register_task(kind: str) -> Callable[[TaskType], TaskType]:
    """Register a task kind under ``kind`` (the name used in dataset task tables).

    Parameters
    ----------
    kind : str
        Registry key, e.g. ``"classification"`` or ``"semseg"``.

    Returns
    -------
    callable
        Class decorator that sets ``cls.kind`` and adds the class to :data:`TASK_REGISTRY`.

    Raises
    ------
    ValueError
        If ``kind`` is already registered.
    """

    def decorator(cls: TaskType) -> TaskType:
        TASK_REGISTRY.add(kind, cls)
        return cls

    return decorator


class TaskMetrics(ABC):
    """Streaming metric accumulator for one task over one evaluation pass."""

    @abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate one batch of model outputs (raw, pre-activation) and targets."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Return every metric of the pass; the task's ``primary_metric`` is always a key.

        A metric with nothing to score (no samples, or no valid pixels) is NaN.
        """


class Task(ABC):
    """One prediction task of a client (an instance of a registered task kind).

    Parameters
    ----------
    name : str
        The task's name inside its dataset (e.g. ``"digit"``); keys decoders and heads.
    num_outputs : int
        Classes (classification, semseg, text), labels (multi-label) or channels (dense
        regression: 1 for depth, 3 for normals, 1 for saliency and edge).
    options : Any
        Kind-specific options (e.g. ``ignore_index`` for semseg, ``pos_weight`` for edge); the
        accepted names and their defaults are the kind's ``default_options``. Every kind also
        accepts ``loss_weight`` (overrides the class default).

    Raises
    ------
    ValueError
        If ``num_outputs`` is out of range for the kind or an option name is unknown.

    Notes
    -----
    Output and target layouts per kind:

    - classification / text_classification: output ``[B, C]`` logits, target ``long [B]``.
    - multilabel: output ``[B, L]`` logits, target ``float [B, L]`` in {0, 1}.
    - semseg: output ``[B, C, H, W]`` logits, target ``long [B, H, W]``, ``ignore_index`` skipped.
    - depth: output ``[B, 1, H, W]``, target ``float [B, 1, H, W]``; pixels with target 0 are
      invalid.
    - normals: output ``[B, 3, H, W]`` (normalised inside loss/metric), target unit vectors
      ``[B, 3, H, W]``; pixels whose target norm is 0 are invalid.
    - saliency / edge: output ``[B, 1, H, W]`` logits, target ``float [B, 1, H, W]`` in {0, 1}
      (both may mark unlabelled pixels with ``ignore_index``).

    Losses are means over valid elements; a batch without any valid element gives a zero loss
    that is still connected to the graph, so ``backward()`` works.
    """

    kind: ClassVar[str] = ""
    dense: ClassVar[bool] = False
    modality: ClassVar[str] = "any"  # "image", "text" or "any": which encoders may serve it
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    default_options: ClassVar[dict[str, Any]] = {}
    min_outputs: ClassVar[int] = 1
    # Per-task weight a multi-task caller may apply when summing losses; instances may override.
    loss_weight: float = 1.0

    def __init__(self, name: str, num_outputs: int, **options: Any) -> None:
        if num_outputs < self.min_outputs:
            raise ValueError(
                f"task {name!r} ({self.kind}): num_outputs must be >= {self.min_outputs}, "
                f"got {num_outputs}"
            )
        unknown = sorted(set(options) - set(self.default_options) - {"loss_weight"})
        if unknown:
            raise ValueError(
                f"task {name!r} ({self.kind}): unknown option(s) {unknown}; "
                f"known: {sorted([*self.default_options, 'loss_weight'])}"
            )
        self.name = name
        self.num_outputs = num_outputs
        self.loss_weight = float(options.pop("loss_weight", type(self).loss_weight))
        self.options: dict[str, Any] = {**self.default_options, **options}

    @property
    def out_channels(self) -> int:
        """Channels (or logits) the head must produce for this task."""
        return self.num_outputs

    @property
    def output_ndim(self) -> int:
        """Dimensions of an output batch: 4 (``[B, C, H, W]``) for dense kinds, else 2."""
        return 4 if self.dense else 2

    def target_shape(self, output_shape: torch.Size) -> tuple[int, ...]:
        """The target shape that goes with an output of ``output_shape`` (default: the same)."""
        return tuple(output_shape)

    def check_shapes(self, output: Tensor, target: Tensor) -> None:
        """Check that ``output`` and ``target`` follow this kind's layout (see class Notes).

        Raises
        ------
        ValueError
            Naming the task and both shapes, if they do not fit together.
        """
        expected = self.target_shape(output.shape)
        if (
            output.dim() != self.output_ndim
            or output.shape[1] != self.out_channels
            or tuple(target.shape) != expected
        ):
            spatial = ", H, W" if self.dense else ""
            raise ValueError(
                f"task {self.name!r} ({self.kind}): output shape {tuple(output.shape)} and "
                f"target shape {tuple(target.shape)} do not fit; expected output "
                f"[B, {self.out_channels}{spatial}] and a target of shape {expected}"
            )

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss (mean over valid elements) of one batch."""

    @abstractmethod
    def new_metrics(self) -> TaskMetrics:
        """A fresh accumulator for an evaluation pass."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_outputs={self.num_outputs})"


def create_task(kind: str, name: str, num_outputs: int, **options: Any) -> Task:
    """Instantiate a registered task kind.

    Parameters
    ----------
    kind : str
        A registered kind, e.g. ``"semseg"``.
    name : str
        The task's name inside its dataset.
    num_outputs : int
        Classes, labels or channels (see :class:`Task`).
    **options : Any
        Kind-specific options (see the kind's ``default_options``) and ``loss_weight``.

    Returns
    -------
    Task
        The task instance.

    Raises
    ------
    KeyError
        If ``kind`` is not registered; the message lists the known kinds.
    """
    return TASK_REGISTRY[kind](name, num_outputs, **options)


def sign_of(higher_is_better: bool) -> float:
    """+1 for metrics where higher is better, -1 otherwise (the Δ% sign convention)."""
    return 1.0 if higher_is_better else -1.0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 (still on the graph) if nothing is valid.

    Parameters
    ----------
    values : Tensor
        Per-element values (e.g. unreduced losses); entries outside ``mask`` may be non-finite.
    mask : Tensor
        Boolean mask broadcastable to ``values``.

    Returns
    -------
    Tensor
        Scalar mean over the masked elements.
    """
    mask = mask.expand_as(values)
    # where() rather than multiplication: 0 * inf at an invalid pixel would poison the sum.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)
