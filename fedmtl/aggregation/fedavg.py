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


class RunningAverage:
    """``Σ_k w_k x_k / Σ_k w_k`` folded one participant at a time (memory flat in their number).

    The server adds each upload as it arrives and may drop it at once: it holds one float64
    accumulator per tensor, however many participants there are.

    Parameters
    ----------
    expected_total : float, optional
        The weight total the caller expects (e.g. the planned participants' example counts).
        Each upload is then added with weight ``w_k / expected_total``, exactly the terms
        :func:`weighted_average` adds, in arrival order, so the result is bit-identical to
        it when the uploads' weights do sum to ``expected_total``. When they do not (a client
        dropped out, reported other counts), the accumulator is rescaled by
        ``expected_total / Σ w_k`` at the end: the same average, within float64 rounding.
        Without it, weights are added raw and the sum is divided at the end.
    """

    def __init__(self, expected_total: float | None = None) -> None:
        if expected_total is not None and expected_total <= 0:
            raise ValueError(f"expected_total must be positive, got {expected_total}")
        self.expected_total = expected_total
        self.total = 0.0
        self.count = 0
        self._keys: list[str] = []
        self._acc: dict[str, Tensor] = {}  # float64 running sums
        self._fixed: dict[str, Tensor] = {}  # integer tensors: the first participant's
        self._like: dict[str, Tensor] = {}  # dtype and shape to return (0-byte views)

    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Fold one participant's tensors in with ``weight``.

        Raises
        ------
        ValueError
            If the weight is negative, or the names or shapes differ from the first
            participant's.
        """
        if weight < 0:
            raise ValueError(f"aggregation weights must be non-negative, got {weight}")
        keys = list(state.keys())
        if not self.count:
            self._keys = keys
            for key, tensor in state.items():
                if torch.is_floating_point(tensor):
                    self._acc[key] = torch.zeros_like(tensor, dtype=torch.float64)
                    self._like[key] = tensor.new_empty(0)
                else:
                    self._fixed[key] = tensor.clone()
        elif keys != self._keys:
            missing = set(self._keys) ^ set(keys)
            raise ValueError(
                f"participant {self.count} has different tensor names: {sorted(missing)[:5]}"
            )
        expected = self.expected_total
        alpha = float(weight) if expected is None else float(weight) / expected
        for key, acc in self._acc.items():
            tensor = state[key]
            if tensor.shape != acc.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(acc.shape)}")
            acc.add_(tensor.to(torch.float64), alpha=alpha)
        self.total += float(weight)
        self.count += 1

    def result(self) -> dict[str, Tensor]:
        """The average, cast back to each tensor's dtype (integer tensors: the first's).

        Raises
        ------
        ValueError
            If nothing was added or the weights sum to zero.
        """
        if not self.count:
            raise ValueError("RunningAverage needs at least one participant")
        if self.total <= 0:
            raise ValueError("aggregation weights sum to zero")
        scale = 1.0 if self.expected_total is None else self.expected_total
        out: dict[str, Tensor] = {}
        for key in self._keys:
            if key in self._fixed:
                out[key] = self._fixed[key]
                continue
            acc = self._acc[key]
            if scale != self.total:  # not the planned total: Σ (w_k/E) x_k · E / Σ w_k
                acc = acc * scale / self.total
            out[key] = acc.to(self._like[key].dtype)
        return out
