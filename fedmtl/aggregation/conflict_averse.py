"""Conflict-averse (CAGrad) direction over client updates, FedHCA² encoder aggregation (Eq. 6–9)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

# SLSQP settings: the problem is solved on a Gram matrix scaled to unit mean squared update norm,
# so an absolute tolerance is meaningful whatever the size of the updates.
_SLSQP_FTOL = 1e-14
_SLSQP_MAXITER = 1000
# Keeps sqrt differentiable where G w = 0; relative to the unit-scaled Gram matrix.
_SQRT_EPS = 1e-14
# Columns per float32 partial Gram product (see gram_matrix).
_GRAM_CHUNK = 1 << 16


def rescale_divisor(c: float, rescale: int) -> float:
    """Return the divisor the official code applies to the CAGrad direction.

    Parameters
    ----------
    c : float
        CAGrad constant (``ca_c``).
    rescale : int
        0: no division; 1: divide by ``1 + c²`` (default in FedHCA²); 2: divide by ``1 + c``.
    """
    if rescale == 0:
        return 1.0
    if rescale == 1:
        return 1.0 + c * c
    if rescale == 2:
        return 1.0 + c
    raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")


def _solve_simplex_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """Minimise ``F(w) = wᵀA 1/N + c·‖g0‖·sqrt(wᵀAw)`` over the probability simplex.

    ``gram`` must already be scaled (e.g. to unit mean diagonal); ``‖g0‖ = sqrt(mean(A))``.
    """
    n = gram.shape[0]
    start = np.full(n, 1.0 / n)
    b = gram @ start  # A·(1/N)1, so that wᵀb = ⟨g_w, g0⟩
    c_eff = c * float(np.sqrt(max(gram.mean(), 0.0)))

    def objective(w: np.ndarray) -> float:
        return float(w @ b + c_eff * np.sqrt(w @ gram @ w + _SQRT_EPS))

    def gradient(w: np.ndarray) -> np.ndarray:
        aw = gram @ w
        return b + c_eff * aw / np.sqrt(w @ aw + _SQRT_EPS)

    result = minimize(
        objective,
        start,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[
            {"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)}
        ],
        options={"ftol": _SLSQP_FTOL, "maxiter": _SLSQP_MAXITER},
    )
    # Clip the solver's tiny bound violations and renormalise so w lies exactly on the simplex.
    w = np.clip(result.x, 0.0, 1.0)
    return w / w.sum()


def conflict_averse_coefficients(
    gram: Tensor, c: float = 0.4, rescale: int = 1
) -> tuple[Tensor, Tensor]:
    """Solve CAGrad on a Gram matrix and express the direction as a combination of the updates.

    The direction is ``U = (g0 + λ·g_w) / r`` with ``g0 = mean_i Δ_i``, ``g_w = Σ_i w_i Δ_i``,
    ``λ = c‖g0‖ / ‖g_w‖`` and ``r`` from :func:`rescale_divisor`, i.e. ``U = Σ_i v_i Δ_i`` with
    ``v = (1/N + λ·w) / r``. ``F`` is positively homogeneous in ``A``, so ``A`` is divided by its
    mean diagonal (the mean squared update norm) before solving in float64: ``w`` does not depend
    on the size of the updates. Unlike the official code no ``1e-8`` terms enter ``‖g0‖``, ``c_eff``
    or ``λ``; they only matter for updates of norm ≲ 1e-3 and would make ``U`` scale-dependent.

    Parameters
    ----------
    gram : Tensor
        ``[N, N]`` Gram matrix ``A_ij = ⟨Δ_i, Δ_j⟩`` of the client updates.
    c : float
        CAGrad constant (``ca_c``, 0.4 in FedHCA²).
    rescale : int
        See :func:`rescale_divisor`.

    Returns
    -------
    coefficients : Tensor
        ``v``, float64 ``[N]`` on ``gram``'s device, with ``U = v @ updates``.
    weights : Tensor
        ``w``, float64 ``[N]`` on the probability simplex. Uniform when all updates are zero.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {tuple(gram.shape)}")
    divisor = rescale_divisor(c, rescale)
    n = gram.shape[0]
    a = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = (a + a.T) / 2.0  # exact symmetry for the solver
    scale = float(np.trace(a)) / n
    uniform = np.full(n, 1.0 / n)
    if not np.isfinite(scale):
        raise ValueError("gram matrix is not finite")
    if scale <= np.finfo(np.float64).tiny:
        # All updates are zero: every w is optimal and U = g0 = 0.
        w, lam = uniform, 0.0
    else:
        a = a / scale
        w = _solve_simplex_weights(a, c)
        gw_sq = float(w @ a @ w)
        # ‖g_w‖ ≈ 0 only when the weighted updates cancel; g_w then adds nothing to U (its
        # direction would be rounding noise).
        lam = c * float(np.sqrt(max(a.mean(), 0.0)) / np.sqrt(gw_sq)) if gw_sq > _SQRT_EPS else 0.0
    v = (uniform + lam * w) / divisor
    f64, device = torch.float64, gram.device
    return torch.as_tensor(v, dtype=f64, device=device), torch.as_tensor(
        w, dtype=f64, device=device
    )


def gram_matrix(updates: Tensor) -> Tensor:
    """Return the float64 Gram matrix ``updates @ updates.T`` of ``[N, d]`` updates.

    Lower-precision inputs are multiplied per chunk of columns and the chunks summed in float64:
    one float32 matmul over d = 27.5 M accumulates the whole length in float32 and was measured
    ~1 % off on the diagonal, which alone moves the CAGrad weights by ~1e-3.
    """
    if updates.dtype == torch.float64:
        return updates @ updates.T
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for start in range(0, d, _GRAM_CHUNK):
        part = updates[:, start : start + _GRAM_CHUNK].float()
        gram += (part @ part.T).double()
    return gram


def conflict_averse_direction(
    updates: Tensor, c: float = 0.4, rescale: int = 1
) -> tuple[Tensor, Tensor]:
    """Compute the conflict-averse update direction ``U`` of ``N`` client updates.

    CAGrad (Liu et al., NeurIPS'21) with every client as one task, as in FedHCA² (Eq. 6–9):
    ``w* = argmin_{w ∈ simplex} ⟨g_w, g0⟩ + c‖g0‖‖g_w‖`` and
    ``U = (g0 + c‖g0‖/‖g_w‖ · g_w) / (1 + c²)`` (see :func:`conflict_averse_coefficients`).

    Parameters
    ----------
    updates : Tensor
        ``[N, d]`` client updates ``Δ_i = θ_i^local − θ_i^last`` (one row per client).
    c : float
        CAGrad constant (``ca_c``).
    rescale : int
        0: no division; 1: divide by ``1 + c²``; 2: divide by ``1 + c``.

    Returns
    -------
    direction : Tensor
        ``U``, ``[d]``, dtype and device of ``updates``.
    weights : Tensor
        ``w*``, float64 ``[N]`` on ``updates``' device.
    """
    if updates.ndim != 2:
        raise ValueError(f"updates must be [N, d], got shape {tuple(updates.shape)}")
    gram = gram_matrix(updates)
    coefficients, weights = conflict_averse_coefficients(gram, c=c, rescale=rescale)
    return coefficients.to(updates.dtype) @ updates, weights
