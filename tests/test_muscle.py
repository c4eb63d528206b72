"""Muscle loss, baselines and FedMuscle server payloads against brute force and hand values."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fedmtl.losses.muscle as muscle_module
from fedmtl.aggregation.muscle_targets import (
    PROTOCOLS,
    client_loss_from_payload,
    client_payload,
    draw_peers,
    payload_bytes,
)
from fedmtl.losses.muscle import gram_volume_loss, muscle_loss, pairwise_infonce_loss

TAU, TAU_PREV = 0.2, 0.15


def unit_rows(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)


def brute_force_muscle(anchor: Tensor, peers: list[Tensor], tau: float, tau_prev: float) -> Tensor:
    """The paper's formula, enumerating every tuple j ∈ [B]^M (positive included)."""
    gamma = 1.0 / tau_prev - 1.0 / tau
    batch, num_peers = anchor.shape[0], len(peers)
    losses = []
    for i in range(batch):
        log_terms = []
        for j in itertools.product(range(batch), repeat=num_peers):
            members = [peers[m][j[m]] for m in range(num_peers)]
            score = anchor[i] @ torch.stack(members).sum(0) / tau
            log_alpha = -0.5 * sum(
                gamma * members[m] @ members[m2]
                for m in range(num_peers)
                for m2 in range(num_peers)
                if m2 != m
            )
            log_terms.append(score + log_alpha)
        stacked = torch.stack(log_terms)
        positive = list(itertools.product(range(batch), repeat=num_peers)).index((i,) * num_peers)
        # −log(num / den) written in log form so that large norms do not overflow.
        losses.append(torch.logsumexp(stacked, dim=0) - stacked[positive])
    return torch.stack(losses)


def grads(loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("num_peers,batch", [(1, 6), (2, 6), (3, 5)])
@pytest.mark.parametrize("path", ["exp", "log"])
def test_muscle_loss_matches_brute_force(
    num_peers: int, batch: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "log":
        # Force the log-space path, in chunks of one anchor (checkpointed backward).
        monkeypatch.setattr(muscle_module, "_EXP_SAFE_RANGE", -1.0)
        monkeypatch.setattr(muscle_module, "_LOG_CHUNK_ELEMENTS", 1)
    anchor = unit_rows(batch, 7, seed=1).requires_grad_(True)
    peers = [unit_rows(batch, 7, seed=10 + m).requires_grad_(True) for m in range(num_peers)]
    fast = muscle_loss(anchor, peers, TAU, TAU_PREV, reduction="none")
    slow = brute_force_muscle(anchor, peers, TAU, TAU_PREV)
    assert fast.shape == (batch,)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    weights = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)  # a generic upstream gradient
    for g_fast, g_slow in zip(
        grads((fast * weights).sum(), [anchor, *peers]),
        grads((slow * weights).sum(), [anchor, *peers]),
    ):
        torch.testing.assert_close(g_fast, g_slow, rtol=0, atol=1e-10)


def test_reductions_and_loss_lower_bound() -> None:
    anchor, peers = unit_rows(6, 5, 2), [unit_rows(6, 5, 3), unit_rows(6, 5, 4)]
    per_sample = muscle_loss(anchor, peers, reduction="none")
    torch.testing.assert_close(muscle_loss(anchor, peers), per_sample.mean())
    torch.testing.assert_close(muscle_loss(anchor, peers, reduction="sum"), per_sample.sum())
    # Perfectly aligned clients: positive scores are maximal, so the loss is finite and smaller.
    aligned = muscle_loss(anchor, [anchor, anchor], reduction="none")
    assert bool((aligned < per_sample).all())
    with pytest.raises(ValueError, match="reduction"):
        muscle_loss(anchor, peers, reduction="max")
    with pytest.raises(ValueError, match="at least one peer"):
        muscle_loss(anchor, [])
    with pytest.raises(ValueError, match="peer 1 has shape"):
        muscle_loss(anchor, [peers[0], peers[1][:5]])


def test_single_peer_is_infonce() -> None:
    anchor, peer = unit_rows(8, 16, 5), unit_rows(8, 16, 6)
    logits = anchor @ peer.T / TAU
    expected = torch.logsumexp(logits, dim=1) - logits.diagonal()
    # γ plays no role with one peer: any tau_prev gives InfoNCE.
    for tau_prev in (0.05, TAU_PREV, 1.0):
        got = muscle_loss(anchor, [peer], TAU, tau_prev, reduction="none")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_zero_gamma_is_sum_of_pairwise_infonce_per_sample() -> None:
    anchor = unit_rows(7, 9, 7)
    peers = [unit_rows(7, 9, 8 + m) for m in range(3)]
    by_hand = sum(
        torch.logsumexp(anchor @ p.T / TAU, dim=1) - (anchor * p).sum(1) / TAU for p in peers
    )
    pairwise = pairwise_infonce_loss(anchor, peers, TAU, reduction="none")
    torch.testing.assert_close(pairwise, by_hand, rtol=0, atol=1e-12)
    muscle_gamma0 = muscle_loss(anchor, peers, TAU, tau_prev=TAU, reduction="none")
    torch.testing.assert_close(muscle_gamma0, pairwise, rtol=0, atol=1e-12)
    # The statement is specific to γ = 0: the paper's γ = 5/3 gives a different loss.
    muscle_paper = muscle_loss(anchor, peers, TAU, TAU_PREV, reduction="none")
    assert (muscle_paper - pairwise).abs().max() > 1e-3


@pytest.mark.parametrize("num_peers", [1, 2, 3, 4])
def test_large_norm_float32_stays_finite_and_exact(num_peers: int) -> None:
    batch = 4
    anchor32 = (unit_rows(batch, 12, 20, torch.float32) * 1e3).requires_grad_(True)
    peers32 = [unit_rows(batch, 12, 30 + m, torch.float32) * 1e3 for m in range(num_peers)]
    loss = muscle_loss(anchor32, peers32, reduction="none")
    (grad,) = grads(loss.sum(), [anchor32])
    assert loss.dtype == torch.float32
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    anchor64 = anchor32.detach().double().requires_grad_(True)
    reference = brute_force_muscle(anchor64, [p.double() for p in peers32], TAU, TAU_PREV)
    (reference_grad,) = grads(reference.sum(), [anchor64])
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-5, atol=1e-3)


