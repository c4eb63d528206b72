"""`fedmtl --version`, `fedmtl list`, and the log lines `flwr run . --stream` shows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedmtl import __version__
from fedmtl.cli import main
from fedmtl.progress import LogLineObserver, render_text
from fedmtl.report import summarize, summary_table
from tests.helpers import run_in_process, tiny_experiment


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fedmtl {__version__} (Flower 1.")


def test_list_prints_every_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmtl.config import ALGORITHM_NAMES, bundled_configs
    from fedmtl.data import DATASET_REGISTRY
    from fedmtl.models import supported_backbones
    from fedmtl.tasks import TASK_REGISTRY

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    names = [*ALGORITHM_NAMES, *TASK_REGISTRY, *supported_backbones(), *DATASET_REGISTRY]
    for name in [*names, *bundled_configs()]:
        assert f" {name} " in out, name
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "semseg" in out and "miou ↑" in out and "fedavg" not in out
    assert main(["list", "algos"]) == 2
    assert "unknown section ['algos']" in capsys.readouterr().out


def test_progress_logs_one_line_per_phase_and_a_table_in_80_columns(tmp_path: Path) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("fedmtl.test.progress")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    experiment = tiny_experiment("fedavg", rounds=2)
    run_dir, _ = run_in_process(experiment, tmp_path, observer=LogLineObserver(logger))
    assert records[0] == "fedmtl tiny · fedavg: rounds 1–2, 3 clients"
    # "[ROUND 1/2] train: 3/3 clients replied (2.7 s)": the part before the timing
    phases = [r.split(" (")[0].split(" in ")[0] for r in records[1:]]
    assert phases == [
        "[ROUND 1/2] train: 3/3 clients replied",
        "[ROUND 1/2] evaluate: 3/3 clients replied",
        "[ROUND 1/2] done",
        "[ROUND 2/2] train: 3/3 clients replied",
        "[ROUND 2/2] evaluate: 3/3 clients replied",
        "[ROUND 2/2] done",
    ]
    text = render_text(summary_table(summarize(run_dir)))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    for client in ("a-digit", "b-digit", "c-seg-depth"):
        assert client in text  # never cut
    assert "\x1b[" not in text  # plain text for `flwr log`


def test_final_table_moves_models_to_a_legend_at_80_columns() -> None:
    clients = {
        "depth-edge-vit-small": ("vit_small_patch16_224", ["depth", "edge"]),
        "surface-normals-swin": ("swin_tiny_patch4_window7_224", ["normals"]),
    }
    summary = {
        "experiment": "quickstart",
        "algorithm": "fedavg",
        "average_last_rounds": 3,
        "mean_delta_vs_local_pct": 1.5,
        "clients": {
            c: {
                "model": model,
                "tasks": {
                    t: {
                        "kind": t,
                        "metric": "mean_angular_error",
                        "higher_is_better": False,
                        "value": 12.3456,
                        "delta_vs_local_pct": -3.25,
                    }
                    for t in tasks
                },
            }
            for c, (model, tasks) in clients.items()
        },
    }
    narrow = render_text(summary_table(summary), width=80)
    assert max(len(line) for line in narrow.splitlines()) <= 80 and "…" not in narrow
    assert narrow.count("depth-edge-vit-small") == 3  # two rows and the legend, whole
    assert "models: vit_small_patch16_224 (depth-edge-vit-small)" in narrow
    assert "swin_tiny_patch4_window7_224" in narrow.replace("\n", "")
    wide = render_text(summary_table(summary), width=140)
    assert "models:" not in wide and wide.count("vit_small_patch16_224") == 2  # a column


def test_no_positive_sample_warnings_are_silenced() -> None:
    import warnings

    import torch

    from fedmtl.tasks import create_task

    task = create_task("multilabel", "attributes", 3)
    metrics = task.new_metrics()
    target = torch.tensor([[1, 0, 0], [0, 1, 0]])  # label 2 never positive in the pass
    metrics.update(torch.randn(2, 3), target)
    with warnings.catch_warnings(record=True) as caught:
        values = metrics.compute()
    assert 0.0 <= values["mAP"] <= 1.0
    assert not [w for w in caught if "No positive samples" in str(w.message)]
