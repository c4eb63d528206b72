"""Task registry: importing this package registers every built-in task kind."""

from __future__ import annotations

# The kind modules register themselves on import.
from fedmtl.tasks import binary_dense, classification, dense
from fedmtl.tasks.base import TASK_REGISTRY, Task, TaskMetrics, create_task, register_task

__all__ = [
    "TASK_REGISTRY",
    "Task",
    "TaskMetrics",
    "binary_dense",
    "classification",
    "create_task",
    "dense",
    "register_task",
]