def paper_targets_loss(
    z_anchor: Tensor, peers: list[Tensor], tau: float, tau_prev: float
) -> Tensor:
    """Targets form, literally: S^n (B^M × d), α^n (B^M), logits = Z Sᵀ + log α, positive pos(i)."""
    gamma = 1.0 / tau_prev - 1.0 / tau
    batch, num_peers = z_anchor.shape[0], len(peers)
    tuples = list(itertools.product(range(batch), repeat=num_peers))
    s_rows = torch.stack(
        [torch.stack([p[k] for p, k in zip(peers, j)]).sum(0) / tau for j in tuples]
    )
    log_alpha = torch.stack(
        [
            -sum(
                gamma * peers[m][j[m]] @ peers[m2][j[m2]]
                for m, m2 in itertools.combinations(range(num_peers), 2)
            )
            + z_anchor.new_zeros(())
            for j in tuples
        ]
    )
    logits = z_anchor @ s_rows.T + log_alpha
    positive = [i * (batch**num_peers - 1) // (batch - 1) for i in range(batch)]
    return (torch.logsumexp(logits, dim=1) - logits[range(batch), positive]).mean()


@pytest.mark.parametrize("num_peers", [1, 2, 3])
def test_three_protocols_give_identical_client_gradients(num_peers: int) -> None:
    batch, features, dim = 5, 6, 4
    clients = ["a", "b", "c", "d"]
    inputs = torch.randn(batch, features, generator=torch.Generator().manual_seed(3)).double()
    projectors = {c: torch.nn.Linear(features, dim).double() for c in clients}
    reps = {c: F.normalize(projectors[c](inputs), dim=1).detach() for c in clients}
    peer_ids = draw_peers(clients, num_peers, seed=0, round=1, batch=0)["a"]
    assert len(peer_ids) == num_peers

    def client_step(protocol: str) -> tuple[Tensor, list[Tensor]]:
        payload = client_payload(protocol, "a", reps, peer_ids, TAU, TAU_PREV)
        z = F.normalize(projectors["a"](inputs), dim=1)  # the client's own forward pass
        surrogate = client_loss_from_payload(protocol, z, payload, TAU, TAU_PREV, client_id="a")
        params = list(projectors["a"].parameters())
        return surrogate, grads(surrogate, params)

    z = F.normalize(projectors["a"](inputs), dim=1)
    peers = [reps[p] for p in peer_ids]
    reference = muscle_loss(z, peers, TAU, TAU_PREV)
    reference_grads = grads(reference, list(projectors["a"].parameters()))
    z_paper = F.normalize(projectors["a"](inputs), dim=1)
    paper = paper_targets_loss(z_paper, peers, TAU, TAU_PREV)
    torch.testing.assert_close(paper, reference, rtol=0, atol=1e-12)
    for g_paper, g_ref in zip(grads(paper, list(projectors["a"].parameters())), reference_grads):
        torch.testing.assert_close(g_paper, g_ref, rtol=0, atol=1e-12)

    for protocol in PROTOCOLS:
        value, client_grads = client_step(protocol)
        if protocol != "gradient":
            torch.testing.assert_close(value, reference, rtol=0, atol=1e-12)
        for g_client, g_ref in zip(client_grads, reference_grads):
            torch.testing.assert_close(g_client, g_ref, rtol=0, atol=1e-12)
    loss_sent = client_payload("gradient", "a", reps, peer_ids, TAU, TAU_PREV)["loss"]
    torch.testing.assert_close(loss_sent, reference.detach(), rtol=0, atol=1e-12)


def test_payload_sizes_match_payload_bytes_and_hand_values() -> None:
    batch, dim, num_peers = 20, 128, 3
    reps = {c: unit_rows(batch, dim, k, torch.float32) for k, c in enumerate("abcd")}
    for protocol in PROTOCOLS:
        payload = client_payload(protocol, "a", reps, ["b", "c", "d"])
        sent = sum(t.numel() * t.element_size() for t in payload.values())
        assert sent == payload_bytes(protocol, batch, dim, num_peers, torch.float32)
    assert payload_bytes("peers", 20, 128, 3) == 3 * 20 * 128 * 4
    assert payload_bytes("targets", 20, 128, 3) == (3 * 20 * 128 + 3 * 20 * 20) * 4
    assert payload_bytes("gradient", 20, 128, 3) == (20 * 128 + 1) * 4
    assert payload_bytes("gradient", 20, 128, 5, torch.float16) == (20 * 128 + 1) * 2
    with pytest.raises(ValueError, match="protocol"):
        payload_bytes("weights", 20, 128, 3)


def test_payload_validation_names_the_client() -> None:
    good = unit_rows(4, 3, 0)
    bad = good.clone()
    bad[1, 2] = math.nan
    reps = {"alice": good, "bob": unit_rows(4, 3, 1), "carol": bad, "dave": good[:3]}
    with pytest.raises(ValueError, match=r"'carol'.*non-finite"):
        client_payload("peers", "alice", reps, ["bob", "carol"])
    with pytest.raises(ValueError, match=r"'dave'.*shape"):
        client_payload("targets", "alice", reps, ["dave"])
    with pytest.raises(ValueError, match=r"'erin'.*no representation"):
        client_payload("gradient", "alice", reps, ["erin"])
    with pytest.raises(ValueError, match=r"'alice'.*no peers"):
        client_payload("peers", "alice", reps, [])
    with pytest.raises(ValueError, match=r"'alice'.*distinct others"):
        client_payload("peers", "alice", reps, ["alice", "bob"])
    payload = client_payload("gradient", "alice", reps, ["bob"])
    with pytest.raises(ValueError, match=r"'alice'.*'grad' has shape"):
        client_loss_from_payload("gradient", good[:2], payload, client_id="alice")
    with pytest.raises(ValueError, match=r"'alice'.*lacks 'log_alpha'"):
        targets = client_payload("targets", "alice", reps, ["bob"])
        client_loss_from_payload(
            "targets", good, {"targets": targets["targets"]}, client_id="alice"
        )


def test_draw_peers_is_deterministic_order_free_and_excludes_self() -> None:
    clients = [f"client-{k}" for k in range(7)]
    draws = draw_peers(clients, 3, seed=11, round=2, batch=5)
    shuffled = clients[:]
    random.Random(0).shuffle(shuffled)
    assert draw_peers(shuffled, 3, seed=11, round=2, batch=5) == draws
    assert set(draws) == set(clients)
    for client, peers in draws.items():
        assert client not in peers
        assert len(peers) == len(set(peers)) == 3
        assert set(peers) <= set(clients)
    # Re-drawn per batch and per round; the seed matters.
    per_batch = [draw_peers(clients, 3, seed=11, round=2, batch=b) for b in range(10)]
    assert any(d != draws for d in per_batch)
    assert any(draw_peers(clients, 3, seed=11, round=r, batch=5) != draws for r in range(3, 8))
    assert any(draw_peers(clients, 3, seed=s, round=2, batch=5) != draws for s in range(5))
    # Over many batches every other client is drawn for client-0 (all 6 of them).
    seen = {
        p for b in range(200) for p in draw_peers(clients, 3, seed=1, round=0, batch=b)["client-0"]
    }
    assert seen == set(clients[1:])


def test_draw_peers_with_few_available() -> None:
    clients = ["a", "b", "c", "d", "e"]
    draws = draw_peers(clients, 3, seed=0, round=0, batch=0, available=["a", "c", "e"])
    assert draws["a"] == ["c", "e"]  # fewer than M others: all of them
    assert draws["c"] == ["a", "e"]
    assert draws["b"] == ["a", "c", "e"]  # not available itself, still an anchor
    assert draw_peers(clients, 2, seed=0, round=0, batch=0, available=["d"])["d"] == []
    with pytest.raises(ValueError, match="not in client_ids"):
        draw_peers(clients, 2, seed=0, round=0, batch=0, available=["z"])
    with pytest.raises(ValueError, match="duplicates"):
        draw_peers(["a", "a"], 1, seed=0, round=0, batch=0)
    with pytest.raises(ValueError, match="at least 1"):
        draw_peers(clients, 0, seed=0, round=0, batch=0)


def test_gram_volume_single_peer_is_sine_of_angle() -> None:
    anchor, peer = unit_rows(5, 4, 40), unit_rows(5, 4, 41)
    # For unit vectors the area of the parallelogram is |sin θ| = sqrt(1 − cos²θ).
    volume = torch.sqrt(1 - (anchor @ peer.T) ** 2)
    logits = -volume / 0.07
    targets = torch.arange(5)
    expected = 0.5 * (
        F.cross_entropy(logits, targets, label_smoothing=0.1)
        + F.cross_entropy(logits.T, targets, label_smoothing=0.1)
    )
    torch.testing.assert_close(gram_volume_loss(anchor, [peer]), expected, rtol=0, atol=1e-12)


def test_gram_volume_two_peers_against_explicit_determinant() -> None:
    batch = 4
    anchor = unit_rows(batch, 6, 50)
    peers = [unit_rows(batch, 6, 51), unit_rows(batch, 6, 52)]
    volume = torch.empty(batch, batch, dtype=torch.float64)
    for i in range(batch):
        for j in range(batch):
            spanned = torch.stack([anchor[i], peers[0][j], peers[1][j]], dim=1)  # d × 3
            volume[i, j] = torch.linalg.det(spanned.T @ spanned).sqrt()
    logits = -volume / 0.5
    targets = torch.arange(batch)
    row = F.cross_entropy(logits, targets, reduction="none")
    col = F.cross_entropy(logits.T, targets, reduction="none")
    got = gram_volume_loss(anchor, peers, 0.5, label_smoothing=0.0, reduction="none")
    torch.testing.assert_close(got, 0.5 * (row + col), rtol=0, atol=1e-10)


def test_gram_volume_gradient_finite_at_zero_volume() -> None:
    anchor = unit_rows(4, 5, 60).requires_grad_(True)
    loss = gram_volume_loss(anchor, [anchor.detach(), anchor.detach()])
    (grad,) = grads(loss, [anchor])
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
