"""Language on real data: COCO captions as COCO's text view, text_classification files, local
tokenizers, and the checks that refuse a text client on a dataset without text."""

from __future__ import annotations

import csv
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizer

from fedmtl.cli import main
from fedmtl.clients.fedmuscle import public_view
from fedmtl.clients.session import ClientSession
from fedmtl.config import ConfigError, parse_experiment
from fedmtl.data import (
    DATASET_REGISTRY,
    PublicDataset,
    SampleSet,
    cap_positions,
    client_split,
    create_dataset,
)
from fedmtl.data.multilabel import COCO_CATEGORY_IDS
from fedmtl.data.text import TextClassificationSource
from fedmtl.models import create_encoder
from fedmtl.models.factory import build_tasks
from fedmtl.models.text import HashingTokenizer, TextEncoder
from tests.helpers import run_in_process

# --------------------------------------------------------------------------- COCO captions

# Image ids written out of order; each id is also the pixel value of its image, so a test can
# tell which image a tensor is without trusting the loader.
TRAIN_IDS = (30, 4, 17, 8, 25)
VAL_IDS = (12, 3)
CATEGORIES = {30: [1], 4: [1, 90], 17: [13], 8: [], 25: [90, 90], 12: [2], 3: [1]}


def _captions_of(image_id: int) -> list[dict[str, Any]]:
    # three captions per image with annotation ids not in file order: the smallest is "first"
    ids = [image_id * 10 + 7, image_id * 10 + 2, image_id * 10 + 5]
    return [
        {"id": a, "image_id": image_id, "caption": f"image {image_id} caption {a}"} for a in ids
    ]


def write_coco_text(root: Path, *, captions: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, ids in (("train2017", TRAIN_IDS), ("val2017", VAL_IDS)):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        for i in ids:
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(
                root / split / f"{i:012d}.png", format="PNG"
            )
            (root / split / f"{i:012d}.png").rename(root / split / f"{i:012d}.jpg")
        annotations = [
            {"id": 1000 + n, "image_id": i, "category_id": c}
            for n, (i, c) in enumerate((i, c) for i in ids for c in CATEGORIES[i])
        ]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations})
        )
        if captions:
            rows = [row for i in reversed(ids) for row in _captions_of(i)]
            (root / "annotations" / f"captions_{split}.json").write_text(
                json.dumps({"images": images, "annotations": rows})
            )
    return root


def _image_id(image: torch.Tensor | str) -> int:
    assert isinstance(image, torch.Tensor)
    # images are normalised as (x / 255 - 0.5) / 0.5; undo it to read the pixel value
    return round(float((image[0, 0, 0] * 0.5 + 0.5) * 255))


def test_coco_captions_pick_the_smallest_annotation_id_per_image(tmp_path: Path) -> None:
    source = create_dataset("coco_captions", write_coco_text(tmp_path))
    assert source.modality == "text" and source.views() == ("text", "image")
    train = source.split("train")
    # samples in increasing image id, as the instances file sorts them for the image view
    expected_ids = sorted(TRAIN_IDS)
    texts = [train[i][0] for i in range(len(train))]
    assert texts == [f"image {i} caption {i * 10 + 2}" for i in expected_ids]
    # the labels are the image's categories (multi-hot over the 80 sorted COCO ids)
    for row, image_id in enumerate(expected_ids):
        hot = torch.nonzero(train[row][1]["labels"]).flatten().tolist()
        assert hot == sorted({COCO_CATEGORY_IDS.index(c) for c in CATEGORIES[image_id]})
    test = source.split("test")
    assert [test[i][0] for i in range(2)] == ["image 3 caption 32", "image 12 caption 122"]


