"""Text classification read from standard files: CSV/TSV, JSON Lines, or ``save_to_disk``.

Layouts (``root`` as given to the source, kind ``text_classification``):

- a directory with ``train.<ext>`` and optionally ``test.<ext>``, ``<ext>`` one of ``csv``,
  ``tsv``, ``jsonl``, ``json`` (``options.train`` / ``options.test`` name other files, relative
  to ``root`` or absolute);
- a single file (the train data; ``options.test`` may name a test file beside it);
- a directory written by Hugging Face ``datasets``' ``save_to_disk``: a ``DatasetDict``
  (``dataset_dict.json``; ``options.train`` / ``options.test`` are split names, default
  ``train`` and ``test``, else ``validation``) or a single ``Dataset`` (``state.json``).
  Reading one needs the ``datasets`` package; files never do.

Every row has a text column and a label column (``options.text_column``, default ``text``;
``options.label_column``, default ``label``). Labels are integers ``0 … C−1`` (kept as they are:
``C`` is the largest label + 1, or the number of names of a ``datasets`` ``ClassLabel``) or
strings, mapped to ids in sorted order over train and test together; ``options.classes`` fixes
the names and their order instead (every node of a deployment should set it: each reads its own
files). Without a test file or split, a seeded stratified ``options.test_fraction`` of the train
rows is the test split. The task is ``label``, single-label ``text_classification``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedmtl.data.base import DatasetSource, Sample, SampleSet, TaskInfo, register_dataset
from fedmtl.data.partition import stratified_order

FILE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
TASK = "label"
_INTEGER = re.compile(r"^[+-]?\d+$")


@dataclass
class _Rows:
    """The raw rows of one split: texts and labels as read (ints or strings)."""

    texts: list[str]
    labels: list[int | str]
    where: str  # the file or split, for error messages
    names: list[str] | None = None  # a datasets ClassLabel's names


@dataclass
class _Table:
    """Train and test rows together (test after train), the splits' rows and the class names."""

    texts: list[str]
    labels: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    names: list[str]


class _TextRows:
    """Texts plus class ids (a small picklable object for DataLoader workers and Ray)."""

    def __init__(self, texts: list[str], labels: np.ndarray) -> None:
        self.texts, self.labels = texts, labels

    def load(self, key: int, tasks: tuple[str, ...]) -> Sample:
        targets = {TASK: torch.tensor(int(self.labels[key]))} if TASK in tasks else {}
        return self.texts[key], targets

    def sample_set(self) -> SampleSet:
        return SampleSet(self.load, np.arange(len(self.texts)), (TASK,), self.labels)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json")
    )


