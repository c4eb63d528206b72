"""MaT-FL's dynamic grouping: cluster the encoder updates, average inside each cluster.

Cai et al., "Many-Task Federated Learning: A New Problem Setting and A Simple Baseline",
CVPR Workshops 2023. Every round the server clusters the clients' encoder updates
``Δ_i = θ_i^new − θ_i^start`` by agglomerative clustering with cosine distance and average
linkage (:func:`scipy.cluster.hierarchy.linkage`), and averages the encoders inside each
cluster; clients whose updates point the same way share an encoder, the others do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

from fedmtl.aggregation.fedavg import weighted_average


def cosine_distances(updates: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Pairwise cosine distances ``1 − ⟨Δ_i, Δ_j⟩ / (‖Δ_i‖·‖Δ_j‖)`` of flattened updates.

    The inner products are summed tensor by tensor in float64 (the ``[N, N]`` Gram matrix; no
    ``[N, d]`` copy). An all-zero update has no direction: its distance to every other update
    is 1 (orthogonal), to itself 0.

    Returns
    -------
    Tensor
        ``[N, N]`` float64, symmetric, zero diagonal, values in [0, 2].
    """
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return gram
    for key, first in updates[0].items():
        if not torch.is_floating_point(first):
            continue
        rows = torch.stack([u[key].detach().to(torch.float64).reshape(-1) for u in updates])
        gram += rows @ rows.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    scale = torch.outer(norms, norms)
    cosine = torch.where(scale > 0, gram / scale.clamp_min(1e-300), torch.zeros_like(gram))
    distances = (1.0 - cosine.clamp(-1.0, 1.0)).fill_diagonal_(0.0)
    return (distances + distances.T) / 2  # exactly symmetric, as squareform requires


def cluster_labels(
    distances: Tensor, *, num_clusters: int | None = None, distance_threshold: float | None = None
) -> list[int]:
    """Agglomerative clustering (average linkage) of a distance matrix; one label per client.

    Parameters
    ----------
    distances : Tensor
        ``[N, N]`` symmetric distances with a zero diagonal (:func:`cosine_distances`).
    num_clusters : int, optional
        Cut the dendrogram into at most this many clusters (fewer clients: one each).
    distance_threshold : float, optional
        Cut it where the average-linkage distance exceeds this value instead.

    Returns
    -------
    list of int
        Cluster labels 0, 1, ... numbered in order of first appearance.

    Raises
    ------
    ValueError
        Unless exactly one of ``num_clusters`` and ``distance_threshold`` is given.
    """
    if (num_clusters is None) == (distance_threshold is None):
        raise ValueError("give exactly one of num_clusters and distance_threshold")
    n = distances.shape[0]
    if n <= 1:
        return [0] * n
    condensed = squareform(distances.detach().cpu().numpy().astype(np.float64), checks=False)
    tree = linkage(condensed, method="average")
    if num_clusters is not None:
        raw = fcluster(tree, t=min(num_clusters, n), criterion="maxclust")
    else:
        raw = fcluster(tree, t=distance_threshold, criterion="distance")
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in raw]


def cluster_averages(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], labels: Sequence[int]
) -> list[dict[str, Tensor]]:
    """FedAvg inside each cluster: one average per cluster, in label order.

    Parameters
    ----------
    states : sequence of mappings
        Each client's tensors (its new encoder).
    weights : sequence of float
        Each client's weight (its training examples).
    labels : sequence of int
        Each client's cluster (:func:`cluster_labels`).
    """
    out = []
    for label in range(max(labels, default=-1) + 1):
        members = [i for i, value in enumerate(labels) if value == label]
        out.append(weighted_average([states[i] for i in members], [weights[i] for i in members]))
    return out
