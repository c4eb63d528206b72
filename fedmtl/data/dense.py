"""Dense multi-task benchmarks in the ATRC / MTI-Net / FedHCA2 layout: PASCAL-Context and NYUD-v2.

``pascal_context`` expects ``<root>`` (or ``<root>/PASCALContext``) to contain

- ``JPEGImages/<id>.jpg`` and ``ImageSets/Context/{train,val}.txt`` (``val`` is the test split);
- ``semseg`` (21 classes, 255 ignored): ``semseg/VOC12/<id>.png`` or
  ``semseg/pascal-context/<id>.png``, class ids as stored pixel values;
- ``human_parts`` (7 classes): ``human_parts/<id>.png`` (0..6, 255 ignored) or the PASCAL-Part
  ``human_parts/<id>.mat`` (``anno.objects`` with ``class_ind`` 15 = person and named ``parts``
  grouped into head, torso, upper/lower arms, upper/lower legs). Images without an annotated
  person are entirely ignore (255);
- ``saliency``: ``sal_distill/<id>.png``, salient where value / 255 > 0.5;
- ``normals``: ``normals_distill/<id>.png``, n = 2·v/255 − 1. If ``json/nyu_classes.json``,
  ``json/context_classes.json`` and ``pascal-context/trainval/<id>.mat`` exist, normals are kept
  only on the context classes shared with NYUD (as ATRC does); black pixels are always invalid;
- ``edge``: ``edges/<id>.png`` (> 127 is edge) or ``pascal-context/trainval/<id>.mat``
  (``LabelMap``): pixels whose label differs from the right or lower neighbour, a one-pixel
  boundary close to the thinned Laplacian edges of MTI-Net.

``nyud`` expects ``<root>`` (or ``<root>/NYUDv2``) to contain ``images/<id>.{png,jpg}``,
``gt_sets/{train,val}.txt`` (``val`` is the test split), ``segmentation/<id>.png`` (40 classes
stored as 1..40 with 0 = unlabelled, mapped to 0..39 and 255), ``depth/<id>.npy`` (metres,
0 = invalid), ``normals/<id>.{npy,png}`` (``[H, W, 3]`` in [−1, 1] or PNG as above) and
``edge/<id>.{npy,png}``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from scipy.io import loadmat
from torch import Tensor

from fedmtl.data.base import DatasetSource, Sample, SampleSet, TaskInfo, register_dataset
from fedmtl.data.files import IMAGE_EXTENSIONS, find_file, read_id_list, read_png, read_rgb
from fedmtl.data.transforms import binary_map, depth_map, image_tensor, label_map, normal_map

IGNORE_INDEX = 255
PERSON_CLASS = 15  # PASCAL VOC class index of "person" in PASCAL-Part annotations
HUMAN_PARTS = {
    **dict.fromkeys(
        ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1
    ),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6),
}


def png_normals(path: Path) -> np.ndarray:
    """Normals stored as RGB (n = 2·v/255 − 1), ``[3, H, W]``; pure black marks invalid pixels."""
    rgb = read_png(path)[..., :3].astype(np.float32)
    normals = 2.0 * rgb / 255.0 - 1.0
    normals[(rgb == 0).all(axis=-1)] = 0.0
    return normals.transpose(2, 0, 1)


def label_boundaries(label_map_: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a label map: label differs from the right or lower neighbour."""
    edge = np.zeros(label_map_.shape, dtype=bool)
    edge[:, :-1] |= label_map_[:, :-1] != label_map_[:, 1:]
    edge[:-1, :] |= label_map_[:-1, :] != label_map_[1:, :]
    return edge


