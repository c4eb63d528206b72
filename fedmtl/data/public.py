"""The public dataset FedMuscle clients represent: same samples, same order, on every client."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import Tensor

from fedmtl.data.base import DatasetSource, SampleSet, collate, create_dataset


class PublicDataset:
    """A fixed, seeded selection of public samples, served in identical batches on every client.

    Parameters
    ----------
    source : DatasetSource or str
        The dataset (or its registered kind, built with ``source_options``). Bundled quickstart
        sources draw from their public pool (disjoint from train and test); other sources from
        their train split.
    size : int
        Number of public samples.
    batch_size : int
        Samples per batch (the last batch may be smaller).
    seed : int
        Seed of the selection and of the per-epoch order; every client must use the same one.
    **source_options
        Options for :func:`create_dataset` when ``source`` is a name.

    Raises
    ------
    ValueError
        If ``size`` or ``batch_size`` is not positive, ``size`` exceeds the pool, or options
        come with a source instance.
    """

    def __init__(
        self,
        source: DatasetSource | str,
        size: int,
        batch_size: int,
        seed: int = 0,
        **source_options: Any,
    ) -> None:
        if isinstance(source, str):
            self.source = create_dataset(source, **source_options)
        elif source_options:
            raise ValueError(f"source options {sorted(source_options)} need a dataset name")
        else:
            self.source = source
        pool = self.source.public_pool()
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be >= 1, got {size} and {batch_size}")
        if size > len(pool):
            raise ValueError(
                f"public size {size} exceeds the {len(pool)} samples of {self.source.kind!r}"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.pool_positions = np.sort(np.random.default_rng(seed).choice(len(pool), size, False))
        self._inputs = pool.subset(self.pool_positions).with_tasks(())

    def __len__(self) -> int:
        return self.size

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        return math.ceil(self.size / self.batch_size)

    @property
    def samples(self) -> SampleSet:
        """The selected samples (inputs only), in selection order."""
        return self._inputs

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """Positions (into :attr:`samples`) of each batch of ``epoch``, seeded by seed and epoch."""
        order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]

    def batches(self, epoch: int) -> Iterator[Tensor | list[str]]:
        """Yield the inputs of every batch of ``epoch`` (``[B, 3, H, W]`` or ``B`` captions)."""
        for positions in self.batch_indices(epoch):
            inputs, _ = collate([self._inputs[int(p)] for p in positions])
            yield inputs

    def modality_view(self, kind: str, **options: Any) -> PublicDataset:
        """The same samples, in the same order, as seen by a client of modality ``kind``.

        Parameters
        ----------
        kind : str
            ``"image"`` or ``"text"``.
        **options
            Options of the counterpart source (e.g. ``image_size`` for images).

        Raises
        ------
        ValueError
            If the source has no view in that modality.
        """
        counterpart = self.source.counterpart(kind, **options)
        if counterpart is self.source:
            return self
        return PublicDataset(counterpart, self.size, self.batch_size, self.seed)