def test_coco_image_and_text_views_pair_the_same_image_ids(tmp_path: Path) -> None:
    root = write_coco_text(tmp_path)
    images = create_dataset("coco_multilabel", root, image_size=8)
    captions = images.counterpart("text")
    assert captions.kind == "coco_captions" and captions.root == images.root
    assert captions.counterpart("image", image_size=8).kind == "coco_multilabel"
    public = PublicDataset(images, size=4, batch_size=2, seed=5)
    text = public.modality_view("text")
    assert text.source.kind == "coco_captions"
    assert np.array_equal(public.pool_positions, text.pool_positions)
    seen = []
    for i in range(4):
        image_id = _image_id(public.samples[i][0])
        caption = text.samples[i][0]
        assert caption == f"image {image_id} caption {image_id * 10 + 2}"
        seen.append(image_id)
    assert set(seen) <= set(TRAIN_IDS) and len(set(seen)) == 4
    # and the other way round: a public set declared on the captions gives images back
    back = PublicDataset(captions, size=4, batch_size=2, seed=5).modality_view(
        "image", image_size=8
    )
    assert [_image_id(back.samples[i][0]) for i in range(4)] == seen


def test_missing_captions_file_names_the_file(tmp_path: Path) -> None:
    root = write_coco_text(tmp_path, captions=False)
    source = create_dataset("coco_captions", root)
    with pytest.raises(FileNotFoundError, match=re.escape("captions_train2017.json")):
        source.split("train")
    assert len(create_dataset("coco_multilabel", root).split("train")) == 5  # images need none


def test_image_without_caption_is_an_error(tmp_path: Path) -> None:
    root = write_coco_text(tmp_path)
    path = root / "annotations" / "captions_val2017.json"
    document = json.loads(path.read_text())
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] != 12]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"no caption \(image ids \[12\]\)"):
        create_dataset("coco_captions", root).split("test")


TINY_BERT: dict[str, Any] = {
    "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 32,
}  # fmt: skip
TINY_VIT = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}


def coco_federation(root: Path, **extra: Any) -> dict[str, Any]:
    """One image client on COCO's images, one text client on its captions, public COCO."""
    client = {"samples": 4, "test_samples": 2, "training": {"max_batches": 1, "batch_size": 2}}
    return {
        "name": "coco-text",
        "seed": 1,
        "rounds": 1,
        "device": "cpu",
        "algorithm": {"name": "fedmuscle", "projector_dim": 8, "num_peers": 1},
        "public": {"dataset": "coco", "size": 4, "batch_size": 2},
        "datasets": {
            "coco": {"kind": "coco_multilabel", "root": str(root), "image_size": 8},
            "coco_text": {"kind": "coco_captions", "root": str(root)},
        },
        "clients": [
            {
                "client_id": "img",
                "dataset": "coco",
                "tasks": ["labels"],
                "model": {"backbone": "vit_tiny_patch16_224", "kwargs": TINY_VIT},
                **client,
            },
            {
                "client_id": "txt",
                "dataset": "coco_text",
                "tasks": ["labels"],
                "model": {"backbone": "bert", "kwargs": {**TINY_BERT, "vocab_size": 64}},
                **client,
            },
        ],
        **extra,
    }


def _write_toml(path: Path, data: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(data))
    return path


def test_coco_federation_validates_and_a_missing_captions_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_coco_text(tmp_path / "coco")
    config = _write_toml(tmp_path / "exp.toml", coco_federation(root))
    assert main(["validate", str(config)]) == 0
    (root / "annotations" / "captions_train2017.json").unlink()
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2
    out = capsys.readouterr().out
    assert "captions_train2017.json" in out.replace("\n", "")
    assert "datasets.coco" in out  # the dataset entry (coco_text, or the public coco)


def test_public_coco_checks_its_captions_for_text_clients(tmp_path: Path) -> None:
    # the text client reads another text dataset; the public COCO still needs its captions
    root = write_coco_text(tmp_path / "coco", captions=False)
    other = write_coco_text(tmp_path / "other")
    data = coco_federation(root)
    data["datasets"]["coco_text"]["root"] = str(other)
    from fedmtl.preflight import preflight

    experiment = parse_experiment(data)
    with pytest.raises(ConfigError, match=r"datasets\.coco: .*captions_train2017\.json"):
        preflight(experiment)


