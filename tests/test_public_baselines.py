"""FedMuscle's comparison set: FedHeNN, SimCLR, pseudo-labelling — maths by hand, runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmtl.cli import main
from fedmtl.losses.cka import cka, cka_distance, linear_kernel
from fedmtl.losses.contrastive import nt_xent_loss
from fedmtl.losses.pseudo import pseudo_targets
from fedmtl.protocols.fedhenn import KERNEL
from fedmtl.tasks import create_task
from tests.helpers import (
    reply_arrays,
    run_in_process,
    run_recorded,
    tiny_experiment,
    train_messages,
)

ROOT = Path(__file__).resolve().parents[1]


def _cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in feature space: ‖YᵀX‖²_F / (‖XᵀX‖_F·‖YᵀY‖_F) on centred columns."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    num = np.linalg.norm(y.T @ x) ** 2
    return float(num / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_of_small_matrices_by_hand() -> None:
    # X (3×2) and Y (3×1) have centred columns already.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
    # YᵀX = (2, 1): ‖·‖² = 5; XᵀX = [[2, 1], [1, 2]]: ‖·‖_F = √10; YᵀY = 2
    # CKA = 5 / (2·√10) = 0.79056941504
    value = cka(linear_kernel(x), linear_kernel(y))
    assert value.item() == pytest.approx(5 / (2 * math.sqrt(10)), abs=1e-12)
    assert value.item() == pytest.approx(0.7905694150420949, abs=1e-12)
    assert cka_distance(linear_kernel(x), linear_kernel(y)).item() == pytest.approx(
        1 - 0.7905694150420949, abs=1e-12
    )
    # invariant to scale and to an orthogonal rotation of the features; 1 with itself
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    assert cka(linear_kernel(x), linear_kernel(3 * x @ rotation)).item() == pytest.approx(1.0)


def test_cka_equals_the_feature_space_formula_on_uncentred_features() -> None:
    generator = np.random.default_rng(0)
    x, y = generator.normal(size=(7, 5)) + 2.0, generator.normal(size=(7, 3)) - 1.0
    expected = _cka_features(x, y)
    got = cka(linear_kernel(torch.from_numpy(x)), linear_kernel(torch.from_numpy(y)))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0


def test_nt_xent_on_a_hand_built_batch() -> None:
    # Two samples, identical views: every view's positive has similarity 1, both negatives 0.
    # τ = 1: ℓ = −log(e / (e + 1 + 1)) = log(1 + 2/e) = 0.55144471...
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent_loss(z, z.clone(), tau=1.0).item() == pytest.approx(math.log(1 + 2 / math.e))
    assert nt_xent_loss(z, z.clone(), tau=1.0).item() == pytest.approx(0.5514447139320511)


def test_nt_xent_equals_the_formula_summed_by_loops() -> None:
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    tau = 0.3
    views = [v / v.norm() for v in [*z1, *z2]]
    total = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        sims = {k: float(views[i] @ views[k]) / tau for k in range(6) if k != i}
        total += -math.log(math.exp(sims[positive]) / sum(math.exp(s) for s in sims.values()))
    assert nt_xent_loss(z1, z2, tau).item() == pytest.approx(total / 6, rel=1e-5)


def test_pseudo_targets_keep_only_confident_labels() -> None:
    digit = create_task("classification", "digit", 3)
    # softmax(3, 0, 0)[0] = e³/(e³ + 2) = 0.9094 ≥ 0.8: kept; softmax(0.1, 0, 0) ≈ 0.36: dropped
    target, keep = pseudo_targets(digit, torch.tensor([[3.0, 0.0, 0.0], [0.1, 0.0, 0.0]]), 0.8)
    assert target.tolist() == [0, 0] and keep.tolist() == [True, False]
    seg = create_task("semseg", "seg", 2)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 4.0  # pixel 0: class 1 at σ(4) = 0.982; pixel 1: 0.5, unsure
    target, keep = pseudo_targets(seg, logits, 0.9)
    assert target.tolist() == [[[1, 255]]] and keep.tolist() == [True]
    assert pseudo_targets(create_task("depth", "depth", 1), torch.ones(1, 1, 2, 2), 0.9) is None


def test_fedhenn_round_2_sends_the_weighted_mean_kernel(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedhenn", rounds=2)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    kernels = {c: reply_arrays(recorder.replies[(1, c)])[KERNEL] for c in ids}
    weights = {
        c: float(recorder.replies[(1, c)].metric_records["metrics"]["num-examples"]) for c in ids
    }
    assert all(k.shape == (8, 8) for k in kernels.values())  # public batch of 8
    expected = sum(weights[c] * kernels[c] for c in ids) / sum(weights.values())
    sent = train_messages(grid, ids)
    for client in ids:
        assert reply_arrays(sent[(1, client)].content) == {}  # round 1: no kernel yet
        got = reply_arrays(sent[(2, client)].content)
        assert set(got) == {KERNEL}
        torch.testing.assert_close(got[KERNEL], expected, rtol=1e-6, atol=1e-6)
    # server signal: mean 1 − CKA(K_i, K̄), recomputed from the kernels in NumPy
    kbar = expected.numpy()
    centre = np.eye(8) - 1 / 8

    def np_cka(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
        h = lambda a, b: np.trace(a @ centre @ b @ centre)  # noqa: E731
        return h(k, l) / math.sqrt(h(k, k) * h(l, l))

    mean = np.mean([1 - np_cka(kernels[c].numpy(), kbar) for c in ids])
    rows = run_dir.read_metrics()
    first = [r for r in rows if r["round"] == 1]
    assert first[0]["server/fedhenn/cka_distance_mean"] == pytest.approx(mean, abs=1e-6)
    assert mean > 0  # three different encoders do not agree yet
    # round 2: each client trained against K̄ and reports its distance to it
    second = [r for r in rows if r["round"] == 2]
    assert all(0 <= r["fedhenn/cka_distance"] <= 1 for r in second)
    assert all(
        not reply_arrays(m.content) for m in grid.sent if m.metadata.message_type == "evaluate"
    )


def test_pseudolabel_and_simclr_act_on_the_public_set(tmp_path: Path) -> None:
    for name, threshold in (("pseudolabel", 0.0), ("simclr", None)):
        data = tiny_experiment(name, rounds=2).model_dump(mode="json")
        if threshold is not None:  # keep every label: each client steps on the public set
            data["algorithm"] = {"name": name, "threshold": threshold}
        from fedmtl.config import parse_experiment

        run_dir, grid = run_in_process(parse_experiment(data), tmp_path / name)
        rows = [r for r in run_dir.read_metrics() if "train/loss" in r]
        assert not any(
            m.content.array_records for m in grid.sent if m.metadata.message_type == "train"
        )
        if name == "pseudolabel":
            assert all(r["pseudolabel/kept_fraction"] == 1.0 for r in rows)
            assert all(r["pseudolabel/steps"] == 2 and r["pseudolabel/loss"] > 0 for r in rows)
        else:
            first = [r for r in rows if r["round"] == 1]
            assert all(r["simclr/steps"] == 4 for r in first)  # 2 epochs × 2 public batches
            # NT-Xent is below log(2B − 1) only if the views are told apart; finite and positive
            assert all(0 < r["simclr/loss"] < 10 for r in first)
            assert not any("simclr/loss" in r for r in rows if r["round"] == 2)  # pretraining only


@pytest.mark.parametrize("algorithm", ["pseudolabel", "simclr", "fedhenn", "cofed", "feddf"])
def test_missing_public_section_exits_2_at_validate(
    algorithm: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "configs" / "fedmuscle.toml").read_text()
    head, marker, tail = text.partition("[public]")
    assert marker
    tail = tail.split("\n\n", 1)[1]  # drop the [public] table
    text = (head + tail).replace('name = "fedmuscle"\n', f'name = "{algorithm}"\n', 1)
    text = (
        text.split("[algorithm]")[0]
        + f'[algorithm]\nname = "{algorithm}"\n\n'
        + ("[hyperparameters" + text.split("[hyperparameters", 1)[1])
    )
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert f"public: {algorithm} needs a [public] dataset section" in text


def test_majority_vote_by_hand() -> None:
    from fedmtl.aggregation.votes import majority_vote

    # 3 voters, 4 samples: (2,2,1) → 2 at 2/3; (0,1,2) → tie, smallest class 0 at 1/3;
    # (1,1,1) → 1 at 1; (3,0,3) → 3 at 2/3
    votes = torch.tensor([[2, 0, 1, 3], [2, 1, 1, 0], [1, 2, 1, 3]], dtype=torch.float32)
    labels, share = majority_vote(votes, min_agreement=0.5)
    assert labels.tolist() == [2, -1, 1, 3]
    torch.testing.assert_close(share, torch.tensor([2 / 3, 1 / 3, 1.0, 2 / 3], dtype=torch.float64))
    labels, _ = majority_vote(votes, min_agreement=0.0)
    assert labels.tolist() == [2, 0, 1, 3]  # no threshold: the tie goes to the smallest class


def test_cofed_round_2_sends_the_digit_clients_their_unanimous_votes(tmp_path: Path) -> None:
    experiment = tiny_experiment("cofed", rounds=2)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    a = reply_arrays(recorder.replies[(1, "a-digit")])["cofed/pred/digit"]
    b = reply_arrays(recorder.replies[(1, "b-digit")])["cofed/pred/digit"]
    assert a.shape == (16,) and reply_arrays(recorder.replies[(1, "c-seg-depth")]) == {}
    # two voters, min_agreement 0.5: a label only where both predicted the same class
    expected = torch.where(a == b, a, torch.full_like(a, -1.0))
    sent = train_messages(grid, ids)
    for client in ("a-digit", "b-digit"):
        assert reply_arrays(sent[(1, client)].content) == {}
        torch.testing.assert_close(
            reply_arrays(sent[(2, client)].content)["cofed/labels/digit"], expected
        )
    assert reply_arrays(sent[(2, "c-seg-depth")].content) == {}  # no partner: local
    rows = run_dir.read_metrics()
    first = next(r for r in rows if r["round"] == 1)
    assert first["server/cofed/pseudo_labels"] == float((a == b).sum())
    assert first["server/cofed/agreement_mean"] == pytest.approx(
        float(((a == b).double() + 0.5 * (a != b).double()).mean())
    )
    second = {r["client_id"]: r for r in rows if r["round"] == 2}
    assert second["a-digit"]["cofed/labels"] == float((a == b).sum())
    assert "cofed/labels" not in second["c-seg-depth"]


def test_relaxed_contrastive_loss_on_a_hand_built_batch() -> None:
    from fedmtl.losses.relaxed import relaxed_contrastive_loss

    # classes 0, 0, 1, 1; similarities s01 = 0.8, s02 = 0, s03 = −1, s12 = 0.6, s13 = −0.8,
    # s23 = 0. τ = 0.5, one hardest negative, threshold 0.7.
    features = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    terms = relaxed_contrastive_loss(features, labels, tau=0.5, threshold=0.7, topk_neg=1)
    # SCL per anchor, −log(e^{p/τ} / (e^{p/τ} + e^{n/τ})) = log(1 + e^{(n − p)/τ}):
    #   0: p = 0.8, n = 0   → log(1 + e^−1.6);  1: p = 0.8, n = 0.6 → log(1 + e^−0.4)
    #   2: p = 0,   n = 0.6 → log(1 + e^1.2);   3: p = 0,   n = −0.8 → log(1 + e^−1.6)
    scl = 2 * math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-0.4)) + math.log1p(math.exp(1.2))
    assert terms.scl.item() == pytest.approx(scl / 4, rel=1e-6)
    assert terms.scl.item() == pytest.approx(0.58602480, abs=1e-6)
    # penalty: anchors 0 and 1 (their class-mate at 0.8 ≥ 0.7): log(1 + e^{(0.8 − 1)/τ}) each
    assert terms.penalty.item() == pytest.approx(2 * math.log1p(math.exp(-0.4)) / 4, rel=1e-6)
    assert terms.penalty.item() == pytest.approx(0.25650766, abs=1e-6)
    assert terms.penalised_fraction == 0.5
    # above every similarity, the relaxation never acts
    loose = relaxed_contrastive_loss(features, labels, tau=0.5, threshold=0.9, topk_neg=1)
    assert loose.penalty.item() == 0.0 and loose.penalised_fraction == 0.0


def test_relaxed_contrastive_loss_equals_its_formula_by_loops() -> None:
    from fedmtl.losses.relaxed import relaxed_contrastive_loss

    generator = torch.Generator().manual_seed(4)
    features = torch.randn(7, 3, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 1])
    tau, threshold, k = 0.3, 0.2, 2
    z = [f / f.norm() for f in features]
    scl = penalty = 0.0
    for i in range(7):
        s = [float(z[i] @ z[j]) for j in range(7)]
        p = min(s[j] for j in range(7) if labels[j] == labels[i])  # itself included (1)
        negatives = sorted((s[j] for j in range(7) if labels[j] != labels[i]), reverse=True)[:k]
        scl += math.log(1 + sum(math.exp((n - p) / tau) for n in negatives))
        mates = [s[j] for j in range(7) if j != i and labels[j] == labels[i]]
        if mates and min(mates) >= threshold:
            penalty += math.log(1 + math.exp((min(mates) - 1) / tau))
    terms = relaxed_contrastive_loss(features, labels, tau, threshold, k)
    assert terms.scl.item() == pytest.approx(scl / 7, rel=1e-5)
    assert terms.penalty.item() == pytest.approx(penalty / 7, rel=1e-5, abs=1e-9)


def test_fedrcl_clients_report_the_contrastive_terms(tmp_path: Path) -> None:
    run_dir, _ = run_in_process(tiny_experiment("fedrcl", rounds=2), tmp_path)
    rows = [r for r in run_dir.read_metrics() if "train/loss" in r]
    digit = [r for r in rows if r["client_id"] != "c-seg-depth"]
    assert digit and all(r["fedrcl/scl_loss"] > 0 for r in digit)
    assert all(0 <= r["fedrcl/penalised_fraction"] <= 1 for r in digit)
    # no classification task: FedAvg alone
    assert not any("fedrcl/scl_loss" in r for r in rows if r["client_id"] == "c-seg-depth")
    assert rows[0]["server/groups"] >= 1  # FedAvg's groups were averaged


def test_distillation_loss_by_hand() -> None:
    from fedmtl.losses.distillation import distillation_loss

    # teacher softmax(ln 3, 0) = (3/4, 1/4), student softmax(0, 0) = (1/2, 1/2):
    # KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.13081203...
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1308120, abs=1e-7)
    # T = 2: softmax(ln3/2, 0) = (√3/(√3+1), 1/(√3+1)); times T² = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_feddf_distillation_target_is_the_mean_of_the_ensembles_logits(tmp_path: Path) -> None:
    experiment = tiny_experiment("feddf", rounds=2)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    a = reply_arrays(recorder.replies[(1, "a-digit")])["feddf/logits/digit"]
    b = reply_arrays(recorder.replies[(1, "b-digit")])["feddf/logits/digit"]
    assert a.shape == (16, 10) and not torch.equal(a, b)
    assert not any(
        k.startswith("feddf/") for k in reply_arrays(recorder.replies[(1, "c-seg-depth")])
    )
    sent = train_messages(grid, ids)
    for client in ("a-digit", "b-digit"):
        got = reply_arrays(sent[(2, client)].content)
        torch.testing.assert_close(got["feddf/target/digit"], (a + b) / 2, rtol=1e-6, atol=1e-6)
        assert any(k.startswith("encoder.") for k in got)  # the prototype: FedAvg's encoder
    assert not any(k.startswith("feddf/") for k in reply_arrays(sent[(2, "c-seg-depth")].content))
    rows = run_dir.read_metrics()
    first = next(r for r in rows if r["round"] == 1)
    spread = float(((a - (a + b) / 2) ** 2).mean())  # both members are equally far
    assert first["server/feddf/ensemble_spread"] == pytest.approx(spread, rel=1e-5)
    second = {r["client_id"]: r for r in rows if r["round"] == 2}
    assert (
        second["a-digit"]["feddf/distill_steps"] == 2
        and second["a-digit"]["feddf/distill_loss"] > 0
    )
    assert "feddf/distill_loss" not in second["c-seg-depth"]


@pytest.mark.parametrize("algorithm", ["cofed", "feddf"])
def test_no_same_task_partner_anywhere_is_refused_naming_the_clients(algorithm: str) -> None:
    from fedmtl.config import ConfigError, parse_experiment

    data = tiny_experiment("local", rounds=1).model_dump(mode="json")
    data["algorithm"] = {"name": algorithm}
    data["clients"] = [c for c in data["clients"] if c["client_id"] != "b-digit"]
    with pytest.raises(ConfigError) as caught:
        parse_experiment(data)
    message = str(caught.value)
    assert f"{algorithm} needs two clients of one dataset sharing a classification task" in message
    assert "a-digit (digits: digit)" in message and "c-seg-depth" in message


def test_validate_refuses_a_comparison_whose_cofed_has_no_partner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the bundled federation without digit-resnet18: digit-vit-tiny's digits task is alone
    head, *clients = (ROOT / "configs" / "fedmuscle.toml").read_text().split("[[clients]]")
    kept = [c for c in clients if 'client_id = "digit-resnet18"' not in c]
    assert len(kept) == len(clients) - 1
    path = tmp_path / "alone.toml"
    path.write_text("[[clients]]".join([head, *kept]))
    assert main(["validate", str(path)]) == 2  # its [hyperparameters.cofed] cannot run here
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert "cofed needs two clients of one dataset sharing a classification task" in text
    assert "digit-vit-tiny (digits: digit)" in text
