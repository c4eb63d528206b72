"""Splitting a dataset among clients: IID, Dirichlet label skew, and explicit sizes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.data.base import DatasetSource, SampleSet

SCHEMES = ("iid", "dirichlet", "sizes")
MAX_DIRICHLET_DRAWS = 1000


def _dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split each class by proportions drawn from Dir(alpha); redraw until all are big enough."""
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.append(chunk)
        partitions = [np.concatenate(part) for part in parts]
        if min(len(p) for p in partitions) >= min_size:
            return partitions
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} samples into {num_partitions} "
        f"partitions gave every partition >= {min_size} samples in {MAX_DIRICHLET_DRAWS} draws; "
        "raise alpha or lower min_size"
    )


def partition_indices(
    num_samples: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
    sizes: Sequence[int] | None = None,
    min_size: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``range(num_samples)`` into ``num_partitions`` disjoint, sorted index arrays.

    Parameters
    ----------
    num_samples : int
        Size of the data to split.
    num_partitions : int
        Number of partitions (clients).
    scheme : {"iid", "dirichlet", "sizes"}
        ``iid``: seeded shuffle cut into near-equal parts (covers everything).
        ``dirichlet``: label skew; each class is divided by proportions drawn from
        Dir(alpha · 1), redrawn until every partition has ``min_size`` samples (covers everything).
        ``sizes``: ``sizes[k]`` random samples for partition ``k`` (disjoint; the rest unused).
    labels : ndarray, optional
        One class per sample; required by ``dirichlet``.
    alpha : float
        Dirichlet concentration: small values give strong skew.
    sizes : sequence of int, optional
        Per-partition sample counts; required by ``sizes``.
    min_size : int
        Smallest partition ``iid`` and ``dirichlet`` may produce.
    seed : int
        Same seed, same partitions.

    Returns
    -------
    list of ndarray
        ``int64`` indices, sorted, one array per partition.

    Raises
    ------
    ValueError
        For an unknown scheme, missing or inconsistent ``labels``/``sizes``, sizes that exceed
        the data, or partitions that cannot reach ``min_size``.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    rng = np.random.default_rng(seed)
    if scheme == "sizes":
        if sizes is None or len(sizes) != num_partitions:
            raise ValueError(f"scheme 'sizes' needs {num_partitions} sizes, got {sizes}")
        if any(s < 0 for s in sizes) or sum(sizes) > num_samples:
            raise ValueError(f"sizes {list(sizes)} (sum {sum(sizes)}) exceed {num_samples} samples")
        cuts = np.cumsum(sizes)[:-1]
        partitions = np.split(rng.permutation(num_samples)[: sum(sizes)], cuts)
    elif scheme == "iid":
        if num_samples // num_partitions < min_size:
            raise ValueError(
                f"{num_samples} samples cannot give {num_partitions} partitions of >= {min_size}"
            )
        partitions = np.array_split(rng.permutation(num_samples), num_partitions)
    else:
        if labels is None or len(labels) != num_samples:
            raise ValueError(f"scheme 'dirichlet' needs one label per sample ({num_samples})")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        partitions = _dirichlet(np.asarray(labels), num_partitions, alpha, min_size, rng)
    return [np.sort(p).astype(np.int64) for p in partitions]


def client_split(
    source: DatasetSource,
    split: str,
    *,
    partition_index: int,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    min_size: int = 1,
) -> SampleSet:
    """One client's share of a split (see :func:`partition_indices` for the schemes).

    Parameters
    ----------
    source : DatasetSource
        The dataset.
    split : str
        ``"train"`` or ``"test"``.
    partition_index : int
        Which partition this client gets, in ``[0, num_partitions)``.
    num_partitions, scheme, alpha, sizes, seed, min_size
        As in :func:`partition_indices`; every client must pass the same values.

    Raises
    ------
    ValueError
        If ``partition_index`` is out of range, or a ``dirichlet`` split has no labels.
    """
    if not 0 <= partition_index < num_partitions:
        raise ValueError(f"partition_index {partition_index} not in [0, {num_partitions})")
    samples = source.split(split)
    labels = samples.stratify_labels()
    if scheme == "dirichlet" and labels is None:
        raise ValueError(f"dataset {source.kind!r} has no per-sample class for Dirichlet skew")
    parts = partition_indices(
        len(samples),
        num_partitions,
        scheme=scheme,
        labels=labels,
        alpha=alpha,
        sizes=sizes,
        min_size=min_size,
        seed=seed,
    )
    return samples.subset(parts[partition_index])
