"""Tensors on the FedMuscle stream: encoding, checked decoding and message-size bounds."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from fedmtl.messages import TensorSpec
from fedmtl.proto import muscle_stream_pb2 as pb

# Room for frame headers, tensor names, dtype strings and shapes around the raw bytes.
FRAME_OVERHEAD = 4096
DTYPES = {"float32": (np.float32, torch.float32)}


class FrameError(ValueError):
    """A frame or tensor that does not match what the phase expects."""


def encode_tensor(tensor: Tensor) -> pb.Tensor:
    """A contiguous float32 CPU copy of ``tensor`` as a :class:`Tensor` frame.

    Raises
    ------
    FrameError
        If the tensor's dtype is not float32 (the stream carries float32 only).
    """
    if tensor.dtype != torch.float32:
        raise FrameError(f"the stream carries float32 tensors, got {tensor.dtype}")
    array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype="<f4")  # no copy if LE
    return pb.Tensor(dtype="float32", shape=list(array.shape), data=array.tobytes())


def decode_tensor(frame: pb.Tensor, name: str, spec: TensorSpec | None = None) -> Tensor:
    """Decode a tensor frame, checking dtype, byte count, shape (against ``spec``) and finiteness.

    Parameters
    ----------
    frame : Tensor frame
        As received.
    name : str
        Used in error messages.
    spec : TensorSpec, optional
        The shape and dtype the receiver expects.

    Raises
    ------
    FrameError
        Naming ``name`` and what is wrong.
    """
    if frame.dtype not in DTYPES:
        raise FrameError(f"{name}: dtype {frame.dtype!r} is not float32")
    shape = tuple(int(s) for s in frame.shape)
    if any(s < 0 for s in shape):
        raise FrameError(f"{name}: negative dimension in shape {shape}")
    if spec is not None and (shape != tuple(spec.shape) or frame.dtype != spec.dtype):
        raise FrameError(
            f"{name}: expected {spec.dtype}{list(spec.shape)}, got {frame.dtype}{list(shape)}"
        )
    numpy_dtype, _ = DTYPES[frame.dtype]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(numpy_dtype).itemsize
    if len(frame.data) != expected_bytes:
        raise FrameError(
            f"{name}: {len(frame.data)} bytes do not hold a {frame.dtype} tensor of shape {shape}"
        )
    array = np.frombuffer(frame.data, dtype="<f4").reshape(shape)
    tensor = torch.from_numpy(array.astype(numpy_dtype, copy=True))
    if not torch.isfinite(tensor).all():
        raise FrameError(f"{name}: contains NaN or infinite values")
    return tensor


def encode_tensors(tensors: Mapping[str, Tensor]) -> dict[str, pb.Tensor]:
    """:func:`encode_tensor` of every entry."""
    return {name: encode_tensor(value) for name, value in tensors.items()}


def decode_tensors(frames: Mapping[str, pb.Tensor]) -> dict[str, Tensor]:
    """:func:`decode_tensor` of every entry (finite float32, consistent sizes)."""
    return {name: decode_tensor(frame, name) for name, frame in frames.items()}


def representation_bytes(batch_size: int, dim: int) -> int:
    """Upper bound of one client frame: ``Z_b`` of ``batch_size × dim`` float32 and headers."""
    return 4 * batch_size * dim + FRAME_OVERHEAD


def payload_frame_bytes(payload_bytes: int) -> int:
    """Upper bound of one server frame carrying ``payload_bytes`` of tensor data."""
    return payload_bytes + FRAME_OVERHEAD
