"""CIFAR-10 / CIFAR-100 from the python pickle layout of the official archives."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fedmtl.data.base import DatasetSource, Sample, SampleSet, TaskInfo, register_dataset
from fedmtl.data.transforms import image_tensor


class _CifarSource(DatasetSource):
    """Shared reader; subclasses name the folder, batch files and label key."""

    FOLDER: ClassVar[str]
    TRAIN_FILES: ClassVar[tuple[str, ...]]
    TEST_FILES: ClassVar[tuple[str, ...]]
    LABEL_KEY: ClassVar[bytes]
    NATIVE_IMAGE_SIZE = 32

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(root, image_size=image_size, seed=seed)
        # accept the directory that holds the extracted folder, or the folder itself
        nested = self.root_path / self.FOLDER
        if nested.is_dir():
            self.directory = nested
        elif (self.root_path / self.TEST_FILES[0]).is_file():
            self.directory = self.root_path
        else:
            raise self.missing(nested)

    def _load_split(self, split: str) -> SampleSet:
        names = self.TRAIN_FILES if split == "train" else self.TEST_FILES
        images, labels = [], []
        for name in names:
            path = self.directory / name
            if not path.is_file():
                raise self.missing(path)
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[self.LABEL_KEY], dtype=np.int64))
        reader = _CifarArrays(
            np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels), self.image_size
        )
        return SampleSet(reader.load, np.arange(len(reader.labels)), ("label",), reader.labels)


class _CifarArrays:
    """One split held in memory (a small picklable object for DataLoader workers)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int | None) -> None:
        self.images, self.labels, self.image_size = images, labels, image_size

    def load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        targets = {"label": torch.tensor(int(self.labels[key]))} if "label" in tasks else {}
        return image_tensor(self.images[key], self.image_size), targets


@register_dataset("cifar10")
class Cifar10Source(_CifarSource):
    """CIFAR-10, task ``label`` (10 classes)."""

    FOLDER = "cifar-10-batches-py"
    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_FILES = ("test_batch",)
    LABEL_KEY = b"labels"
    TASKS: ClassVar[dict[str, TaskInfo]] = {"label": TaskInfo("classification", 10)}
    LAYOUT = "  <root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}"


@register_dataset("cifar100")
class Cifar100Source(_CifarSource):
    """CIFAR-100, task ``label`` (100 fine classes)."""

    FOLDER = "cifar-100-python"
    TRAIN_FILES = ("train",)
    TEST_FILES = ("test",)
    LABEL_KEY = b"fine_labels"
    TASKS: ClassVar[dict[str, TaskInfo]] = {"label": TaskInfo("classification", 100)}
    LAYOUT = "  <root>/cifar-100-python/{train, test}"