def _load_from_disk(path: Path) -> Any:
    """``datasets.load_from_disk(path)``, with a clear error when the package is missing."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"text_classification: {path} was written by Hugging Face datasets' save_to_disk; "
            "reading it needs the 'datasets' package (pip install datasets), or export it "
            "to CSV / JSON Lines (Dataset.to_csv, Dataset.to_json)"
        ) from None
    return datasets.load_from_disk(str(path))


@register_dataset("text_classification")
class TextClassificationSource(DatasetSource):
    """Single-label text classification: CSV/TSV, JSON Lines or ``save_to_disk``; task ``label``.

    Parameters
    ----------
    root : str or Path
        A directory (files or ``save_to_disk``) or a single data file; see the module docstring.
    image_size : None
        Text has no image size; must stay None.
    seed : int
        Seed of the stratified test carve-out (when there is no test file or split).
    train, test : str, optional
        Files (relative to ``root`` or absolute) or, for a ``DatasetDict``, split names.
    text_column, label_column : str
        Column names.
    classes : list of str, optional
        Class names in id order; string labels must be among them, integer labels below their
        number. Default: read from the data.
    test_fraction : float
        Share of the train rows held out as the test split when there is none, in (0, 1).
    delimiter : str, optional
        CSV delimiter (default ``,``; tab for ``.tsv`` files).

    Raises
    ------
    FileNotFoundError
        Naming the option (``options.train``) and the path that does not exist.
    ValueError
        For an unreadable file, a missing column, a bad label or a bad option.
    ImportError
        For a ``save_to_disk`` directory without the ``datasets`` package.
    """

    modality = "text"
    OUTPUTS_FROM_DATA = True
    TASKS: ClassVar[dict[str, TaskInfo]] = {TASK: TaskInfo("text_classification", 0)}
    LAYOUT = (
        "  <root>/train.{csv,tsv,jsonl,json} [and <root>/test.{...}], or one such file as root,\n"
        "  each row with a text and a label column (options text_column, label_column);\n"
        "  or a directory written by datasets' save_to_disk (Dataset or DatasetDict)"
    )

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        image_size: int | None = None,
        seed: int = 0,
        train: str | None = None,
        test: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        classes: list[str] | None = None,
        test_fraction: float = 0.2,
        delimiter: str | None = None,
    ) -> None:
        if image_size is not None:
            raise ValueError(f"dataset {self.kind!r} is text; image_size must be None")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"options.test_fraction must lie in (0, 1), got {test_fraction}")
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ValueError(f"options.classes must be distinct names, got {classes}")
        super().__init__(root, image_size=None, seed=seed)
        self.text_column, self.label_column = text_column, label_column
        self.classes = None if classes is None else [str(c) for c in classes]
        self.test_fraction, self.delimiter = test_fraction, delimiter
        self._train_option, self._test_option = train, test
        # Resolve (and check) the paths now: a missing file is reported when the source is
        # built, i.e. by `fedmtl validate`, naming the option that points at it.
        self._saved = is_saved_dataset(self.root_path)
        if self._saved:
            self.train_path: Path | None = None
            self.test_path: Path | None = None
        else:
            self.train_path = self._resolve("train", train)
            self.test_path = self._resolve("test", test)
        self._table: _Table | None = None

    # -- paths ----------------------------------------------------------------------------

    def _resolve(self, split: str, option: str | None) -> Path | None:
        root = self.root_path
        base = root if root.is_dir() else root.parent
        if option is not None:
            path = Path(option).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                raise FileNotFoundError(
                    f"{self.kind}: options.{split} = {option!r}: {path} does not exist"
                )
            return path
        if root.is_file():
            return root if split == "train" else None
        found = [
            root / f"{split}{ext}" for ext in FILE_EXTENSIONS if (root / f"{split}{ext}").is_file()
        ]
        if len(found) > 1:
            raise ValueError(
                f"{self.kind}: {root} holds several {split} files {[p.name for p in found]}; "
                f"name one with options.{split}"
            )
        if not found and split == "train":
            raise self.missing(root / "train.csv")
        return found[0] if found else None

    # -- reading --------------------------------------------------------------------------

    def _read_file(self, path: Path) -> _Rows:
        if is_saved_dataset(path):
            return self._read_saved(_load_from_disk(path), str(path))
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            records = self._read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".json"):
            records = self._read_json(path)
        else:
            raise ValueError(
                f"{self.kind}: {path}: unknown file type {suffix!r}; use one of {FILE_EXTENSIONS} "
                "or a save_to_disk directory"
            )
        return self._rows(records, str(path), from_csv=suffix in (".csv", ".tsv"))

    def _read_csv(self, path: Path, default_delimiter: str) -> list[dict[str, Any]]:
        delimiter = self.delimiter or default_delimiter
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename column 1
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            self._check_columns(list(reader.fieldnames or []), str(path))
            return list(reader)

    def _read_json(self, path: Path) -> list[dict[str, Any]]:
        text = path.read_text(encoding="utf-8")
        try:
            if text.lstrip().startswith("["):  # a JSON array of objects
                records = json.loads(text)
            else:  # JSON Lines: one object per non-blank line
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.kind}: {path} is not JSON Lines: {exc}") from None
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{self.kind}: {path}: every row must be a JSON object")
        columns = sorted({key for record in records for key in record})
        self._check_columns(columns, str(path))
        return records

    def _check_columns(self, columns: list[str], where: str) -> None:
        for option, column in (
            ("text_column", self.text_column),
            ("label_column", self.label_column),
        ):
            if column not in columns:
                raise ValueError(
                    f"{self.kind}: {where} has no column {column!r} (options.{option}); "
                    f"its columns: {columns}"
                )

    def _rows(self, records: list[dict[str, Any]], where: str, *, from_csv: bool) -> _Rows:
        texts, labels = [], []
        for number, record in enumerate(records, start=1):
            text, label = record.get(self.text_column), record.get(self.label_column)
            if text is None or label is None or label == "":
                column = self.text_column if text is None else self.label_column
                raise ValueError(f"{self.kind}: {where}, row {number}: no {column!r} value")
            if isinstance(label, bool) or not isinstance(label, int | str):
                raise ValueError(
                    f"{self.kind}: {where}, row {number}: label {label!r} is neither an integer "
                    "nor a string"
                )
            # CSV has no types: a column of digits is an integer label, as in the JSON file
            if from_csv and isinstance(label, str) and _INTEGER.match(label.strip()):
                label = int(label)
            texts.append(str(text))
            labels.append(label)
        return _Rows(texts, labels, where)

    def _read_saved(self, dataset: Any, where: str) -> _Rows:
        if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
            raise ValueError(
                f"{self.kind}: {where} is a DatasetDict; give its directory as root and name "
                "the splits with options.train / options.test"
            )
        self._check_columns(list(dataset.column_names), where)
        feature = dataset.features[self.label_column]
        names = list(getattr(feature, "names", None) or []) or None
        records = [
            {self.text_column: t, self.label_column: y}
            for t, y in zip(dataset[self.text_column], dataset[self.label_column])
        ]
        rows = self._rows(records, where, from_csv=False)
        rows.names = names
        return rows

    def _read_splits(self) -> tuple[_Rows, _Rows | None]:
        if not self._saved:
            assert self.train_path is not None
            test = None if self.test_path is None else self._read_file(self.test_path)
            return self._read_file(self.train_path), test
        saved = _load_from_disk(self.root_path)
        if not isinstance(saved.column_names, dict):  # a single Dataset: carve the test split
            if self._train_option or self._test_option:
                raise ValueError(
                    f"{self.kind}: {self.root_path} is a single saved Dataset; options.train / "
                    "options.test name the splits of a DatasetDict only"
                )
            return self._read_saved(saved, str(self.root_path)), None
        splits = list(saved.keys())
        train_name = self._train_option or "train"
        test_name = self._test_option
        if test_name is None:
            test_name = next((s for s in ("test", "validation") if s in splits), None)
        for option, name in (("train", train_name), ("test", test_name)):
            if name is not None and name not in splits:
                raise ValueError(
                    f"{self.kind}: options.{option} = {name!r}: {self.root_path} has splits "
                    f"{splits}"
                )
        where = f"{self.root_path} [{{}}]"
        train = self._read_saved(saved[train_name], where.format(train_name))
        test = (
            None
            if test_name is None
            else self._read_saved(saved[test_name], where.format(test_name))
        )
        return train, test

    # -- labels -----------------------------------------------------------------------------

    def _class_ids(self, splits: list[_Rows]) -> tuple[list[np.ndarray], list[str]]:
        """Class ids of each split's rows, and the class names (``"0"``… for integer labels)."""
        values = [y for rows in splits for y in rows.labels]
        integers = all(isinstance(y, int) for y in values)
        strings = all(isinstance(y, str) for y in values)
        if not (integers or strings):
            raise ValueError(
                f"{self.kind}: labels mix integers and strings in {[r.where for r in splits]}"
            )
        names = self.classes or next((r.names for r in splits if r.names), None)
        if integers:
            for rows in splits:
                bad = [y for y in rows.labels if isinstance(y, int) and y < 0]
                if bad:
                    raise ValueError(
                        f"{self.kind}: {rows.where} has negative label {bad[0]} (an unlabelled "
                        "split, as GLUE's test splits? name another with options.test)"
                    )
            count = max(int(y) for y in values) + 1
            if names is not None:
                if count > len(names):
                    raise ValueError(
                        f"{self.kind}: label {count - 1} but {len(names)} classes {names}"
                    )
                count = len(names)
            ids = [np.asarray(rows.labels, dtype=np.int64) for rows in splits]
            return ids, list(names) if names is not None else [str(c) for c in range(count)]
        # strings: sorted (or as options.classes orders them), so every node maps alike
        names = list(names) if names is not None else sorted({str(y) for y in values})
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for rows in splits:
            unknown = sorted({str(y) for y in rows.labels} - set(index))
            if unknown:
                raise ValueError(
                    f"{self.kind}: {rows.where} has labels {unknown[:5]} not in options.classes"
                )
            ids.append(np.asarray([index[str(y)] for y in rows.labels], dtype=np.int64))
        return ids, names

    def _load_table(self) -> _Table:
        """Texts and class ids of train + test (test rows after train ones) and class names."""
        if self._table is None:
            train, test = self._read_splits()
            if not train.texts:
                raise ValueError(f"{self.kind}: the train data {train.where} has no rows")
            splits = [train] if test is None else [train, test]
            ids, names = self._class_ids(splits)
            if len(names) < 2:
                raise ValueError(
                    f"{self.kind}: {train.where}: a classifier needs >= 2 classes, found {names}"
                )
            texts = train.texts + ([] if test is None else test.texts)
            labels = np.concatenate(ids)
            if test is None:
                train_rows, test_rows = self._carve(ids[0])
            else:
                train_rows = np.arange(len(train.texts))
                test_rows = len(train.texts) + np.arange(len(test.texts))
            self._table = _Table(texts, labels, train_rows, test_rows, names)
        return self._table

    def _carve(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Seeded stratified train/test rows of one labelled set (test ≥ 1 row, train ≥ 1)."""
        n = len(labels)
        if n < 2:
            raise ValueError(f"{self.kind}: cannot hold out a test split from {n} row(s)")
        # every prefix of a stratified order holds each class in proportion
        order = stratified_order(labels, np.random.default_rng(self.seed))
        count = min(max(round(n * self.test_fraction), 1), n - 1)
        return np.sort(order[count:]), np.sort(order[:count])

    def data_task_table(self) -> dict[str, TaskInfo]:
        """Task ``label`` with as many classes as the data (or ``options.classes``) has."""
        return {TASK: TaskInfo("text_classification", len(self._load_table().names))}

    @property
    def class_names(self) -> list[str]:
        """Class names in id order (decimal strings for integer labels)."""
        return list(self._load_table().names)

    @classmethod
    def task_table(cls, **options: Any) -> dict[str, TaskInfo]:
        """Task ``label``; its number of classes is ``len(options.classes)`` or read from data."""
        table = super().task_table(**options)
        classes = options.get("classes")
        if classes:
            table[TASK] = TaskInfo("text_classification", len(classes))
        return table

    def _load_split(self, split: str) -> SampleSet:
        table = self._load_table()
        rows = table.train_rows if split == "train" else table.test_rows
        texts = [table.texts[int(r)] for r in rows]
        return _TextRows(texts, table.labels[rows]).sample_set()

    def __getstate__(self) -> dict[str, Any]:
        # a sample set's loader carries its own rows; the whole table need not travel
        return {**super().__getstate__(), "_table": None}
