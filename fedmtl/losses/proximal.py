"""Proximal pull toward reference tensors: FedProx, Ditto and M-Fed's encoder alignment."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def proximal_term(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    reference: Mapping[str, Tensor],
    coefficient: float,
) -> Tensor:
    """Return ``coefficient · Σ_p ‖w_p − g_p‖²`` over parameters that have a reference.

    The gradient with respect to ``w`` is ``2 · coefficient · (w − g)``; ``reference`` is treated
    as a constant (it is detached here), so the pull never moves the reference.

    Parameters
    ----------
    named_parameters : iterable of (name, parameter)
        The trainable parameters, e.g. ``model.named_parameters()``.
    reference : mapping
        ``name → tensor`` to pull toward; names absent from it are not regularised.
    coefficient : float
        The multiplier (λ in M-Fed, μ/2 in FedProx, λ/2 in Ditto).
    """
    total: Tensor | None = None
    for name, param in named_parameters:
        ref = reference.get(name)
        if ref is None:
            continue
        diff = param - ref.detach().to(device=param.device, dtype=param.dtype)
        term = diff.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return coefficient * total
