"""The local training loop and evaluation every client algorithm shares."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.config import TrainingConfig
from fedmtl.tasks import Task

Batch = tuple[Any, Mapping[str, Tensor]]
ExtraLoss = Callable[[nn.Module], Tensor]
# A term of the batch: called with the model right after its forward pass, and the targets.
BatchLoss = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def resolve_device(name: str) -> torch.device:
    """Map the experiment's ``device`` to a torch device.

    ``auto`` picks CUDA when visible, else CPU. Asking for CUDA where none is visible is an
    error (in simulation, set ``simulation.num_gpus_per_client > 0`` or Ray hides the GPU).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but no CUDA device is visible to this process; in "
            "simulation set simulation.num_gpus_per_client > 0 (Ray hides GPUs otherwise)"
        )
    return torch.device(name)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimiser a client's ``training`` section names."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move an input batch (tensor, or raw text list left as is) to ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (halves activation memory, tensor cores); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainStats:
    """What one call of :func:`train_epochs` did."""

    loss: float = 0.0
    task_losses: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    examples: int = 0


def multitask_loss(
    outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], tasks: Sequence[Task]
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the client's task losses, ``Σ_t w_t·L_t`` (``w_t = task.loss_weight``)."""
    total: Tensor | None = None
    parts: dict[str, float] = {}
    for task in tasks:
        loss = task.loss(outputs[task.name].float(), targets[task.name]) * task.loss_weight
        parts[task.name] = float(loss.detach())
        total = loss if total is None else total + loss
    assert total is not None  # a client has at least one task (validated in config)
    return total, parts


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    grad_clip: float | None,
    *,
    what: str = "training loss",
) -> float:
    """One step on ``loss`` (gradient-norm clipping as configured); returns its value.

    Raises
    ------
    FloatingPointError
        If ``loss`` is NaN or Inf, before any parameter changes (the reply must not carry
        poisoned weights); the message names ``what``.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} became {value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


def train_epochs(
    model: nn.Module,
    batches: Callable[[int], Iterator[Batch]],
    tasks: Sequence[Task],
    cfg: TrainingConfig,
    device: torch.device,
    *,
    epochs: int | None = None,
    extra_loss: ExtraLoss | None = None,
    batch_loss: BatchLoss | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Train ``model`` on the client's tasks for ``epochs`` passes.

    Parameters
    ----------
    model : nn.Module
        A MultiTaskModel (``forward(inputs) → {task: output}``), already on ``device``.
    batches : callable
        ``batches(epoch)`` yields ``(inputs, targets)`` for that epoch (seeded shuffling).
    tasks : sequence of Task
        The client's tasks; the loss is their sum.
    cfg : TrainingConfig
        Optimiser, learning rate, clipping, ``max_batches``.
    device : torch.device
        Where to compute; CUDA runs under bf16 autocast.
    epochs : int, optional
        Defaults to ``cfg.local_epochs``.
    extra_loss : callable, optional
        ``extra_loss(model)`` adds a regulariser (FedProx, Ditto, M-Fed's encoder pull).
    batch_loss : callable, optional
        ``batch_loss(model, targets)`` adds a term of the current batch, called right after the
        forward pass (FedRCL's contrastive loss on the features that pass produced).
    optimizer : torch.optim.Optimizer, optional
        Defaults to a fresh one from ``cfg`` (FL clients restart their optimiser each round).
    progress : callable, optional
        Called as ``progress(batches_done, last_loss)``.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or Inf (the reply must not carry poisoned weights).
    """
    epochs = cfg.local_epochs if epochs is None else epochs
    optimizer = optimizer or make_optimizer(model.parameters(), cfg)
    model.train()
    stats = TrainStats()
    sums: dict[str, float] = {}
    for epoch in range(epochs):
        for step, (inputs, targets) in enumerate(batches(epoch)):
            if cfg.max_batches is not None and step >= cfg.max_batches:
                break
            inputs = to_device(inputs, device)
            targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
            with autocast(device):
                outputs = model(inputs)
            loss, parts = multitask_loss(outputs, targets, tasks)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            if batch_loss is not None:
                loss = loss + batch_loss(model, targets)
            value = optimizer_step(
                loss, optimizer, model, cfg.grad_clip, what=f"training loss at epoch {epoch}"
            )
            stats.batches += 1
            stats.examples += len(next(iter(targets.values())))
            stats.loss += value
            for name, part in parts.items():
                sums[name] = sums.get(name, 0.0) + part
            if progress is not None:
                progress(stats.batches, value)
    if stats.batches:
        stats.loss /= stats.batches
        stats.task_losses = {k: v / stats.batches for k, v in sums.items()}
    return stats


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Batch],
    tasks: Sequence[Task],
    device: torch.device,
) -> tuple[dict[str, dict[str, float]], float, int]:
    """Evaluate on a split: ``({task: {metric: value}}, mean summed loss, examples)``."""
    model.eval()
    accumulators = {task.name: task.new_metrics() for task in tasks}
    loss_sum, examples, count = 0.0, 0, 0
    for inputs, targets in batches:
        inputs = to_device(inputs, device)
        targets = {k: v.to(device) for k, v in targets.items()}
        with autocast(device):
            outputs = model(inputs)
        outputs = {k: v.float() for k, v in outputs.items()}
        loss, _ = multitask_loss(outputs, targets, tasks)
        loss_sum += float(loss)
        count += 1
        examples += len(next(iter(targets.values())))
        for task in tasks:
            accumulators[task.name].update(outputs[task.name], targets[task.name])
    results = {name: acc.compute() for name, acc in accumulators.items()}
    return results, (loss_sum / count if count else float("nan")), examples
