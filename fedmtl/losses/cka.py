"""Linear kernels and centred kernel alignment (CKA), FedHeNN's representation distance.

``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with
``HSIC(K, L) = tr(K H L H) / (n − 1)²`` and ``H = I − 11ᵀ/n`` (Kornblith et al., ICML 2019).
Kernels are ``n × n`` whatever each model's feature width, which is why FedHeNN can compare
heterogeneous architectures (Makhija et al., ICML 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_kernel(features: Tensor) -> Tensor:
    """``K = Z Zᵀ`` of ``[n, d]`` representations (float32 or wider)."""
    z = features.flatten(1)
    return z @ z.T


def centre_kernel(kernel: Tensor) -> Tensor:
    """``H K H``: subtract row and column means, add back the grand mean."""
    return (
        kernel - kernel.mean(dim=0, keepdim=True) - kernel.mean(dim=1, keepdim=True) + kernel.mean()
    )


def hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (the paper's name)
    """The biased HSIC estimator ``tr(K H L H) / (n − 1)²``."""
    n = k.shape[0]
    # tr(K H L H) = Σ (H K H) ∘ L, with H idempotent and K, L symmetric.
    return (centre_kernel(k) * l).sum() / float((n - 1) ** 2)


def cka(k: Tensor, l: Tensor, eps: float = 1e-12) -> Tensor:  # noqa: E741
    """Centred kernel alignment of two ``n × n`` kernels, in [0, 1] for PSD kernels.

    Raises
    ------
    ValueError
        If the kernels are not square of one size, or ``n < 2``.
    """
    if k.shape != l.shape or k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 2:
        raise ValueError(
            f"CKA needs two n×n kernels (n ≥ 2), got {tuple(k.shape)}, {tuple(l.shape)}"
        )
    l = l.to(k.dtype)  # noqa: E741
    denominator = torch.sqrt((hsic(k, k) * hsic(l, l)).clamp_min(eps))
    return hsic(k, l) / denominator


def cka_distance(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """``1 − CKA(K, L)``: FedHeNN's proximal distance (0 when the kernels agree)."""
    return 1.0 - cka(k, l)
