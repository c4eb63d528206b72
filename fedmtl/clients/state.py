"""Node-local personal state: safetensors files written atomically, one version per round."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmtl.results import atomic_replace

_VERSION = re.compile(r"^round-(\d+)\.safetensors$")


class StateStore:
    """Personal tensors of one client, versioned by the round that produced them.

    Keeping the two newest versions makes a server-side resume exact: if the server stops after
    checkpointing round r while a client already trained round r + 1, the client still has
    round r and starts from it when the resumed server asks for round r + 1 again.

    Parameters
    ----------
    directory : path
        The client's own directory (created if missing).
    keep : int
        How many round versions to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

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
            save_file(contiguous, tmp, metadata={"meta": json.dumps(dict(meta or {}))})
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
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        return load_file(str(path)), meta

    def latest_at_most(self, round_: int) -> int | None:
        """Newest saved round not after ``round_`` (for restarts that lost context)."""
        candidates = [r for r in self.rounds() if r <= round_]
        return candidates[-1] if candidates else None
