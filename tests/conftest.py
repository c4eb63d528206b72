"""Shared fixtures: Flower environment, tiny experiments, in-process runs."""

from __future__ import annotations

import os

for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

# One thread: the suite runs beside other work on 2 cores, where two spinning OpenMP
# threads per process made runs 10x slower (measured).
torch.set_num_threads(1)
