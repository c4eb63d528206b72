"""Tests for fedmtl.data: partitions, the bundled digits, captions, public data, real loaders."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from fedmtl.data import (
    DATASET_REGISTRY,
    PublicDataset,
    SampleSet,
    client_split,
    collate,
    create_dataset,
    dataset_task_table,
    partition_indices,
)
from fedmtl.data.digits import DEPTH_CAP, DEPTH_FLOOR, DIGIT_NAMES, digit_arrays
from fedmtl.data.multilabel import VOC_CLASSES

TASK_KINDS = {
    "classification",
    "multilabel",
    "semseg",
    "depth",
    "normals",
    "saliency",
    "edge",
    "text_classification",
}


def _labels(samples: SampleSet) -> np.ndarray:
    labels = samples.stratify_labels()
    assert labels is not None
    return labels


Sample = tuple[torch.Tensor | str, dict[str, torch.Tensor]]


def _image(sample: Sample) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    assert isinstance(sample[0], torch.Tensor)
    return sample[0], sample[1]


def _text(sample: Sample) -> str:
    assert isinstance(sample[0], str)
    return sample[0]


def _tensor_batches(batches: Iterator[torch.Tensor | list[str]]) -> list[torch.Tensor]:
    out = list(batches)
    assert all(isinstance(b, torch.Tensor) for b in out)
    return [b for b in out if isinstance(b, torch.Tensor)]


def _to_unit(image: torch.Tensor) -> np.ndarray:
    """Undo the (x - 0.5) / 0.5 normalisation of channel 0."""
    return (image[0].numpy() * 0.5) + 0.5


# --------------------------------------------------------------------------- partitions


def _check_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    return joined


def test_iid_partitions_cover_disjoint_near_equal_and_seeded() -> None:
    parts = partition_indices(103, 4, scheme="iid", seed=7)
    joined = _check_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted
    again = partition_indices(103, 4, scheme="iid", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(103, 4, scheme="iid", seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _total_variation(parts: list[np.ndarray], labels: np.ndarray, classes: int) -> float:
    overall = np.bincount(labels, minlength=classes) / len(labels)
    tvs = [
        0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


def test_dirichlet_is_skewed_covering_and_respects_min_size() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(
        1000, 8, scheme="dirichlet", labels=labels, alpha=0.1, min_size=20, seed=0
    )
    joined = _check_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert min(len(p) for p in parts) >= 20
    iid = partition_indices(1000, 8, scheme="iid", seed=0)
    skewed_tv = _total_variation(parts, labels, 10)
    iid_tv = _total_variation(iid, labels, 10)
    assert iid_tv < 0.15  # ~sampling noise only
    assert skewed_tv > 0.5 and skewed_tv > 3 * iid_tv
    again = partition_indices(
        1000, 8, scheme="dirichlet", labels=labels, alpha=0.1, min_size=20, seed=0
    )
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_sizes_scheme_gives_exact_disjoint_counts() -> None:
    parts = partition_indices(50, 3, scheme="sizes", sizes=[5, 0, 20], seed=1)
    assert [len(p) for p in parts] == [5, 0, 20]
    joined = _check_disjoint(parts)
    assert joined.min() >= 0 and joined.max() < 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "zipf"}, "unknown partition scheme"),
        ({"scheme": "dirichlet"}, "needs one label per sample"),
        ({"scheme": "sizes", "sizes": [20, 20, 20]}, "exceed 50"),
        ({"scheme": "sizes", "sizes": [1, 2]}, "needs 3 sizes"),
        ({"scheme": "iid", "min_size": 20}, "cannot give 3 partitions"),
        (
            {"scheme": "dirichlet", "labels": np.zeros(50, int), "min_size": 17},
            "raise alpha or lower min_size",
        ),
    ],
)
def test_partition_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_indices(50, 3, **kwargs)


def test_client_split_partitions_the_quickstart_train_split() -> None:
    source = create_dataset("quickstart")
    shares = [
        client_split(
            source,
            "train",
            partition_index=i,
            num_partitions=3,
            scheme="dirichlet",
            alpha=0.3,
            sizes=None,
            seed=4,
        )
        for i in range(3)
    ]
    keys = np.concatenate([s.keys for s in shares])
    assert sorted(keys.tolist()) == sorted(source.split("train").keys.tolist())
    first = shares[0]
    _, targets = first[0]
    assert int(targets["digit"]) == int(_labels(first)[0])
    with pytest.raises(ValueError, match="partition_index 3"):
        client_split(
            source,
            "train",
            partition_index=3,
            num_partitions=3,
            scheme="iid",
            alpha=0.5,
            sizes=None,
            seed=0,
        )


# --------------------------------------------------------------------------- quickstart images


def test_registry_and_task_tables_are_static_and_valid() -> None:
    expected = {
        "quickstart",
        "quickstart_text",
        "cifar10",
        "cifar100",
        "voc_multilabel",
        "coco_multilabel",
        "coco_captions",
        "pascal_context",
        "nyud",
    }
    assert expected <= set(DATASET_REGISTRY)
    for kind in expected:
        for info in dataset_task_table(kind).values():
            assert info.kind in TASK_KINDS and info.num_outputs >= 1
    table = dataset_task_table("quickstart")
    assert {name: (t.kind, t.num_outputs) for name, t in table.items()} == {
        "digit": ("classification", 10),
        "attributes": ("multilabel", 6),
        "segmentation": ("semseg", 11),
        "depth": ("depth", 1),
        "normals": ("normals", 3),
        "saliency": ("saliency", 1),
        "edge": ("edge", 1),
    }
    assert table["segmentation"].options == {"ignore_index": 255}
    assert dataset_task_table("quickstart_text")["digit"].kind == "text_classification"
    with pytest.raises(KeyError, match="unknown dataset kind 'mnist'"):
        dataset_task_table("mnist")
    with pytest.raises(ValueError, match="unknown options \\['colour'\\]"):
        create_dataset("quickstart", colour=True)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        create_dataset("quickstart").split("val")
    with pytest.raises(ValueError, match="takes no root"):
        create_dataset("quickstart", "/tmp")


def test_quickstart_splits_are_stratified_and_disjoint() -> None:
    source = create_dataset("quickstart")
    train, test, public = source.split("train"), source.split("test"), source.public_pool()
    assert (len(train), len(test), len(public)) == (3600, 900, 500)
    keys = [set(s.keys.tolist()) for s in (train, test, public)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert np.bincount(_labels(train)).tolist() == [360] * 10
    assert np.bincount(_labels(public)).tolist() == [50] * 10


def _brute_force_distance(stroke: np.ndarray, y: int, x: int) -> float:
    ys, xs = np.nonzero(stroke)
    return float(np.sqrt((ys - y) ** 2 + (xs - x) ** 2).min())


def test_quickstart_sample_layouts_match_the_task_contract() -> None:
    samples = create_dataset("quickstart").split("test")
    image, targets = _image(samples[5])
    digit = int(targets["digit"])
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # gray -> RGB
    assert targets["digit"].dtype == torch.long and targets["digit"].shape == ()
    # even, >4, closed loop, prime follow from the digit alone
    expected = [digit % 2 == 0, digit > 4, digit in (0, 6, 8, 9), digit in (2, 3, 5, 7)]
    assert targets["attributes"].dtype == torch.float32
    assert targets["attributes"][:4].tolist() == [float(v) for v in expected]

    unit = _to_unit(image)
    stroke = unit > 0.5
    seg = targets["segmentation"]
    assert seg.dtype == torch.long and seg.shape == (32, 32)
    assert set(seg.unique().tolist()) <= {0, 1 + digit, 255}
    assert (seg.numpy()[stroke] == 1 + digit).all()
    assert (seg.numpy()[unit <= 0.1] == 0).all()

    depth = targets["depth"]
    assert depth.shape == (1, 32, 32) and depth.dtype == torch.float32
    assert depth.min() > 0 and depth.max() <= 1
    assert torch.allclose(depth[0][torch.from_numpy(stroke)], torch.tensor(DEPTH_FLOOR))
    for y, x in [(0, 0), (16, 3), (30, 16)]:
        d = min(_brute_force_distance(stroke, y, x), DEPTH_CAP) / DEPTH_CAP
        assert float(depth[0, y, x]) == pytest.approx(DEPTH_FLOOR + (1 - DEPTH_FLOOR) * d, abs=1e-5)

    normals = targets["normals"]
    assert normals.shape == (3, 32, 32)
    assert torch.allclose(normals.norm(dim=0), torch.ones(32, 32), atol=1e-3)
    assert torch.allclose(normals[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)

    for name in ("saliency", "edge"):
        assert targets[name].shape == (1, 32, 32) and targets[name].dtype == torch.float32
        assert set(targets[name].unique().tolist()) <= {0.0, 1.0}
    saliency = targets["saliency"][0].numpy().astype(bool)
    edge = targets["edge"][0].numpy().astype(bool)
    for y in range(32):
        for x in range(32):
            assert saliency[y, x] == (_brute_force_distance(stroke, y, x) <= 2.0)
            neighbours = [
                stroke[y + dy, x + dx]
                for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
                if 0 <= y + dy < 32 and 0 <= x + dx < 32
            ]
            assert edge[y, x] == any(n != stroke[y, x] for n in neighbours)


def test_quickstart_normals_follow_the_blurred_height_field() -> None:
    from scipy.ndimage import gaussian_filter

    image, targets = _image(create_dataset("quickstart").split("train")[11])
    height = gaussian_filter(_to_unit(image).astype(np.float64), sigma=1.0) * 4.0
    normals = targets["normals"].numpy()
    for y, x in [(10, 10), (16, 12), (20, 22), (8, 17)]:
        dx = (height[y, x + 1] - height[y, x - 1]) / 2
        dy = (height[y + 1, x] - height[y - 1, x]) / 2
        expected = np.array([-dx, -dy, 1.0]) / np.sqrt(dx * dx + dy * dy + 1)
        np.testing.assert_allclose(normals[:, y, x], expected, atol=2e-3)


def test_quickstart_resize_keeps_layouts_and_collate_batches() -> None:
    samples = create_dataset("quickstart", image_size=48).split("train")
    image, targets = _image(samples[0])
    assert image.shape == (3, 48, 48)
    digit = int(targets["digit"])
    assert set(targets["segmentation"].unique().tolist()) <= {0, 1 + digit, 255}
    assert targets["depth"].shape == (1, 48, 48) and targets["depth"].min() > 0
    assert torch.allclose(targets["normals"].norm(dim=0), torch.ones(48, 48), atol=1e-4)
    assert set(targets["edge"].unique().tolist()) <= {0.0, 1.0}
    inputs, batch = collate([samples[i] for i in range(4)])
    assert isinstance(inputs, torch.Tensor) and inputs.shape == (4, 3, 48, 48)
    assert batch["segmentation"].shape == (4, 48, 48) and batch["digit"].shape == (4,)
    assert batch["attributes"].shape == (4, 6)
    only = samples.with_tasks(["digit"])[0][1]
    assert list(only) == ["digit"]
    # DataLoader workers and Ray actors receive pickled sample sets
    restored = pickle.loads(pickle.dumps(samples.subset([3, 1])))
    assert torch.equal(_image(restored[1])[0], _image(samples[1])[0])
    assert _labels(restored).tolist() == _labels(samples)[[3, 1]].tolist()


def test_digit_arrays_are_shared_read_only() -> None:
    arrays = digit_arrays()
    assert arrays.images.shape == (5000, 32, 32)
    with pytest.raises(ValueError):
        arrays.images[0, 0, 0] = 1.0


# --------------------------------------------------------------------------- captions


def _mentions(caption: str, word: str) -> bool:
    return word in caption.replace(".", " ").replace(",", " ").split()


def test_captions_rarely_name_the_digit_and_share_the_split() -> None:
    text = create_dataset("quickstart_text")
    train = text.split("train")
    assert np.array_equal(train.keys, create_dataset("quickstart").split("train").keys)
    captions = [_text(train[i]) for i in range(len(train))]
    digits = _labels(train)
    assert all(isinstance(c, str) and len(c) > 20 for c in captions)
    named = np.mean([_mentions(c, DIGIT_NAMES[d]) for c, d in zip(captions, digits)])
    assert 0.05 < named < 0.3
    no_hints = create_dataset("quickstart_text", hint_probability=0.0).split("train")
    assert not any(
        _mentions(_text(no_hints[i]), name) for i in range(len(no_hints)) for name in DIGIT_NAMES
    )
    inputs, targets = collate([train[i] for i in range(3)])
    assert inputs == captions[:3] and targets["digit"].tolist() == digits[:3].tolist()
    with pytest.raises(ValueError, match="image_size must be None"):
        create_dataset("quickstart_text", image_size=32)


def test_captions_carry_some_but_not_all_label_information() -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    text = create_dataset("quickstart_text")
    train, test = text.split("train"), text.split("test")
    vectoriser = CountVectorizer(ngram_range=(1, 2))
    x_train = vectoriser.fit_transform([_text(train[i]) for i in range(len(train))])
    x_test = vectoriser.transform([_text(test[i]) for i in range(len(test))])
    model = MultinomialNB().fit(x_train, _labels(train))
    accuracy = model.score(x_test, _labels(test))
    assert 0.25 < accuracy < 0.8  # chance is 0.1


# --------------------------------------------------------------------------- public dataset


def test_public_batches_are_identical_across_instances_and_reshuffled_per_epoch() -> None:
    first = PublicDataset("quickstart", size=40, batch_size=16, seed=3)
    second = PublicDataset(create_dataset("quickstart"), size=40, batch_size=16, seed=3)
    assert first.num_batches == 3 and len(first) == 40
    epoch0 = _tensor_batches(first.batches(0))
    assert [b.shape[0] for b in epoch0] == [16, 16, 8]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _tensor_batches(second.batches(0))))
    epoch1 = _tensor_batches(first.batches(1))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    # same samples, another order
    order0, order1 = np.concatenate(first.batch_indices(0)), np.concatenate(first.batch_indices(1))
    assert sorted(order0.tolist()) == sorted(order1.tolist()) == list(range(40))
    assert not np.array_equal(order0, order1)
    pool = set(create_dataset("quickstart").public_pool().keys.tolist())
    assert set(first.samples.keys.tolist()) <= pool
    with pytest.raises(ValueError, match="exceeds the 500 samples"):
        PublicDataset("quickstart", size=501, batch_size=8)
    with pytest.raises(ValueError, match="need a dataset name"):
        PublicDataset(create_dataset("quickstart"), 4, 2, image_size=64)


def test_public_modality_views_align_image_and_text() -> None:
    images = PublicDataset("quickstart", size=24, batch_size=8, seed=5)
    texts = images.modality_view("text")
    independent = PublicDataset("quickstart_text", size=24, batch_size=8, seed=5)
    assert np.array_equal(texts.samples.keys, images.samples.keys)
    assert np.array_equal(independent.samples.keys, images.samples.keys)
    caption_of = _caption_table()
    for epoch in (0, 2):
        positions = images.batch_indices(epoch)
        assert all(np.array_equal(a, b) for a, b in zip(positions, texts.batch_indices(epoch)))
        batches = zip(positions, texts.batches(epoch), _tensor_batches(images.batches(epoch)))
        for pos, text_batch, image_batch in batches:
            keys = images.samples.keys[pos]
            assert text_batch == [caption_of[int(k)] for k in keys]
            assert image_batch.shape == (len(keys), 3, 32, 32)
    back = texts.modality_view("image", image_size=40)
    assert np.array_equal(back.samples.keys, images.samples.keys)
    assert _tensor_batches(back.batches(0))[0].shape == (8, 3, 40, 40)
    with pytest.raises(ValueError, match="no 'text' view"):
        _cifar_public().modality_view("text")


def _caption_table() -> dict[int, str]:
    pool = create_dataset("quickstart_text").public_pool()
    return {int(k): _text(pool[i]) for i, k in enumerate(pool.keys)}


# --------------------------------------------------------------------------- real loaders


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_cifar(root: Path, hundred: bool = False) -> None:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = (
        ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    )
    key = b"fine_labels" if hundred else b"labels"
    for n, name in enumerate(names):
        data = np.zeros((2, 3072), dtype=np.uint8)
        data[0, :1024] = 255  # sample 0: pure red
        data[1, 2048:] = 255  # sample 1: pure blue
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, key: [n, 90 if hundred else 9]}, handle)


_CIFAR_ROOTS: dict[str, Path] = {}


def _cifar_public() -> PublicDataset:
    return PublicDataset("cifar10", size=3, batch_size=2, root=_CIFAR_ROOTS["cifar10"])


@pytest.fixture(scope="module", autouse=True)
def _cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar(root)
    _CIFAR_ROOTS["cifar10"] = root


def test_cifar10_reads_the_pickle_layout(tmp_path: Path) -> None:
    root = _CIFAR_ROOTS["cifar10"]
    train = create_dataset("cifar10", root, image_size=8).split("train")
    assert len(train) == 10
    assert _labels(train).tolist() == [0, 9, 1, 9, 2, 9, 3, 9, 4, 9]
    image, targets = _image(train[0])
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image[0], torch.ones(8, 8)) and torch.allclose(
        image[2], -torch.ones(8, 8)
    )
    assert targets["label"].dtype == torch.long and int(targets["label"]) == 0
    test = create_dataset("cifar10", root / "cifar-10-batches-py").split("test")
    blue = _image(test[1])[0]
    assert len(test) == 2 and blue.shape == (3, 32, 32)
    assert torch.allclose(blue[2], torch.ones(32, 32))
    public = _cifar_public()
    assert set(public.samples.keys.tolist()) <= set(range(10))
    (root / "cifar-10-batches-py" / "data_batch_3").rename(tmp_path / "moved")
    try:
        with pytest.raises(FileNotFoundError, match="data_batch_3"):
            create_dataset("cifar10", root).split("train")
    finally:
        (tmp_path / "moved").rename(root / "cifar-10-batches-py" / "data_batch_3")


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    _write_cifar(tmp_path, hundred=True)
    source = create_dataset("cifar100", tmp_path)
    assert source.task_table()["label"].num_outputs == 100
    assert _labels(source.split("test")).tolist() == [1, 90]


@pytest.mark.parametrize(
    "kind",
    [
        "cifar10",
        "voc_multilabel",
        "coco_multilabel",
        "coco_captions",
        "pascal_context",
        "nyud",
        "text_classification",
    ],
)
def test_missing_paths_name_the_path_and_layout(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        create_dataset(kind, missing)
    assert "expected layout" in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))) as info:
        create_dataset(kind, tmp_path)  # exists, but holds nothing of the layout
    assert "expected layout" in str(info.value)
    with pytest.raises(ValueError, match="needs a root path"):
        create_dataset(kind)


def _voc_xml(names: list[str], difficult: int = 0) -> str:
    objects = "".join(
        f"<object><name>{n}</name><difficult>{difficult}</difficult></object>" for n in names
    )
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


def test_voc_multilabel_reads_xml_objects(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    annotations = {
        "2008_000001": _voc_xml(["person", "dog", "person"]),
        "2008_000002": _voc_xml(["dog"], difficult=1),
        "2008_000003": _voc_xml(["tvmonitor", "aeroplane"]),
    }
    for stem, xml in annotations.items():
        _write_image(base / "JPEGImages" / f"{stem}.jpg", np.full((6, 9, 3), 200, np.uint8))
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{stem}.xml").write_text(xml)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n")
    source = create_dataset("voc_multilabel", tmp_path, image_size=16)
    with pytest.raises(FileNotFoundError, match=re.escape("val.txt")):
        source.split("test")
    (base / "ImageSets" / "Main" / "val.txt").write_text("2008_000003\n")
    train = source.split("train")
    dog, person = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    image, targets = _image(train[0])
    assert image.shape == (3, 16, 16)
    assert targets["labels"].shape == (20,) and targets["labels"].dtype == torch.float32
    assert torch.nonzero(targets["labels"]).flatten().tolist() == sorted([dog, person])
    assert torch.nonzero(train[1][1]["labels"]).flatten().tolist() == [dog]  # difficult counts
    # rarest present label: person (1 image) is rarer than dog (2 images)
    assert _labels(train).tolist() == [person, dog]
    test = create_dataset("voc_multilabel", base).split("test")
    assert torch.nonzero(test[0][1]["labels"]).flatten().tolist() == [0, 19]
    assert _image(test[0])[0].shape == (3, 6, 9)


def test_coco_multilabel_maps_category_ids_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    images: list[dict[str, Any]] = [
        {"id": 42, "file_name": "000042.jpg"},
        {"id": 7, "file_name": "000007.jpg"},
        {"id": 9, "file_name": "000009.jpg"},
    ]
    annotations = [
        {"image_id": 42, "category_id": 90, "iscrowd": 0},
        {"image_id": 42, "category_id": 1, "iscrowd": 1},
        {"image_id": 7, "category_id": 13, "iscrowd": 0},
    ]
    document = {"images": images, "annotations": annotations, "categories": []}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    for image in images:
        _write_image(tmp_path / "val2017" / image["file_name"], np.zeros((5, 5, 3), np.uint8))
    source = create_dataset("coco_multilabel", tmp_path)
    test = source.split("test")
    # images sorted by id: 7, 9, 42; ids 1 -> 0, 13 -> 11 (12 unused), 90 -> 79
    labels = [torch.nonzero(test[i][1]["labels"]).flatten().tolist() for i in range(3)]
    assert labels == [[11], [], [0, 79]]
    assert _labels(test).tolist() == [11, 80, 0]
    with pytest.raises(FileNotFoundError, match=re.escape("instances_train2017.json")):
        source.split("train")


def _part_annotation(shape: tuple[int, int]) -> dict:
    person = np.zeros(shape, np.uint8)
    person[1:5, 1:4] = 1
    head, lower_leg = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    head[1, 1:4] = 1
    lower_leg[4, 2] = 1
    parts = np.zeros((1, 2), dtype=[("part_name", "O"), ("mask", "O")])
    parts[0, 0] = ("head", head)
    parts[0, 1] = ("llleg", lower_leg)
    objects = np.zeros(
        (1, 2), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    objects[0, 0] = ("dog", 12, person, np.zeros((0, 0)))
    objects[0, 1] = ("person", 15, person, parts)
    return {"anno": {"imname": "a", "objects": objects}}


def test_pascal_context_reads_the_mtl_layout(tmp_path: Path) -> None:
    base = tmp_path / "PASCALContext"
    shape = (6, 5)
    for stem in ("a", "b"):
        _write_image(base / "JPEGImages" / f"{stem}.jpg", np.full((*shape, 3), 90, np.uint8))
        semseg = np.zeros(shape, np.uint8)
        semseg[0, :] = 255
        semseg[3:, :] = 15
        _write_image(base / "semseg" / "pascal-context" / f"{stem}.png", semseg)
        saliency = np.zeros(shape, np.uint8)
        saliency[:, 2:] = 200
        saliency[:, 4] = 120  # below 0.5 after /255
        _write_image(base / "sal_distill" / f"{stem}.png", saliency)
        normals = np.zeros((*shape, 3), np.uint8)
        normals[:, :3] = (255, 128, 128)  # ~ +x
        _write_image(base / "normals_distill" / f"{stem}.png", normals)
        context = np.zeros(shape, np.int32)
        context[:, 3:] = 7
        (base / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        sio.savemat(base / "pascal-context" / "trainval" / f"{stem}.mat", {"LabelMap": context})
    (base / "human_parts").mkdir()
    sio.savemat(base / "human_parts" / "a.mat", _part_annotation(shape))
    edges = np.zeros(shape, np.uint8)
    edges[2, :] = 255
    _write_image(base / "edges" / "b.png", edges)
    (base / "ImageSets" / "Context").mkdir(parents=True)
    (base / "ImageSets" / "Context" / "train.txt").write_text("a\nb\n")
    train = create_dataset("pascal_context", tmp_path).split("train")
    assert train.stratify_labels() is None and len(train) == 2
    image, targets = _image(train[0])
    assert image.shape == (3, 6, 5)
    semseg_target = targets["semseg"]
    assert semseg_target.dtype == torch.long and semseg_target[0].tolist() == [255] * 5
    assert semseg_target[4].tolist() == [15] * 5 and semseg_target[1].tolist() == [0] * 5
    parts = targets["human_parts"]
    assert parts.dtype == torch.long and parts[1, 1:4].tolist() == [1, 1, 1]
    assert int(parts[4, 2]) == 6 and int(parts[2, 2]) == 0 and int(parts[0, 0]) == 0
    assert train[1][1]["human_parts"].unique().tolist() == [255]  # no annotation: ignored
    assert targets["saliency"][0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    normals_target = targets["normals"]
    assert torch.allclose(normals_target.norm(dim=0)[:, :3], torch.ones(6, 3), atol=1e-5)
    assert (
        float(normals_target[0, 0, 0]) > 0.99 and normals_target[:, :, 3:].abs().sum() == 0
    )  # black: invalid
    # edges from the .mat label map: column 2 differs from its right neighbour
    expected_edge = torch.zeros(6, 5)
    expected_edge[:, 2] = 1
    assert torch.equal(targets["edge"][0], expected_edge)
    assert train[1][1]["edge"][0, 2].tolist() == [1.0] * 5  # edges/*.png preferred
    # normals restricted to context classes shared with NYUD when the jsons exist
    (base / "json").mkdir()
    (base / "json" / "nyu_classes.json").write_text(json.dumps(["wall", "unknown"]))
    (base / "json" / "context_classes.json").write_text(json.dumps({"wall": 7, "tvmonitor": 9}))
    masked = create_dataset("pascal_context", base).split("train")[0][1]["normals"]
    assert masked[:, :, :3].abs().sum() == 0  # class 0 is not shared: invalid
    with pytest.raises(FileNotFoundError, match=re.escape("val.txt")):
        create_dataset("pascal_context", base).split("test")


def test_nyud_reads_the_mtl_layout(tmp_path: Path) -> None:
    base = tmp_path / "NYUDv2"
    shape = (4, 6)
    _write_image(base / "images" / "0001.png", np.full((*shape, 3), 30, np.uint8))
    segmentation = np.array([[0, 1, 40, 2, 2, 2]] * 4, dtype=np.uint8)
    _write_image(base / "segmentation" / "0001.png", segmentation)
    (base / "depth").mkdir()
    depth = np.full(shape, 2.5, np.float32)
    depth[0, 0] = 0.0
    np.save(base / "depth" / "0001.npy", depth)
    (base / "normals").mkdir()
    normals = np.zeros((*shape, 3), np.float32)
    normals[..., 2] = -2.0
    np.save(base / "normals" / "0001.npy", normals)
    edge = np.zeros(shape, np.uint8)
    edge[1, :] = 255
    _write_image(base / "edge" / "0001.png", edge)
    (base / "gt_sets").mkdir()
    (base / "gt_sets" / "val.txt").write_text("0001\n")
    source = create_dataset("nyud", tmp_path, image_size=8)
    image, targets = _image(source.split("test")[0])
    assert image.shape == (3, 8, 8)
    assert targets["semseg"].shape == (8, 8) and targets["semseg"].dtype == torch.long
    assert targets["semseg"][0, 0] == 255 and targets["semseg"][0, 2] == 0
    assert targets["semseg"][0, 3] == 39
    assert targets["depth"].shape == (1, 8, 8)
    assert targets["depth"][0, 0, 0] == 0  # invalid stays invalid after resizing
    assert torch.allclose(targets["depth"][0][targets["depth"][0] > 0], torch.tensor(2.5))
    assert torch.allclose(targets["normals"][2], -torch.ones(8, 8))
    assert targets["edge"].shape == (1, 8, 8) and set(targets["edge"].unique().tolist()) == {0, 1}
    native = create_dataset("nyud", base).split("test")[0][1]
    assert native["semseg"][0].tolist() == [255, 0, 39, 1, 1, 1]
    assert native["edge"][0, 1].tolist() == [1.0] * 6 and native["edge"][0, 0].sum() == 0
    with pytest.raises(FileNotFoundError, match=re.escape("train.txt")):
        source.split("train")
