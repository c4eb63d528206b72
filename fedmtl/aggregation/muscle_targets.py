"""FedMuscle server side: per-batch peer draw and the three exact client payload protocols."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from fedmtl.losses.muscle import muscle_loss, muscle_loss_from_scores, peer_pairs

PROTOCOLS = ("peers", "targets", "gradient")


def draw_peers(
    client_ids: Sequence[str],
    num_peers: int,
    *,
    seed: int,
    round: int,
    batch: int,
    available: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """Draw M distinct peers for every client, re-drawn for every public batch.

    Each client's draw is seeded by a hash of ``(seed, round, batch, client_id)`` and taken from
    the sorted pool, so it is deterministic, independent of the order of ``client_ids`` and of
    the other clients' draws. A client with fewer than ``num_peers`` available others gets all of
    them: its batch proceeds with fewer peers (the Muscle loss is defined for any M ≥ 1), and
    with an empty list when it has none (the caller skips its alignment step for that batch).

    Parameters
    ----------
    client_ids : sequence of str
        The anchors: every client to draw peers for (unique).
    num_peers : int
        M ≥ 1.
    seed, round, batch : int
        Experiment seed, round number and public-batch index.
    available : collection of str, optional
        The clients whose representations of this batch are usable (e.g. those that replied
        and passed validation); a subset of ``client_ids``. Defaults to all of them.

    Returns
    -------
    dict
        ``client_id → sorted list of peer ids`` (never containing the client itself), keyed in
        sorted order.
    """
    if num_peers < 1:
        raise ValueError(f"num_peers must be at least 1, got {num_peers}")
    ids = sorted(client_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"client_ids contains duplicates: {ids}")
    pool = ids if available is None else sorted(set(available))
    unknown = set(pool) - set(ids)
    if unknown:
        raise ValueError(f"available clients not in client_ids: {sorted(unknown)}")
    draws: dict[str, list[str]] = {}
    for client_id in ids:
        others = [c for c in pool if c != client_id]
        key = f"{seed}|{round}|{batch}|{client_id}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        draws[client_id] = sorted(rng.sample(others, min(num_peers, len(others))))
    return draws


def validate_representation(
    client_id: str, rep: Tensor, *, shape: Sequence[int] | None = None
) -> None:
    """Raise ``ValueError`` naming ``client_id`` unless ``rep`` is a finite float ``[B, d]``.

    Parameters
    ----------
    client_id : str
        Used in the error message.
    rep : Tensor
        The representation matrix of one public batch.
    shape : sequence of int, optional
        The required ``[B, d]``.
    """
    if not isinstance(rep, Tensor) or not torch.is_floating_point(rep) or rep.dim() != 2:
        got = tuple(rep.shape) if isinstance(rep, Tensor) else type(rep).__name__
        raise ValueError(f"client {client_id!r}: representation must be a float [B, d], got {got}")
    if shape is not None and tuple(rep.shape) != tuple(shape):
        raise ValueError(
            f"client {client_id!r}: representation shape {tuple(rep.shape)}, "
            f"expected {tuple(shape)}"
        )
    if not bool(torch.isfinite(rep).all()):
        raise ValueError(f"client {client_id!r}: representation has non-finite values")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _check_tensor(client: str, name: str, tensor: Tensor | None, shape: Sequence[int]) -> Tensor:
    if tensor is None:
        raise ValueError(f"client {client!r}: payload lacks {name!r}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"client {client!r}: payload {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(shape)}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"client {client!r}: payload {name!r} has non-finite values")
    return tensor


def client_payload(
    protocol: str,
    anchor_id: str,
    reps: Mapping[str, Tensor],
    peer_ids: Sequence[str],
    tau: float = 0.2,
    tau_prev: float = 0.15,
) -> dict[str, Tensor]:
    """Build what the server sends client ``anchor_id`` for one public batch.

    All three protocols give the client the same gradient of its own loss
    ``L_n = mean_i L_i(Z^n; Z^{m∈peers})`` (peers held constant):

    - ``"peers"``: ``{"peers": [M, B, d]}``, the peers' matrices in ``peer_ids`` order; the
      client evaluates `muscle_loss` itself.
    - ``"targets"``: the paper's ``S^n`` and ``α^n`` in their exact compact form.
      ``S^n`` (row ``j``: ``s_j = Σ_m z_{j_m}^m / τ``, B^M × d) is a sum of per-peer terms, so
      it is sent as its factors ``{"targets": [M, B, d]}`` = ``Z^m / τ``; ``log α^n`` (B^M) is a
      sum of pair terms, sent as ``{"log_alpha": [M(M-1)/2, B, B]}`` =
      ``−γ Z^m Z^{m'ᵀ}`` (pairs in `peer_pairs` order). ``s_j = Σ_m targets[m, j_m]`` and
      ``log α_j = Σ_{m<m'} log_alpha[p(m, m'), j_m, j_m']`` recover every row exactly.
    - ``"gradient"``: ``{"grad": ∂L_n/∂Z^n [B, d], "loss": L_n}``, computed here; the client
      back-propagates ``grad`` through the forward pass that produced ``Z^n``.

    Parameters
    ----------
    protocol : {"peers", "targets", "gradient"}
        What to send.
    anchor_id : str
        The receiving client.
    reps : mapping
        ``client_id → [B, d]`` representations of this batch (the anchor's and its peers').
    peer_ids : sequence of str
        The anchor's peers for this batch (from `draw_peers`), at least one.
    tau, tau_prev : float
        τ^(N) and τ^(N−1); γ = 1/tau_prev − 1/tau.

    Returns
    -------
    dict
        Detached tensors on the representations' device, in their dtype.
    """
    _check_protocol(protocol)
    if anchor_id not in reps:
        raise ValueError(f"client {anchor_id!r}: no representation for this batch")
    if not peer_ids:
        raise ValueError(f"client {anchor_id!r}: no peers for this batch")
    if anchor_id in peer_ids or len(set(peer_ids)) != len(peer_ids):
        raise ValueError(f"client {anchor_id!r}: peers must be distinct others, got {peer_ids}")
    anchor = reps[anchor_id].detach()
    validate_representation(anchor_id, anchor)
    peers = []
    for peer_id in peer_ids:
        if peer_id not in reps:
            raise ValueError(f"client {peer_id!r}: no representation for this batch")
        peer = reps[peer_id].detach()
        validate_representation(peer_id, peer, shape=anchor.shape)
        peers.append(peer.to(anchor.dtype))
    stacked = torch.stack(peers)
    if protocol == "peers":
        return {"peers": stacked}
    if protocol == "targets":
        gamma = 1.0 / tau_prev - 1.0 / tau
        pairs = peer_pairs(len(peers))
        wide = stacked.double()
        log_alpha = wide.new_zeros((len(pairs), anchor.shape[0], anchor.shape[0]))
        for p, (m, m2) in enumerate(pairs):
            log_alpha[p] = -gamma * wide[m] @ wide[m2].T
        return {"targets": stacked / tau, "log_alpha": log_alpha.to(anchor.dtype)}
    z = anchor.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = muscle_loss(z, peers, tau, tau_prev, reduction="mean")
        (grad,) = torch.autograd.grad(loss, z)
    return {"grad": grad, "loss": loss.detach()}


def client_loss_from_payload(
    protocol: str,
    z_anchor: Tensor,
    payload: Mapping[str, Tensor],
    tau: float = 0.2,
    tau_prev: float = 0.15,
    *,
    client_id: str = "this client",
) -> Tensor:
    """The client's objective for one public batch, from the server's payload.

    Parameters
    ----------
    protocol : {"peers", "targets", "gradient"}
        The protocol the payload was built with (see `client_payload`).
    z_anchor : Tensor
        ``[B, d]``, the client's current representations of the batch (attached to its model).
    payload : mapping
        The server's tensors.
    tau, tau_prev : float
        Temperatures (used by ``"peers"``; the other payloads already contain them).
    client_id : str
        Named in validation errors.

    Returns
    -------
    Tensor
        Scalar. For ``"peers"`` and ``"targets"`` the Muscle loss (mean over anchors); for
        ``"gradient"`` the surrogate ``Σ z_anchor ∘ grad``, whose value is not the loss
        (``payload["loss"]`` is) but whose gradient w.r.t. ``z_anchor`` is exactly ``grad``.
    """
    _check_protocol(protocol)
    validate_representation(client_id, z_anchor)
    batch, dim = z_anchor.shape
    if protocol == "gradient":
        grad = _check_tensor(client_id, "grad", payload.get("grad"), (batch, dim))
        return (z_anchor * grad.to(z_anchor.dtype)).sum()
    key = "peers" if protocol == "peers" else "targets"
    factors = payload.get(key)
    num_peers = factors.shape[0] if factors is not None and factors.dim() == 3 else 0
    if num_peers < 1:
        raise ValueError(f"client {client_id!r}: payload {key!r} must be [M, B, d], M ≥ 1")
    factors = _check_tensor(client_id, key, factors, (num_peers, batch, dim))
    if protocol == "peers":
        return muscle_loss(z_anchor, list(factors.unbind(0)), tau, tau_prev, reduction="mean")
    shape = (len(peer_pairs(num_peers)), batch, batch)
    log_alpha = _check_tensor(client_id, "log_alpha", payload.get("log_alpha"), shape)
    anchor_peer = torch.einsum("id,mjd->mij", z_anchor.double(), factors.double())
    loss = muscle_loss_from_scores(anchor_peer, log_alpha.double(), reduction="mean")
    return loss.to(z_anchor.dtype)


def payload_bytes(
    protocol: str, batch: int, dim: int, num_peers: int, dtype: torch.dtype = torch.float32
) -> int:
    """Downlink bytes per client per public batch; the uplink is ``B · d`` in every protocol.

    - ``"peers"``: ``M·B·d``. Reveals the M peers' representations of the public batch.
    - ``"targets"``: ``M·B·d + M(M−1)/2·B²``, against ``B^M·d + B^M`` for the paper's
      materialised ``S^n`` and ``α^n``. The same information as the paper's targets (``S^n``
      row differences already give ``(z_a^m − z_b^m)/τ``), i.e. essentially the peers' matrices
      plus their cross-peer Gram products.
    - ``"gradient"``: ``B·d + 1`` (gradient and loss value). Reveals only ``∂L_n/∂Z^n``, a
      softmax-weighted mixture of peer rows: the least direct exposure, not a formal guarantee.

    Parameters
    ----------
    protocol : {"peers", "targets", "gradient"}
        The protocol.
    batch, dim, num_peers : int
        B, d and M.
    dtype : torch.dtype
        Wire dtype of the tensors.

    Returns
    -------
    int
        Bytes of the payload's tensors (framing not included).
    """
    _check_protocol(protocol)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if protocol == "peers":
        count = num_peers * batch * dim
    elif protocol == "targets":
        count = num_peers * batch * dim + len(peer_pairs(num_peers)) * batch * batch
    else:
        count = batch * dim + 1
    return count * itemsize
