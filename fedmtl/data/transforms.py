"""Array-to-tensor conversion and consistent resizing of images and per-task targets."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def _tensor(value: np.ndarray | Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor copy of ``value`` (arrays may be read-only views of shared cached data)."""
    if isinstance(value, Tensor):
        return value.to(dtype)
    return torch.from_numpy(np.array(value)).to(dtype)


def image_tensor(image: np.ndarray, size: int | None = None) -> Tensor:
    """Convert an image array into a normalised float tensor ``[3, H, W]``.

    Parameters
    ----------
    image : ndarray
        ``uint8`` (0–255) or float (0–1) image, ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``;
        grayscale is replicated to three channels.
    size : int, optional
        Resize (bilinear, antialiased) to ``size`` × ``size``.

    Returns
    -------
    Tensor
        ``float32 [3, H, W]`` with ``(x - 0.5) / 0.5`` applied to values in [0, 1].
    """
    array = np.asarray(image)
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    tensor = _tensor(scaled, torch.float32)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1)
    tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[0] != 3:
        raise ValueError(f"image must have 1 or 3 channels, got shape {tuple(array.shape)}")
    if size is not None and tuple(tensor.shape[1:]) != (size, size):
        tensor = F.interpolate(
            tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return ((tensor - IMAGE_MEAN) / IMAGE_STD).contiguous()


def _resize_nearest(tensor: Tensor, size: int) -> Tensor:
    """Nearest-neighbour resize of ``[C, H, W]`` (labels and masks keep their exact values)."""
    out = F.interpolate(tensor[None].float(), size=(size, size), mode="nearest-exact")[0]
    return out.to(tensor.dtype)


def label_map(labels: np.ndarray | Tensor, size: int | None = None) -> Tensor:
    """Semantic labels ``[H, W]`` as ``long``, resized by nearest neighbour."""
    tensor = _tensor(labels, torch.long)
    if size is not None and tuple(tensor.shape) != (size, size):
        tensor = _resize_nearest(tensor[None], size)[0]
    return tensor


def binary_map(mask: np.ndarray | Tensor, size: int | None = None) -> Tensor:
    """A ``{0, 1}`` map (values such as an ignore index survive) as ``float [1, H, W]``."""
    tensor = _tensor(mask, torch.float32)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if size is not None and tuple(tensor.shape[1:]) != (size, size):
        tensor = _resize_nearest(tensor, size)
    return tensor


def _resize_valid(values: Tensor, valid: Tensor, size: int) -> Tensor:
    """Bilinear resize that averages valid pixels only; pixels invalid by nearest stay 0.

    Invalid pixels are 0 by the task contract; blending them in would drag valid values
    towards 0 at every hole border, so the bilinear weights are renormalised over valid pixels.
    """
    weight = valid[None, None].float()
    num = F.interpolate(values[None] * weight, size=(size, size), mode="bilinear")[0]
    den = F.interpolate(weight, size=(size, size), mode="bilinear")[0]
    keep = _resize_nearest(valid[None].float(), size) > 0
    return torch.where(keep & (den > 0), num / den.clamp_min(1e-12), torch.zeros_like(num))


def depth_map(depth: np.ndarray | Tensor, size: int | None = None) -> Tensor:
    """Depth ``[H, W]`` as ``float [1, H, W]``; 0 marks invalid pixels and stays invalid."""
    tensor = _tensor(depth, torch.float32)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if size is not None and tuple(tensor.shape[1:]) != (size, size):
        tensor = _resize_valid(tensor, tensor[0] != 0, size)
    return tensor


def normal_map(normals: np.ndarray | Tensor, size: int | None = None) -> Tensor:
    """Surface normals ``[3, H, W]`` as unit vectors; zero vectors (invalid) stay zero."""
    tensor = _tensor(normals, torch.float32)
    norm = tensor.norm(dim=0, keepdim=True)
    valid = norm[0] > 1e-6
    tensor = torch.where(valid, tensor / norm.clamp_min(1e-12), torch.zeros_like(tensor))
    if size is not None and tuple(tensor.shape[1:]) != (size, size):
        tensor = _resize_valid(tensor, valid, size)
        # bilinear blends shorten the vectors; the target must be unit length again
        norm = tensor.norm(dim=0, keepdim=True)
        tensor = torch.where(norm > 1e-6, tensor / norm.clamp_min(1e-12), torch.zeros_like(tensor))
    return tensor


def augment_images(images: Tensor, generator: torch.Generator) -> Tensor:
    """SimCLR-style random view of a normalised image batch ``[B, 3, H, W]`` (CPU).

    Per image: a random crop of 60–100 % of the side, resized back (bilinear), a brightness
    and contrast jitter of ±40 %, and Gaussian noise of std 0.05. Draws come from
    ``generator`` only, so a seeded generator gives the same views.
    """
    batch, _, height, width = images.shape
    out = torch.empty_like(images)
    for i in range(batch):
        scale = 0.6 + 0.4 * float(torch.rand((), generator=generator))
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        out[i] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
    jitter = 1 + 0.8 * (torch.rand(batch, 2, 1, 1, 1, generator=generator) - 0.5)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * jitter[:, 1] + mean * jitter[:, 0]
    return out + 0.05 * torch.randn(out.shape, generator=generator)


def augment_texts(texts: list[str], generator: torch.Generator, drop: float = 0.2) -> list[str]:
    """A random view of each caption: every word dropped with probability ``drop`` (one kept)."""
    out = []
    for text in texts:
        words = text.split()
        keep = [w for w in words if float(torch.rand((), generator=generator)) >= drop]
        out.append(" ".join(keep or words[:1]))
    return out
