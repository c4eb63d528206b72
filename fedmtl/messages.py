"""Wire format shared by the ServerApp and the ClientApp: message types, record keys, tensors.

Every message carries a ``config`` ConfigRecord (the resolved experiment, the round, the
addressed client id) and optionally ``arrays`` (named tensors with full state-dict keys). Every
reply carries ``client`` (a ConfigRecord with ``client-id``; MetricRecords cannot hold strings),
``metrics`` (a MetricRecord with ``num-examples``) and optionally ``arrays``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

# Message types (Flower requires "<train|evaluate|query>[.<identifier>]").
DESCRIBE = "query.describe"
TRAIN = "train"
EVALUATE = "evaluate"
REPRESENT = "query.represent"
ALIGN = "train.align"

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
SERVER_ROUND = "server-round"
EXPERIMENT = "experiment"
STATE_ROOT = "state-root"
# train config: the parameter groups the server wants back (default: every shared group).
UPLOAD_GROUPS = "upload-groups"


class ReplyError(ValueError):
    """A client reply that must be left out of aggregation (names client and problem)."""


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one named tensor in a reply."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        """The spec of an existing tensor."""
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def to_array_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Pack named tensors (moved to CPU, detached) into an ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, Tensor]:
    """Unpack an ArrayRecord into named CPU tensors (order preserved)."""
    return dict(record.to_torch_state_dict())


def specs_to_json(specs: Mapping[str, TensorSpec]) -> str:
    """Serialise tensor specs for a ConfigRecord."""
    return json.dumps({k: [list(s.shape), s.dtype] for k, s in specs.items()})


def specs_from_json(text: str) -> dict[str, TensorSpec]:
    """Inverse of :func:`specs_to_json`."""
    return {k: TensorSpec(tuple(shape), dtype) for k, (shape, dtype) in json.loads(text).items()}


def validate_tensors(
    tensors: Mapping[str, Tensor], expected: Mapping[str, TensorSpec], *, client_id: str
) -> None:
    """Check a reply's tensors against what the client announced.

    Raises
    ------
    ReplyError
        On missing or unexpected names, a wrong shape or dtype, or a non-finite value; the
        message names the client and the tensor.
    """
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ReplyError(
            f"client {client_id!r}: tensor names differ (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, spec in expected.items():
        tensor = tensors[name]
        got = TensorSpec.of(tensor)
        if got.shape != spec.shape:
            raise ReplyError(
                f"client {client_id!r}: {name} has shape {got.shape}, expected {spec.shape}"
            )
        if got.dtype != spec.dtype:
            raise ReplyError(
                f"client {client_id!r}: {name} has dtype {got.dtype}, expected {spec.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ReplyError(f"client {client_id!r}: {name} contains NaN or Inf")


def validate_metrics(metrics: Mapping[str, object], *, client_id: str) -> None:
    """Reject replies whose reported numbers are not finite or lack ``num-examples``."""
    if NUM_EXAMPLES not in metrics:
        raise ReplyError(f"client {client_id!r}: reply lacks {NUM_EXAMPLES!r}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v) and not key.startswith("eval/"):
                raise ReplyError(f"client {client_id!r}: metric {key} is {v}")


def make_content(
    config: Mapping[str, str | int | float | bool],
    arrays: Mapping[str, Tensor] | None = None,
    extra_arrays: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> RecordDict:
    """Build a message's content: a config record plus optional named-tensor records."""
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {
        CONFIG: ConfigRecord(dict(config))
    }
    if arrays:
        records[ARRAYS] = to_array_record(arrays)
    for key, tensors in (extra_arrays or {}).items():
        records[key] = to_array_record(tensors)
    return RecordDict(records)


def make_reply_content(
    client_id: str,
    metrics: Mapping[str, int | float | list[float]],
    arrays: Mapping[str, Tensor] | None = None,
    info: Mapping[str, str | int | float | bool] | None = None,
    extra_arrays: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> RecordDict:
    """Build a reply's content (client identity, metrics, optional tensors)."""
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {
        CLIENT: ConfigRecord({CLIENT_ID: client_id, **(info or {})}),
        METRICS: MetricRecord(dict(metrics)),
    }
    if arrays:
        records[ARRAYS] = to_array_record(arrays)
    for key, tensors in (extra_arrays or {}).items():
        records[key] = to_array_record(tensors)
    return RecordDict(records)


def content_bytes(content: RecordDict) -> int:
    """Bytes of tensor payload in a message's content (all ArrayRecords)."""
    return sum(record.count_bytes() for record in content.array_records.values())
