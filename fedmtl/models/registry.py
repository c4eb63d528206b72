"""Encoder interface, its uniform output and the timm-style encoder registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from fedmtl.catalog import BACKBONES, backbone_family
from fedmtl.registry import Registry


@dataclass
class EncoderOutput:
    """What every encoder returns, whatever its backbone library and layout.

    Attributes
    ----------
    pooled : Tensor
        ``[B, D]`` global feature (timm's pre-logits, or the text [CLS] state).
    feature_maps : list[Tensor]
        ``[B, C_i, H_i, W_i]`` maps at non-decreasing stride (empty for text encoders).
    input_size : tuple[int, int] | None
        ``(H, W)`` of the input images, the size dense outputs are upsampled to; ``None`` for
        text.
    """

    pooled: Tensor
    feature_maps: list[Tensor] = field(default_factory=list)
    input_size: tuple[int, int] | None = None


class Encoder(nn.Module, ABC):
    """Base class of the backbone wrappers.

    Subclasses set ``modality`` as a class attribute (``backbones``, the names they build, comes
    from :data:`fedmtl.catalog.BACKBONES` at registration), and ``num_features`` (D) and
    ``feature_channels`` (``C_i`` of each feature map) in ``__init__``. Their constructor
    signature is ``(backbone, *, pretrained=None, **kwargs)``.
    """

    family: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    backbones: ClassVar[tuple[str, ...]] = ()

    num_features: int
    feature_channels: list[int]

    @abstractmethod
    def forward(self, inputs: Any) -> EncoderOutput:
        """Encode a batch; see the subclass for the accepted input type."""


ENCODER_REGISTRY: Registry[type[Encoder]] = Registry("encoder family", attribute="family")


def register_encoder(family: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Register an encoder class as the builder of one backbone family.

    Parameters
    ----------
    family : str
        Family name, e.g. ``"vit"``: a key of :data:`fedmtl.catalog.BACKBONES`, whose list of
        backbone names (the one the experiment schema accepts) becomes the class's
        ``backbones``.
    """
    if family not in BACKBONES:
        raise ValueError(f"encoder family {family!r} is not in fedmtl.catalog.BACKBONES")

    def decorator(cls: type[Encoder]) -> type[Encoder]:
        ENCODER_REGISTRY.add(family, cls)
        cls.backbones = BACKBONES[family]
        return cls

    return decorator


def resolve_family(backbone: str) -> str:
    """Name of the registered family that builds ``backbone``.

    Raises
    ------
    ValueError
        If no family builds it; the message lists the supported names.
    """
    return backbone_family(backbone)


def create_encoder(backbone: str, *, pretrained: str | None = None, **kwargs: Any) -> Encoder:
    """Build the encoder for ``backbone``.

    Parameters
    ----------
    backbone : str
        A timm model name (``"vit_tiny_patch16_224"``, ``"resnet18"``, ...) or ``"bert"`` /
        ``"distilbert"``.
    pretrained : str | None
        ``None`` for random initialisation, a local file or directory of weights, or ``"hub"``
        to download the library's pretrained weights (only when the user asks for it).
    **kwargs : Any
        Architecture overrides forwarded to timm / the transformers config.

    Returns
    -------
    Encoder
        The wrapped backbone.
    """
    return ENCODER_REGISTRY[resolve_family(backbone)](backbone, pretrained=pretrained, **kwargs)
