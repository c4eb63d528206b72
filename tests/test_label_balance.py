"""Caps and partitions keep the label distribution: histograms of every bundled config's clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmtl.clients.session import ClientSession
from fedmtl.config import load_experiment
from fedmtl.data import cap_positions, partition_indices

ROOT = Path(__file__).resolve().parents[1]
# The bundled federations that run on the offline data (the *_paper.toml files need real data).
BUNDLED = [
    ROOT / "configs" / name
    for name in ("quickstart.toml", "mfed.toml", "fedhca2.toml", "fedmuscle.toml", "gpu_check.toml")
] + [ROOT / "tests" / "data" / "tiny.toml"]


def _histogram(session: ClientSession, split: str) -> np.ndarray:
    labels = session.split(split).stratify_labels()
    assert labels is not None
    return np.bincount(labels, minlength=10)


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_every_bundled_client_sees_every_class_in_proportion(path: Path, tmp_path: Path) -> None:
    # partitions do not depend on the device (gpu_check.toml asks for CUDA)
    experiment = load_experiment(path).model_copy(update={"device": "cpu"})
    for client in experiment.clients:
        session = ClientSession(experiment, client.client_id, tmp_path)
        for split in ("train", "test"):
            counts = _histogram(session, split)
            n = counts.sum()
            assert (counts > 0).all(), f"{path.name} {client.client_id} {split}: {counts}"
            # stratified: each class within one sample (plus rounding) of n/10
            assert counts.max() - counts.min() <= 2, f"{client.client_id} {split}: {counts}"
            assert abs(counts - n / 10).max() <= 1.5


def _labels(per_class: int = 50, classes: int = 10, *, sorted_store: bool = True) -> np.ndarray:
    labels = np.repeat(np.arange(classes), per_class)
    return labels if sorted_store else np.random.default_rng(0).permutation(labels)


@pytest.mark.parametrize("sorted_store", [True, False])
def test_a_cap_is_a_stratified_seeded_sample(sorted_store: bool) -> None:
    labels = _labels(sorted_store=sorted_store)
    picked = cap_positions(len(labels), 60, labels, seed=4)
    assert len(picked) == 60 and len(set(picked.tolist())) == 60
    assert np.bincount(labels[picked], minlength=10).tolist() == [6] * 10
    assert (cap_positions(len(labels), 60, labels, seed=4) == picked).all()
    assert not (cap_positions(len(labels), 60, labels, seed=5) == picked).all()
    # a cap of an already skewed share keeps its skew (proportional within one sample)
    skewed = np.array([0] * 80 + [1] * 20)
    kept = np.bincount(skewed[cap_positions(100, 10, skewed, seed=0)], minlength=2)
    assert kept.tolist() == [8, 2]
    # without labels it is a plain seeded subset; a cap above the size keeps everything
    assert len(cap_positions(30, 7, None, seed=0)) == 7
    assert cap_positions(5, 9, None).tolist() == [0, 1, 2, 3, 4]


def test_iid_and_sizes_partitions_are_stratified() -> None:
    labels = _labels()
    for part in partition_indices(500, 5, scheme="iid", labels=labels, seed=1):
        assert np.bincount(labels[part], minlength=10).tolist() == [10] * 10
    sizes = [200, 100, 50]
    parts = partition_indices(500, 3, scheme="sizes", sizes=sizes, labels=labels, seed=1)
    for part, size in zip(parts, sizes):
        counts = np.bincount(labels[part], minlength=10)
        assert counts.sum() == size and (counts == size // 10).all()
    assert len(set(np.concatenate(parts).tolist())) == 350  # disjoint


def test_dirichlet_still_gives_the_skew_asked_for() -> None:
    labels = _labels(per_class=100)
    parts = partition_indices(1000, 4, scheme="dirichlet", labels=labels, alpha=0.1, seed=0)
    shares = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    # strong skew: some client's largest class holds far more than the 10 % of a balanced split
    assert max(s.max() for s in shares) > 0.3
    parts = partition_indices(1000, 4, scheme="dirichlet", labels=labels, alpha=1000.0, seed=0)
    shares = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    assert max(s.max() for s in shares) < 0.16
