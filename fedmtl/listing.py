"""What this installation offers (``fedmtl list``): algorithms, tasks, backbones, datasets, configs.

Every entry comes from a registry the code fills at import (``@register_strategy``,
``@register_task``, ``@register_encoder``, ``@register_dataset``); :func:`registries` is the one
place that reads them, so a new registry type only needs to change it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECTIONS = ("algorithms", "tasks", "backbones", "datasets", "configs")


def registries() -> dict[str, Mapping[str, Any]]:
    """Each section's registry: ``name → registered class``."""
    from fedmtl.data import DATASET_REGISTRY
    from fedmtl.models import ENCODER_REGISTRY
    from fedmtl.strategies.base import STRATEGIES
    from fedmtl.tasks import TASK_REGISTRY

    return {
        "algorithms": STRATEGIES,
        "tasks": TASK_REGISTRY,
        "backbones": ENCODER_REGISTRY,
        "datasets": DATASET_REGISTRY,
    }


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def catalog() -> dict[str, list[tuple[str, str]]]:
    """``section → [(name, one-line description)]``, names sorted within a section.

    Algorithms are described by their experiment-file section (``[algorithm] name = ...``),
    tasks by their primary metric and its direction, backbone families by the names they build,
    dataset kinds by their modality, whether they are bundled, their tasks and the kinds that read
    them in another modality (COCO's captions).
    """
    from typing import get_args

    from fedmtl.config import AlgorithmConfig, bundled_configs

    algorithm_docs = {
        cls.model_fields["name"].default: _first_line(cls)
        for cls in get_args(get_args(AlgorithmConfig)[0])
    }
    found = registries()
    out: dict[str, list[tuple[str, str]]] = {}
    out["algorithms"] = [
        (name, algorithm_docs.get(name, _first_line(cls)))
        for name, cls in sorted(found["algorithms"].items())
    ]
    out["tasks"] = [
        (
            kind,
            f"{cls.primary_metric} {'↑' if cls.higher_is_better else '↓'} "
            f"({'dense' if cls.dense else 'per sample'}, {cls.modality} encoders)",
        )
        for kind, cls in sorted(found["tasks"].items())
    ]
    out["backbones"] = [
        (name, f"{family} ({cls.modality})")
        for family, cls in sorted(found["backbones"].items())
        for name in sorted(cls.backbones)
    ]
    out["datasets"] = [
        (
            kind,
            f"{cls.modality}, {'bundled' if not cls.requires_root else 'needs root'}; "
            f"tasks: {', '.join(sorted(cls.TASKS)) or 'set by options'}"
            + "".join(f"; {view} view: {other}" for view, other in sorted(cls.VIEW_KINDS.items())),
        )
        for kind, cls in sorted(found["datasets"].items())
    ]
    out["configs"] = [(name, "bundled experiment file") for name in bundled_configs()]
    return out
