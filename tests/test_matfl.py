"""MaT-FL: cosine distances by hand, clusterings known by construction, a run on a FakeGrid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import AgglomerativeClustering

from fedmtl.aggregation.matfl import cluster_averages, cluster_labels, cosine_distances
from fedmtl.config import ConfigError, parse_experiment
from fedmtl.protocols.matfl import REPORT_START, START_PREFIX
from tests.helpers import (
    reply_arrays,
    run_recorded,
    tiny_experiment,
    train_messages,
)


def test_cosine_distances_by_hand() -> None:
    # Δ1 = (1, 0), Δ2 = (1, 1), Δ3 = (0, 2), Δ4 = 0 — split over two tensors to check the sum.
    updates = [
        {"a": torch.tensor([1.0]), "b": torch.tensor([0.0])},
        {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])},
        {"a": torch.tensor([0.0]), "b": torch.tensor([2.0])},
        {"a": torch.tensor([0.0]), "b": torch.tensor([0.0])},
    ]
    d = cosine_distances(updates)
    h = 1 - 1 / math.sqrt(2)  # cos 45° → 0.29289321881345254
    expected = [
        [0.0, h, 1.0, 1.0],
        [h, 0.0, h, 1.0],
        [1.0, h, 0.0, 1.0],
        [1.0, 1.0, 1.0, 0.0],  # a zero update has no direction: orthogonal to all
    ]
    torch.testing.assert_close(d, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def _bundles(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three updates near e1 and two near e2 in R^50 (near-orthogonal bundles), interleaved."""
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.zeros(50), torch.zeros(50)
    e1[:25], e2[25:] = 1.0, 1.0
    centres = [e1, e2, e1, e2, e1]
    return [{"w": c * (1 + i) + 0.05 * torch.randn(50, generator=g)} for i, c in enumerate(centres)]


def test_two_near_orthogonal_bundles_are_two_clusters() -> None:
    updates = _bundles()
    d = cosine_distances(updates)
    assert cluster_labels(d, num_clusters=2) == [0, 1, 0, 1, 0]
    assert cluster_labels(d, distance_threshold=0.5) == [0, 1, 0, 1, 0]  # bundles are ≈1 apart
    assert cluster_labels(d, distance_threshold=1.5) == [0] * 5  # above it: one cluster
    assert cluster_labels(d, num_clusters=5) == [0, 1, 2, 3, 4]
    assert cluster_labels(d, num_clusters=9) == [0, 1, 2, 3, 4]  # more clusters than clients
    # scikit-learn's implementation of the same clustering agrees
    flat = np.stack([u["w"].numpy() for u in updates]).astype(np.float64)
    reference = AgglomerativeClustering(n_clusters=2, metric="cosine", linkage="average").fit(flat)
    ours = cluster_labels(d, num_clusters=2)
    assert len({(a, int(b)) for a, b in zip(ours, reference.labels_)}) == 2  # same partition


def test_one_client_and_bad_cuts() -> None:
    assert cluster_labels(torch.zeros(1, 1), num_clusters=2) == [0]
    with pytest.raises(ValueError, match="exactly one"):
        cluster_labels(torch.zeros(2, 2), num_clusters=2, distance_threshold=0.3)


def test_cluster_averages_by_hand() -> None:
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}, {"w": torch.tensor([10.0])}]
    averages = cluster_averages(states, [1.0, 3.0, 5.0], [0, 1, 0])
    # cluster 0: (1·0 + 5·10)/6 = 8.3333; cluster 1: 4
    torch.testing.assert_close(averages[0]["w"], torch.tensor([50.0 / 6]))
    torch.testing.assert_close(averages[1]["w"], torch.tensor([4.0]))


def test_config_cuts_by_count_or_by_distance() -> None:
    base = tiny_experiment("matfl", rounds=1).model_dump(mode="json")
    for algorithm, count, threshold in (
        ({"name": "matfl"}, 2, None),  # the default: FedHCA²'s comparison's 2 clusters
        ({"name": "matfl", "distance_threshold": 0.4}, None, 0.4),
        ({"name": "matfl", "num_clusters": 3}, 3, None),
    ):
        parsed = parse_experiment({**base, "algorithm": algorithm}).algorithm
        assert (parsed.num_clusters, parsed.distance_threshold) == (count, threshold)
    for bad, field in (
        ({"num_clusters": 0}, "algorithm.matfl.num_clusters"),
        ({"distance_threshold": 3.0}, "algorithm.matfl.distance_threshold"),
        ({"num_clusters": 2, "distance_threshold": 0.4}, "both set"),
    ):
        with pytest.raises(ConfigError, match=field):
            parse_experiment({**base, "algorithm": {"name": "matfl", **bad}})


@pytest.mark.parametrize("count", [1, 2])
def test_round_2_encoders_are_cluster_averages_of_the_updates(count: int, tmp_path: Path) -> None:
    data = tiny_experiment("matfl", rounds=3).model_dump(mode="json")
    data["algorithm"] = {"name": "matfl", "num_clusters": count}
    experiment = parse_experiment(data)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    sent = train_messages(grid, ids)
    weights = {cid: float(c.samples or 0) for cid, c in zip(ids, experiment.clients)}
    for round_ in (1, 2):
        replies = {cid: reply_arrays(recorder.replies[(round_, cid)]) for cid in ids}
        names = sorted(k for k in replies["a-digit"] if k.startswith("encoder."))
        if round_ == 1:  # the start is reported once, then known to the server
            assert all(bool(sent[(1, cid)].content["config"][REPORT_START]) for cid in ids)
            starts = {cid: {n: replies[cid][START_PREFIX + n] for n in names} for cid in ids}
        else:
            assert all(REPORT_START not in sent[(2, cid)].content["config"] for cid in ids)
            starts = {
                cid: {n: reply_arrays(sent[(2, cid)].content)[n] for n in names} for cid in ids
            }
        flat = np.stack(
            [
                torch.cat([(replies[c][n] - starts[c][n]).reshape(-1) for n in names]).numpy()
                for c in ids
            ]
        )
        if count == 1:
            labels = [0, 0, 0]
        else:  # an independent implementation of the same clustering
            fitted = AgglomerativeClustering(n_clusters=count, metric="cosine", linkage="average")
            labels = [int(x) for x in fitted.fit(flat).labels_]
        for cid in ids:
            members = [c for c, label in zip(ids, labels) if label == labels[ids.index(cid)]]
            total = sum(weights[m] for m in members)
            got = reply_arrays(sent[(round_ + 1, cid)].content)
            for n in names:
                expected = sum(weights[m] / total * replies[m][n] for m in members)
                torch.testing.assert_close(got[n], expected, rtol=1e-5, atol=1e-6)
        # decoders: FedAvg between the two digit clients
        digit = [k for k in replies["a-digit"] if k.startswith("decoders.digit.")]
        for n in digit:
            expected = (replies["a-digit"][n] + replies["b-digit"][n]) / 2  # equal samples
            torch.testing.assert_close(
                reply_arrays(sent[(round_ + 1, "a-digit")].content)[n], expected
            )
        rows = [r for r in run_dir.read_metrics() if r["round"] == round_]
        assert rows[0]["server/matfl/clusters"] == float(len(set(labels)))
        assert rows[0]["server/matfl/cluster/c-seg-depth"] in (0.0, 1.0)
