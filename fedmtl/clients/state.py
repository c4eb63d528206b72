"""Node-local personal state: safetensors files written atomically, one version per round."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmtl.results import atomic_replace

_VERSION = re.compile(r"^round-(\d+)\.safetensors$")
_STORED_AS = "stored-as"  # header entry: tensor name → its own dtype, for compact storage


class StateStore:
    """Personal tensors of one client, versioned by the round that produced them.

    Retention follows the server's checkpoints. A message of round r means the server has
    checkpointed round r − 1 (it sends round r only after that checkpoint), so a resumed
    server can only ever repeat a round ≥ r: the client needs its newest version of round
    ≤ r − 1 and nothing older. :meth:`commit` drops the older ones; once the next round is
    committed only the newest is kept. Between rounds there are at most two versions (the
    committed one and the one the uncommitted round wrote), which keeps a resume exact: if
    the server stops after checkpointing round r while a client already trained round r + 1,
    the client still has round r and starts from it when the resumed server asks for round
    r + 1 again.

    Parameters
    ----------
    directory : path
        The client's own directory (created if missing).
    keep : int
        At most how many round versions to keep (a bound on top of :meth:`commit`).
    dtype : torch.dtype, optional
        Store floating tensors in this dtype (e.g. ``torch.bfloat16``) and restore them to
        their own dtype on load. ``None`` stores them as they are.
    """

    def __init__(
        self, directory: str | Path, keep: int = 2, dtype: torch.dtype | None = None
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.dtype = dtype

    def path(self, round_: int) -> Path:
        """File holding the state produced by ``round_``."""
        return self.directory / f"round-{round_}.safetensors"

    def rounds(self) -> list[int]:
        """Rounds with a saved version, ascending."""
        found = (_VERSION.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(
        self, round_: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Atomically write the state of ``round_`` (temp file + rename), then prune old ones."""
        target = self.path(round_)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            metadata = {"meta": json.dumps(dict(meta or {}))}
            if self.dtype is not None:
                cast = {
                    k: str(v.dtype).removeprefix("torch.")
                    for k, v in contiguous.items()
                    if v.is_floating_point() and v.dtype != self.dtype
                }
                dtype = self.dtype
                contiguous = {k: v.to(dtype) if k in cast else v for k, v in contiguous.items()}
                metadata[_STORED_AS] = json.dumps(cast)
            save_file(contiguous, tmp, metadata=metadata)
            atomic_replace(tmp, target)  # fsynced, and the mode of the run folder's files
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return target

    def load(self, round_: int) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The state produced by ``round_``, or ``None`` if this client has no such version."""
        path = self.path(round_)
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        meta = json.loads(header.get("meta", "{}"))
        tensors = load_file(str(path))
        # Tensors stored in a compact dtype come back in their own.
        for key, dtype in json.loads(header.get(_STORED_AS, "{}")).items():
            tensors[key] = tensors[key].to(getattr(torch, dtype))
        return tensors, meta

    def commit(self, round_: int) -> None:
        """The server has checkpointed ``round_``: drop versions older than the newest ≤ it.

        Call it with r − 1 for every message of round r. Versions after ``round_`` stay (an
        uncommitted round the server may repeat overwrites them).
        """
        base = self.latest_at_most(round_)
        if base is None:
            return
        for old in self.rounds():
            if old < base:
                self.path(old).unlink(missing_ok=True)

    def latest_at_most(self, round_: int) -> int | None:
        """Newest saved round not after ``round_`` (for restarts that lost context)."""
        candidates = [r for r in self.rounds() if r <= round_]
        return candidates[-1] if candidates else None
