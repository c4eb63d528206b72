"""What every tracker shares: the extras they need, the scalars of a round, the fan-out observer.

A tracker is an :class:`~fedmtl.strategies.loop.Observer` (``on_start``, ``on_phase``,
``on_round_end``) plus :meth:`Tracker.finish`, called once the run's summary.json and plots
exist. They are fed the same rows the loop appends to metrics.jsonl, so every backend shows
exactly what the run folder holds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedmtl.config import ConfigError, Experiment
from fedmtl.results import RunDirectory
from fedmtl.strategies.loop import Observer

log = logging.getLogger("fedmtl.tracking")

# tracker → (module that must be importable, human name); the pip extra has the tracker's name.
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "TensorBoard"),
    "mlflow": ("mlflow", "MLflow"),
    "wandb": ("wandb", "Weights & Biases"),
}
# Row fields that are not scalars of the round.
NOT_SCALARS = frozenset({"round", "client_id", "status", "error"})
# Per-key families of the algorithms' own signals that also get a mean over their keys
# (FedHCA2's α has one key per client, β one per client, task and layer).
FAMILY_MEANS = ("server/mfed/distance/", "server/fedhca2/alpha/", "server/fedhca2/beta/")
STATE_FILE = "tracking.json"


class MissingExtraError(ConfigError):
    """A tracker was turned on but its optional dependency is not installed."""


def require_extra(name: str) -> None:
    """Check that tracker ``name``'s package is importable.

    Raises
    ------
    MissingExtraError
        Naming the extra to install, e.g. ``pip install 'fedmtl[mlflow]'``.
    """
    module, label = EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"tracking.{name}: the {label} tracker needs the optional extra {name!r}, which is "
            f"not installed: pip install 'fedmtl[{name}]' (or turn it off in [tracking])"
        )


def check_trackers(experiment: Experiment) -> None:
    """Every tracker the experiment turns on can be imported (before any round runs)."""
    for name in experiment.tracking.enabled():
        require_extra(name)


def round_scalars(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The scalars of one round, by tag: what each tracker logs at step ``round``.

    ``<client>/<key>`` for each numeric field of a client's row (``eval/<task>/<metric>``,
    ``train/loss``, ``bytes_up``, ``seconds/train``, ...), ``<client>/failed`` (1 if the
    client was left out), ``server/<key>`` once for the server's signals (FedMuscle's
    alignment loss, M-Fed's distances, FedHCA2's α/β), and ``<family>_mean`` over the keys
    of :data:`FAMILY_MEANS`.
    """
    out: dict[str, float] = {}
    for row in rows:
        client = str(row["client_id"])
        out[f"{client}/failed"] = 1.0 if row.get("status") == "failed" else 0.0
        for key, value in row.items():
            if key in NOT_SCALARS or not isinstance(value, int | float):
                continue
            tag = key if key.startswith("server/") else f"{client}/{key}"
            out[tag] = float(value)
    for prefix in FAMILY_MEANS:
        values = [v for k, v in out.items() if k.startswith(prefix) and math.isfinite(v)]
        if values:
            out[f"{prefix.rstrip('/')}_mean"] = sum(values) / len(values)
    return out


def final_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """``final/<client>/<task>/<metric>`` (the reported value), Δ% per task and the mean Δ%."""
    out: dict[str, float] = {}
    for client, entry in summary.get("clients", {}).items():
        for task, values in entry.get("tasks", {}).items():
            if values.get("value") is not None:
                out[f"final/{client}/{task}/{values['metric']}"] = float(values["value"])
            if values.get("delta_vs_local_pct") is not None:
                out[f"final/{client}/{task}/delta_vs_local_pct"] = float(
                    values["delta_vs_local_pct"]
                )
    if summary.get("mean_delta_vs_local_pct") is not None:
        out["final/mean_delta_vs_local_pct"] = float(summary["mean_delta_vs_local_pct"])
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as ``a.b.0.c`` keys (MLflow params are flat strings)."""
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    if not out and prefix:  # an empty table or list still shows up as a parameter
        out[prefix] = "{}" if isinstance(value, Mapping) else "[]"
    return out


def run_name(experiment: Experiment) -> str:
    """``<algorithm>-seed<seed>``: one name per run of a comparison."""
    return f"{experiment.algorithm.name}-seed{experiment.seed}"


class Tracker(Protocol):
    """An Observer that also hears how the run ended."""

    name: str

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Open the backend's run (``first_round`` > 1 on resume)."""

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """After a phase (most trackers log per round only)."""

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Log the round's scalars at step ``round_``."""

    def finish(self, status: str) -> None:
        """Log summary and plots (if any) and close; ``status``: FINISHED, FAILED or KILLED."""

    def where(self) -> str:
        """One line telling the user where to look (a command or a path)."""


def read_state(run_dir: RunDirectory) -> dict[str, Any]:
    """``tracking.json`` of a run folder: each tracker's run id, so a resume continues it."""
    path = run_dir.path / STATE_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))


def write_state(run_dir: RunDirectory, name: str, entry: Mapping[str, Any]) -> None:
    """Record tracker ``name``'s run identity in ``tracking.json``."""
    state = read_state(run_dir)
    state[name] = dict(entry)
    (run_dir.path / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


class TrackingObserver:
    """Feeds the loop's progress to an observer (the CLI's, the log's) and to the trackers.

    The observer's exceptions propagate (a stop request must stop the run); a tracker that
    fails is logged once and dropped, so a tracking server that goes away never costs a run.
    """

    def __init__(
        self,
        observer: Observer,
        trackers: Iterable[Tracker],
        run_dir: RunDirectory | None = None,
    ) -> None:
        self.observer = observer
        self.trackers = list(trackers)
        self.run_dir = run_dir

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker must never end the run
                log.warning(
                    "tracker %s failed in %s and is turned off: %s", tracker.name, method, exc
                )
                self.trackers.remove(tracker)

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Start the observer, then open each tracker's run."""
        self.observer.on_start(experiment, first_round)
        self._each("on_start", experiment, first_round)

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Forward a finished phase."""
        self.observer.on_phase(round_, phase, done, total)
        self._each("on_phase", round_, phase, done, total)

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Log the round to every tracker before the observer (which may stop the run)."""
        self._each("on_round_end", round_, rows)
        self.observer.on_round_end(round_, rows)

    def finish(self, status: str) -> list[str]:
        """Close every tracker; returns where each one wrote (one line per tracker)."""
        self._each("finish", status)
        lines = []
        for tracker in self.trackers:
            try:
                lines.append(f"{tracker.name}: {tracker.where()}")
            except Exception:  # a hint is not worth an error
                continue
        if self.run_dir is not None and lines:
            # kept for the CLI, which prints them after the final table
            write_state(self.run_dir, "where", {"lines": lines})
        return lines


def run_paths(run_dir: RunDirectory) -> dict[str, Path]:
    """The files of a finished run a tracker attaches (those that exist)."""
    candidates = {
        "summary": run_dir.summary_path,
        "config": run_dir.config_path,
        "plot": run_dir.path / "metrics.png",
    }
    return {k: p for k, p in candidates.items() if p.is_file()}
