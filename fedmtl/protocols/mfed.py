"""M-Fed's ``train`` message (built by ``fedmtl.strategies.mfed``, read by ``fedmtl.clients.mfed``).

- ``arrays`` holds the task-global model the client starts from (``encoder.…`` unless the
  experiment sets ``keep_local_encoder``, ``decoders.<task>.…`` and ``heads.<task>.…``) and the
  global encoder ``g`` under :data:`GLOBAL_ENCODER_PREFIX` (``global/encoder.…``), in the one
  ``arrays`` record.
- ``config`` holds :func:`lambda_key` (``lambda/<task>``) for each of the client's tasks.

The reply carries encoder, decoders and heads (``MFedConfig.shares``) and, when the experiment
sets ``algorithm.threshold``, ``val/<task>/<primary metric>`` in its metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

GLOBAL_ENCODER_PREFIX = "global/"
LAMBDA_PREFIX = "lambda/"


def lambda_key(task: str) -> str:
    """Config key of the pull strength λ of ``task`` in a ``train`` message."""
    return f"{LAMBDA_PREFIX}{task}"


def validation_key(task: str, metric: str) -> str:
    """Metric key of a task's held-out validation value in a ``train`` reply."""
    return f"val/{task}/{metric}"


def split_received(received: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate a ``train`` message's arrays into the task-global model and ``g``.

    Returns
    -------
    task_model, global_encoder
        State-dict-keyed tensors to load, and ``g`` keyed ``encoder.…`` (prefix removed).
    """
    task_model: dict[str, Tensor] = {}
    global_encoder: dict[str, Tensor] = {}
    for name, tensor in received.items():
        if name.startswith(GLOBAL_ENCODER_PREFIX):
            global_encoder[name.removeprefix(GLOBAL_ENCODER_PREFIX)] = tensor
        else:
            task_model[name] = tensor
    return task_model, global_encoder


def pull_strength(config: Mapping[str, Any], tasks: list[str]) -> float:
    """The λ a client with ``tasks`` uses on its one encoder: the mean of its tasks' λ.

    Raises
    ------
    KeyError
        If the message lacks the λ of one of the tasks.
    """
    missing = [t for t in tasks if lambda_key(t) not in config]
    if missing:
        raise KeyError(f"train message lacks {[lambda_key(t) for t in missing]}")
    return sum(float(config[lambda_key(t)]) for t in tasks) / len(tasks)
