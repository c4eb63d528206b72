"""Splitting a dataset among clients: IID, Dirichlet label skew, explicit sizes, and caps.

Whenever the data has one class per sample, ``iid`` and ``sizes`` partitions and sample caps
are *stratified*: they cut consecutive runs out of a seeded order in which every prefix holds
each class in proportion (see :func:`stratified_order`), so a client with 300 samples sees
every digit about 30 times whatever order the source stores its samples in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.data.base import DatasetSource, SampleSet

SCHEMES = ("iid", "dirichlet", "sizes")
MAX_DIRICHLET_DRAWS = 1000


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation whose every prefix holds each class in proportion.

    Each sample of class ``c`` (``n_c`` members, shuffled) at rank ``r`` gets the key
    ``(r + 0.5) / n_c``; sorting by key (ties broken at random) interleaves the classes evenly,
    so any run of ``m`` consecutive positions holds ``m · n_c / N`` samples of class ``c`` up to
    about one per class. Without labels it is a plain seeded permutation.

    Parameters
    ----------
    labels : ndarray
        One class per sample.
    rng : numpy.random.Generator
        The source of randomness (the order is a function of its state).

    Returns
    -------
    ndarray
        ``int64`` positions ``0 … len(labels) − 1`` in stratified order.
    """
    labels = np.asarray(labels)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranks = rng.permutation(len(members))
        keys[members] = (ranks + 0.5) / len(members)
    tiebreak = rng.random(len(labels))
    return np.lexsort((tiebreak, keys)).astype(np.int64)


def _order(num_samples: int, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Stratified order when there are labels, else a seeded permutation."""
    if labels is None:
        return rng.permutation(num_samples)
    return stratified_order(labels, rng)


def cap_positions(
    num_samples: int, cap: int, labels: np.ndarray | None = None, *, seed: int = 0
) -> np.ndarray:
    """Positions of a seeded subset of ``cap`` samples (stratified by ``labels`` when given).

    A cap keeps a partition's label distribution: ``cap`` samples of an IID share hold every
    class in proportion, ``cap`` samples of a Dirichlet share keep its skew.

    Parameters
    ----------
    num_samples : int
        Size of the set to cap.
    cap : int
        How many samples to keep (all of them if ``cap >= num_samples``).
    labels : ndarray, optional
        One class per sample.
    seed : int
        Same seed, same subset.

    Returns
    -------
    ndarray
        Sorted ``int64`` positions.
    """
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"{len(labels)} labels for {num_samples} samples")
    if cap >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    order = _order(num_samples, labels, np.random.default_rng(seed))
    return np.sort(order[:cap]).astype(np.int64)


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
        ``iid``: seeded shuffle cut into near-equal parts (covers everything); stratified by
        ``labels`` when given, so every part holds every class in proportion.
        ``dirichlet``: label skew; each class is divided by proportions drawn from
        Dir(alpha · 1), redrawn until every partition has ``min_size`` samples (covers everything).
        ``sizes``: ``sizes[k]`` random samples for partition ``k`` (disjoint; the rest unused);
        stratified by ``labels`` when given.
    labels : ndarray, optional
        One class per sample; required by ``dirichlet``, used by ``iid`` and ``sizes`` to
        stratify.
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
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"{len(labels)} labels for {num_samples} samples")
    if scheme == "sizes":
        if sizes is None or len(sizes) != num_partitions:
            raise ValueError(f"scheme 'sizes' needs {num_partitions} sizes, got {sizes}")
        if any(s < 0 for s in sizes) or sum(sizes) > num_samples:
            raise ValueError(f"sizes {list(sizes)} (sum {sum(sizes)}) exceed {num_samples} samples")
        cuts = np.cumsum(sizes)[:-1]
        partitions = np.split(_order(num_samples, labels, rng)[: sum(sizes)], cuts)
    elif scheme == "iid":
        if num_samples // num_partitions < min_size:
            raise ValueError(
                f"{num_samples} samples cannot give {num_partitions} partitions of >= {min_size}"
            )
        # Consecutive runs of a stratified order: each part gets every class in proportion.
        partitions = np.array_split(_order(num_samples, labels, rng), num_partitions)
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
    # Multi-label and dense datasets have no per-sample class: their splits stay plain random.
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
