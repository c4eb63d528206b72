"""Tiny on-disk datasets in the layouts the real loaders read (a few 8-px samples each).

Enough for ``fedmtl validate`` to read every index and first sample, and for a short run on
CIFAR-10; nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 8


def _image(path: Path, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.integers(0, 6, (SIZE, SIZE), dtype=np.uint8)).save(path)


def write_cifar10(root: Path, per_file: int = 16) -> Path:
    """``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` with ``per_file`` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 255, (per_file, 3 * 32 * 32), dtype=np.uint8),
            b"labels": [int(i % 10) for i in range(per_file)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def write_cifar100(root: Path, per_file: int = 16) -> Path:
    """``<root>/cifar-100-python/{train,test}``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        batch = {
            b"data": rng.integers(0, 255, (per_file, 3 * 32 * 32), dtype=np.uint8),
            b"fine_labels": [int(i % 100) for i in range(per_file)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def write_voc(root: Path, ids: tuple[str, ...] = ("a1", "a2")) -> Path:
    """``<root>/VOCdevkit/VOC2012/{JPEGImages,Annotations,ImageSets/Main}``."""
    base = root / "VOCdevkit" / "VOC2012"
    for index, image_id in enumerate(ids):
        _image(base / "JPEGImages" / f"{image_id}.jpg", index)
        xml = f"<annotation><object><name>{'cat' if index else 'dog'}</name></object></annotation>"
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_text(xml)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_coco(root: Path, captions: bool = True) -> Path:
    """``<root>/annotations/{instances,captions}_{train,val}2017.json``, one image per split."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(("train2017", "val2017")):
        _image(root / split / "000001.jpg", index)
        document = {
            "images": [{"id": 1, "file_name": "000001.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 1}],
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
        if captions:
            text = {"annotations": [{"id": 5, "image_id": 1, "caption": "A person."}]}
            (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(text))
    return root


def write_pascal_context(root: Path, ids: tuple[str, ...] = ("p1", "p2")) -> Path:
    """The ATRC layout directly under ``root``: images, split lists and one file per task."""
    for index, stem in enumerate(ids):
        _image(root / "JPEGImages" / f"{stem}.jpg", index)
        _image(root / "semseg" / "VOC12" / f"{stem}.png", index, mode="L")
        _image(root / "human_parts" / f"{stem}.png", index, mode="L")
        _image(root / "sal_distill" / f"{stem}.png", index, mode="L")
        _image(root / "normals_distill" / f"{stem}.png", index)
        _image(root / "edges" / f"{stem}.png", index, mode="L")
    (root / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_everything(root: Path) -> Path:
    """Every layout above side by side under one root (the loaders' subtrees do not clash)."""
    for write in (write_cifar10, write_cifar100, write_voc, write_coco):
        write(root)
    return root


def write_nyud(root: Path, ids: tuple[str, ...] = ("n1", "n2")) -> Path:
    """The ATRC NYUD-v2 layout directly under ``root``: images, split lists, one file per task."""
    rng = np.random.default_rng(2)
    for index, stem in enumerate(ids):
        _image(root / "images" / f"{stem}.png", index)
        _image(root / "segmentation" / f"{stem}.png", index, mode="L")
        for task, shape in (("depth", (SIZE, SIZE)), ("normals", (SIZE, SIZE, 3))):
            (root / task).mkdir(parents=True, exist_ok=True)
            np.save(root / task / f"{stem}.npy", rng.uniform(0.1, 1.0, shape).astype(np.float32))
        _image(root / "edge" / f"{stem}.png", index, mode="L")
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