def test_coco_image_and_text_clients_run_fedmuscle(tmp_path: Path) -> None:
    root = write_coco_text(tmp_path / "coco")
    experiment = parse_experiment(coco_federation(root))
    # what each client's FedMuscle code represents: the same public images, as pixels or text
    image_view = public_view(ClientSession(experiment, "img", tmp_path / "s-img"))
    text_view = public_view(ClientSession(experiment, "txt", tmp_path / "s-txt"))
    assert image_view.batch_indices(0)[0].tolist() == text_view.batch_indices(0)[0].tolist()
    for i in range(4):
        image_id = _image_id(image_view.samples[i][0])
        assert text_view.samples[i][0] == f"image {image_id} caption {image_id * 10 + 2}"
    run_dir, _ = run_in_process(experiment, tmp_path / "runs")
    rows = run_dir.read_metrics()
    assert sorted(r["client_id"] for r in rows) == ["img", "txt"]
    assert all(r.get("status") != "failed" for r in rows), rows
    for row in rows:
        assert row["server/fedmuscle/clients"] == 2
        assert row["server/fedmuscle/payloads"] == 4  # 2 clients x 2 public batches
        assert 0.0 <= row["eval/labels/micro_f1"] <= 1.0


# --------------------------------------------------------------------------- text client checks


