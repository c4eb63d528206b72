"""Large server buffers in a memory-mapped file, so their RAM stays within a budget.

A ``[N, d]`` float buffer of N client encoders grows with N (FedHCA²: 100 Swin-T clients are
~11 GB per buffer in float32). :class:`SpilledMatrix` keeps it in a file mapped into memory:
torch reads and writes it as any tensor (the same kernels, so the same bits), and
:meth:`SpilledMatrix.release` drops the pages this process touched from its resident set (the
data stays in the file and the page cache, which the kernel writes back and reclaims under
pressure). Callers release after each row or column chunk they stream, so the resident part
is one chunk at a time.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class SpilledMatrix:
    """A zero-initialised ``[rows, cols]`` tensor backed by a temporary file.

    Parameters
    ----------
    rows, cols : int
        Shape.
    dtype : torch.dtype
        float16, float32 or float64.
    directory : path, optional
        Where the file goes (default: the system's temporary directory). It is deleted by
        :meth:`close` (and when the process exits, as it is unlinked once mapped).
    """

    def __init__(
        self, rows: int, cols: int, dtype: torch.dtype, directory: str | Path | None = None
    ) -> None:
        if dtype not in _NUMPY:
            raise ValueError(f"SpilledMatrix holds float16/32/64, not {dtype}")
        self.shape = (rows, cols)
        size = rows * cols * torch.empty(0, dtype=dtype).element_size()
        fd, name = tempfile.mkstemp(prefix="fedmtl-spill-", suffix=".bin", dir=directory)
        try:
            os.ftruncate(fd, max(size, 1))  # sparse: zeros cost no disk until written
            access = mmap.PROT_READ | mmap.PROT_WRITE
            self._map = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, access)
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping keeps the data; nothing is left behind on exit
        array = np.frombuffer(self._map, dtype=_NUMPY[dtype], count=rows * cols)
        self.tensor: Tensor = torch.from_numpy(array).view(rows, cols)

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return self.tensor.numel() * self.tensor.element_size()

    def release(self) -> None:
        """Drop this process's resident pages of the buffer (the contents are kept)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap the buffer (the tensor must not be used afterwards)."""
        self.tensor = torch.empty(0)
        try:
            self._map.close()
        except BufferError:  # a view of the tensor is still alive: the GC unmaps it later
            pass
