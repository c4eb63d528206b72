"""timm image backbones (ViT, Swin, ResNet) behind the uniform ``Encoder`` interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import timm
from torch import Tensor

from fedmtl.models.pretrained import load_state_dict_strict, read_state_dict
from fedmtl.models.registry import Encoder, EncoderOutput, register_encoder


class TimmEncoder(Encoder):
    """A timm backbone built with ``num_classes=0``, returning pooled features and feature maps.

    Parameters
    ----------
    backbone : str
        timm model name, one of the family's ``backbones``.
    pretrained : str | None
        ``None``, a local weight file / model directory, or ``"hub"`` (timm download).
    **kwargs : Any
        Overrides forwarded to ``timm.create_model`` (e.g. ``img_size``, ``depth``).

    Notes
    -----
    Feature maps come from ``forward_intermediates`` in NCHW, so Swin's NHWC stages and ViT's
    token sequences reach the decoders in the same layout as ResNet's maps.
    """

    modality: ClassVar[str] = "image"
    # Any: timm's feature API (forward_intermediates, feature_info) is not on nn.Module.
    model: Any

    def __init__(self, backbone: str, *, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.model = timm.create_model(
            backbone, pretrained=pretrained == "hub", num_classes=0, **kwargs
        )
        self.feature_indices = self.select_feature_indices(len(self.model.feature_info))
        self.num_features = int(self.model.num_features)
        self.feature_channels = [
            int(self.model.feature_info[i]["num_chs"]) for i in self.feature_indices
        ]
        if pretrained is not None and pretrained != "hub":
            self.load_pretrained(pretrained)

    def select_feature_indices(self, num_stages: int) -> list[int]:
        """Indices into ``feature_info`` whose outputs become the feature maps."""
        return list(range(num_stages))

    def load_pretrained(self, path: str | Path) -> None:
        """Load local weights strictly; a classifier in the checkpoint is ignored."""
        classifier = self.model.pretrained_cfg.get("classifier") or "head"
        load_state_dict_strict(
            self.model, read_state_dict(path), ignore_unexpected=[classifier], source=str(path)
        )

    def forward(self, inputs: Tensor) -> EncoderOutput:
        """Encode images ``[B, 3, H, W]``."""
        final, maps = self.model.forward_intermediates(
            inputs, indices=self.feature_indices, output_fmt="NCHW"
        )
        pooled = self.model.forward_head(final, pre_logits=True)
        return EncoderOutput(pooled, list(maps), (int(inputs.shape[-2]), int(inputs.shape[-1])))


@register_encoder("vit")
class ViTEncoder(TimmEncoder):
    """Vision Transformer; feature maps are the patch tokens of evenly spaced blocks.

    All ViT maps share the patch stride (prefix tokens are dropped by timm's reshape to the
    patch grid); pooled is timm's pre-logits (the class token after the final norm).
    """

    num_feature_maps: ClassVar[int] = 4

    def select_feature_indices(self, num_stages: int) -> list[int]:
        """Up to four evenly spaced blocks ending at the last one (e.g. 2, 5, 8, 11 of 12)."""
        count = min(self.num_feature_maps, num_stages)
        # Ceiling division: the i-th of ``count`` equal segments ends at ceil((i+1)*n/count).
        return [-(-(i + 1) * num_stages // count) - 1 for i in range(count)]


@register_encoder("swin")
class SwinEncoder(TimmEncoder):
    """Swin Transformer; one feature map per stage (strides 4, 8, 16, 32)."""


@register_encoder("resnet")
class ResNetEncoder(TimmEncoder):
    """ResNet; the four residual stages (strides 4-32), the stride-2 stem map is left out."""

    def select_feature_indices(self, num_stages: int) -> list[int]:
        """Skip index 0 (the stem activation), which would make dense decoders costly."""
        return list(range(1, num_stages))