def human_parts_from_mat(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Part labels 0..6 from a PASCAL-Part annotation; all 255 if it has no person with parts."""
    objects = loadmat(path)["anno"][0, 0]["objects"].ravel()
    target: np.ndarray | None = None
    for obj in objects:
        parts = obj["parts"]
        if int(np.asarray(obj["class_ind"]).ravel()[0]) != PERSON_CLASS or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(np.asarray(obj["mask"]).shape, dtype=np.uint8)
        for part in parts.ravel():
            name = str(np.asarray(part["part_name"]).ravel()[0])
            target[np.asarray(part["mask"]).astype(bool)] = HUMAN_PARTS[name]
    return np.full(shape, IGNORE_INDEX, dtype=np.uint8) if target is None else target


def _locate(source: DatasetSource, nested: str, marker: str) -> Path:
    """``<root>/<nested>`` if it holds ``marker``, else ``<root>`` itself."""
    for candidate in (source.root_path / nested, source.root_path):
        if (candidate / marker).is_dir():
            return candidate
    raise source.missing(source.root_path / nested / marker)


def _require(source: DatasetSource, path: Path | None, expected: Path) -> Path:
    if path is None:
        raise source.missing(expected)
    return path


def _gray(path: Path) -> np.ndarray:
    values = read_png(path)
    return values[..., 0] if values.ndim == 3 else values


class _DenseSplit(ABC):
    """One split's sample ids and task readers (a small picklable object for DataLoader workers).

    Subclasses define ``_image_path(stem)`` and one ``_<task>(stem, shape)`` reader per task.
    """

    def __init__(self, source: DatasetSource, directory: Path, ids: list[str]) -> None:
        self.source, self.directory, self.ids = source, directory, ids
        self.size = source.image_size

    @abstractmethod
    def _image_path(self, stem: str) -> Path:
        """Path of the input image of sample ``stem``."""

    def load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        stem = self.ids[key]
        image = read_rgb(self._image_path(stem))
        shape = (image.shape[0], image.shape[1])
        targets = {task: getattr(self, f"_{task}")(stem, shape) for task in tasks}
        return image_tensor(image, self.size), targets

    def sample_set(self) -> SampleSet:
        return SampleSet(self.load, np.arange(len(self.ids)), tuple(self.source.TASKS))

    def _file(self, folder: str, stem: str, extensions: tuple[str, ...]) -> Path:
        directory = self.directory / folder
        found = find_file(directory, stem, extensions)
        return _require(self.source, found, directory / f"{stem}{extensions[0]}")


class _PascalSplit(_DenseSplit):
    def __init__(
        self, source: DatasetSource, directory: Path, ids: list[str], valid: np.ndarray | None
    ) -> None:
        super().__init__(source, directory, ids)
        self.normals_valid_classes = valid

    def _image_path(self, stem: str) -> Path:
        return self._file("JPEGImages", stem, (".jpg",))

    def _context_labels(self, stem: str) -> np.ndarray | None:
        path = self.directory / "pascal-context" / "trainval" / f"{stem}.mat"
        return loadmat(path)["LabelMap"] if path.is_file() else None

    def _semseg(self, stem: str, shape: tuple[int, int]) -> Tensor:
        path = find_file(self.directory / "semseg" / "VOC12", stem, (".png",))
        path = path or self._file("semseg/pascal-context", stem, (".png",))
        return label_map(read_png(path), self.size)

    def _human_parts(self, stem: str, shape: tuple[int, int]) -> Tensor:
        folder = self.directory / "human_parts"
        png, mat = find_file(folder, stem, (".png",)), find_file(folder, stem, (".mat",))
        if png is not None:
            return label_map(read_png(png), self.size)
        if mat is not None:
            return label_map(human_parts_from_mat(mat, shape), self.size)
        # the task is optional: an image without part annotation teaches nothing about parts
        return label_map(np.full(shape, IGNORE_INDEX, dtype=np.uint8), self.size)

    def _saliency(self, stem: str, shape: tuple[int, int]) -> Tensor:
        gray = _gray(self._file("sal_distill", stem, (".png",)))
        return binary_map(gray.astype(np.float32) / 255.0 > 0.5, self.size)

    def _normals(self, stem: str, shape: tuple[int, int]) -> Tensor:
        normals = png_normals(self._file("normals_distill", stem, (".png",)))
        if self.normals_valid_classes is not None:
            labels = self._context_labels(stem)
            if labels is not None:
                normals = normals * np.isin(labels, self.normals_valid_classes)[None]
        return normal_map(normals, self.size)

    def _edge(self, stem: str, shape: tuple[int, int]) -> Tensor:
        png = find_file(self.directory / "edges", stem, (".png",))
        if png is not None:
            return binary_map(_gray(png) > 127, self.size)
        labels = self._context_labels(stem)
        if labels is None:
            raise self.source.missing(self.directory / "edges" / f"{stem}.png")
        return binary_map(label_boundaries(labels), self.size)


@register_dataset("pascal_context")
class PascalContextSource(DatasetSource):
    """PASCAL-Context multi-task: semseg, human_parts, saliency, normals and edge."""

    TASKS: ClassVar[dict[str, TaskInfo]] = {
        "semseg": TaskInfo("semseg", 21, {"ignore_index": IGNORE_INDEX}),
        "human_parts": TaskInfo("semseg", 7, {"ignore_index": IGNORE_INDEX}),
        "saliency": TaskInfo("saliency", 1),
        "normals": TaskInfo("normals", 3),
        "edge": TaskInfo("edge", 1),
    }
    LAYOUT = (
        "  <root>/PASCALContext/ (or <root>) with JPEGImages/<id>.jpg,\n"
        "    ImageSets/Context/{train,val}.txt, semseg/pascal-context/<id>.png (or semseg/VOC12),\n"
        "    human_parts/<id>.{png,mat}, sal_distill/<id>.png, normals_distill/<id>.png,\n"
        "    edges/<id>.png or pascal-context/trainval/<id>.mat"
    )
    SPLIT_FILES: ClassVar[dict[str, str]] = {"train": "train.txt", "test": "val.txt"}

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        self.directory = _locate(self, "PASCALContext", "JPEGImages")

    def _normals_valid_classes(self) -> np.ndarray | None:
        """Context class ids that also exist in NYUD (ATRC's normals mask), if the jsons exist."""
        nyu_path = self.directory / "json" / "nyu_classes.json"
        context_path = self.directory / "json" / "context_classes.json"
        if not (nyu_path.is_file() and context_path.is_file()):
            return None
        nyu, context = json.loads(nyu_path.read_text()), json.loads(context_path.read_text())
        shared = [context[name] for name in nyu if name in context and name != "unknown"]
        return np.asarray([*shared, context["tvmonitor"]])

    def _load_split(self, split: str) -> SampleSet:
        list_path = self.directory / "ImageSets" / "Context" / self.SPLIT_FILES[split]
        if not list_path.is_file():
            raise self.missing(list_path)
        ids = read_id_list(list_path)
        return _PascalSplit(self, self.directory, ids, self._normals_valid_classes()).sample_set()


class _NyudSplit(_DenseSplit):
    def _image_path(self, stem: str) -> Path:
        return self._file("images", stem, IMAGE_EXTENSIONS)

    def _semseg(self, stem: str, shape: tuple[int, int]) -> Tensor:
        stored = read_png(self._file("segmentation", stem, (".png",))).astype(np.int64)
        # stored 1..40 are the classes, 0 is unlabelled
        return label_map(np.where(stored == 0, IGNORE_INDEX, stored - 1), self.size)

    def _depth(self, stem: str, shape: tuple[int, int]) -> Tensor:
        depth = np.load(self._file("depth", stem, (".npy",))).astype(np.float32)
        return depth_map(np.squeeze(depth), self.size)

    def _normals(self, stem: str, shape: tuple[int, int]) -> Tensor:
        path = self._file("normals", stem, (".npy", ".png"))
        if path.suffix == ".png":
            return normal_map(png_normals(path), self.size)
        normals = np.load(path).astype(np.float32)
        channels_last = normals.ndim == 3 and normals.shape[-1] == 3
        return normal_map(normals.transpose(2, 0, 1) if channels_last else normals, self.size)

    def _edge(self, stem: str, shape: tuple[int, int]) -> Tensor:
        path = self._file("edge", stem, (".npy", ".png"))
        if path.suffix == ".npy":
            return binary_map(np.squeeze(np.load(path)) > 0.5, self.size)
        return binary_map(_gray(path) > 127, self.size)


@register_dataset("nyud")
class NyudSource(DatasetSource):
    """NYUD-v2 multi-task: ``semseg`` (40 classes), ``depth``, ``normals``, ``edge``."""

    TASKS: ClassVar[dict[str, TaskInfo]] = {
        "semseg": TaskInfo("semseg", 40, {"ignore_index": IGNORE_INDEX}),
        "depth": TaskInfo("depth", 1),
        "normals": TaskInfo("normals", 3),
        "edge": TaskInfo("edge", 1),
    }
    LAYOUT = (
        "  <root>/NYUDv2/ (or <root>) with images/<id>.{png,jpg}, gt_sets/{train,val}.txt,\n"
        "    segmentation/<id>.png, depth/<id>.npy, normals/<id>.{npy,png}, edge/<id>.{npy,png}"
    )
    SPLIT_FILES: ClassVar[dict[str, str]] = {"train": "train.txt", "test": "val.txt"}

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        self.directory = _locate(self, "NYUDv2", "images")

    def _load_split(self, split: str) -> SampleSet:
        list_path = self.directory / "gt_sets" / self.SPLIT_FILES[split]
        if not list_path.is_file():
            raise self.missing(list_path)
        return _NyudSplit(self, self.directory, read_id_list(list_path)).sample_set()
