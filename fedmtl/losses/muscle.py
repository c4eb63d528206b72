"""Multi-client contrastive losses: the exact factorised Muscle loss, pairwise InfoNCE and GRAM."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# The exp-space contraction divides every factor by its maximum, so the largest tuple weight is
# at least exp(-range of the peer-peer log-weights). Below this range float64 cannot underflow
# (its smallest normal number is e^-708); above it the log-space path takes over.
_EXP_SAFE_RANGE = 600.0
# Elements per anchor chunk of the log-space grid (float64: 32 MiB).
_LOG_CHUNK_ELEMENTS = 1 << 22
_REDUCTIONS = ("mean", "sum", "none")


def peer_pairs(num_peers: int) -> list[tuple[int, int]]:
    """Return the peer pairs ``(m, m')``, ``m < m'``, in the order used for peer-peer matrices.

    Parameters
    ----------
    num_peers : int
        M, the number of peers.

    Returns
    -------
    list of tuple
        ``itertools.combinations(range(M), 2)``: ``M(M-1)/2`` pairs.
    """
    return list(combinations(range(num_peers), 2))


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_inputs(anchor: Tensor, peers: Sequence[Tensor]) -> None:
    if anchor.dim() != 2:
        raise ValueError(f"anchor must be [B, d], got shape {tuple(anchor.shape)}")
    if len(peers) == 0:
        raise ValueError("the contrastive loss needs at least one peer")
    for m, peer in enumerate(peers):
        if peer.shape != anchor.shape:
            raise ValueError(
                f"peer {m} has shape {tuple(peer.shape)}, expected {tuple(anchor.shape)} "
                "(same public batch, same representation size)"
            )


def _tuple_log_weights(peer_peer: Tensor, num_peers: int, batch: int) -> Tensor:
    """``log α`` over all tuples as an M-dimensional ``[B, …, B]`` tensor (B^M numbers, no d).

    Built one peer at a time, so that only two additions touch all B^M entries.
    """
    index = {pair: p for p, pair in enumerate(peer_pairs(num_peers))}
    log_alpha = peer_peer.new_zeros((batch,))
    for k in range(1, num_peers):
        # The pair terms that involve peer k, over (j_0, …, j_k).
        with_k = peer_peer[index[(0, k)]]
        for m in range(1, k):
            with_k = with_k.unsqueeze(-2) + peer_peer[index[(m, k)]].reshape(
                (1,) * m + (batch,) * 2
            )
        log_alpha = log_alpha.unsqueeze(-1) + with_k
    return log_alpha


def _log_partition_exp(anchor_peer: Tensor, log_alpha: Tensor) -> Tensor:
    """``log D_i`` by max-shifted exp-space contraction: one GEMM, then M-1 batched products.

    Work O(B^{M+1}) (the GEMM), memory O(B^M); exact while ``range(log_alpha)`` is moderate.
    """
    num_peers, batch, _ = anchor_peer.shape
    row_max = anchor_peer.amax(dim=2, keepdim=True).detach()
    unary = torch.exp(anchor_peer - row_max)  # [M, anchors, B], entries in (0, 1]
    alpha_max = log_alpha.max().detach()
    weights = torch.exp(log_alpha - alpha_max)  # [B]*M, entries in (0, 1]
    # Sum out the last peer's index with one matrix product: [anchors, B^{M-1}].
    acc = unary[num_peers - 1] @ weights.reshape(-1, batch).T
    for m in range(num_peers - 2, -1, -1):
        # Per anchor, a matrix-vector product sums out peer m's index: [anchors, B^m].
        acc = torch.bmm(acc.reshape(batch, -1, batch), unary[m].unsqueeze(-1)).reshape(batch, -1)
    return acc.reshape(-1).log() + alpha_max + row_max.sum(dim=0).reshape(-1)


def _log_partition_log_chunk(anchor_peer: Tensor, log_alpha: Tensor) -> Tensor:
    num_peers, chunk, batch = anchor_peer.shape
    grid = log_alpha.unsqueeze(0)
    for m in range(num_peers):
        shape = [chunk] + [1] * num_peers
        shape[1 + m] = batch
        grid = grid + anchor_peer[m].reshape(shape)
    return torch.logsumexp(grid.reshape(chunk, -1), dim=1)


def _log_partition_log(anchor_peer: Tensor, log_alpha: Tensor) -> Tensor:
    """``log D_i`` by logsumexp over the tuple grid, chunked over anchors (never underflows).

    Work O(B^{M+1}); memory O(chunk · B^M): each chunk is recomputed in backward (checkpoint).
    """
    batch = anchor_peer.shape[1]
    chunk = max(1, _LOG_CHUNK_ELEMENTS // log_alpha.numel())
    parts = []
    for start in range(0, batch, chunk):
        block = anchor_peer[:, start : start + chunk]
        if torch.is_grad_enabled() and (block.requires_grad or log_alpha.requires_grad):
            part = checkpoint(_log_partition_log_chunk, block, log_alpha, use_reentrant=False)
        else:
            part = _log_partition_log_chunk(block, log_alpha)
        parts.append(part)
    return torch.cat(parts)


def _muscle_per_sample(anchor_peer: Tensor, peer_peer: Tensor) -> Tensor:
    """Per-anchor Muscle loss (float64) from the score matrices; see `muscle_loss_from_scores`."""
    num_peers, batch, _ = anchor_peer.shape
    log_numerator = anchor_peer.diagonal(dim1=1, dim2=2).sum(dim=0)
    if num_peers == 1:
        return torch.logsumexp(anchor_peer[0], dim=1) - log_numerator
    log_numerator = log_numerator + peer_peer.diagonal(dim1=1, dim2=2).sum(dim=0)
    log_alpha = _tuple_log_weights(peer_peer, num_peers, batch)
    spread = (log_alpha.max() - log_alpha.min()).item()
    if spread <= _EXP_SAFE_RANGE:
        log_partition = _log_partition_exp(anchor_peer, log_alpha)
    else:
        log_partition = _log_partition_log(anchor_peer, log_alpha)
    return log_partition - log_numerator


def muscle_loss_from_scores(
    anchor_peer: Tensor, peer_peer: Tensor, reduction: str = "mean"
) -> Tensor:
    """Muscle loss from the anchor-peer and peer-peer score matrices (exact, factorised).

    With ``U^m = anchor_peer[m]`` and ``P^{mm'} = peer_peer[p]`` (``p`` indexing `peer_pairs`),
    the loss of anchor ``i`` is ``log D_i − log num_i`` with
    ``log num_i = Σ_m U^m[i,i] + Σ_{m<m'} P^{mm'}[i,i]`` and
    ``D_i = Σ_{j∈[B]^M} exp(Σ_m U^m[i,j_m] + Σ_{m<m'} P^{mm'}[j_m,j_m'])``.
    The sum over the B^M tuples (positive tuple included) is contracted, never enumerated: an
    exp-space contraction (one matrix product for M = 2, O(B^{M+1}) work and O(B^M) memory),
    or, when the peer-peer weights span more than e^600 (un-normalised inputs), a chunked
    logsumexp over the tuple grid. Both run in float64.

    Parameters
    ----------
    anchor_peer : Tensor
        ``[M, B, B]``, ``U^m[i, j] = z_i^n · z_j^m / τ``.
    peer_peer : Tensor
        ``[M(M-1)/2, B, B]``, ``P^{mm'}[a, b] = −γ z_a^m · z_b^{m'}`` (the pair factors of
        ``log α``); ``[0, B, B]`` for M = 1.
    reduction : {"mean", "sum", "none"}
        Over the B anchors; ``"none"`` returns ``[B]``.

    Returns
    -------
    Tensor
        The loss in ``anchor_peer``'s dtype.
    """
    _check_reduction(reduction)
    if anchor_peer.dim() != 3 or anchor_peer.shape[1] != anchor_peer.shape[2]:
        raise ValueError(f"anchor_peer must be [M, B, B], got {tuple(anchor_peer.shape)}")
    num_peers, batch, _ = anchor_peer.shape
    expected = (len(peer_pairs(num_peers)), batch, batch)
    if tuple(peer_peer.shape) != expected:
        raise ValueError(f"peer_peer must be {list(expected)}, got {list(peer_peer.shape)}")
    per_sample = _muscle_per_sample(anchor_peer.double(), peer_peer.double())
    return _reduce(per_sample.to(anchor_peer.dtype), reduction)


def muscle_loss(
    anchor: Tensor,
    peers: Sequence[Tensor],
    tau: float = 0.2,
    tau_prev: float = 0.15,
    reduction: str = "mean",
) -> Tensor:
    """Muscle loss of FedMuscle (Setayesh et al., ICLR 2026), exact.

    For anchor row ``i``, with tuples ``j ∈ [B]^M`` and ``u_j = Σ_m z_{j_m}^m``::

        L_i = −log [ α_(i,…,i) exp(z_i · u_(i,…,i) / τ) / Σ_j α_j exp(z_i · u_j / τ) ]
        α_j = exp(−Σ_{m<m'} γ z_{j_m}^m · z_{j_m'}^{m'}),   γ = 1/tau_prev − 1/tau

    The positive tuple ``(i, …, i)`` is part of the denominator. Computed from the B×B
    anchor-peer and peer-peer Gram matrices (float64) by `muscle_loss_from_scores`; the B^M
    tuples and the paper's B^M × d target matrix are never built. Gradients (autograd) are
    exact with respect to the anchor and to the peers; callers that treat peers as constants
    pass detached peers. Inputs are used as given (normalise them beforehand); large norms stay
    finite.

    Parameters
    ----------
    anchor : Tensor
        ``[B, d]``, this client's representations of the public batch.
    peers : sequence of Tensor
        M tensors ``[B, d]``, the peers' representations of the same batch, rows aligned.
    tau : float
        τ^(N), the anchor-peer temperature (paper: 0.2).
    tau_prev : float
        τ^(N−1), the peer-peer temperature of the (N−1)-variable model (paper: 0.15).
    reduction : {"mean", "sum", "none"}
        Over the B anchors; ``"none"`` returns ``[B]``.

    Returns
    -------
    Tensor
        The loss, in ``anchor``'s dtype, on ``anchor``'s device. M = 1 is InfoNCE; γ = 0
        (``tau_prev == tau``) is exactly `pairwise_infonce_loss`.
    """
    _check_reduction(reduction)
    _check_inputs(anchor, peers)
    if tau <= 0 or tau_prev <= 0:
        raise ValueError(f"temperatures must be positive, got tau={tau}, tau_prev={tau_prev}")
    gamma = 1.0 / tau_prev - 1.0 / tau
    stacked = torch.stack([p.double() for p in peers])  # [M, B, d]
    anchor_peer = torch.einsum("id,mjd->mij", anchor.double(), stacked) / tau
    pairs = peer_pairs(len(peers))
    if pairs:
        first, second = zip(*pairs)
        peer_peer = -gamma * stacked[list(first)] @ stacked[list(second)].transpose(1, 2)
    else:
        peer_peer = stacked.new_zeros((0, anchor.shape[0], anchor.shape[0]))
    per_sample = _muscle_per_sample(anchor_peer, peer_peer)
    return _reduce(per_sample.to(anchor.dtype), reduction)


def pairwise_infonce_loss(
    anchor: Tensor, peers: Sequence[Tensor], tau: float = 0.2, reduction: str = "mean"
) -> Tensor:
    """Sum over peers of the one-directional InfoNCE anchor → peer (the pairwise baseline).

    ``L_i = Σ_m [logsumexp_j(z_i · z_j^m / τ) − z_i · z_i^m / τ]``; equal to `muscle_loss`
    with ``tau_prev == tau`` (γ = 0), per sample.

    Parameters
    ----------
    anchor : Tensor
        ``[B, d]``.
    peers : sequence of Tensor
        M tensors ``[B, d]``, rows aligned with ``anchor``.
    tau : float
        Temperature.
    reduction : {"mean", "sum", "none"}
        Over the B anchors; ``"none"`` returns ``[B]``.

    Returns
    -------
    Tensor
        The loss in ``anchor``'s dtype.
    """
    _check_reduction(reduction)
    _check_inputs(anchor, peers)
    targets = torch.arange(anchor.shape[0], device=anchor.device)
    per_sample = torch.stack(
        [F.cross_entropy(anchor @ peer.T / tau, targets, reduction="none") for peer in peers]
    ).sum(dim=0)
    return _reduce(per_sample, reduction)


def gram_volume_loss(
    anchor: Tensor,
    peers: Sequence[Tensor],
    tau: float = 0.07,
    *,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """GRAM contrastive loss (Cicchetti et al., ICLR 2025, ``ispamm/GRAM``) over the batch.

    Exact form implemented: ``V[i, j] = sqrt(|det G_ij|)``, the volume of the parallelotope
    spanned by ``(z_i^n, z_j^1, …, z_j^M)``, with ``G_ij`` their ``(M+1)×(M+1)`` Gram matrix
    (the peers of one data point stay together: B negatives per anchor, not B^M). The loss is
    ``½[CE(−V/τ, diag) + CE(−Vᵀ/τ, diag)]`` with label smoothing, as in GRAM's retrieval
    loss. Determinants are taken in float64 and ``|det|`` is floored at 1e-30 before the square
    root so that a perfectly aligned (zero-volume) tuple has a finite gradient.

    Parameters
    ----------
    anchor : Tensor
        ``[B, d]`` (unit-norm rows, as in GRAM).
    peers : sequence of Tensor
        M tensors ``[B, d]``, rows aligned with ``anchor``.
    tau : float
        Temperature (GRAM: 0.07).
    label_smoothing : float
        Cross-entropy label smoothing (GRAM: 0.1).
    reduction : {"mean", "sum", "none"}
        Over the B data points; ``"none"`` returns ``[B]`` (row i: anchor-to-tuples CE of
        anchor i averaged with tuple-to-anchors CE of tuple i).

    Returns
    -------
    Tensor
        The loss in ``anchor``'s dtype.
    """
    _check_reduction(reduction)
    _check_inputs(anchor, peers)
    batch = anchor.shape[0]
    vectors = [anchor.double()] + [p.double() for p in peers]
    # Row a, column b of the Gram matrix for (anchor i, tuple j): a = 0 is the anchor.
    rows = []
    for a, va in enumerate(vectors):
        row = []
        for b, vb in enumerate(vectors):
            if a == 0 and b == 0:
                entry = (va * va).sum(1)[:, None].expand(batch, batch)
            elif a == 0:
                entry = va @ vb.T
            elif b == 0:
                entry = vb @ va.T
            else:
                entry = (va * vb).sum(1)[None, :].expand(batch, batch)
            row.append(entry)
        rows.append(torch.stack(row, dim=-1))
    gram = torch.stack(rows, dim=-2)  # [B, B, M+1, M+1]
    volume = torch.linalg.det(gram).abs().clamp_min(1e-30).sqrt()
    logits = (-volume / tau).to(anchor.dtype)
    targets = torch.arange(batch, device=anchor.device)
    per_sample = 0.5 * (
        F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
        + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing, reduction="none")
    )
    return _reduce(per_sample, reduction)
