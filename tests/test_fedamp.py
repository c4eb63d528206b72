"""FedAMP: ξ by hand for 3 clients, no underflow at Swin-T scale, the pull, a run on a FakeGrid."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedmtl.aggregation.fedamp import attention_weights, cloud_model, squared_distances
from fedmtl.cli import main
from fedmtl.clients.fedamp import FedAMPClient
from fedmtl.config import FedAMPConfig, parse_experiment
from tests.helpers import (
    reply_arrays,
    run_recorded,
    tiny_experiment,
    train_messages,
)

# Three clients, two parameters each: θ1 = (0, 0), θ2 = (1, 1), θ3 = (2, 0).
THETAS = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])]


def test_squared_distances_by_hand() -> None:
    squared, numel = squared_distances([{"w": t} for t in THETAS])
    # ‖θ1−θ2‖² = 1+1 = 2, ‖θ1−θ3‖² = 4+0 = 4, ‖θ2−θ3‖² = 1+1 = 2
    assert numel == 2
    assert squared.tolist() == [[0.0, 2.0, 4.0], [2.0, 0.0, 2.0], [4.0, 2.0, 0.0]]


def test_xi_for_three_clients_by_hand() -> None:
    squared, numel = squared_distances([{"w": t} for t in THETAS])
    xi, capped = attention_weights(squared, numel, alpha_k=0.25, sigma=1.0)
    # per parameter: d̄²_12 = 2/2 = 1, d̄²_13 = 4/2 = 2, d̄²_23 = 1
    # ξ_ij = (α_k/σ)·exp(−d̄²/σ):  0.25·e^−1 = 0.09196986029, 0.25·e^−2 = 0.03383382081
    e1, e2 = 0.09196986029286058, 0.033833820809153176
    expected = torch.tensor(
        [
            [1 - e1 - e2, e1, e2],  # ξ_11 = 0.87419631889798624
            [e1, 1 - 2 * e1, e1],  # ξ_22 = 0.81606027941427884
            [e2, e1, 1 - e1 - e2],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(xi, expected, rtol=0, atol=1e-15)
    assert not capped.any()
    # u_1 = ξ_11·(0,0) + ξ_12·(1,1) + ξ_13·(2,0) = (e1 + 2·e2, e1) = (0.15963750191, 0.09196986029)
    u1 = cloud_model([{"w": t} for t in THETAS], xi[0])["w"]
    torch.testing.assert_close(u1, torch.tensor([0.15963750191116694, 0.09196986029286058]))


def test_rows_whose_peers_outweigh_one_are_capped_to_a_softmax() -> None:
    squared, numel = squared_distances([{"w": t} for t in THETAS])
    xi, capped = attention_weights(squared, numel, alpha_k=1.0, sigma=1.0)
    # row 1: e^−1 + e^−2 = 0.503 ≤ 1, kept; row 2: 2·e^−1 = 0.736 ≤ 1, kept
    assert not capped.any()
    xi, capped = attention_weights(squared, numel, alpha_k=2.0, sigma=1.0)
    # row 2: 2·2e^−1 = 1.47 > 1 → (1/2, 1/2) over its equidistant peers, no self weight
    assert capped.tolist() == [True, True, True]  # rows 1 and 3 by symmetry
    torch.testing.assert_close(xi[1], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    # row 1: 2e^−1 + 2e^−2 = 1.006 > 1 → softmax(−1, −2) = (1/(1+e^−1), e^−1/(1+e^−1))
    p = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(xi[0], torch.tensor([0.0, p, 1 - p], dtype=torch.float64))


def test_swin_scale_distance_neither_underflows_nor_divides_by_zero() -> None:
    # A 27.5 M-parameter encoder whose clients sit at ‖θ_i − θ_j‖² ≈ 1e5 (FedHCA²'s setting).
    numel = 27_519_354
    squared = torch.tensor([[0.0, 1e5, 1.2e5], [1e5, 0.0, 0.9e5], [1.2e5, 0.9e5, 0.0]])
    assert math.exp(-1e5 / 1.0) == 0.0  # the literal formula: every ξ_ij = 0, u_i = θ_i
    xi, capped = attention_weights(squared, numel, alpha_k=1e-3, sigma=1e-2)
    assert torch.isfinite(xi).all()
    torch.testing.assert_close(xi.sum(dim=1), torch.ones(3, dtype=torch.float64))
    off = ~torch.eye(3, dtype=torch.bool)
    assert (xi[off] > 0).all()  # peers still weigh: d̄² = 1e5/2.75e7 ≈ 3.6e-3 per parameter
    # ξ_12 = 0.1·exp(−(1e5/27519354)/1e-2) = 0.0695 by hand; rows sum below 1: not capped
    assert not capped.any()
    torch.testing.assert_close(xi[0, 1], torch.tensor(0.1 * math.exp(-1e5 / numel / 1e-2)).double())
    # Extreme settings stay finite: a tiny σ (all peers negligible) and a huge α_k/σ (capped).
    for alpha_k, sigma in ((1.0, 1e-12), (1e6, 1e-9)):
        xi, _ = attention_weights(squared, numel, alpha_k=alpha_k, sigma=sigma)
        assert torch.isfinite(xi).all()
        torch.testing.assert_close(xi.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_client_pull_has_a_gradient_toward_the_cloud_model_and_does_not_load_it() -> None:
    session = SimpleNamespace(experiment=SimpleNamespace(algorithm=FedAMPConfig(lam=3.0)))
    client = FedAMPClient(session)  # type: ignore[arg-type]
    model = nn.Module()
    model.encoder = nn.Linear(2, 1, bias=False)
    model.decoders = nn.ModuleDict({"t": nn.Linear(1, 1, bias=False)})
    with torch.no_grad():
        model.encoder.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.decoders["t"].weight.fill_(5.0)
    received = {"encoder.weight": torch.tensor([[0.0, 4.0]])}
    client.receive(model, received)
    assert model.encoder.weight.tolist() == [[1.0, 2.0]]  # u_i is a target, not loaded
    loss = client.extra_loss(received, {})
    assert loss is not None
    value = loss(model)
    value.backward()
    # (λ/2)·‖θ − u‖² = 1.5·((1−0)² + (2−4)²) = 7.5; gradient λ·(θ − u) = 3·(1, −2)
    assert value.item() == pytest.approx(7.5)
    assert model.encoder.weight.grad.tolist() == [[3.0, -6.0]]
    assert model.decoders["t"].weight.grad.tolist() == [[0.0]]  # no u: pulled to its start


def test_round_2_sends_each_client_its_cloud_model(tmp_path: Path) -> None:
    alpha_k, sigma = 1e-7, 1e-6
    data = tiny_experiment("fedamp", rounds=2).model_dump(mode="json")
    data["algorithm"] = {"name": "fedamp", "alpha_k": alpha_k, "sigma": sigma}
    experiment = parse_experiment(data)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    uploads = {cid: reply_arrays(recorder.replies[(1, cid)]) for cid in ids}
    # all three share the encoder; the two digit clients share the digit decoder
    encoder = [k for k in uploads["a-digit"] if k.startswith("encoder.")]
    digit = [k for k in uploads["a-digit"] if k.startswith("decoders.digit.")]
    assert encoder and digit
    assert not any(k.startswith("decoders.") for k in uploads["c-seg-depth"])  # no partner

    def by_hand(names: list[str], members: list[str], me: str) -> dict[str, torch.Tensor]:
        flat = {m: torch.cat([uploads[m][n].reshape(-1) for n in names]) for m in members}
        numel = flat[me].numel()
        xi = {
            j: alpha_k / sigma * math.exp(-float((flat[me] - flat[j]).pow(2).sum()) / numel / sigma)
            for j in members
            if j != me
        }
        xi[me] = 1 - sum(xi.values())
        assert 0 < xi[me] < 1
        return {n: sum(xi[m] * uploads[m][n] for m in members) for n in names}

    sent = train_messages(grid, ids)
    for cid in ids:
        assert reply_arrays(sent[(1, cid)].content) == {}  # round 1: nothing known yet
        got = reply_arrays(sent[(2, cid)].content)
        expected = by_hand(encoder, ids, cid)
        if cid != "c-seg-depth":
            expected.update(by_hand(digit, ["a-digit", "b-digit"], cid))
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    rows = [r for r in run_dir.read_metrics() if r["round"] == 1]
    assert 0 < rows[0]["server/fedamp/encoder/xi_self_mean"] < 1
    assert rows[0]["server/fedamp/capped_rows"] == 0
    # evaluation uses the personalised model: nothing is sent with evaluate
    assert all(
        not reply_arrays(m.content) for m in grid.sent if m.metadata.message_type == "evaluate"
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [("sigma = 0.0", "sigma"), ("alpha_k = -1.0", "alpha_k"), ("lam = -0.5", "lam")],
)
def test_bad_hyperparameters_exit_2_naming_the_field(
    line: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "fedhca2.toml").read_text()
    path = tmp_path / "bad.toml"
    head, marker, tail = text.partition("[hyperparameters.fedamp]")
    assert marker  # the bundled file sets FedAMP's values; break one of them
    tail = re.sub(rf"^{field} = .*$", line, tail, count=1, flags=re.MULTILINE)
    path.write_text(head + marker + tail)
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"hyperparameters.fedamp.{field}" in (captured.out + captured.err).replace("\n", "")
