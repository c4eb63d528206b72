"""A run's folder: resolved config, metrics.jsonl, checkpoints, summary.json (with Δ%)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmtl.config import Experiment, experiment_from_json, experiment_to_json


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


class RunDirectory:
    """``<output>/<experiment>/<timestamp>-<algorithm>/`` and what lives in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, experiment: Experiment) -> RunDirectory:
        """A fresh, uniquely named run folder with the resolved config written into it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir) / experiment.name
        path = base / f"{stamp}-{experiment.algorithm.name}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = base / f"{stamp}-{experiment.algorithm.name}-{suffix}"
        path.mkdir(parents=True)
        run = cls(path)
        _atomic_write_text(run.config_path, experiment_to_json(experiment))
        return run

    # -- paths -------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The resolved experiment (JSON)."""
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        """One JSON line per round per client."""
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        """Final metrics per client and Δ% against local training."""
        return self.path / "summary.json"

    @property
    def clients_dir(self) -> Path:
        """Personal-state root for clients simulated on this machine."""
        return self.path / "clients"

    @property
    def checkpoint_dir(self) -> Path:
        """Server checkpoints, one per round (the newest two kept)."""
        return self.path / "checkpoints"

    def experiment(self) -> Experiment:
        """The experiment this run was started with."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a fedmtl run folder (no config.json)")
        return experiment_from_json(self.config_path.read_text(encoding="utf-8"))

    # -- metrics -----------------------------------------------------------------------

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows to metrics.jsonl (flushed, so a crash loses at most the current round)."""
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, allow_nan=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of metrics.jsonl (empty if none yet)."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (a resumed run redoes them)."""
        rows = [r for r in self.read_metrics() if int(r["round"]) <= last_round]
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows)
        _atomic_write_text(self.metrics_path, text)

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(
        self, round_: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
    ) -> Path:
        """Atomically write the server state after ``round_``; keep the newest two."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        target = self.checkpoint_dir / f"round-{round_}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.checkpoint_dir, prefix=".tmp-")
        os.close(fd)
        try:
            payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(payload, tmp, metadata={"meta": json.dumps({**meta, "round": round_})})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in self.checkpoint_rounds()[:-2]:
            (self.checkpoint_dir / f"round-{old}.safetensors").unlink(missing_ok=True)
        return target

    def checkpoint_rounds(self) -> list[int]:
        """Rounds with a checkpoint, ascending."""
        if not self.checkpoint_dir.exists():
            return []
        names = (p.stem for p in self.checkpoint_dir.glob("round-*.safetensors"))
        return sorted(int(n.removeprefix("round-")) for n in names)

    def load_checkpoint(self) -> tuple[int, dict[str, Tensor], dict[str, Any]] | None:
        """The newest checkpoint as ``(round, tensors, meta)``, or ``None``."""
        rounds = self.checkpoint_rounds()
        if not rounds:
            return None
        path = self.checkpoint_dir / f"round-{rounds[-1]}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        return rounds[-1], load_file(str(path)), meta

    # -- summary -----------------------------------------------------------------------

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically."""
        _atomic_write_text(self.summary_path, json.dumps(summary, indent=2, allow_nan=True))

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or ``None`` if the run has not finished."""
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text(encoding="utf-8"))


def final_metrics(
    rows: Iterable[Mapping[str, Any]], last_k: int = 1
) -> dict[str, dict[str, float]]:
    """Each client's evaluation metrics (``eval/<task>/<metric>``), averaged over its last rounds.

    Parameters
    ----------
    rows : iterable of mapping
        metrics.jsonl rows.
    last_k : int
        Average each metric over the client's ``last_k`` newest evaluated rounds (1: the newest
        round alone). One round of 180 test samples is noisy; a mean over the flat end of the
        learning curve is what the papers' tables report.
    """
    evaluated: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        evals = {k: v for k, v in row.items() if k.startswith("eval/") and k != "eval/loss"}
        if evals:
            evaluated.setdefault(row["client_id"], {})[int(row["round"])] = evals
    out: dict[str, dict[str, float]] = {}
    for client, by_round in evaluated.items():
        tail = [by_round[r] for r in sorted(by_round)[-max(1, last_k) :]]
        keys = {k for evals in tail for k in evals}
        out[client] = {
            k: sum(float(e[k]) for e in tail if k in e) / sum(1 for e in tail if k in e)
            for k in keys
        }
    return out


def relative_delta(value: float, reference: float, higher_is_better: bool) -> float:
    """The papers' Δ in percent: ``±(M − M_ref)/M_ref × 100``, sign by the metric direction."""
    if reference == 0 or math.isnan(reference) or math.isnan(value):
        return math.nan
    sign = 1.0 if higher_is_better else -1.0
    return sign * (value - reference) / abs(reference) * 100.0


def delta_table(
    primary: Mapping[str, Mapping[str, tuple[float, bool]]],
    reference: Mapping[str, Mapping[str, tuple[float, bool]]],
) -> tuple[dict[str, dict[str, float]], float]:
    """Δ% per client and task against ``reference`` (local training), and the mean over all.

    Parameters
    ----------
    primary, reference : mapping
        ``client → task → (primary metric value, higher_is_better)``.

    Returns
    -------
    per_task, mean
        ``client → task → Δ%`` for pairs present in both, and their mean (NaN if none).
    """
    per_task: dict[str, dict[str, float]] = {}
    values: list[float] = []
    for client, tasks in primary.items():
        for task, (value, higher) in tasks.items():
            ref = reference.get(client, {}).get(task)
            if ref is None:
                continue
            delta = relative_delta(value, ref[0], higher)
            per_task.setdefault(client, {})[task] = delta
            if not math.isnan(delta):
                values.append(delta)
    return per_task, (sum(values) / len(values) if values else math.nan)


def find_reference_run(run: RunDirectory, algorithm: str = "local") -> RunDirectory | None:
    """The newest finished ``algorithm`` run of the same experiment and seed beside ``run``."""
    experiment = run.experiment()
    candidates = sorted(run.path.parent.glob(f"*-{algorithm}*"), reverse=True)
    for path in candidates:
        other = RunDirectory(path)
        if path == run.path or other.read_summary() is None:
            continue
        try:
            theirs = other.experiment()
        except (FileNotFoundError, ValueError):
            continue
        same_clients = [c.model_dump() for c in theirs.clients] == [
            c.model_dump() for c in experiment.clients
        ]
        if theirs.seed == experiment.seed and same_clients and theirs.rounds == experiment.rounds:
            return other
    return None
