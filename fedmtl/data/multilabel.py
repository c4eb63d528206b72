"""Multi-label image classification on Pascal VOC 2012 (20 classes) and COCO 2017 (80 classes).

Expected layouts (``root`` as given to the source):

- ``voc_multilabel``: ``<root>/VOCdevkit/VOC2012/`` (or ``<root>/VOC2012/``, or ``<root>`` itself)
  containing ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
  ``ImageSets/Main/{train,val}.txt``; ``val`` is the test split. Every ``<object>`` counts,
  difficult ones included.
- ``coco_multilabel``: ``<root>/annotations/instances_{train,val}2017.json`` and the images under
  ``<root>/{train,val}2017/``; ``val2017`` is the test split. The 80 category ids map to 0..79 in
  sorted-id order; crowd annotations count.
- ``coco_captions``: the same images read as text,
  ``<root>/annotations/captions_{train,val}2017.json`` next to the instances files (no image
  is opened). Sample ``i`` of a split is the image of the ``i``-th smallest id in the
  instances file, as in ``coco_multilabel``, so the two kinds are views of one another: a
  public COCO set gives image clients the image and text clients a caption of the same image
  id. Each image has about five captions; the view uses the one with the smallest annotation
  id (fixed, so every text client and every run reads the same text).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedmtl.data.base import (
    DatasetSource,
    Sample,
    SampleSet,
    TaskInfo,
    create_dataset,
    register_dataset,
)
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


COCO_LAYOUT = (
    "  <root>/annotations/instances_{train,val}2017.json\n"
    "  <root>/annotations/captions_{train,val}2017.json (text clients, coco_captions)\n"
    "  <root>/{train,val}2017/<file_name from the json> (image clients, coco_multilabel)"
)
COCO_SPLITS: dict[str, str] = {"train": "train2017", "test": "val2017"}


def _coco_instances(json_path: Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The images of an instances file sorted by id, and their ``[N, 80]`` multi-hot labels."""
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
    return images, labels


def first_captions(json_path: Path, image_ids: list[int]) -> list[str]:
    """The caption with the smallest annotation id of each image, in ``image_ids`` order.

    Parameters
    ----------
    json_path : Path
        A COCO ``captions_*.json`` (``annotations``: ``id``, ``image_id``, ``caption``).
    image_ids : list of int
        The images to caption (those of the matching instances file).

    Raises
    ------
    ValueError
        If an image has no caption (the message names the file and up to five image ids).
    """
    document = json.loads(json_path.read_text())
    best: dict[int, tuple[int, str]] = {}  # image id → (annotation id, caption)
    for annotation in document.get("annotations", []):
        image_id, key = annotation["image_id"], annotation["id"]
        if image_id not in best or key < best[image_id][0]:
            best[image_id] = (key, str(annotation["caption"]).strip())
    missing = [image_id for image_id in image_ids if image_id not in best]
    if missing:
        raise ValueError(
            f"{json_path}: {len(missing)} image(s) of the instances file have no caption "
            f"(image ids {missing[:5]}{' …' if len(missing) > 5 else ''})"
        )
    return [best[image_id][1] for image_id in image_ids]


class _CaptionRows:
    """Captions plus a multi-hot matrix (picklable, like :class:`_MultilabelFiles`)."""

    def __init__(self, captions: list[str], labels: np.ndarray) -> None:
        self.captions, self.labels = captions, labels

    def load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        targets = {"labels": torch.from_numpy(self.labels[key].copy())} if "labels" in tasks else {}
        return self.captions[key], targets

    def sample_set(self) -> SampleSet:
        keys = np.arange(len(self.captions))
        return SampleSet(self.load, keys, ("labels",), rarest_present_label(self.labels))


class _CocoFiles(DatasetSource):
    """What both COCO views share: the root check and the instances file of a split."""

    LAYOUT = COCO_LAYOUT
    TASKS: ClassVar[dict[str, TaskInfo]] = {
        "labels": TaskInfo("multilabel", len(COCO_CATEGORY_IDS))
    }
    SPLIT_NAMES: ClassVar[dict[str, str]] = COCO_SPLITS

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        if not (self.root_path / "annotations").is_dir():
            raise self.missing(self.root_path / "annotations")

    def annotation_file(self, prefix: str, split: str) -> Path:
        """``<root>/annotations/<prefix>_<split>2017.json``, which must exist."""
        path = self.root_path / "annotations" / f"{prefix}_{self.SPLIT_NAMES[split]}.json"
        if not path.is_file():
            raise self.missing(path)
        return path


@register_dataset("coco_multilabel")
class CocoMultilabelSource(_CocoFiles):
    """COCO 2017 multi-label classification, task ``labels`` (80 categories)."""

    OTHER_VIEWS = ("text",)
    VIEW_KINDS: ClassVar[dict[str, str]] = {"text": "coco_captions"}

    def _load_split(self, split: str) -> SampleSet:
        images, labels = _coco_instances(self.annotation_file("instances", split))
        name = self.SPLIT_NAMES[split]
        paths = [self.root_path / name / image["file_name"] for image in images]
        return _MultilabelFiles(paths, labels, self.image_size).sample_set()

    def counterpart(self, modality: str, **options: Any) -> DatasetSource:
        """``"text"``: one caption of each of the same images (:class:`CocoCaptionsSource`)."""
        if modality == "text":
            return create_dataset("coco_captions", self.root, **{"seed": self.seed, **options})
        return super().counterpart(modality, **options)


@register_dataset("coco_captions")
class CocoCaptionsSource(_CocoFiles):
    """COCO 2017 captions (one per image), task ``labels``: the image's 80 categories."""

    modality = "text"
    OTHER_VIEWS = ("image",)
    VIEW_KINDS: ClassVar[dict[str, str]] = {"image": "coco_multilabel"}

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        if image_size is not None:
            raise ValueError(f"dataset {self.kind!r} is text; image_size must be None")
        super().__init__(root, image_size=None, seed=seed)

    def _load_split(self, split: str) -> SampleSet:
        # The instances file fixes the samples and their order (the image view's), and the labels.
        images, labels = _coco_instances(self.annotation_file("instances", split))
        captions = first_captions(
            self.annotation_file("captions", split), [image["id"] for image in images]
        )
        return _CaptionRows(captions, labels).sample_set()

    def counterpart(self, modality: str, **options: Any) -> DatasetSource:
        """``"image"``: the same images (:class:`CocoMultilabelSource`)."""
        if modality == "image":
            return create_dataset("coco_multilabel", self.root, **{"seed": self.seed, **options})
        return super().counterpart(modality, **options)
