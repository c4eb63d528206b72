"""One list of names, one registry type: the schema, the server and the client side agree."""

from __future__ import annotations

import typing

import pytest

from fedmtl.catalog import ALGORITHM_NAMES, BACKBONES, backbone_family, supported_backbones
from fedmtl.client_app import ALL_GROUPS
from fedmtl.clients import CLIENT_ALGORITHMS
from fedmtl.config import AlgorithmConfig, ModelConfig
from fedmtl.models import ENCODER_REGISTRY
from fedmtl.registry import Registry
from fedmtl.strategies import STRATEGIES


def _schema_algorithms() -> set[str]:
    union = typing.get_args(AlgorithmConfig)[0]  # Annotated[Union[...], Field(...)]
    return {cls.model_fields["name"].default for cls in typing.get_args(union)}


def test_schema_server_and_client_know_the_same_algorithms() -> None:
    assert _schema_algorithms() == set(ALGORITHM_NAMES)
    assert set(STRATEGIES) == set(ALGORITHM_NAMES)
    assert set(CLIENT_ALGORITHMS) == set(ALGORITHM_NAMES)
    for name in ALGORITHM_NAMES:
        assert STRATEGIES[name].name == name


def test_every_backbone_the_schema_accepts_has_an_encoder() -> None:
    assert set(ENCODER_REGISTRY) == set(BACKBONES)
    for family, cls in ENCODER_REGISTRY.items():
        assert cls.backbones == BACKBONES[family]
        assert cls.family == family
    for name in supported_backbones():
        assert ModelConfig(backbone=name).backbone == name
        assert backbone_family(name) in ENCODER_REGISTRY
    # A name timm may know but fedmtl does not build is refused by the schema, not later.
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_base_patch16_384'"):
        ModelConfig(backbone="vit_base_patch16_384")


def test_extra_message_types_are_declared_by_client_algorithms() -> None:
    declared = {t for cls in CLIENT_ALGORITHMS.values() for t in cls.extra_messages}
    assert declared == {"query.represent", "train.align"}
    fedmuscle = CLIENT_ALGORITHMS["fedmuscle"]
    for method in fedmuscle.extra_messages.values():
        assert callable(getattr(fedmuscle, method))
    assert ALL_GROUPS == ("encoder", "decoders", "heads", "projector")


def test_registry_refuses_duplicates_and_names_outside_the_list() -> None:
    registry: Registry[type] = Registry("thing", attribute="label", allowed=("a", "b"))

    @registry.register("a")
    class A:
        label = ""

    assert registry["a"] is A and A.label == "a" and list(registry) == ["a"] and len(registry) == 1
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.add("a", A)
    with pytest.raises(ValueError, match=r"thing 'c' is not one of \['a', 'b'\]"):
        registry.add("c", A)
    with pytest.raises(KeyError, match=r"unknown thing 'b'; known: \['a'\]"):
        registry["b"]