@pytest.mark.parametrize(
    ("kind", "view"),
    [
        ("cifar10", "no text view"),
        ("voc_multilabel", "no text view"),
        ("coco_multilabel", "'coco_captions'"),
    ],
)
def test_text_client_on_a_dataset_without_text_is_refused(
    kind: str, view: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "name": "t",
        "rounds": 1,
        "algorithm": {"name": "fedavg"},
        "datasets": {"d": {"kind": kind, "root": str(tmp_path)}},
        "clients": [
            {
                "client_id": "reader-7",
                "dataset": "d",
                "tasks": ["label" if kind == "cifar10" else "labels"],
                "model": {"backbone": "bert"},
            },
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_experiment(data)
    message = str(info.value)
    assert message.startswith("clients[0].dataset: client 'reader-7'")
    assert f"dataset 'd' (kind '{kind}')" in message and view in message
    capsys.readouterr()
    assert main(["validate", str(_write_toml(tmp_path / "exp.toml", data))]) == 2
    assert "reader-7" in capsys.readouterr().out


# --------------------------------------------------------------------------- text_classification


def _write_csv(
    path: Path,
    rows: list[tuple[str, Any]],
    header: tuple[str, str] = ("text", "label"),
    delimiter: str = ",",
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_source(root: Path, **options: Any) -> TextClassificationSource:
    source = create_dataset("text_classification", root, **options)
    assert isinstance(source, TextClassificationSource)
    return source


def _all(samples: SampleSet) -> list[tuple[str, int]]:
    out = []
    for i in range(len(samples)):
        text, targets = samples[i]
        assert isinstance(text, str)
        out.append((text, int(targets["label"])))
    return out


def test_csv_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    train = [("good, really", "pos"), ("bad", "neg"), ("so-so", "neutral"), ("fine", "pos")]
    test = [("awful", "neg"), ("great", "pos")]
    _write_csv(tmp_path / "train.csv", train)
    _write_csv(tmp_path / "test.csv", test)
    source = text_source(tmp_path)
    ids = {"neg": 0, "neutral": 1, "pos": 2}  # sorted names
    assert source.data_task_table()["label"].num_outputs == 3
    assert source.class_names == ["neg", "neutral", "pos"]
    assert _all(source.split("train")) == [(t, ids[y]) for t, y in train]
    assert _all(source.split("test")) == [(t, ids[y]) for t, y in test]
    stratify = source.split("train").stratify_labels()
    assert stratify is not None and stratify.tolist() == [2, 0, 1, 2]
    # a test-only class still counts (train and test are mapped together)
    _write_csv(tmp_path / "test.csv", [*test, ("meh", "mixed")])
    assert text_source(tmp_path).class_names == [
        "mixed",
        "neg",
        "neutral",
        "pos",
    ]


def test_jsonl_integer_labels_configurable_columns_and_classes(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "y": i % 4, "extra": 1} for i in range(8)]
    _write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "d" / "test.jsonl", [{"sentence": "t", "y": 1}])
    options = {"text_column": "sentence", "label_column": "y"}
    source = create_dataset("text_classification", tmp_path / "d", **options)
    assert _all(source.split("train")) == [(f"s{i}", i % 4) for i in range(8)]  # ints kept
    assert source.data_task_table()["label"].num_outputs == 4
    named = create_dataset("text_classification", tmp_path / "d", classes=list("abcdef"), **options)
    assert named.data_task_table()["label"].num_outputs == 6
    assert (
        DATASET_REGISTRY["text_classification"]
        .task_table(classes=list("abcdef"))["label"]
        .num_outputs
        == 6
    )
    with pytest.raises(ValueError, match=r"no column 'text' \(options\.text_column\)"):
        create_dataset("text_classification", tmp_path / "d").split("train")
    _write_jsonl(tmp_path / "d" / "test.jsonl", [{"sentence": "t", "y": -1}])
    with pytest.raises(ValueError, match="negative label -1"):
        create_dataset("text_classification", tmp_path / "d", **options).split("train")


def test_tsv_with_integer_strings_and_explicit_files(tmp_path: Path) -> None:
    _write_csv(tmp_path / "a" / "mine.tsv", [("x y", "1"), ("z", "0")], delimiter="\t")
    _write_csv(tmp_path / "b" / "held.csv", [("w", "1")])
    source = create_dataset(
        "text_classification",
        tmp_path / "a",
        train="mine.tsv",
        test=str(tmp_path / "b" / "held.csv"),
    )
    assert _all(source.split("train")) == [("x y", 1), ("z", 0)]  # digits read as ints
    assert _all(source.split("test")) == [("w", 1)]
    with pytest.raises(FileNotFoundError, match=r"options\.train = 'nope\.csv'"):
        create_dataset("text_classification", tmp_path / "a", train="nope.csv")


def test_single_file_gets_a_seeded_stratified_test_split(tmp_path: Path) -> None:
    # 60 / 30 / 10 rows of three classes in blocks: a plain head/tail cut would be all "a"
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    path = _write_csv(tmp_path / "all.csv", [(f"t{i}", y) for i, y in enumerate(labels)])
    source = create_dataset("text_classification", path, seed=4, test_fraction=0.2)
    train, test = _all(source.split("train")), _all(source.split("test"))
    assert len(test) == 20 and len(train) == 80
    assert np.bincount([y for _, y in test]).tolist() == [12, 6, 2]
    assert {t for t, _ in train}.isdisjoint({t for t, _ in test})
    assert {t for t, _ in train} | {t for t, _ in test} == {f"t{i}" for i in range(100)}
    again = create_dataset("text_classification", path, seed=4, test_fraction=0.2)
    assert _all(again.split("test")) == test
    other = create_dataset("text_classification", path, seed=5, test_fraction=0.2)
    assert _all(other.split("test")) != test


def test_text_classification_partitions_are_stratified(tmp_path: Path) -> None:
    labels = [i % 3 for i in range(90)]  # 30 per class
    _write_csv(tmp_path / "train.csv", [(f"t{i}", y) for i, y in enumerate(labels)])
    _write_csv(tmp_path / "test.csv", [("q", 0)])
    source = create_dataset("text_classification", tmp_path)
    parts = [
        client_split(source, "train", partition_index=k, num_partitions=3, scheme="iid", seed=2)
        for k in range(3)
    ]
    for part in parts:
        assert np.bincount([y for _, y in _all(part)], minlength=3).tolist() == [10, 10, 10]
    sizes = [
        client_split(
            source,
            "train",
            partition_index=k,
            num_partitions=2,
            scheme="sizes",
            sizes=[30, 12],
            seed=2,
        )
        for k in range(2)
    ]
    assert [np.bincount([y for _, y in _all(p)], minlength=3).tolist() for p in sizes] == [
        [10, 10, 10],
        [4, 4, 4],
    ]
    skewed = [
        client_split(
            source,
            "train",
            partition_index=k,
            num_partitions=3,
            scheme="dirichlet",
            alpha=0.1,
            seed=2,
        )
        for k in range(3)
    ]
    texts = [t for p in skewed for t, _ in _all(p)]
    assert sorted(texts) == sorted(f"t{i}" for i in range(90))  # disjoint and covering
    histograms = np.array([np.bincount([y for _, y in _all(p)], minlength=3) for p in skewed])
    assert histograms.max() > 20  # alpha = 0.1: a class concentrates on one client
    capped = parts[0].subset(cap_positions(len(parts[0]), 6, parts[0].stratify_labels(), seed=1))
    assert np.bincount([y for _, y in _all(capped)], minlength=3).tolist() == [2, 2, 2]


def test_save_to_disk_dataset_dict_and_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features
    )
    validation = datasets.Dataset.from_dict(
        {"text": ["e", "f"], "label": [1, 0]}, features=features
    )
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(
        str(tmp_path / "dd")
    )
    source = text_source(tmp_path / "dd")
    assert _all(source.split("train")) == [("a", 0), ("b", 1), ("c", 0), ("d", 1)]
    assert _all(source.split("test")) == [("e", 1), ("f", 0)]  # no "test": validation
    assert source.class_names == ["x", "y", "z"]  # the ClassLabel's names, "z" unused
    assert source.data_task_table()["label"].num_outputs == 3
    with pytest.raises(ValueError, match=r"options\.test = 'dev'.*\['train', 'validation'\]"):
        create_dataset("text_classification", tmp_path / "dd", test="dev").split("train")
    train.save_to_disk(str(tmp_path / "single"))
    single = create_dataset("text_classification", tmp_path / "single", test_fraction=0.5)
    assert sorted(_all(single.split("train")) + _all(single.split("test"))) == [
        ("a", 0),
        ("b", 1),
        ("c", 0),
        ("d", 1),
    ]
    assert sorted(y for _, y in _all(single.split("test"))) == [0, 1]  # stratified


