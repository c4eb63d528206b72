"""A run's folder: resolved config, metrics.jsonl, checkpoints, summary.json (with Δ%)."""

from __future__ import annotations

import hashlib
import json
import logging
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

from fedmtl.config import ConfigError, Experiment, experiment_from_json, experiment_to_json

log = logging.getLogger("fedmtl.results")


def file_mode() -> int:
    """Permission bits a plain ``open()`` gives a new file here (0o666 less the umask).

    ``tempfile.mkstemp`` creates 0o600 files; atomically written files get this mode instead,
    so that every file of a run folder shares one mode whichever way it was written.
    """
    try:  # Linux: read the umask without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: str | Path, target: Path) -> None:
    """Give ``tmp`` the run folder's file mode, flush it to disk and rename it over ``target``.

    A process killed at any point leaves either the old or the new ``target``, never a torn
    one; after a power loss too, thanks to the two fsyncs.
    """
    os.chmod(tmp, file_mode())
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_directory(target.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        atomic_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_fingerprint(experiment: Experiment) -> str:
    """What makes two runs comparable: clients, datasets, public set, seed and rounds.

    The algorithm, its hyper-parameters and the output folder are left out: runs that differ
    only there are the ones a Δ% compares.
    """
    identity = {
        "clients": [c.model_dump(mode="json") for c in experiment.clients],
        "datasets": {k: v.model_dump(mode="json") for k, v in experiment.datasets.items()},
        "public": None if experiment.public is None else experiment.public.model_dump(mode="json"),
        "seed": experiment.seed,
        "rounds": experiment.rounds,
    }
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        if self.metrics_path.exists() and not self.metrics_path.read_bytes().endswith(b"\n"):
            # A torn line from a killed process would swallow the next row: rewrite without it.
            self.truncate_metrics(max((int(r["round"]) for r in self.read_metrics()), default=0))
        new = not self.metrics_path.exists()
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, allow_nan=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_directory(self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of metrics.jsonl (empty if none yet).

        A torn last line (a process killed while appending) is dropped with a warning; the
        round it belonged to has no checkpoint yet, so a resumed run redoes it.

        Raises
        ------
        ConfigError
            If a line other than the last is not JSON (the file was damaged otherwise).
        """
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        rows = []
        for position, (number, line) in enumerate(numbered):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if position == len(numbered) - 1:
                    log.warning(
                        "%s: dropped the torn last line %d (%s)", self.metrics_path, number, exc
                    )
                    break
                raise ConfigError(
                    f"{self.metrics_path}: line {number} is not JSON ({exc}); the file is "
                    "damaged beyond a torn last line"
                ) from None
        return rows

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
            atomic_replace(tmp, target)
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

    def is_finished(self) -> bool:
        """Whether every round ran: the last round's checkpoint exists.

        Not ``summary.json``: ``fedmtl report`` writes one for an interrupted run too.
        """
        try:
            rounds = self.experiment().rounds
        except (FileNotFoundError, ValueError):
            return False
        return rounds in self.checkpoint_rounds()

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
    """The newest finished ``algorithm`` run with the same fingerprint as ``run``, beside it.

    Same fingerprint (:func:`run_fingerprint`): same clients, datasets, public set, seed and
    rounds. Unfinished runs never serve, even if ``fedmtl report`` gave them a summary.
    """
    wanted = run_fingerprint(run.experiment())
    candidates = sorted(run.path.parent.glob(f"*-{algorithm}*"), reverse=True)
    for path in candidates:
        other = RunDirectory(path)
        if path == run.path or not other.is_finished():
            continue
        try:
            theirs = other.experiment()
        except (FileNotFoundError, ValueError):
            continue
        if theirs.algorithm.name == algorithm and run_fingerprint(theirs) == wanted:
            return other
    return None


def client_failures(
    experiment: Experiment, rows: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Clients with a failed round: which rounds, the first and last error, whether any worked.

    Returns
    -------
    dict
        ``client → {"failed_rounds": [...], "first_error": str, "last_error": str,
        "completed": bool}`` for every client with at least one failed round or no row at
        all (never online); ``completed`` is whether one of its rounds succeeded.
    """
    seen: dict[str, dict[str, Any]] = {
        c.client_id: {"failed_rounds": [], "first_error": "", "last_error": "", "completed": False}
        for c in experiment.clients
    }
    rows_of: dict[str, int] = {}
    for row in rows:
        entry = seen.get(str(row.get("client_id")))
        if entry is None:
            continue
        rows_of[row["client_id"]] = rows_of.get(row["client_id"], 0) + 1
        if row.get("status") == "failed":
            entry["failed_rounds"].append(int(row["round"]))
            error = str(row.get("error", ""))
            entry["first_error"] = entry["first_error"] or error
            entry["last_error"] = error
        else:
            entry["completed"] = True
    for client_id, entry in seen.items():
        if client_id not in rows_of:
            entry["first_error"] = entry["last_error"] = "never online: no node answered for it"
    return {c: e for c, e in seen.items() if e["failed_rounds"] or not e["completed"]}
