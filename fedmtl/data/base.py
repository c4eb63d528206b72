"""Dataset contract: task tables, the ``SampleSet`` every source yields, and the registry."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedmtl.registry import Registry

SPLITS = ("train", "test")

Sample = tuple[Tensor | str, dict[str, Tensor]]
# Loads the sample stored under ``key`` with targets for the named tasks only.
SampleLoader = Callable[[int, tuple[str, ...]], Sample]


@dataclass(frozen=True)
class TaskInfo:
    """A task a dataset offers.

    Parameters
    ----------
    kind : str
        A registered task kind (``fedmtl.tasks``), e.g. ``"semseg"``.
    num_outputs : int
        Classes, labels or channels, as :class:`fedmtl.tasks.base.Task` expects.
    options : dict
        Kind-specific task options, e.g. ``{"ignore_index": 255}``.
    """

    kind: str
    num_outputs: int
    options: dict[str, Any] = field(default_factory=dict)


class SampleSet(Dataset):
    """An indexable set of ``(input, targets)`` samples of one split.

    Parameters
    ----------
    loader : callable
        ``loader(key, tasks)`` returns the input and the targets of ``tasks`` for one sample.
    keys : array of int
        The loader's key of every sample, in order.
    tasks : sequence of str
        Task names whose targets ``__getitem__`` returns.
    labels : array of int, optional
        One class per sample (aligned with ``keys``), used for Dirichlet label skew.
    """

    def __init__(
        self,
        loader: SampleLoader,
        keys: Sequence[int] | np.ndarray,
        tasks: Sequence[str],
        labels: np.ndarray | None = None,
    ) -> None:
        self._loader = loader
        self._keys = np.asarray(keys, dtype=np.int64)
        self.tasks: tuple[str, ...] = tuple(tasks)
        if labels is not None and len(labels) != len(self._keys):
            raise ValueError(f"{len(labels)} labels for {len(self._keys)} samples")
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> Sample:
        return self._loader(int(self._keys[i]), self.tasks)

    @property
    def keys(self) -> np.ndarray:
        """Loader keys of the samples (stable sample identities within the source)."""
        return self._keys.copy()

    def stratify_labels(self) -> np.ndarray | None:
        """One class per sample for label-skewed partitioning, or None if the data has none."""
        return None if self._labels is None else self._labels.copy()

    def subset(self, indices: Sequence[int] | np.ndarray) -> SampleSet:
        """The samples at positions ``indices`` (same tasks and labels).

        Raises
        ------
        IndexError
            If a position is outside ``[0, len(self))``.
        """
        positions = np.asarray(indices, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"subset positions must lie in [0, {len(self)})")
        labels = None if self._labels is None else self._labels[positions]
        return SampleSet(self._loader, self._keys[positions], self.tasks, labels)

    def with_tasks(self, tasks: Sequence[str]) -> SampleSet:
        """The same samples returning targets for ``tasks`` only (a subset of ``self.tasks``).

        Raises
        ------
        KeyError
            If a task is not offered by this set.
        """
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise KeyError(f"tasks {unknown} not offered; available: {list(self.tasks)}")
        return SampleSet(self._loader, self._keys, tasks, self._labels)


def collate(batch: Sequence[Sample]) -> tuple[Tensor | list[str], dict[str, Tensor]]:
    """Batch samples: stack image tensors (text stays a ``list[str]``) and every target.

    Parameters
    ----------
    batch : sequence of (input, targets)
        Samples as returned by :meth:`SampleSet.__getitem__`.

    Returns
    -------
    inputs : Tensor or list of str
        ``[B, 3, H, W]`` images or ``B`` captions.
    targets : dict of str to Tensor
        Each task's targets stacked along a new batch dimension.
    """
    inputs = [sample[0] for sample in batch]
    stacked: Tensor | list[str]
    if all(isinstance(x, str) for x in inputs):
        stacked = [str(x) for x in inputs]
    else:
        stacked = torch.stack([x for x in inputs if isinstance(x, Tensor)])
        if len(stacked) != len(inputs):
            raise TypeError("a batch mixes text and tensor inputs")
    names = batch[0][1].keys() if batch else ()
    targets = {name: torch.stack([sample[1][name] for sample in batch]) for name in names}
    return stacked, targets


class DatasetSource(ABC):
    """A dataset: where it lives, which tasks it offers, and its train/test splits.

    Parameters
    ----------
    root : str or Path, optional
        Dataset directory (required when ``requires_root``; bundled sources take none).
    image_size : int, optional
        Resize images and dense targets to ``image_size`` × ``image_size``; native size if None.
    seed : int
        Seed for any random choice the source makes.

    Raises
    ------
    ValueError
        If a root is missing for a source that needs one, or given to one that takes none.
    FileNotFoundError
        If ``root`` (or the directory the layout expects in it) does not exist; the message names
        the path and the expected layout.
    """

    kind: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    requires_root: ClassVar[bool] = True
    TASKS: ClassVar[dict[str, TaskInfo]] = {}
    LAYOUT: ClassVar[str] = ""  # the expected on-disk layout, quoted in missing-path errors
    # Modalities ``counterpart`` offers besides ``modality`` (quickstart: its captions).
    OTHER_VIEWS: ClassVar[tuple[str, ...]] = ()
    # The dataset kind of each other view, so that a config error can name what to use instead
    # (coco_multilabel: {"text": "coco_captions"}).
    VIEW_KINDS: ClassVar[dict[str, str]] = {}
    # True when a task's number of outputs is read from the data (text_classification's classes):
    # the static table then has 0 outputs and models are built from :meth:`data_task_table`.
    OUTPUTS_FROM_DATA: ClassVar[bool] = False
    # Side of the images when ``image_size`` is None, if every image has it (CIFAR: 32).
    NATIVE_IMAGE_SIZE: ClassVar[int | None] = None

    def __init__(
        self, root: str | Path | None = None, *, image_size: int | None = None, seed: int = 0
    ) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"{self.kind}: image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.seed = seed
        self.root: Path | None = None
        self._splits: dict[str, SampleSet] = {}
        if self.requires_root:
            if root is None:
                raise ValueError(f"dataset {self.kind!r} needs a root path;{self.layout_hint()}")
            self.root = Path(root).expanduser()
            if not self.root.exists():
                raise self.missing(self.root)
        elif root is not None:
            raise ValueError(f"dataset {self.kind!r} is bundled and takes no root (got {root})")

    @classmethod
    def task_table(cls, **options: Any) -> dict[str, TaskInfo]:
        """The tasks this dataset offers (static: no file access).

        Parameters
        ----------
        **options
            The options the source would be built with; validated, no source uses them here.
        """
        check_options(cls, options)
        return dict(cls.TASKS)

    def data_task_table(self) -> dict[str, TaskInfo]:
        """The tasks of this source as its data defines them (default: the static table).

        Sources with ``OUTPUTS_FROM_DATA`` override it to count classes in their files.
        """
        return dict(self.TASKS)

    @classmethod
    def views(cls) -> tuple[str, ...]:
        """Modalities this dataset can be read in (its own first); see :meth:`counterpart`."""
        return (cls.modality, *cls.OTHER_VIEWS)

    def check(self, tasks: Sequence[str]) -> None:
        """Read both splits' indices and the first sample of each, with targets for ``tasks``.

        Run before a federation starts, so that an empty root, a wrong layout or a missing
        annotation file is reported naming the path, not as a client failing in round 1.

        Raises
        ------
        FileNotFoundError
            Naming the missing file and the expected layout.
        ValueError
            If a split is empty or a file cannot be parsed.
        """
        for name in SPLITS:
            samples = self.split(name)
            if len(samples) == 0:
                raise ValueError(f"{self.kind}: the {name} split is empty{self._where()}")
            try:
                samples.with_tasks(list(tasks))[0]
            except (FileNotFoundError, ValueError):
                raise
            except Exception as exc:  # a decoder error (truncated image, bad pickle, ...)
                raise ValueError(
                    f"{self.kind}: the first {name} sample cannot be read{self._where()}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

    def _where(self) -> str:
        return f" (root {self.root})" if self.root is not None else ""

    def split(self, split: str) -> SampleSet:
        """The ``"train"`` or ``"test"`` split with targets for every offered task.

        Raises
        ------
        ValueError
            If ``split`` is neither ``"train"`` nor ``"test"``.
        """
        if split not in SPLITS:
            raise ValueError(f"{self.kind}: unknown split {split!r}; use one of {SPLITS}")
        # parsing annotations (COCO's json, VOC's xml) is slow; every client of a process reuses it
        if split not in self._splits:
            self._splits[split] = self._load_split(split)
        return self._splits[split]

    @abstractmethod
    def _load_split(self, split: str) -> SampleSet:
        """Build the SampleSet of a validated split name."""

    def public_pool(self) -> SampleSet:
        """Samples a public dataset is drawn from (default: the train split)."""
        return self.split("train")

    def counterpart(self, modality: str, **options: Any) -> DatasetSource:
        """A source over the same samples in ``modality``, sharing the public pool.

        Parameters
        ----------
        modality : str
            ``"image"`` or ``"text"``.
        **options
            Constructor options of the returned source (e.g. ``image_size``); with none and the
            source's own modality, the source itself is returned.

        Raises
        ------
        ValueError
            If this dataset has no view in ``modality``.
        """
        if modality != self.modality:
            raise ValueError(f"dataset {self.kind!r} has no {modality!r} view")
        if not options:
            return self
        return create_dataset(self.kind, self.root, **{"seed": self.seed, **options})

    def __getstate__(self) -> dict[str, Any]:
        # sample sets pickle their source (DataLoader workers, Ray); cached splits stay behind
        return {**self.__dict__, "_splits": {}}

    @property
    def root_path(self) -> Path:
        """The dataset directory (sources with ``requires_root`` always have one)."""
        if self.root is None:
            raise ValueError(f"dataset {self.kind!r} has no root path")
        return self.root

    @classmethod
    def layout_hint(cls) -> str:
        """The expected layout, formatted for error messages."""
        return f" expected layout:\n{cls.LAYOUT}" if cls.LAYOUT else ""

    def missing(self, path: Path) -> FileNotFoundError:
        """An error naming a missing path and the layout the source expects."""
        return FileNotFoundError(f"{self.kind}: {path} does not exist;{self.layout_hint()}")


DATASET_REGISTRY: Registry[type[DatasetSource]] = Registry("dataset kind", attribute="kind")


def register_dataset(kind: str) -> Callable[[type[DatasetSource]], type[DatasetSource]]:
    """Register a dataset source under ``kind`` (the name experiment files use).

    Parameters
    ----------
    kind : str
        Registry key, e.g. ``"quickstart"`` or ``"cifar10"``.
    """
    return DATASET_REGISTRY.register(kind)


def accepted_options(cls: type[DatasetSource]) -> list[str]:
    """Keyword options the source's constructor takes besides ``root``, ``image_size``, ``seed``.

    Those three come from ``[datasets.X]`` itself, so they are not ``options``.
    """
    fixed = ("self", "root", "image_size", "seed")
    return [name for name in inspect.signature(cls.__init__).parameters if name not in fixed]


def check_options(cls: type[DatasetSource], options: dict[str, Any]) -> None:
    """Reject options the source's constructor does not accept.

    Raises
    ------
    ValueError
        Naming the unknown options and the accepted ones.
    """
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {cls.kind!r}: unknown options {unknown}; accepted: {accepted}")


def create_dataset(kind: str, root: str | Path | None = None, **options: Any) -> DatasetSource:
    """Build a registered dataset source.

    Parameters
    ----------
    kind : str
        Registered dataset kind.
    root : str or Path, optional
        Dataset directory.
    **options
        ``image_size``, ``seed`` and source-specific options.

    Raises
    ------
    KeyError
        If ``kind`` is not registered; the message lists the known kinds.
    ValueError
        If an option is unknown to the source.
    """
    cls = DATASET_REGISTRY[kind]
    check_options(cls, options)
    return cls(root, **options)


def dataset_task_table(kind: str, **options: Any) -> dict[str, TaskInfo]:
    """The task table of a registered dataset kind (static; used to validate experiment files).

    Raises
    ------
    KeyError
        If ``kind`` is not registered.
    """
    return DATASET_REGISTRY[kind].task_table(**options)
