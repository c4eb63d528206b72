"""Weights & Biases: one W&B run per fedmtl run, offline unless the user is logged in."""

from __future__ import annotations

import json
import netrc
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedmtl.config import Experiment, WandbConfig
from fedmtl.results import RunDirectory
from fedmtl.tracking.base import (
    final_scalars,
    read_state,
    round_scalars,
    run_name,
    run_paths,
    write_state,
)

DEFAULT_HOST = "https://api.wandb.ai"


def logged_in() -> bool:
    """Whether W&B credentials exist here: ``WANDB_API_KEY``, or ``wandb login``'s netrc entry.

    Read without W&B's network check: deciding the mode must not contact a server.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(config: WandbConfig) -> str:
    """``online`` or ``offline``: ``auto`` is online only with credentials (or ``WANDB_MODE``)."""
    if config.mode != "auto":
        return config.mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("online", "offline"):
        return env
    return "online" if logged_in() else "offline"


class WandbTracker:
    """Log a run with ``wandb.init`` / ``run.log`` under ``<run folder>/wandb``.

    Parameters
    ----------
    run_dir : RunDirectory
        The run folder; W&B writes ``wandb/<offline-run-…>/`` into it (``wandb sync`` uploads
        it later) and ``tracking.json`` keeps the run id for a resume.
    config : WandbConfig
        ``project``, ``entity``, ``group`` (default: the experiment's name) and ``mode``.
    """

    name = "wandb"

    def __init__(self, run_dir: RunDirectory, config: WandbConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.mode = resolve_mode(config)
        self.run: Any = None

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Start (or, on resume, continue) the W&B run with the experiment as its config."""
        import wandb

        previous = read_state(self.run_dir).get(self.name, {})
        resume = first_round > 1 and bool(previous.get("run_id"))
        self.run = wandb.init(
            project=self.config.project,
            entity=self.config.entity,
            group=self.config.group or experiment.name,
            name=run_name(experiment),
            dir=str(self.run_dir.path),
            mode=self.mode,  # type: ignore[arg-type]
            config=experiment.model_dump(mode="json"),
            id=str(previous["run_id"]) if resume else None,
            resume="allow" if resume else None,
            # console="off": W&B must not wrap stdout, which the progress bar (and Flower's
            # log uploader under `flwr run`) own; silent: no banner per run of a comparison.
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )
        write_state(self.run_dir, self.name, {"run_id": self.run.id, "mode": self.mode})

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Nothing per phase."""

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Every scalar of the round at step ``round_``."""
        self.run.log(round_scalars(rows), step=round_)

    def finish(self, status: str) -> None:
        """Summary values, the plot as an image and summary.json as a file; end the run."""
        if self.run is None:
            return
        import wandb

        summary = self.run_dir.read_summary()
        if summary is not None and status == "FINISHED":
            self.run.summary.update(final_scalars(summary))
            paths = run_paths(self.run_dir)
            if "plot" in paths:
                self.run.log({"plots/metrics": wandb.Image(str(paths["plot"]))})
            for key in ("summary", "config"):
                if key in paths:
                    # a copy inside the W&B run folder: synced with it, and no symlink warning
                    copy = Path(self.run.dir) / paths[key].name
                    shutil.copyfile(paths[key], copy)
                    self.run.save(str(copy), base_path=self.run.dir, policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def where(self) -> str:
        """The offline run folder and the command that uploads it, or the run's page."""
        if self.mode == "offline":
            return f"wandb sync {Path(self.run.dir).parent}  (offline run {self.run.id})"
        return str(self.run.url)


# --------------------------------------------------------------------------- offline run files

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records
_HEADER = 7  # ":W&B", a 2-byte magic and a version byte; each record frame has 7 bytes too
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _frames(data: bytes) -> Iterator[bytes]:
    """Record payloads of a ``.wandb`` file, fragments joined (CRCs not checked)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    position, pending = _HEADER, b""
    while position + 7 <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < 7:  # block trailer: padding
            position += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            position += _BLOCK - position % _BLOCK if position % _BLOCK else 0


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """What an offline run logged, read back from its ``run-<id>.wandb`` file.

    Parameters
    ----------
    path : str or Path
        The ``.wandb`` file, or the ``offline-run-…`` folder holding it.

    Returns
    -------
    dict
        ``{"run_id", "config": {key: value}, "history": [{"_step": n, tag: value, ...}],
        "summary": {key: value}, "files": [paths saved], "exit_code"}``, decoded with W&B's
        own record type (``wandb.proto.wandb_internal_pb2.Record``).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path}: no run-*.wandb file")
        path = found[0]
    out: dict[str, Any] = {
        "run_id": None,
        "config": {},
        "history": [],
        "summary": {},
        "files": [],
        "exit_code": None,
    }
    for payload in _frames(path.read_bytes()):
        record = pb.Record()  # type: ignore[attr-defined]  # generated, no stubs
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            step: dict[str, Any] = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                step[key] = json.loads(item.value_json)
            out["history"].append(step)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
