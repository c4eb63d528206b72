"""FedAMP's attentive message passing: the weights ξ and each client's cloud model u_i.

Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data", AAAI 2021. The
server takes one gradient step (step size α_k) on the attention-inducing regulariser
``Σ_{i<j} A(‖θ_i − θ_j‖²)`` with ``A(x) = 1 − exp(−x/σ)``; written per client, the step is a
weighted average of the clients' models, the client's *cloud model*::

    u_i = ξ_ii·θ_i + Σ_{j≠i} ξ_ij·θ_j,   ξ_ij = α_k·A'(d²_ij) = (α_k/σ)·exp(−d²_ij/σ),
    ξ_ii = 1 − Σ_{j≠i} ξ_ij.

A'(x) decreases in x: the closer two models, the more they weigh in each other's cloud model.

**Why it does not underflow.** Taken literally, ``d²_ij = ‖θ_i − θ_j‖²`` sums over every
parameter, so it grows with the model: for a 27 M-parameter Swin-T encoder it is about 1e5,
and ``exp(−1e5/σ)`` with σ = 1 is 0 in float64 (whose smallest positive value is about
``exp(−745)``). Every ξ_ij is then 0 and u_i = θ_i: FedAMP silently turns into local training,
whatever the models look like (the defect of the comparison code FedHCA²'s table was made
with). Two changes keep the weights meaningful:

1. The distance is *normalised by the parameter count* P of the group,
   ``d̄²_ij = ‖θ_i − θ_j‖² / P`` (the mean squared difference per parameter), so its scale is
   that of one weight, whatever the model's size (d² ≈ 1e5 over 27 M parameters is
   d̄² ≈ 4e-3). This is the paper's formula with σ and α_k both measured per parameter
   (σ_paper = P·σ, α_k,paper = P·α_k).
2. The weights are formed in *log space*, ``log ξ_ij = log α_k − log σ − d̄²_ij/σ``, and their
   row total by log-sum-exp: no intermediate overflows however small σ is, and a weight that
   does underflow is one below ``1e-300`` of the client's own, i.e. a negligible peer.

**Capping.** The step is a convex combination only while ``Σ_{j≠i} ξ_ij ≤ 1`` (the paper
requires α_k small enough). When a row's peer weights sum to more than 1 they are divided by
their sum (a softmax over ``−d̄²/σ`` in log space) and ξ_ii = 0: u_i is then the attention-weighted
mean of the peers. :func:`attention_weights` reports which rows were capped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedmtl.aggregation.fedavg import weighted_average


def squared_distances(states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, int]:
    """Pairwise ``‖θ_i − θ_j‖²`` over the floating tensors of ``states``, and their count P.

    Differences are taken tensor by tensor in float64 (no ``‖a‖² + ‖b‖² − 2ab`` expansion, whose
    cancellation loses the small distances between similar models).

    Parameters
    ----------
    states : sequence of mappings
        One ``name → tensor`` mapping per client, with equal names and shapes.

    Returns
    -------
    distances : Tensor
        ``[N, N]`` float64, symmetric, zero diagonal.
    numel : int
        P, the number of floating-point parameters in one state.

    Raises
    ------
    ValueError
        If the states' names or shapes differ.
    """
    n = len(states)
    out = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return out, 0
    keys = [k for k, v in states[0].items() if torch.is_floating_point(v)]
    for i, state in enumerate(states):
        if set(state) != set(states[0]):
            raise ValueError(f"state {i} has different tensor names than state 0")
    numel = sum(states[0][k].numel() for k in keys)
    for key in keys:
        rows = [state[key].detach().to(torch.float64).reshape(-1) for state in states]
        if any(r.numel() != rows[0].numel() for r in rows):
            raise ValueError(f"{key}: shapes differ between states")
        for i in range(n):
            for j in range(i + 1, n):
                value = (rows[i] - rows[j]).pow(2).sum()
                out[i, j] += value
                out[j, i] += value
    return out, numel


def attention_weights(
    distances: Tensor, numel: int, *, alpha_k: float, sigma: float
) -> tuple[Tensor, Tensor]:
    """FedAMP's ξ from squared distances, per parameter and in log space (module docstring).

    Parameters
    ----------
    distances : Tensor
        ``[N, N]`` squared distances ``‖θ_i − θ_j‖²`` (:func:`squared_distances`).
    numel : int
        P, the parameters the distances sum over; ``d̄² = d² / P``.
    alpha_k : float
        The server's step size α_k (> 0).
    sigma : float
        The attention scale σ (> 0), per parameter.

    Returns
    -------
    xi : Tensor
        ``[N, N]`` float64: row i holds ξ_ij, with ξ_ii on the diagonal; every row is
        non-negative and sums to 1.
    capped : Tensor
        ``[N]`` bool: rows whose peer weights summed to more than 1 and were normalised.

    Raises
    ------
    ValueError
        If α_k or σ is not positive, P is not positive, or the matrix is not square.
    """
    if alpha_k <= 0 or sigma <= 0:
        raise ValueError(f"alpha_k and sigma must be positive, got {alpha_k}, {sigma}")
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be square, got shape {tuple(distances.shape)}")
    n = distances.shape[0]
    xi = torch.eye(n, dtype=torch.float64)
    capped = torch.zeros(n, dtype=torch.bool)
    if n < 2:
        return xi, capped
    if numel <= 0:
        raise ValueError(f"the parameter count must be positive, got {numel}")
    per_parameter = distances.to(torch.float64) / numel
    logits = math.log(alpha_k) - math.log(sigma) - per_parameter / sigma
    off = ~torch.eye(n, dtype=torch.bool)
    for i in range(n):
        row = logits[i][off[i]]
        total = torch.logsumexp(row, dim=0)  # log Σ_{j≠i} ξ_ij, never overflows
        if total > 0:  # Σ_{j≠i} ξ_ij > 1: a softmax over the peers, no self weight
            peers = torch.exp(row - total)
            capped[i] = True
            xi[i, i] = 0.0
        else:
            peers = torch.exp(row)
            xi[i, i] = 1.0 - peers.sum()
        xi[i][off[i]] = peers
    return xi, capped


def cloud_model(states: Sequence[Mapping[str, Tensor]], weights: Tensor) -> dict[str, Tensor]:
    """``u_i = Σ_j ξ_ij θ_j`` for one row of ξ (float64 accumulation, each tensor's dtype back).

    Parameters
    ----------
    states : sequence of mappings
        Every client's θ_j, in the order of ξ's columns.
    weights : Tensor
        ``[N]``: row i of ξ (non-negative, summing to 1).
    """
    return weighted_average(states, [float(w) for w in weights])
