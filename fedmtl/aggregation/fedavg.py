"""Weighted averaging of named tensors (FedAvg and everything built on it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Return ``weights`` divided by their sum.

    Raises
    ------
    ValueError
        If a weight is negative or all weights are zero.
    """
    if any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    return [float(w) / total for w in weights]


def weighted_average(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Average named tensors key by key, ``Σ_k w_k x_k / Σ_k w_k``.

    Parameters
    ----------
    states : sequence of mappings
        One ``name → tensor`` mapping per participant; all must have the same keys and shapes.
    weights : sequence of float
        One non-negative weight per participant (e.g. its number of training examples).

    Returns
    -------
    dict
        The average, accumulated in float64 and cast back to each tensor's dtype. Integer tensors
        (e.g. BatchNorm counters) are taken from the first participant.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    norm = normalised_weights(weights)
    keys = list(states[0].keys())
    for i, state in enumerate(states[1:], start=1):
        if list(state.keys()) != keys:
            missing = set(keys) ^ set(state.keys())
            raise ValueError(f"participant {i} has different tensor names: {sorted(missing)[:5]}")
    out: dict[str, Tensor] = {}
    for key in keys:
        first = states[0][key]
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, norm):
            tensor = state[key]
            if tensor.shape != first.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(first.shape)}")
            acc.add_(tensor.to(torch.float64), alpha=w)
        out[key] = acc.to(first.dtype)
    return out
