"""The run and comparison plots: integer round ticks, a style per line, a band over seeds."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from fedmtl.report import runs_figure
from fedmtl.results import RunDirectory
from tests.helpers import tiny_experiment


def _fake_run(out: Path, algorithm: str, seed: int, offset: float) -> RunDirectory:
    """A finished-looking run folder with hand-written metrics (no training)."""
    experiment = tiny_experiment(algorithm, rounds=3).model_copy(update={"seed": seed})
    run = RunDirectory.create(out / f"{algorithm}-{seed}", experiment)
    rows = []
    for round_ in (1, 2, 3):
        for i, client in enumerate(experiment.clients):
            row = {"round": round_, "client_id": client.client_id}
            for task in client.tasks:
                metric = {"digit": "accuracy", "segmentation": "miou", "depth": "rmse"}[task]
                row[f"eval/{task}/{metric}"] = 0.1 * round_ + offset + 0.01 * i
            row["server/fedhca2/alpha/a-digit"] = 0.1 + 0.05 * round_
            rows.append(row)
    run.append_metrics(rows)
    return run


def test_lines_differ_in_style_ticks_are_rounds_and_seeds_give_a_band(tmp_path: Path) -> None:
    runs = {
        "fedavg": {s: _fake_run(tmp_path, "fedavg", s, 0.02 * s) for s in (0, 1)},
        "fedper": {0: _fake_run(tmp_path, "fedper", 0, 0.0)},  # one seed: no band
    }
    fig = runs_figure(runs)
    try:
        fig.canvas.draw()
        axes = [ax for ax in fig.axes if ax.get_lines()]
        # 4 client tasks and FedHCA2's α panel
        assert len(axes) == 5
        assert any("FedHCA2 α" in ax.get_title() for ax in axes)
        first = axes[0]
        fedavg, fedper = first.get_lines()[:2]
        assert fedavg.get_label() == "fedavg" and fedper.get_label() == "fedper"
        assert fedavg.get_linestyle() != fedper.get_linestyle()
        assert fedavg.get_marker() != fedper.get_marker()
        assert fedavg.get_color() != fedper.get_color()
        assert list(fedavg.get_xdata()) == [1, 2, 3]
        assert fedavg.get_ydata()[0] == pytest.approx(0.1 + 0.01)  # mean of 0.1 and 0.12
        low, high = first.get_xlim()
        ticks = [t for t in first.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        # one band (fill_between) for the label with two seeds, none for the single seed
        assert len(first.collections) == 1
    finally:
        plt.close(fig)
