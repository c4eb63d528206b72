"""Task decoders (shareable), heads (personal) and the contrastive projector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmtl.models.registry import EncoderOutput


class ClassificationDecoder(nn.Module):
    """MLP on the pooled feature for classification-type tasks: ``Linear(D, hidden)`` + GELU.

    Parameters
    ----------
    in_features : int
        Pooled feature size D.
    hidden : int
        Output size, the head's input.
    """

    def __init__(self, in_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.out_channels = hidden

    def forward(self, features: EncoderOutput) -> Tensor:
        """``[B, hidden]`` from ``features.pooled``."""
        return self.act(self.fc(features.pooled))


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[B, C, H, W]`` to ``size`` (returned as is when already that size)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DenseDecoder(nn.Module):
    """Multi-scale FCN for dense tasks.

    A 1×1 lateral conv per feature map to ``channels``, bilinear upsampling of every map to the
    finest one, a sum, then two 3×3 conv + BatchNorm + ReLU blocks.

    Parameters
    ----------
    in_channels : Sequence[int]
        Channels of each encoder feature map.
    channels : int
        Width of the decoder (and of its output).
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("a dense decoder needs at least one encoder feature map")
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            _conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels)
        )
        self.out_channels = channels

    def forward(self, features: EncoderOutput) -> Tensor:
        """``[B, channels, H_f, W_f]`` at the finest feature map's resolution."""
        maps = features.feature_maps
        if len(maps) != len(self.laterals):
            raise ValueError(f"expected {len(self.laterals)} feature maps, got {len(maps)}")
        height, width = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
        resized = [resize_bilinear(lat(m), (height, width)) for lat, m in zip(self.laterals, maps)]
        fused = torch.stack(resized).sum(dim=0)
        return self.fuse(fused)


def classification_head(hidden: int, out_channels: int) -> nn.Linear:
    """The personal layer of a classification-type task: ``Linear(hidden, out_channels)``."""
    return nn.Linear(hidden, out_channels)


def dense_head(channels: int, out_channels: int) -> nn.Conv2d:
    """The personal layer of a dense task: a 1×1 conv to ``out_channels``."""
    return nn.Conv2d(channels, out_channels, kernel_size=1)


def projector(in_features: int, projector_dim: int) -> nn.Sequential:
    """SimCLR-style projector: ``Linear(D, D)`` + ReLU + ``Linear(D, projector_dim)``."""
    return nn.Sequential(
        nn.Linear(in_features, in_features),
        nn.ReLU(inplace=True),
        nn.Linear(in_features, projector_dim),
    )
