"""Client models: timm / transformers encoders, task decoders and heads, parameter groups."""

from __future__ import annotations

from fedmtl.catalog import supported_backbones
from fedmtl.models.decoders import ClassificationDecoder, DenseDecoder
from fedmtl.models.multitask import (
    MultiTaskModel,
    build_model,
    count_parameters,
    encoder_signature,
    group_of,
    group_state,
    parameter_groups,
)
from fedmtl.models.pretrained import load_state_dict_strict, read_state_dict
from fedmtl.models.registry import (
    ENCODER_REGISTRY,
    Encoder,
    EncoderOutput,
    create_encoder,
    register_encoder,
)
from fedmtl.models.text import HashingTokenizer, TextEncoder
from fedmtl.models.vision import TimmEncoder

__all__ = [
    "ENCODER_REGISTRY",
    "ClassificationDecoder",
    "DenseDecoder",
    "Encoder",
    "EncoderOutput",
    "HashingTokenizer",
    "MultiTaskModel",
    "TextEncoder",
    "TimmEncoder",
    "build_model",
    "count_parameters",
    "create_encoder",
    "encoder_signature",
    "group_of",
    "group_state",
    "load_state_dict_strict",
    "parameter_groups",
    "read_state_dict",
    "register_encoder",
    "supported_backbones",
]
