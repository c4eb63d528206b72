"""Per-task FedAvg: task models averaged inside task groups only, recomputed by hand."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmtl.config import parse_experiment
from tests.helpers import (
    TINY_VIT,
    reply_arrays,
    run_recorded,
    tiny_experiment,
    train_messages,
)


def test_task_groups_average_whole_task_models_and_nothing_across(tmp_path: Path) -> None:
    data = tiny_experiment("fedavg_task", rounds=2).model_dump(mode="json")
    # a fourth client: segmentation only, so the multi-task client shares segmentation with it
    # and is alone in depth; the digit clients get unequal sizes (FedAvg weights 24 and 40)
    d_seg = {**data["clients"][2], "client_id": "d-seg", "tasks": ["segmentation"]}
    data["clients"] = [*data["clients"], d_seg]
    data["clients"][1]["samples"] = 40
    data["datasets"]["digits"]["partition"] = {"scheme": "sizes"}
    for client in data["clients"]:
        client["model"]["kwargs"] = TINY_VIT
    experiment = parse_experiment(data)
    ids = [c.client_id for c in experiment.clients]
    run_dir, grid, recorder = run_recorded(experiment, tmp_path)
    up = {cid: reply_arrays(recorder.replies[(1, cid)]) for cid in ids}
    sent = train_messages(grid, ids)
    # a digit client uploads its whole digit model (encoder, decoder, head), nothing else
    assert any(k.startswith("heads.digit.") for k in up["a-digit"])
    assert all(k.startswith(("encoder.", "decoders.digit.", "heads.digit.")) for k in up["a-digit"])
    # the multi-task client uploads its encoder and segmentation model, not its lone depth task
    assert any(k.startswith("heads.segmentation.") for k in up["c-seg-depth"])
    assert not any(k.startswith(("decoders.depth.", "heads.depth.")) for k in up["c-seg-depth"])

    def avg(members: dict[str, float], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        names = [k for k in up[next(iter(members))] if k.startswith(prefixes)]
        total = sum(members.values())
        return {n: sum(w / total * up[m][n] for m, w in members.items()) for n in names}

    digit = avg({"a-digit": 24, "b-digit": 40}, ("encoder.", "decoders.digit.", "heads.digit."))
    seg = avg(
        {"c-seg-depth": 24, "d-seg": 24},
        ("encoder.", "decoders.segmentation.", "heads.segmentation."),
    )
    own_c = {k: v for k, v in up["c-seg-depth"].items() if k.startswith("encoder.")}
    expected = {
        "a-digit": digit,
        "b-digit": digit,
        "d-seg": seg,
        # its encoder: the mean of its groups' encoders, its lone depth group's being its own
        "c-seg-depth": {
            **{k: v for k, v in seg.items() if not k.startswith("encoder.")},
            **{k: (seg[k] + own_c[k]) / 2 for k in own_c},
        },
    }
    for cid in ids:
        got = reply_arrays(sent[(2, cid)].content)
        assert set(got) == set(expected[cid]), cid
        for name, value in expected[cid].items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)
    # nothing across groups: the digit clients' encoder is not the segmentation clients'
    name = next(k for k in digit if k.startswith("encoder."))
    assert not torch.allclose(digit[name], seg[name])
    row = next(r for r in run_dir.read_metrics() if r["round"] == 1)
    assert row["server/fedavg_task/shared_groups"] == 2.0  # digit and segmentation


def test_a_client_with_no_partner_trains_alone(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg_task", rounds=2)  # c-seg-depth: no other seg/depth
    ids = [c.client_id for c in experiment.clients]
    _, grid, recorder = run_recorded(experiment, tmp_path)
    assert reply_arrays(recorder.replies[(1, "c-seg-depth")]) == {}
    received = [
        m
        for m in grid.sent
        if m.metadata.dst_node_id == 101 + ids.index("c-seg-depth")
        and m.metadata.message_type in ("train", "evaluate")
    ]
    assert received and all(not reply_arrays(m.content) for m in received)
