"""Seeds, paired Δ% and confidence intervals of `fedmtl compare`, checked by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedmtl.compare import comparison_stats, parse_seeds, run_comparison, stats_table, t_interval
from fedmtl.config import ConfigError
from fedmtl.report import summarize
from fedmtl.results import final_metrics
from tests.helpers import run_in_process, tiny_experiment


def test_t_interval_matches_a_hand_computation() -> None:
    # values 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446 (tables)
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(3.182446 * 1.290994 / 2.0, rel=1e-5)
    # two values: t(0.975, 1) = 12.706205, s = |a − b| / sqrt(2)
    mean, half = t_interval([10.0, 12.0])
    assert mean == pytest.approx(11.0)
    assert half == pytest.approx(12.706205 * (2.0 / math.sqrt(2)) / math.sqrt(2), rel=1e-5)
    # one value: no interval; NaN values are dropped
    assert t_interval([3.0])[0] == 3.0 and math.isnan(t_interval([3.0])[1])
    assert t_interval([1.0, math.nan, 3.0])[0] == pytest.approx(2.0)


def test_parse_seeds() -> None:
    assert parse_seeds(None, 5) == [5]
    assert parse_seeds("3", 5) == [5, 6, 7]
    assert parse_seeds("0,1,2", 5) == [0, 1, 2]
    for bad in ("0", "-2", "a", "1,1", ","):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad, 0)


def _summary(values: dict[str, float], deltas: dict[str, float | None]) -> dict[str, Any]:
    tasks = {
        t: {
            "metric": "accuracy",
            "higher_is_better": True,
            "value": v,
            "delta_vs_local_pct": deltas[t],
        }
        for t, v in values.items()
    }
    finite = [d for d in deltas.values() if d is not None]
    return {
        "clients": {"c": {"tasks": tasks}},
        "mean_delta_vs_local_pct": sum(finite) / len(finite) if finite else None,
    }


def test_comparison_stats_pairs_by_seed_and_marks_significance() -> None:
    summaries = {
        "local": {
            0: _summary({"x": 0.5, "y": 0.8}, {"x": 0.0, "y": 0.0}),
            1: _summary({"x": 0.6, "y": 0.7}, {"x": 0.0, "y": 0.0}),
            2: _summary({"x": 0.7, "y": 0.9}, {"x": 0.0, "y": 0.0}),
        },
        "fedavg": {
            0: _summary({"x": 0.55, "y": 0.8}, {"x": 10.0, "y": -2.0}),
            1: _summary({"x": 0.66, "y": 0.7}, {"x": 11.0, "y": 3.0}),
            2: _summary({"x": 0.77, "y": 0.9}, {"x": 12.0, "y": -1.0}),
        },
    }
    stats = comparison_stats(summaries)
    assert stats["seeds"] == [0, 1, 2]
    x = stats["algorithms"]["fedavg"]["clients"]["c"]["x"]["delta"]
    assert x["per_seed"] == [10.0, 11.0, 12.0]
    assert x["mean"] == pytest.approx(11.0)
    assert x["ci95"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # s = 1
    assert x["significant"]  # 11 ± 2.48 excludes 0
    y = stats["algorithms"]["fedavg"]["clients"]["c"]["y"]["delta"]
    assert y["mean"] == pytest.approx(0.0) and not y["significant"]
    mean = stats["algorithms"]["fedavg"]["mean_delta"]
    assert mean["per_seed"] == pytest.approx([4.0, 7.0, 5.5])
    table = stats_table(stats, last_k=3)
    assert table.row_count == 3  # two client tasks and the mean


def test_final_metrics_average_the_last_k_evaluated_rounds() -> None:
    rows = [
        {"client_id": "a", "round": r, "eval/t/acc": v}
        for r, v in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.6)]
    ] + [{"client_id": "a", "round": 5, "train/loss": 1.0}]  # a round without evaluation
    assert final_metrics(rows, 1)["a"]["eval/t/acc"] == pytest.approx(0.6)
    assert final_metrics(rows, 3)["a"]["eval/t/acc"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert final_metrics(rows, 10)["a"]["eval/t/acc"] == pytest.approx(1.3 / 4)


def test_compare_two_seeds_pairs_each_run_with_its_seeds_local(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg", rounds=2)
    runs, summaries = run_comparison(
        experiment,
        ["fedavg", "local"],
        [0, 1],
        run=lambda exp: run_in_process(exp, tmp_path)[0],
        summarize=summarize,
    )
    assert list(runs) == ["local", "fedavg"]  # the reference runs first
    for seed in (0, 1):
        assert runs["fedavg"][seed].experiment().seed == seed
        summary = summaries["fedavg"][seed]
        assert summary["reference_run"] == str(runs["local"][seed].path)
        local = summaries["local"][seed]["clients"]["a-digit"]["tasks"]["digit"]["value"]
        mine = summary["clients"]["a-digit"]["tasks"]["digit"]
        expected = (mine["value"] - local) / abs(local) * 100 if local else None
        if expected is not None:
            assert mine["delta_vs_local_pct"] == pytest.approx(expected)
    # different seeds give different partitions/initialisations, hence different local values
    locals_ = [
        summaries["local"][s]["clients"]["c-seg-depth"]["tasks"]["depth"]["value"] for s in (0, 1)
    ]
    assert locals_[0] != locals_[1]
    stats = comparison_stats(summaries)
    entry = stats["algorithms"]["fedavg"]["mean_delta"]
    assert len(entry["per_seed"]) == 2 and entry["ci95"] is not None


def test_cli_compare_with_seeds_writes_per_seed_values_and_intervals(tmp_path: Path) -> None:
    import json

    from fedmtl.cli import main

    root = Path(__file__).resolve().parent
    code = main(
        [
            "compare", str(root / "data" / "tiny.toml"), "--algorithms", "local,fedavg",
            "--seeds", "2", "--rounds", "1", "--last-k", "1", "--engine", "inprocess",
            "--output", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    (record_path,) = tmp_path.glob("*/compare-*/summary.json")
    record = json.loads(record_path.read_text())
    assert record["stats"]["seeds"] == [1, 2]  # tiny.toml's seed 1 and the one after it
    assert set(record["runs"]["fedavg"]) == {"1", "2"}
    entry = record["stats"]["algorithms"]["fedavg"]["mean_delta"]
    assert len(entry["per_seed"]) == 2
    assert entry["ci95"] is not None or None in entry["per_seed"]
    # each seed's fedavg run was compared with that seed's local run
    for seed in ("1", "2"):
        assert record["summaries"]["fedavg"][seed]["reference_run"] == record["runs"]["local"][seed]
    assert (record_path.parent / "compare.png").stat().st_size > 1000


def _long_stats(algorithms: list[str]) -> dict[str, Any]:
    """Stats of a federation with long client and task names (the quickstart's)."""
    names = {
        "depth-edge-vit-small": ["depth", "edge"],
        "seg-vit-tiny": ["segmentation"],
        "digit-resnet18": ["digit"],
    }
    entry = {"mean": -12.34, "ci95": 16.78, "significant": True, "per_seed": []}
    clients = {
        c: {
            t: {"metric": "mean_angular_error", "higher_is_better": False, "value": entry}
            | {"delta": entry}
            for t in tasks
        }
        for c, tasks in names.items()
    }
    return {
        "seeds": [0, 1, 2],
        "algorithms": {a: {"mean_delta": entry, "clients": clients} for a in algorithms},
    }


def test_compare_tables_fit_80_columns_without_cutting_names() -> None:
    from fedmtl.compare import stats_tables
    from fedmtl.progress import render_text

    algorithms = ["local", "fedavg", "fedprox", "fedper", "ditto", "mfed"]
    renderable = stats_tables(_long_stats(algorithms), last_k=3)
    text = render_text(renderable, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text
    tables = len(renderable.tables(80))
    assert tables > 1
    rows = {"depth-edge-vit-small": 2, "seg-vit-tiny": 1, "digit-resnet18": 1, "segmentation": 1}
    for name, per_table in rows.items():
        assert text.count(name) == per_table * tables, name  # whole, in every table
    for algorithm in algorithms[1:]:
        assert f" {algorithm}" in text  # every algorithm has its column somewhere
    assert text.count("-12.34 ± 16.78*") == 5 * 5  # 4 client tasks and the mean, each
    # a wide terminal gets one table
    assert len(stats_tables(_long_stats(algorithms), last_k=3).tables(200)) == 1
