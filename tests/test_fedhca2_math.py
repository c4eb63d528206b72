"""FedHCA² server mathematics against brute force, explicit loops and autograd."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedmtl.aggregation import fedhca2
from fedmtl.aggregation.conflict_averse import conflict_averse_direction, gram_matrix
from fedmtl.aggregation.cross_attention import (
    cross_attention,
    decoder_layers,
    hyper_cross_attention,
)
from fedmtl.aggregation.fedhca2 import (
    FedHCA2State,
    FlatLayout,
    fedhca2_round,
    flatten_states,
    group_mean_matrix,
    unflatten_state,
)
from fedmtl.aggregation.hyper_weights import (
    HyperWeights,
    decoder_agreement,
    hyper_weight_gradient,
)

C = 0.4
F64 = torch.float64


def objective(w: np.ndarray, gram: np.ndarray, c: float = C) -> np.ndarray:
    """CAGrad objective ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ for rows of ``w`` (no epsilons)."""
    n = gram.shape[0]
    b = gram @ np.full(n, 1.0 / n)
    quad = np.einsum("pi,ij,pj->p", w, gram, w)
    return w @ b + c * np.sqrt(gram.mean()) * np.sqrt(np.maximum(quad, 0.0))


def direction_from_weights(updates: torch.Tensor, w: torch.Tensor, c: float = C) -> torch.Tensor:
    """U = (g0 + c‖g0‖/‖g_w‖ · g_w) / (1 + c²) evaluated directly on the vectors."""
    g0 = updates.mean(0)
    gw = w.to(updates.dtype) @ updates
    return (g0 + c * g0.norm() / gw.norm() * gw) / (1 + c * c)


def simplex_grid(n: int, steps: int) -> np.ndarray:
    points = [
        [i / steps for i in idx] + [(steps - sum(idx)) / steps]
        for idx in itertools.product(range(steps + 1), repeat=n - 1)
        if sum(idx) <= steps
    ]
    return np.array(points)


# --------------------------------------------------------------------------- conflict averse


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 0.0, 0.3], [-0.5, 1.0, 0.0]],  # interior optimum
        [[3.0, 0.0, 0.1], [-1.0, 0.2, 0.0]],  # optimum at a vertex
    ],
)
def test_conflict_averse_two_clients_matches_fine_grid(rows: list[list[float]]) -> None:
    updates = torch.tensor(rows, dtype=F64)
    direction, w = conflict_averse_direction(updates, c=C)
    gram = (updates @ updates.T).numpy()
    h = 1e-5
    t = np.linspace(0.0, 1.0, round(1 / h) + 1)
    grid = np.stack([t, 1 - t], axis=1)
    values = objective(grid, gram)
    best = int(values.argmin())
    ours = objective(w.numpy()[None], gram)[0]
    # Ours is at least as good as every grid point, and the grid's best point lies within h of
    # the continuous optimum, so it is worse by at most max|F'|·h.
    slope = np.abs(np.diff(values)).max() / h
    assert ours <= values.min() + 1e-12
    assert values.min() - ours <= slope * h + 1e-12
    # For convex F on a segment the grid argmin is within one step of w*; U moves by at most
    # the largest one-step change of U along the grid.
    assert abs(w[0].item() - t[best]) <= h + 1e-9
    grid_u = direction_from_weights(updates, torch.tensor(grid[best]))
    steps_u = [
        (
            direction_from_weights(updates, torch.tensor(grid[j + 1]))
            - direction_from_weights(updates, torch.tensor(grid[j]))
        ).norm()
        for j in range(max(best - 2, 0), min(best + 2, len(t) - 1))
    ]
    assert (direction - grid_u).norm() <= 2 * max(steps_u) + 1e-12
    torch.testing.assert_close(direction, direction_from_weights(updates, w), rtol=0, atol=1e-12)


def test_conflict_averse_three_clients_matches_simplex_grid() -> None:
    gen = torch.Generator().manual_seed(3)
    updates = torch.randn(3, 8, generator=gen, dtype=F64)
    updates[2] = -0.7 * updates[0] + 0.2 * updates[2]  # a conflicting client
    direction, w = conflict_averse_direction(updates, c=C)
    gram = (updates @ updates.T).numpy()
    steps = 400
    grid = simplex_grid(3, steps)
    values = objective(grid, gram)
    ours = objective(w.numpy()[None], gram)[0]
    # Nearest grid point is within h = 1/steps per coordinate (ℓ2 ≤ h·√3) of w*; bound the
    # gradient norm on the grid to turn that into a bound on F.
    n = 3
    b = gram @ np.full(n, 1 / n)
    quad = np.einsum("pi,ij,pj->p", grid, gram, grid)
    grad = b + C * np.sqrt(gram.mean()) * (grid @ gram) / np.sqrt(quad)[:, None]
    bound = np.linalg.norm(grad, axis=1).max() * np.sqrt(3) / steps
    assert ours <= values.min() + 1e-12
    assert values.min() - ours <= bound
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-12
    assert not torch.allclose(w, torch.full((3,), 1 / 3, dtype=F64), atol=1e-3)
    torch.testing.assert_close(direction, direction_from_weights(updates, w), rtol=0, atol=1e-12)


def test_conflict_averse_satisfies_kkt_for_many_clients() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(7, 20, generator=gen, dtype=F64) + 0.5 * torch.randn(20, generator=gen)
    _, w = conflict_averse_direction(updates, c=C)
    a = (updates @ updates.T).numpy()
    a = a / np.trace(a) * len(a)
    wn = w.numpy()
    grad = a.mean(1) + C * np.sqrt(a.mean()) * (a @ wn) / np.sqrt(wn @ a @ wn)
    support = wn > 1e-8
    # Optimality on the simplex: the gradient is minimal and equal on the support.
    assert grad[support].max() - grad.min() < 1e-6
    assert support.sum() < len(wn)  # a non-trivial face: some clients get weight zero


@pytest.mark.parametrize(("rescale", "factor"), [(0, 1 + C), (1, (1 + C) / (1 + C * C)), (2, 1.0)])
def test_conflict_averse_single_client(rescale: int, factor: float) -> None:
    # N = 1: w = 1, g_w = g0, λ = c‖g0‖/‖g0‖ = c, so U = g0·(1 + c) / divisor.
    update = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64)
    direction, w = conflict_averse_direction(update, c=C, rescale=rescale)
    assert w.tolist() == [1.0]
    torch.testing.assert_close(direction, update[0] * factor, rtol=1e-14, atol=0)


def test_conflict_averse_is_scale_free_for_tiny_updates() -> None:
    gen = torch.Generator().manual_seed(1)
    updates = torch.randn(5, 50, generator=gen, dtype=F64)
    updates[1] = -updates[0] + 0.1 * updates[1]
    u_one, w_one = conflict_averse_direction(updates)
    u_tiny, w_tiny = conflict_averse_direction(updates * 1e-8)
    assert not torch.allclose(w_one, torch.full((5,), 0.2, dtype=F64), atol=1e-3)
    torch.testing.assert_close(w_tiny, w_one, rtol=0, atol=1e-7)
    torch.testing.assert_close(u_tiny, u_one * 1e-8, rtol=1e-6, atol=0)


def test_conflict_averse_degenerate_updates() -> None:
    zeros = torch.zeros(3, 4)
    direction, w = conflict_averse_direction(zeros)
    assert torch.equal(direction, torch.zeros(4))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64))
    # Opposite updates: g0 = 0, so c‖g0‖ = 0 and U = g0 / (1 + c²) = 0.
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)
    direction, _ = conflict_averse_direction(opposite)
    torch.testing.assert_close(direction, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


def test_gram_matrix_of_float32_updates_is_accurate() -> None:
    # 2^21 positive squares of 1e-3: a float32 running sum loses low bits once it is large; the
    # chunked float64 accumulation keeps the relative error at float32 resolution.
    gen = torch.Generator().manual_seed(8)
    updates = torch.randn(3, 1 << 21, generator=gen) * 1e-3
    exact = updates.double() @ updates.double().T
    gram = gram_matrix(updates)
    assert gram.dtype == F64
    torch.testing.assert_close(gram, exact, rtol=1e-6, atol=1e-6 * exact.diagonal().max().item())


# --------------------------------------------------------------------------- cross attention


def test_cross_attention_matches_row_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    updates = torch.randn(5, 7, generator=gen, dtype=F64)
    expected = torch.empty_like(updates)
    for k in range(5):
        logits = [float(updates[k] @ updates[j]) / np.sqrt(7) for j in range(5)]
        top = max(logits)
        weights = [np.exp(x - top) for x in logits]
        expected[k] = sum(wj / sum(weights) * updates[j] for j, wj in enumerate(weights))
    torch.testing.assert_close(cross_attention(updates), expected, rtol=0, atol=1e-12)


def test_cross_attention_is_stable_and_upcasts() -> None:
    big = torch.tensor([[100.0, 0.0], [0.0, 100.0]], dtype=torch.float16)
    out = cross_attention(big)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # Logits 100²/√2 vs 0: each row attends to itself only.
    torch.testing.assert_close(out.float(), big.float())


def test_decoder_layers_groups_by_parent_module() -> None:
    keys = [
        "linears.0.weight",
        "linears.0.bias",
        "linears.1.weight",
        "linears.10.weight",
        "linears.10.bias",
        "linear_fuse.0.weight",
        "linear_fuse.1.weight",
        "linear_fuse.1.bias",
        "scale",
    ]
    assert decoder_layers(keys) == [
        ("linears.0", ["linears.0.weight", "linears.0.bias"]),
        ("linears.1", ["linears.1.weight"]),
        ("linears.10", ["linears.10.weight", "linears.10.bias"]),
        ("linear_fuse.0", ["linear_fuse.0.weight"]),
        ("linear_fuse.1", ["linear_fuse.1.weight", "linear_fuse.1.bias"]),
        ("scale", ["scale"]),
    ]


def make_decoder(gen: torch.Generator, head_in: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    shapes = {"fc.0.weight": (4, 3), "fc.0.bias": (4,), "out.weight": (2, head_in)}
    return {k: scale * torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}


def test_hyper_cross_attention_matches_explicit_loop() -> None:
    gen = torch.Generator().manual_seed(4)
    # Decoders 0, 1, 3 share every layer; 2 and 4 differ in "out" (another input size), and
    # decoder 4 has a layer shape nobody else has for "out" -> alone there.
    updates = [make_decoder(gen, h) for h in (5, 5, 6, 5, 7)]
    updates[2]["out.weight"] = torch.randn(2, 6, generator=gen, dtype=F64)
    layers = [decoder_layers(list(u)) for u in updates]
    result = hyper_cross_attention(updates, layers)
    for k, update in enumerate(updates):
        for _, keys in layers[k]:
            peers = [
                j
                for j, other in enumerate(updates)
                if all(key in other and other[key].shape == update[key].shape for key in keys)
            ]
            for key in keys:
                q = update[key].reshape(-1)
                d = q.numel()
                logits = torch.tensor(
                    [float(q @ updates[j][key].reshape(-1)) for j in peers], dtype=F64
                )
                attn = torch.softmax(logits / np.sqrt(d), dim=0)
                expected = sum(a * updates[j][key] for a, j in zip(attn, peers))
                torch.testing.assert_close(result[k][key], expected, rtol=0, atol=1e-12)
    # "fc" is shared by all five decoders; "out" of decoder 4 attends only to itself.
    torch.testing.assert_close(result[4]["out.weight"], updates[4]["out.weight"])
    assert not torch.allclose(result[0]["fc.0.weight"], updates[0]["fc.0.weight"])


# --------------------------------------------------------------------------- hyper weights


def test_alpha_gradient_matches_autograd_through_personalised_update() -> None:
    gen = torch.Generator().manual_seed(5)
    alpha = torch.tensor([-0.2, 1e-3, 0.5, 0.999, 1.3], dtype=F64, requires_grad=True)
    last, mean_update, next_update = (torch.randn(5, 9, generator=gen, dtype=F64) for _ in "abc")
    direction = torch.randn(9, generator=gen, dtype=F64)
    new = last + mean_update + alpha.clamp(0, 1)[:, None] * direction
    # Official upstream gradient: θ^agg − θ^local of the next round = −Δ^{t+1}.
    torch.autograd.backward(new, -next_update)
    closed = hyper_weight_gradient(alpha.detach(), next_update @ direction)
    assert alpha.grad is not None
    torch.testing.assert_close(closed, alpha.grad, rtol=0, atol=1e-10)
    assert closed[0] == 0 and closed[4] == 0 and closed[1] != 0 and closed[3] != 0


def test_hyper_weight_gradient_passes_at_the_bounds() -> None:
    # The official code's torch (clamp subgradient 1 at min and max, pytorch#7049) lets the
    # gradient through at exactly 0 and 1; newer torch returns 0 there, so check by hand.
    weight = torch.tensor([-1e-9, 0.0, 0.4, 1.0, 1.0 + 1e-9], dtype=F64)
    agreement = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    expected = torch.tensor([0.0, -2.0, -3.0, -4.0, 0.0], dtype=F64)
    assert torch.equal(hyper_weight_gradient(weight, agreement), expected)


def test_beta_gradient_matches_autograd_through_decoder_update() -> None:
    gen = torch.Generator().manual_seed(6)
    last, update, cross, next_update = (make_decoder(gen, 5) for _ in range(4))
    layers = decoder_layers(list(last))
    for values in ([0.3, 0.7], [0.999, -0.1], [1e-3, 1.2]):
        beta = torch.tensor(values, dtype=F64, requires_grad=True)
        new = []
        for index, (_, keys) in enumerate(layers):
            new += [last[k] + update[k] + beta.clamp(0, 1)[index] * cross[k] for k in keys]
        upstream = [-next_update[k] for _, keys in layers for k in keys]
        torch.autograd.backward(new, upstream)
        closed = hyper_weight_gradient(beta.detach(), decoder_agreement(cross, next_update, layers))
        assert beta.grad is not None
        torch.testing.assert_close(closed, beta.grad, rtol=0, atol=1e-10)


def test_hyper_weight_step_equals_torch_sgd() -> None:
    gen = torch.Generator().manual_seed(7)
    hyper = HyperWeights(4, [3, 2])
    reference = [torch.nn.Parameter(torch.full((n,), 0.1, dtype=F64)) for n in (4, 3, 2)]
    optimizer = torch.optim.SGD(reference, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        grads = [torch.randn(n, generator=gen, dtype=F64) for n in (4, 3, 2)]
        hyper.step(grads[0], grads[1:])
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(hyper.alpha, reference[0].detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(hyper.beta[0], reference[1].detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(hyper.beta[1], reference[2].detach(), rtol=0, atol=1e-15)
    buffer = optimizer.state[reference[0]]["momentum_buffer"]
    torch.testing.assert_close(hyper.alpha_momentum, buffer, rtol=0, atol=1e-15)


def test_hyper_weights_state_dict_round_trip() -> None:
    hyper = HyperWeights(3, [2, 4])
    hyper.step(torch.tensor([1.0, -2.0, 3.0], dtype=F64), [None, torch.ones(4, dtype=F64)])
    copy = HyperWeights(3, [2, 4])
    copy.load_state_dict(hyper.state_dict())
    for name, tensor in hyper.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    assert torch.equal(copy.beta[0], torch.full((2,), 0.1, dtype=F64))
    with pytest.raises(ValueError, match="names differ"):
        HyperWeights(3, [2]).load_state_dict(hyper.state_dict())


# --------------------------------------------------------------------------- full round


def test_flatten_and_unflatten_round_trip() -> None:
    states = [{"a": torch.full((2, 3), float(i)), "b": torch.arange(4.0) + i} for i in range(3)]
    layout = FlatLayout.from_state(states[0])
    flat = flatten_states(states, layout)
    assert flat.shape == (3, 10)
    assert flat[1].tolist() == [1.0] * 6 + [1.0, 2.0, 3.0, 4.0]
    views = unflatten_state(flat[2], layout)
    assert torch.equal(views["a"], states[2]["a"]) and torch.equal(views["b"], states[2]["b"])
    views["b"][0] = -1.0  # views share the buffer's memory
    assert flat[2, 6] == -1.0


def test_flatten_states_refills_a_persistent_buffer() -> None:
    states = [{"w": torch.full((2,), float(i))} for i in range(2)]
    layout = FlatLayout.from_state(states[0])
    buffer = torch.zeros(2, 2, dtype=F64)
    assert flatten_states(states, layout, out=buffer) is buffer
    assert buffer.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="contiguous"):
        flatten_states(states, layout, out=torch.zeros(2, 3))


def test_group_mean_matrix_averages_non_consecutive_clients() -> None:
    keys = [("pascal", ("seg",)), "nyud", ("pascal", ("seg",)), "other", "nyud"]
    updates = torch.randn(5, 3, dtype=F64)
    means = group_mean_matrix(keys) @ updates
    expected = updates.clone()
    expected[[0, 2]] = updates[[0, 2]].mean(0)
    expected[[1, 4]] = updates[[1, 4]].mean(0)
    torch.testing.assert_close(means, expected, rtol=0, atol=1e-15)


def reference_round(
    last: torch.Tensor,
    local: torch.Tensor,
    keys: list[object],
    alpha: torch.Tensor,
    dec_last: list[dict[str, torch.Tensor]],
    dec_local: list[dict[str, torch.Tensor]],
    betas: list[torch.Tensor],
) -> tuple[
    torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]
]:
    """Straightforward per-client implementation of the personalised updates."""
    delta = local - last
    direction, _ = conflict_averse_direction(delta)
    new = torch.empty_like(last)
    for i in range(len(keys)):
        members = [j for j in range(len(keys)) if keys[j] == keys[i]]
        new[i] = last[i] + delta[members].mean(0) + alpha[i].clamp(0, 1) * direction
    dec_delta = [
        {k: dec_local[j][k] - last_j[k] for k in last_j} for j, last_j in enumerate(dec_last)
    ]
    layers = [decoder_layers(list(d)) for d in dec_last]
    cross = hyper_cross_attention(dec_delta, layers)
    dec_new = []
    for j in range(len(dec_last)):
        out = {}
        for index, (_, names) in enumerate(layers[j]):
            for name in names:
                step = dec_delta[j][name] + betas[j][index].clamp(0, 1) * cross[j][name]
                out[name] = dec_last[j][name] + step
        dec_new.append(out)
    return new, direction, dec_new, cross


def make_federation(seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    encoders = torch.randn(4, 37, generator=gen, dtype=F64)
    decoders = [make_decoder(gen, 5) for _ in range(3)]
    return encoders, decoders


def perturb(
    seed: int, encoders: torch.Tensor, decoders: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    local = encoders + 0.3 * torch.randn(encoders.shape, generator=gen, dtype=F64)
    dec = [
        {k: t + 0.3 * torch.randn(t.shape, generator=gen, dtype=F64) for k, t in d.items()}
        for d in decoders
    ]
    return local, dec


KEYS: list[object] = ["a", "b", "a", "c"]
OWNERS = [0, 3, 3]


@pytest.mark.parametrize("chunk_elements", [16, 1 << 18])
def test_round_matches_reference_over_two_rounds(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    # 16 elements per chunk forces many column chunks with a ragged last one.
    monkeypatch.setitem(fedhca2._CHUNK_ELEMENTS, "cpu", chunk_elements)
    encoders, decoders = make_federation(0)
    state = FedHCA2State.initial(encoders.clone(), decoders, OWNERS)
    ref_last, ref_dec = encoders.clone(), [dict(d) for d in decoders]
    alpha = torch.full((4,), 0.1, dtype=F64)
    betas = [torch.full((2,), 0.1, dtype=F64) for _ in range(3)]
    prev_direction = prev_cross = None
    for round_index in range(2):
        local, dec_local = perturb(10 + round_index, ref_last, ref_dec)
        if prev_direction is not None and prev_cross is not None:
            # Expected hyper step: first SGD step from 0.1, buffer = g + wd·p.
            g = -(local - ref_last) @ prev_direction
            alpha = alpha - 0.01 * (g + 1e-4 * alpha)
            for j in range(3):
                layers = decoder_layers(list(ref_dec[j]))
                agreement = [
                    sum(
                        float((prev_cross[j][k] * (dec_local[j][k] - ref_dec[j][k])).sum())
                        for k in keys
                    )
                    for _, keys in layers
                ]
                gb = -torch.tensor(agreement, dtype=F64)
                betas[j] = betas[j] - 0.01 * (gb + 1e-4 * betas[j])
        ref_last, prev_direction, ref_dec, prev_cross = reference_round(
            ref_last, local, KEYS, alpha, ref_dec, dec_local, betas
        )
        encoders_new, decoders_new, state = fedhca2_round(state, local, dec_local, KEYS)
        torch.testing.assert_close(state.hyper.alpha, alpha, rtol=0, atol=1e-12)
        torch.testing.assert_close(encoders_new, ref_last, rtol=0, atol=1e-12)
        assert state.direction is not None
        torch.testing.assert_close(state.direction, prev_direction, rtol=0, atol=1e-12)
        for j in range(3):
            torch.testing.assert_close(state.hyper.beta[j], betas[j], rtol=0, atol=1e-12)
            for name in ref_dec[j]:
                torch.testing.assert_close(
                    decoders_new[j][name], ref_dec[j][name], atol=1e-12, rtol=0
                )
    assert not torch.allclose(alpha, torch.full((4,), 0.1, dtype=F64))


def test_round_restores_the_thread_count() -> None:
    encoders, decoders = make_federation(3)
    state = FedHCA2State.initial(encoders.clone(), decoders, OWNERS)
    threads = torch.get_num_threads()
    fedhca2_round(state, *perturb(1, encoders, decoders), KEYS)
    assert torch.get_num_threads() == threads


def test_round_homo_group_mean_by_key() -> None:
    encoders, decoders = make_federation(1)
    state = FedHCA2State.initial(encoders.clone(), decoders, OWNERS)
    state.hyper.alpha.zero_()  # θ_new − θ_last is then exactly the group-mean update
    local, dec_local = perturb(2, encoders, decoders)
    new, _, _ = fedhca2_round(state, local, dec_local, KEYS)
    delta = local - encoders
    expected = delta.clone()
    expected[0] = expected[2] = (delta[0] + delta[2]) / 2
    torch.testing.assert_close(new - encoders, expected, rtol=0, atol=1e-12)


def test_round_dropped_client_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fedhca2._CHUNK_ELEMENTS, "cpu", 16)  # gathered rows, many chunks
    encoders, decoders = make_federation(2)
    state = FedHCA2State.initial(encoders.clone(), decoders, OWNERS)
    local, dec_local = perturb(3, encoders, decoders)
    fedhca2_round(state, local, dec_local, KEYS)
    before = {k: t.clone() for k, t in state.state_dict().items()}
    local, dec_local = perturb(4, state.encoder_last, state.decoders_last)
    present = torch.tensor([True, True, True, False])
    delta = local - before["encoder_last"]
    new, dec_new, state = fedhca2_round(state, local, dec_local, KEYS, present=present)
    after = state.state_dict()
    # Client 3 owns decoders 1 and 2: α, β, momenta, θ^last and stored XA stay as they were.
    for name in ("hyper.alpha", "hyper.alpha_momentum"):
        assert after[name][3] == before[name][3]
        assert after[name][0] != before[name][0]
    for name in ("hyper.beta.1", "hyper.beta.2", "hyper.beta_momentum.2", "cross.1.out.weight"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["hyper.beta.0"], before["hyper.beta.0"])
    assert torch.equal(new[3], before["encoder_last"][3])
    assert torch.equal(dec_new[2]["fc.0.weight"], before["decoders_last.2.fc.0.weight"])
    # U comes from the present clients only.
    assert state.direction is not None
    direction, _ = conflict_averse_direction(delta[:3])
    torch.testing.assert_close(state.direction, direction, rtol=0, atol=1e-12)
    assert state.direction_clients.tolist() == [True, True, True, False]


def test_round_state_dict_resume_gives_identical_rounds() -> None:
    encoders, decoders = make_federation(5)
    state = FedHCA2State.initial(encoders.clone(), decoders, OWNERS)
    fedhca2_round(state, *perturb(6, encoders, decoders), KEYS)
    saved = {k: t.clone() for k, t in state.state_dict().items()}
    resumed = FedHCA2State.initial(torch.zeros_like(encoders), decoders, OWNERS)
    resumed.load_state_dict(saved)
    local, dec_local = perturb(7, state.encoder_last, state.decoders_last)
    fedhca2_round(state, local, dec_local, KEYS)
    fedhca2_round(resumed, local, dec_local, KEYS)
    for name, tensor in state.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
