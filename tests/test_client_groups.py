"""Issue 19: client groups (``count = n``) expand into ordinary clients, validated as such."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from fedmtl.config import ConfigError, member_id, parse_experiment
from fedmtl.results import RunDirectory
from tests.helpers import StopAfter, eval_rows, run_in_process

TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 1}
MODEL = {"backbone": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "decoder_hidden": 16}


def _data(**group: Any) -> dict[str, Any]:
    """A single client, then a group of five, then another single client."""
    return {
        "name": "groups",
        "seed": 5,
        "rounds": 3,
        "device": "cpu",
        "datasets": {"digits": {"kind": "quickstart", "image_size": 16}},
        "defaults": {"batch_size": 8, "max_batches": 1, "lr": 0.01},
        "clients": [
            {"client_id": "solo", "dataset": "digits", "tasks": ["digit"], "model": MODEL},
            {
                "client_id": "w",
                "count": 5,
                "dataset": "digits",
                "tasks": ["digit"],
                "samples": 24,
                "test_samples": 8,
                "model": MODEL,
                "training": {"batch_size": 4},
                **group,
            },
            {"client_id": "last", "dataset": "digits", "tasks": ["depth"], "model": MODEL},
        ],
    }


def _explicit(data: dict[str, Any]) -> dict[str, Any]:
    """The same file with the group written out as five blocks by hand."""
    out = copy.deepcopy(data)
    group = out["clients"][1]
    overrides = group.pop("overrides", {})
    group.pop("count")
    members = []
    for k in range(5):
        member = {**copy.deepcopy(group), "client_id": f"w-00{k}"}
        own = overrides.get(f"w-00{k}", {})
        for key, value in own.items():
            member[key] = {**member[key], **value} if key in ("model", "training") else value
        members.append(member)
    out["clients"][1:2] = members
    return out


def test_member_ids_are_zero_padded_and_sort_in_order() -> None:
    assert member_id("w", 0, 40) == "w-000"
    assert member_id("w", 39, 40) == "w-039"
    assert member_id("w", 1234, 2000) == "w-1234"
    ids = [member_id("w", k, 2000) for k in range(2000)]
    assert ids == sorted(ids)


def test_group_equals_the_clients_written_out() -> None:
    overrides = {"w-003": {"training": {"lr": 0.5}, "samples": 12}, "w-004": {"tasks": ["depth"]}}
    data = _data(overrides=overrides)
    grouped = parse_experiment(copy.deepcopy(data))
    explicit = parse_experiment(_explicit(data))
    assert grouped == explicit  # every field of every client, defaults merged the same way
    ids = [c.client_id for c in grouped.clients]
    assert ids == ["solo", "w-000", "w-001", "w-002", "w-003", "w-004", "last"]
    assert grouped.client("w-003").training.lr == 0.5  # the override
    assert grouped.client("w-003").training.batch_size == 4  # the template, merged key by key
    assert grouped.client("w-002").training.lr == 0.01  # [defaults]
    assert grouped.client("w-003").samples == 12 and grouped.client("w-000").samples == 24
    assert grouped.client("w-004").tasks == ["depth"]
    # Partitions follow file order, as for single clients.
    assert grouped.dataset_members("digits") == ids
    assert grouped.client_index("w-000") == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"count": 0}, "clients[1].count"),
        ({"count": "five"}, "clients[1].count"),
        ({"overrides": {"w-9": {}}}, "clients[1].overrides: ['w-9'] are not members"),
        ({"overrides": {"w-001": {"client_id": "x"}}}, "clients[1].overrides.w-001"),
        ({"overrides": {"w-001": {"count": 2}}}, "clients[1].overrides.w-001"),
        (
            {"overrides": {"w-002": {"model": {"backbone": "alexnet"}}}},
            "clients[1] (member w-002).model.backbone",
        ),
        ({"tasks": ["dgit"]}, "clients[1] (member w-000).tasks: unknown task 'dgit'"),
        ({"dataset": "nope"}, "clients[1] (member w-000).dataset"),
        ({"training": {"lr": -1}}, "clients[1] (member w-000).training.lr"),
    ],
)
def test_group_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    data = _data()
    data["clients"][1].update(change)
    with pytest.raises(ConfigError) as info:
        parse_experiment(data)
    assert field in str(info.value)


def test_single_clients_after_a_group_keep_their_file_index() -> None:
    data = _data()
    data["clients"][2]["tasks"] = ["dpeth"]
    with pytest.raises(ConfigError, match=r"clients\[2\]\.tasks: unknown task 'dpeth'"):
        parse_experiment(data)


def test_duplicate_between_group_and_single_client_is_refused() -> None:
    data = _data()
    data["clients"][2]["client_id"] = "w-004"
    with pytest.raises(ConfigError, match=r"duplicate client_id \['w-004'\]"):
        parse_experiment(data)


def test_clients_per_round_samples_a_group_seeded_and_resumable(tmp_path: Path) -> None:
    data = _data()
    data["clients_per_round"] = 3
    experiment = parse_experiment(data)
    assert len(experiment.clients) == 7
    full, _ = run_in_process(experiment, tmp_path / "full")
    by_round: dict[int, set[str]] = {}
    for row in full.read_metrics():
        by_round.setdefault(row["round"], set()).add(row["client_id"])
    assert [len(by_round[r]) for r in (1, 2, 3)] == [3, 3, 3]
    assert len({frozenset(s) for s in by_round.values()}) > 1  # a fresh draw per round

    with pytest.raises(StopAfter.Stopped):
        run_in_process(experiment, tmp_path / "stopped", observer=StopAfter(1))
    run_dir = RunDirectory(next((tmp_path / "stopped" / "groups").iterdir()))
    resumed, _ = run_in_process(experiment, tmp_path, run_dir=run_dir, resume=True)
    assert eval_rows(resumed) == eval_rows(full)  # same participants, same numbers