def test_save_to_disk_without_datasets_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    source = create_dataset("text_classification", tmp_path / "saved")
    with pytest.raises(ImportError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        source.split("train")


def test_missing_paths_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_csv(tmp_path / "data" / "train.csv", [("a", "x"), ("b", "y")])
    data = text_federation(tmp_path / "data", tokenizer=None)
    data["datasets"]["news"]["options"] = {"test": "missing.csv"}
    config = _write_toml(tmp_path / "exp.toml", data)
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2
    out = capsys.readouterr().out
    assert "datasets.news" in out and "options.test = 'missing.csv'" in out
    data["datasets"]["news"]["options"] = {}
    data["datasets"]["news"]["root"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"datasets\.news\.root: path does not exist"):
        parse_experiment(data)


# --------------------------------------------------------------------------- tokenizer


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "plot", "the"]


def write_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)  # positional: v4/v5
    return directory


def test_text_backbone_uses_a_local_tokenizer(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    encoder = create_encoder("bert", tokenizer=str(directory), max_length=8, **TINY_BERT)
    assert isinstance(encoder, TextEncoder)
    assert not isinstance(encoder.tokenizer, HashingTokenizer)
    assert encoder.model.config.vocab_size == len(VOCAB)  # from the tokenizer
    reference = BertTokenizer(str(directory / "vocab.txt"))
    texts = ["The good movie", "bad plot twist"]
    tokens = encoder.tokenize(texts)
    expected = reference(texts, padding=True, return_tensors="pt")
    assert tokens["input_ids"].tolist() == expected["input_ids"].tolist()
    # by hand: [CLS] the good movie [SEP] / [CLS] bad plot [UNK] [SEP]
    assert tokens["input_ids"].tolist() == [[2, 9, 5, 7, 3], [2, 6, 8, 1, 3]]
    with pytest.raises(ValueError, match="vocab_size is 5"):
        create_encoder("bert", tokenizer=str(directory), **{**TINY_BERT, "vocab_size": 5})
    with pytest.raises(ValueError, match="tokenizer directory does not exist"):
        create_encoder("bert", tokenizer=str(tmp_path / "nowhere"), **TINY_BERT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer"):
        create_encoder("bert", tokenizer=str(tmp_path / "empty"), **TINY_BERT)


def text_federation(data_root: Path, tokenizer: Path | None, **extra: Any) -> dict[str, Any]:
    """Two tiny-BERT FedAvg clients on a text_classification dataset (iid halves)."""
    # no dropout: its draws come from the global RNG, which earlier code in the process moves
    kwargs: dict[str, Any] = {
        **TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }  # fmt: skip
    if tokenizer is not None:
        kwargs["tokenizer"] = str(tokenizer)
    else:
        kwargs["vocab_size"] = 64
    clients = [
        {
            "client_id": client_id,
            "dataset": "news",
            "tasks": ["label"],
            "model": {"backbone": "bert", "kwargs": dict(kwargs), "decoder_hidden": 8},
            "training": {"batch_size": 4, "local_epochs": 6, "optimizer": "adamw", "lr": 1e-2},
        }
        for client_id in ("t0", "t1")
    ]
    news = {"kind": "text_classification", "root": str(data_root), "partition": {"scheme": "iid"}}
    return {
        "name": "text",
        "seed": 2,
        "rounds": 3,
        "device": "cpu",
        "algorithm": {"name": "fedavg"},
        "datasets": {"news": news},
        "clients": clients,
        **extra,
    }


def test_text_classification_csv_federation_end_to_end(tmp_path: Path) -> None:
    # three classes told apart by their words; a pipeline that loses labels or text stays at 1/3
    words = {"pos": "good movie", "neg": "bad plot", "mid": "the plot"}
    rows = [(f"{words[y]} {i}", y) for i, y in enumerate(["pos", "neg", "mid"] * 8)]
    _write_csv(tmp_path / "data" / "train.csv", rows)
    _write_csv(tmp_path / "data" / "test.csv", rows[:6])
    tokenizer = write_tokenizer(tmp_path / "tok")
    data = text_federation(tmp_path / "data", tokenizer)
    assert main(["validate", str(_write_toml(tmp_path / "exp.toml", data))]) == 0
    experiment = parse_experiment(data)
    tasks = build_tasks(experiment, experiment.clients[0])
    assert [(t.name, t.num_outputs) for t in tasks] == [("label", 3)]  # mid, neg, pos
    session = ClientSession(experiment, "t1", tmp_path / "state")
    model = session.new_model()
    encoder = model.encoder
    assert isinstance(encoder, TextEncoder) and not isinstance(encoder.tokenizer, HashingTokenizer)
    assert encoder.model.config.vocab_size == len(VOCAB)  # sized by the local tokenizer
    assert model(["good movie"])["label"].shape == (1, 3)
    labels = [y for _, y in _all(session.split("train"))]
    assert np.bincount(labels).tolist() == [4, 4, 4]  # iid half of 24, stratified
    run_dir, _ = run_in_process(experiment, tmp_path / "runs")
    out = run_dir.read_metrics()
    assert [(r["round"], r["client_id"]) for r in out] == [
        (1, "t0"), (1, "t1"), (2, "t0"), (2, "t1"), (3, "t0"), (3, "t1"),
    ]  # fmt: skip
    assert all(r.get("status") != "failed" for r in out), out
    final = [r["eval/label/accuracy"] for r in out if r["round"] == 3]
    assert min(final) >= 2 / 3  # chance is 1/3 (6 test rows, 2 per class)
    for client in ("t0", "t1"):
        losses = [r["train/loss"] for r in out if r["client_id"] == client]
        assert losses[-1] < 0.8 * losses[0]
    # tokenizer missing at validate time: named by its field
    broken = text_federation(tmp_path / "data", tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"clients\[0\]\.model\.kwargs\.tokenizer: not a dir"):
        parse_experiment(broken)


def test_tokenizer_location_does_not_change_the_initial_weights(tmp_path: Path) -> None:
    _write_csv(tmp_path / "data" / "train.csv", [("good", "a"), ("bad", "b")] * 4)
    models = []
    for place in ("here", "there"):
        data = text_federation(tmp_path / "data", write_tokenizer(tmp_path / place))
        session = ClientSession(parse_experiment(data), "t0", tmp_path / f"state-{place}")
        models.append(session.new_model().state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_server_checks_models_without_the_clients_files(tmp_path: Path) -> None:
    # a deployed server has neither the CSV nor the tokenizer folder: models still get checked
    from fedmtl.config import load_experiment
    from fedmtl.preflight import check_models

    data = text_federation(tmp_path / "absent", tmp_path / "no-tokenizer")
    experiment = load_experiment(_write_toml(tmp_path / "exp.toml", data), check_files=False)
    check_models(experiment, read_files=False)
    with pytest.raises(ConfigError, match=r"datasets\.news: .*does not exist"):
        check_models(experiment)  # the simulating machine reads the data for the class count
    broken = {
        **data,
        "clients": [
            {
                **data["clients"][0],
                "model": {"backbone": "bert", "kwargs": {**TINY_BERT, "max_length": 1000}},
            }
        ],
    }
    bad = load_experiment(_write_toml(tmp_path / "bad.toml", broken), check_files=False)
    with pytest.raises(ConfigError, match=r"clients\[0\]\.model"):
        check_models(bad, read_files=False)


# --------------------------------------------------------------------------- README examples


def test_readme_dataset_examples_validate(tmp_path: Path) -> None:
    from fedmtl.preflight import preflight

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Datasets") : readme.index("## Experiment tracking")]
    coco_block, text_block = re.findall(r"```toml\n(.*?)```", section, re.S)
    coco = write_coco_text(tmp_path / "coco")
    bert = write_tokenizer(tmp_path / "bert")  # a pretrained folder: weights and tokenizer
    config = BertConfig(vocab_size=len(VOCAB), **{k: v for k, v in TINY_BERT.items()})
    BertModel(config, add_pooling_layer=False).save_pretrained(bert)
    header = 'name = "x"\nrounds = 1\ndevice = "cpu"\n[algorithm]\nname = "{}"\n'
    text = coco_block.replace("/data/coco", str(coco)).replace(
        "/models/bert-base-uncased", str(bert)
    )
    data = tomllib.loads(header.format("fedmuscle") + text.replace("size = 5000", "size = 4"))
    preflight(parse_experiment(data))
    rows = [(f"t{i}", ["pos", "neg"][i % 2]) for i in range(40)]
    for name, part in (("train", rows), ("test", rows[:4])):
        _write_csv(tmp_path / "reviews" / f"{name}.csv", part, header=("review", "sentiment"))
    text = text_block.replace("/data/reviews", str(tmp_path / "reviews"))
    text = text.replace("/models/bert-tokenizer", str(write_tokenizer(tmp_path / "tok")))
    text = text.replace("samples = 2000", "samples = 5").replace("alpha = 0.5", "alpha = 5.0")
    experiment = parse_experiment(tomllib.loads(header.format("fedavg") + text))
    preflight(experiment)
    assert len(experiment.clients) == 4
    tasks = build_tasks(experiment, experiment.clients[0])
    assert [(t.name, t.num_outputs) for t in tasks] == [("label", 2)]
