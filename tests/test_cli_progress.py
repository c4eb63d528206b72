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
    from fedmtl.config import ALGORITHM_NAMES
    from fedmtl.data import DATASET_REGISTRY
    from fedmtl.models import supported_backbones
    from fedmtl.tasks import TASK_REGISTRY

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*ALGORITHM_NAMES, *TASK_REGISTRY, *supported_backbones(), *DATASET_REGISTRY]:
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
