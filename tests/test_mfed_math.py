"""M-Fed math: two-tier aggregation, λ schedule, negative-transfer switch, regulariser gradient."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedmtl.aggregation.lambda_schedule import LambdaSchedule
from fedmtl.aggregation.two_tier import (
    TaskMember,
    architecture_signature,
    check_single_encoder_architecture,
    inter_task_average,
    intra_task_average,
    relative_squared_distance,
    task_example_counts,
)
from fedmtl.losses.proximal import proximal_term


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def member(client: str, task: str, enc: torch.Tensor, dec: float, n: int) -> TaskMember:
    return TaskMember(
        client_id=client,
        task=task,
        encoder={"encoder.w": enc},
        task_tensors={f"decoders.{task}.w": t(dec), f"heads.{task}.b": t(2 * dec)},
        num_examples=n,
    )


# "seg": A (n=1), B (n=3), E (n=8) — three members; "depth": B (n=2, multi-task), C (n=6).
ENC_A, ENC_B, ENC_C, ENC_E = t(1, 2), t(5, 6), t(1, -2), t(0, 0)
MEMBERS = [
    member("A", "seg", ENC_A, 0.0, 1),
    member("B", "seg", ENC_B, 4.0, 3),
    member("E", "seg", ENC_E, 1.0, 8),
    member("B", "depth", ENC_B, 10.0, 2),
    member("C", "depth", ENC_C, 2.0, 6),
]
# By hand: seg encoder (1·[1,2] + 3·[5,6] + 8·[0,0]) / 12 = [16/12, 20/12];
# seg decoder (0 + 12 + 8) / 12; depth encoder (2·[5,6] + 6·[1,-2]) / 8 = [2, 0];
# depth decoder (20 + 12) / 8 = 4.
SEG_ENC, DEPTH_ENC = t(4 / 3, 5 / 3), t(2, 0)


def test_intra_task_average_data_weighted_by_hand() -> None:
    out = intra_task_average(MEMBERS)
    assert list(out) == ["seg", "depth"]
    assert set(out["seg"]) == {"encoder.w", "decoders.seg.w", "heads.seg.b"}
    assert set(out["depth"]) == {"encoder.w", "decoders.depth.w", "heads.depth.b"}
    torch.testing.assert_close(out["seg"]["encoder.w"], SEG_ENC)
    torch.testing.assert_close(out["seg"]["decoders.seg.w"], t(20 / 12))
    torch.testing.assert_close(out["seg"]["heads.seg.b"], t(40 / 12))
    torch.testing.assert_close(out["depth"]["encoder.w"], DEPTH_ENC)
    torch.testing.assert_close(out["depth"]["decoders.depth.w"], t(4.0))
    torch.testing.assert_close(out["depth"]["heads.depth.b"], t(8.0))


def test_intra_task_average_uniform() -> None:
    out = intra_task_average(MEMBERS, weighting="uniform")
    torch.testing.assert_close(out["seg"]["encoder.w"], t(2, 8 / 3))  # ([1,2]+[5,6]+[0,0]) / 3
    torch.testing.assert_close(out["depth"]["encoder.w"], t(3, 2))  # ([5,6]+[1,-2]) / 2


def test_task_example_counts_counts_multitask_client_per_task() -> None:
    assert task_example_counts(MEMBERS) == {"seg": 12, "depth": 8}


def test_inter_task_average_uniform_and_data() -> None:
    tier1 = intra_task_average(MEMBERS)
    uniform = inter_task_average(tier1)
    assert set(uniform) == {"encoder.w"}  # decoders and heads never cross tasks
    torch.testing.assert_close(uniform["encoder.w"], t(5 / 3, 5 / 6))  # (SEG + DEPTH) / 2
    data = inter_task_average(tier1, weighting="data", task_sizes=task_example_counts(MEMBERS))
    # 12/20 · [4/3, 5/3] + 8/20 · [2, 0] = [0.8 + 0.8, 1.0]
    torch.testing.assert_close(data["encoder.w"], t(1.6, 1.0))


def test_inter_task_average_three_tasks_and_multiple_keys() -> None:
    encoders = {
        "a": {"encoder.w": t(3.0), "encoder.b": t(0, 0)},
        "b": {"encoder.w": t(6.0), "encoder.b": t(3, 3)},
        "c": {"encoder.w": t(0.0), "encoder.b": t(3, 0)},
    }
    g = inter_task_average(encoders)
    torch.testing.assert_close(g["encoder.w"], t(3.0))
    torch.testing.assert_close(g["encoder.b"], t(2, 1))
    g = inter_task_average(encoders, weighting="data", task_sizes={"a": 1, "b": 1, "c": 2})
    torch.testing.assert_close(g["encoder.w"], t(2.25))  # (3 + 6 + 0) / 4
    torch.testing.assert_close(g["encoder.b"], t(2.25, 0.75))  # ([0,0]+[3,3]+2·[3,0]) / 4


def test_inter_task_average_data_needs_sizes() -> None:
    encoders = {"a": {"encoder.w": t(1.0)}, "b": {"encoder.w": t(2.0)}}
    with pytest.raises(ValueError, match="task_sizes"):
        inter_task_average(encoders, weighting="data")
    with pytest.raises(ValueError, match="'b'"):
        inter_task_average(encoders, weighting="data", task_sizes={"a": 3})
    with pytest.raises(ValueError, match="weighting"):
        inter_task_average(encoders, weighting="median")


def test_inter_task_average_names_mismatched_task() -> None:
    encoders = {
        "seg": {"encoder.w": t(1, 2)},
        "depth": {"encoder.w": t(1, 2)},
        "edge": {"encoder.w": t(1, 2, 3)},
    }
    with pytest.raises(ValueError, match="'edge'") as err:
        inter_task_average(encoders)
    assert "'seg'" not in str(err.value).split(";")[0]
    encoders["edge"] = {"encoder.w": t(1, 2), "encoder.extra": t(0.0)}
    with pytest.raises(ValueError, match=r"task\(s\) 'edge'.*extra"):
        inter_task_average(encoders)


def test_check_single_encoder_architecture() -> None:
    check_single_encoder_architecture({"a": "x", "b": "x"})
    with pytest.raises(ValueError, match="'c'") as err:
        check_single_encoder_architecture({"a": "x", "b": "x", "c": "y"})
    assert "'a'" not in str(err.value)
    with pytest.raises(ValueError, match="no majority") as err:
        check_single_encoder_architecture({"a": "x", "b": "y"})
    assert "'a'" in str(err.value) and "'b'" in str(err.value)


def test_architecture_signature_names_and_shapes_only() -> None:
    one = {"encoder.a": torch.zeros(2, 3), "encoder.b": torch.zeros(4)}
    reordered = {"encoder.b": torch.ones(4), "encoder.a": torch.ones(2, 3)}
    assert architecture_signature(one) == architecture_signature(reordered)
    assert architecture_signature(one) != architecture_signature({"encoder.a": torch.zeros(3, 2)})


def test_intra_task_average_names_client_with_other_encoder() -> None:
    bad = [*MEMBERS, member("D", "depth", t(1, 2, 3), 0.0, 5)]
    with pytest.raises(ValueError, match=r"client\(s\) 'D'.*encoder"):
        intra_task_average(bad)


def test_intra_task_average_names_client_and_task_with_other_decoder() -> None:
    odd = TaskMember("D", "depth", {"encoder.w": t(0, 0)}, {"decoders.depth.w": t(1, 1)}, 5)
    with pytest.raises(ValueError, match=r"task 'depth'.*'D'"):
        intra_task_average([*MEMBERS, odd])


def test_multitask_client_must_send_one_encoder() -> None:
    clash = [member("B", "seg", ENC_B, 0.0, 1), member("B", "depth", ENC_B + 1, 0.0, 1)]
    with pytest.raises(ValueError, match=r"'B'.*different encoders"):
        intra_task_average(clash)
    # Equal values in distinct tensors are the same encoder.
    same = [member("B", "seg", ENC_B, 0.0, 1), member("B", "depth", ENC_B.clone(), 0.0, 1)]
    assert set(intra_task_average(same)) == {"seg", "depth"}
    with pytest.raises(ValueError, match="twice"):
        intra_task_average([member("A", "seg", ENC_A, 0.0, 1)] * 2)


def test_task_member_rejects_other_tasks_tensors() -> None:
    with pytest.raises(ValueError, match="'A'"):
        TaskMember("A", "seg", {"encoder.w": t(1)}, {"decoders.depth.w": t(1)}, 1)
    with pytest.raises(ValueError, match="encoder"):
        TaskMember("A", "seg", {"decoders.seg.w": t(1)}, {}, 1)
    with pytest.raises(ValueError, match="num_examples"):
        TaskMember("A", "seg", {"encoder.w": t(1)}, {}, -1)
    with pytest.raises(ValueError, match=r"'seg'.*zero"):
        intra_task_average([member("A", "seg", ENC_A, 0.0, 0)])


def test_relative_squared_distance_by_hand() -> None:
    g = {"encoder.a": t(1, 0), "encoder.b": t(2.0), "encoder.n": torch.tensor(7)}
    w = {"encoder.a": t(1, 2), "encoder.b": t(0.0), "decoders.x.w": t(9.0)}
    # ((0 + 4) + 4) / (1 + 4); the integer tensor is skipped
    assert relative_squared_distance(w, g) == pytest.approx(8 / 5)


def test_exponential_schedule_by_hand() -> None:
    default = LambdaSchedule()
    assert default.lambda_for("seg", 1) == pytest.approx(1e-3)
    assert default.lambda_for("seg", 2) == pytest.approx(1.2e-3)
    assert default.lambda_for("seg", 3) == pytest.approx(1.44e-3)
    assert default.lambda_for("seg", 10) == pytest.approx(1e-3 * 5.159780352)  # 1.2^9
    # 1.2^37 ≈ 850 < 1000 ≤ 1.2^38: round 38 is below the cap, round 39 is capped.
    assert default.lambda_for("seg", 38) == pytest.approx(0.8505, rel=1e-3)
    assert default.lambda_for("seg", 39) == 1.0
    fast = LambdaSchedule(lambda_0=0.1, growth=2.0, lambda_max=1.0)
    values = [fast.lambda_for("seg", r) for r in range(1, 7)]
    assert values == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert fast.lambda_for("seg", 100_000) == 1.0  # no float overflow
    with pytest.raises(ValueError, match="from 1"):
        fast.lambda_for("seg", 0)


def test_constant_schedule() -> None:
    schedule = LambdaSchedule(kind="constant", constant=0.1)
    assert [schedule.lambda_for("x", r) for r in (1, 2, 50)] == [0.1, 0.1, 0.1]
    with pytest.raises(ValueError, match="kind"):
        LambdaSchedule(kind="linear")


def test_freeze_stops_growth_for_that_task_only() -> None:
    schedule = LambdaSchedule(lambda_0=0.1, growth=2.0, freeze_epsilon=0.01)
    schedule.observe_alignment("seg", 1, 0.5)  # not close enough
    schedule.observe_alignment("seg", 2, 0.005)
    schedule.observe_alignment("seg", 3, 0.5)  # once frozen, stays frozen
    assert [schedule.lambda_for("seg", r) for r in (1, 2, 3, 4)] == pytest.approx(
        [0.1, 0.2, 0.2, 0.2]
    )
    assert schedule.lambda_for("depth", 3) == pytest.approx(0.4)


def feed(schedule: LambdaSchedule, metrics: dict[int, float], hib: bool = True) -> None:
    for server_round, metric in metrics.items():
        schedule.observe("seg", server_round, metric, higher_is_better=hib)


def test_negative_transfer_switch_off_and_back_on() -> None:
    schedule = LambdaSchedule(lambda_0=0.1, growth=2.0, threshold=0.1, patience=2)
    # best 0.60 after round 2. Round 3: (0.60−0.53)/0.60 = 11.7 % > 10 % → bad 1;
    # round 4: 8.3 % → reset; rounds 5 (16.7 %) and 6 (13.3 %) → 2 bad rounds → off after 6.
    feed(schedule, {1: 0.50, 2: 0.60, 3: 0.53, 4: 0.55, 5: 0.50})
    assert schedule.lambda_for("seg", 6) == pytest.approx(1.0)
    feed(schedule, {6: 0.52})
    assert schedule.lambda_for("seg", 6) == pytest.approx(1.0)  # past rounds keep their λ
    assert schedule.lambda_for("seg", 7) == 0.0
    assert schedule.lambda_for("depth", 7) == pytest.approx(1.0)  # other tasks unaffected
    feed(schedule, {7: 0.59})  # recovering, still below best 0.60 → stays off
    assert schedule.lambda_for("seg", 8) == 0.0
    feed(schedule, {8: 0.61})  # back at (above) best → on again
    assert schedule.lambda_for("seg", 8) == 0.0
    assert schedule.lambda_for("seg", 9) == pytest.approx(1.0)
    # New best is 0.61: 0.55 is 9.8 % worse (not bad), 0.54 is 11.5 % worse (bad).
    feed(schedule, {9: 0.55, 10: 0.54})
    assert schedule.lambda_for("seg", 11) == pytest.approx(1.0)
    feed(schedule, {11: 0.54})
    assert schedule.lambda_for("seg", 12) == 0.0


def test_negative_transfer_switch_lower_is_better() -> None:
    schedule = LambdaSchedule(lambda_0=0.1, growth=2.0, threshold=0.1, patience=1)
    feed(schedule, {1: 1.0, 2: 0.8, 3: 0.85}, hib=False)  # 6.25 % worse than 0.8 → still on
    assert schedule.lambda_for("seg", 4) == pytest.approx(0.8)
    feed(schedule, {4: 0.9}, hib=False)  # 12.5 % worse → off
    assert schedule.lambda_for("seg", 5) == 0.0
    feed(schedule, {5: 0.8}, hib=False)  # equal to best → on
    assert schedule.lambda_for("seg", 6) == pytest.approx(1.0)


def test_switch_disabled_without_threshold_and_input_checks() -> None:
    schedule = LambdaSchedule(lambda_0=0.1, growth=2.0)
    feed(schedule, {1: 0.9, 2: 0.1, 3: 0.1})
    assert schedule.lambda_for("seg", 4) == pytest.approx(0.8)
    checked = LambdaSchedule(threshold=0.1)
    feed(checked, {2: 0.5})
    with pytest.raises(ValueError, match="after round 2"):
        feed(checked, {2: 0.5})
    with pytest.raises(ValueError, match="higher_is_better"):
        feed(checked, {3: 0.5}, hib=False)
    with pytest.raises(ValueError, match="nan"):
        feed(checked, {4: float("nan")})


def test_schedule_state_round_trip_resumes_identically() -> None:
    def new() -> LambdaSchedule:
        return LambdaSchedule(
            lambda_0=0.1, growth=2.0, threshold=0.1, patience=2, freeze_epsilon=0.1
        )

    history = {1: 0.50, 2: 0.60, 3: 0.50, 4: 0.50, 5: 0.59}
    uninterrupted = new()
    feed(uninterrupted, history)
    uninterrupted.observe_alignment("depth", 2, 0.01)

    first_half = new()
    feed(first_half, {r: history[r] for r in (1, 2, 3)})
    first_half.observe_alignment("depth", 2, 0.01)
    saved = json.loads(json.dumps(first_half.state_dict()))  # plain python types only
    resumed = new()
    resumed.load_state_dict(saved)
    feed(resumed, {r: history[r] for r in (4, 5)})

    assert resumed.state_dict() == uninterrupted.state_dict()
    for server_round in range(1, 8):
        for task in ("seg", "depth"):
            assert resumed.lambda_for(task, server_round) == uninterrupted.lambda_for(
                task, server_round
            )
    assert resumed.lambda_for("seg", 5) == 0.0  # switched off after round 4
    assert resumed.lambda_for("depth", 5) == pytest.approx(0.2)  # frozen at round 2
    with pytest.raises(ValueError, match="malformed"):
        resumed.load_state_dict({"tasks": {"seg": {"best": 1.0}}})


def test_regulariser_gradient_is_two_lambda_times_difference() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"encoder": nn.Linear(4, 3), "decoder": nn.Linear(3, 2)})
    g = {
        name: torch.randn_like(p)
        for name, p in model.named_parameters()
        if name.startswith("encoder.")
    }
    lam = LambdaSchedule(lambda_0=0.1, growth=2.0).lambda_for("seg", 3)  # 0.4
    loss = proximal_term(model.named_parameters(), g, coefficient=lam)
    loss.backward()
    expected_value = lam * sum(
        float(((p.detach() - g[n]) ** 2).sum()) for n, p in model.named_parameters() if n in g
    )
    assert float(loss.detach()) == pytest.approx(expected_value, rel=1e-6)
    for name, param in model.named_parameters():
        if name in g:
            torch.testing.assert_close(param.grad, 2 * lam * (param.detach() - g[name]))
        else:
            assert param.grad is None  # the decoder is not pulled
