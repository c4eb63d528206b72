"""Multi-label image classification on Pascal VOC 2012 (20 classes) and COCO 2017 (80 classes).

Expected layouts (``root`` as given to the source):

- ``voc_multilabel``: ``<root>/VOCdevkit/VOC2012/`` (or ``<root>/VOC2012/``, or ``<root>`` itself)
  containing ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
  ``ImageSets/Main/{train,val}.txt``; ``val`` is the test split. Every ``<object>`` counts,
  difficult ones included.
- ``coco_multilabel``: ``<root>/annotations/instances_{train,val}2017.json`` and the images under
  ``<root>/{train,val}2017/``; ``val2017`` is the test split. The 80 category ids map to 0..79 in
  sorted-id order; crowd annotations count.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fedmtl.data.base import DatasetSource, Sample, SampleSet, TaskInfo, register_dataset
from fedmtl.data.files import read_id_list, read_rgb
from fedmtl.data.transforms import image_tensor

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# COCO 2017's 80 category ids (sorted; ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused)
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip


def rarest_present_label(labels: np.ndarray) -> np.ndarray:
    """One class per multi-hot row: its least frequent positive label (``L`` if it has none).

    Dirichlet label skew needs a single class per sample; the rarest present label keeps rare
    classes from being swamped by frequent ones such as VOC's ``person``.
    """
    frequency = labels.sum(axis=0)
    # absent labels get +inf so that argmin picks the rarest present one
    masked = np.where(labels > 0, frequency[None, :], np.inf)
    classes = masked.argmin(axis=1)
    return np.where(labels.any(axis=1), classes, labels.shape[1]).astype(np.int64)


class _MultilabelFiles:
    """Image paths plus a multi-hot matrix (a small picklable object for DataLoader workers)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int | None) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size

    def load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        targets = {"labels": torch.from_numpy(self.labels[key].copy())} if "labels" in tasks else {}
        return image_tensor(read_rgb(self.paths[key]), self.image_size), targets

    def sample_set(self) -> SampleSet:
        keys = np.arange(len(self.paths))
        return SampleSet(self.load, keys, ("labels",), rarest_present_label(self.labels))


@register_dataset("voc_multilabel")
class VocMultilabelSource(DatasetSource):
    """Pascal VOC 2012 multi-label classification, task ``labels`` (20 classes)."""

    TASKS: ClassVar[dict[str, TaskInfo]] = {"labels": TaskInfo("multilabel", len(VOC_CLASSES))}
    LAYOUT = (
        "  <root>/VOCdevkit/VOC2012/ (or <root> itself) containing\n"
        "    JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{train,val}.txt"
    )
    SPLIT_FILES: ClassVar[dict[str, str]] = {"train": "train.txt", "test": "val.txt"}

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        candidates = [self.root_path / "VOCdevkit" / "VOC2012", self.root_path / "VOC2012"]
        candidates.append(self.root_path)
        found = [c for c in candidates if (c / "JPEGImages").is_dir()]
        if not found:
            raise self.missing(candidates[0] / "JPEGImages")
        self.directory = found[0]

    def _load_split(self, split: str) -> SampleSet:
        list_path = self.directory / "ImageSets" / "Main" / self.SPLIT_FILES[split]
        if not list_path.is_file():
            raise self.missing(list_path)
        ids = read_id_list(list_path)
        labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.float32)
        for row, image_id in enumerate(ids):
            xml_path = self.directory / "Annotations" / f"{image_id}.xml"
            if not xml_path.is_file():
                raise self.missing(xml_path)
            for obj in ET.parse(xml_path).getroot().iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in VOC_CLASSES:
                    raise ValueError(f"{xml_path}: unknown VOC class {name!r}")
                labels[row, VOC_CLASSES.index(name)] = 1.0
        paths = [self.directory / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        return _MultilabelFiles(paths, labels, self.image_size).sample_set()


@register_dataset("coco_multilabel")
class CocoMultilabelSource(DatasetSource):
    """COCO 2017 multi-label classification, task ``labels`` (80 categories)."""

    TASKS: ClassVar[dict[str, TaskInfo]] = {
        "labels": TaskInfo("multilabel", len(COCO_CATEGORY_IDS))
    }
    LAYOUT = (
        "  <root>/annotations/instances_{train,val}2017.json\n"
        "  <root>/{train,val}2017/<file_name from the json>"
    )
    SPLIT_NAMES: ClassVar[dict[str, str]] = {"train": "train2017", "test": "val2017"}

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        if not (self.root_path / "annotations").is_dir():
            raise self.missing(self.root_path / "annotations")

    def _load_split(self, split: str) -> SampleSet:
        name = self.SPLIT_NAMES[split]
        json_path = self.root_path / "annotations" / f"instances_{name}.json"
        if not json_path.is_file():
            raise self.missing(json_path)
        document = json.loads(json_path.read_text())
        images = sorted(document["images"], key=lambda image: image["id"])
        row_of = {image["id"]: row for row, image in enumerate(images)}
        column_of = {category: column for column, category in enumerate(COCO_CATEGORY_IDS)}
        labels = np.zeros((len(images), len(COCO_CATEGORY_IDS)), dtype=np.float32)
        for annotation in document.get("annotations", []):
            category = annotation["category_id"]
            if category not in column_of:
                raise ValueError(f"{json_path}: category id {category} is not a COCO 2017 id")
            labels[row_of[annotation["image_id"]], column_of[category]] = 1.0
        paths = [self.root_path / name / image["file_name"] for image in images]
        return _MultilabelFiles(paths, labels, self.image_size).sample_set()
