"""Contract tests of fedmtl.models over every encoder family, on tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers import BertConfig, BertModel, BertTokenizer

from fedmtl.models import (
    ENCODER_REGISTRY,
    Encoder,
    HashingTokenizer,
    MultiTaskModel,
    TextEncoder,
    TimmEncoder,
    build_model,
    count_parameters,
    create_encoder,
    encoder_signature,
    group_state,
    parameter_groups,
)
from fedmtl.tasks.base import Task, TaskMetrics

BERT_KWARGS: dict[str, Any] = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
# family -> (backbone, tiny architecture overrides)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    ),
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)),
    "bert": ("bert", BERT_KWARGS),
    "distilbert": (
        "distilbert",
        dict(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
        ),
    ),
}
IMAGE_FAMILIES = ["vit", "swin", "resnet"]
TEXT_FAMILIES = ["bert", "distilbert"]
BATCH = 2
CAPTIONS = ["a cat sits on the mat", "Two dogs, running!"]


class _TestTask(Task):
    """Minimal concrete task; models only read name, dense, modality and out_channels."""

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def new_metrics(self) -> TaskMetrics:
        raise NotImplementedError


class ImageClassTask(_TestTask):
    kind: ClassVar[str] = "classification"
    modality: ClassVar[str] = "image"


class AnyModalityTask(_TestTask):
    kind: ClassVar[str] = "multilabel"


class TextClassTask(_TestTask):
    kind: ClassVar[str] = "text_classification"
    modality: ClassVar[str] = "text"


class SegTask(_TestTask):
    kind: ClassVar[str] = "semseg"
    dense = True
    modality: ClassVar[str] = "image"


class AnyDenseTask(_TestTask):
    kind: ClassVar[str] = "depth"
    dense = True


def tasks_for(family: str) -> list[Task]:
    if family in TEXT_FAMILIES:
        return [TextClassTask("topic", 4), AnyModalityTask("tags", 6)]
    return [ImageClassTask("digit", 5), AnyModalityTask("tags", 6), SegTask("seg", 3)]


def inputs_for(family: str) -> Tensor | list[str]:
    if family in TEXT_FAMILIES:
        return CAPTIONS
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def make_model(family: str, seed: int = 0, **overrides: Any) -> MultiTaskModel:
    backbone, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return build_model(
        backbone,
        tasks_for(family),
        backbone_kwargs={**kwargs, **overrides},
        decoder_channels=8,
        decoder_hidden=16,
        projector_dim=12,
    )


def timm_model_of(encoder: Encoder) -> Any:
    assert isinstance(encoder, TimmEncoder)
    return encoder.model


def as_text_encoder(encoder: Encoder) -> TextEncoder:
    assert isinstance(encoder, TextEncoder)
    return encoder


def test_every_registered_family_is_covered() -> None:
    assert set(FAMILIES) == set(ENCODER_REGISTRY)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_shapes(family: str) -> None:
    model = make_model(family)
    outputs = model(inputs_for(family))
    expected: dict[str, tuple[int, ...]] = {
        task.name: (BATCH, task.out_channels) for task in tasks_for(family)
    }
    if family in IMAGE_FAMILIES:
        expected["seg"] = (BATCH, 3, 32, 32)  # upsampled to the input's H x W
    assert {name: tuple(out.shape) for name, out in outputs.items()} == expected

    features = model.features(inputs_for(family))
    assert tuple(features.pooled.shape) == (BATCH, model.encoder.num_features)
    assert [m.shape[1] for m in features.feature_maps] == model.encoder.feature_channels
    assert all(m.dim() == 4 and m.shape[0] == BATCH for m in features.feature_maps)
    heights = [m.shape[-2] for m in features.feature_maps]
    assert heights == sorted(heights, reverse=True)  # non-decreasing stride
    assert bool(features.feature_maps) == (family in IMAGE_FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_reaches_every_parameter(family: str) -> None:
    model = make_model(family)
    outputs, projection = model.forward_with_representation(inputs_for(family))
    loss = sum(out.square().mean() for out in outputs.values()) + projection.square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, g in grads.items() if g is None] == []
    assert [n for n, g in grads.items() if g is not None and not torch.isfinite(g).all()] == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_keys_obey_group_contract(family: str) -> None:
    model = make_model(family)
    keys = list(model.state_dict())
    names = [task.name for task in tasks_for(family)]
    per_task = [f"{part}.{n}." for part in ("decoders", "heads") for n in names]
    allowed = ("encoder.", "projector.", *per_task)
    assert [k for k in keys if not k.startswith(allowed)] == []

    groups = parameter_groups(model)
    expected_groups = {"encoder", "projector"} | {
        f"{part}.{n}" for part in ("decoders", "heads") for n in names
    }
    assert set(groups) == expected_groups
    grouped = [k for group_keys in groups.values() for k in group_keys]
    assert sorted(grouped) == sorted(keys)  # a partition: every key exactly once
    for group, group_keys in groups.items():
        assert all(k.startswith(group + ".") for k in group_keys)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_pooled_is_timms_pre_logits(family: str) -> None:
    model = make_model(family).eval()
    images = inputs_for(family)
    timm_model = timm_model_of(model.encoder)
    with torch.no_grad():
        expected = timm_model.forward_head(timm_model.forward_features(images), pre_logits=True)
        pooled = model.features(images).pooled
    torch.testing.assert_close(pooled, expected)


def test_vit_feature_maps_are_patch_grids_of_spaced_blocks() -> None:
    model = make_model("vit", depth=6).eval()
    images = inputs_for("vit")
    vit = timm_model_of(model.encoder)
    # The four evenly spaced of six blocks end the segments at ceil(1.5, 3, 4.5, 6) - 1.
    assert getattr(model.encoder, "feature_indices", None) == [1, 2, 4, 5]
    with torch.no_grad():
        maps = model.features(images).feature_maps
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        tokens = vit.blocks[:2](tokens)  # output of block index 1
    grid = tokens[:, vit.num_prefix_tokens :].reshape(BATCH, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps[0], grid)


@pytest.mark.parametrize("family", ["vit", "resnet", "bert"])
def test_encoder_runs_once_per_batch(family: str) -> None:
    model = make_model(family)
    calls: list[int] = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    model(inputs_for(family))
    model.forward_with_representation(inputs_for(family))
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["vit", "distilbert"])
def test_represent_is_normalised_projection(family: str) -> None:
    model = make_model(family).eval()
    with torch.no_grad():
        representation = model.represent(inputs_for(family))
        _, projection = model.forward_with_representation(inputs_for(family))
    assert tuple(representation.shape) == (BATCH, 12)
    torch.testing.assert_close(representation.norm(dim=-1), torch.ones(BATCH))
    torch.testing.assert_close(representation, projection / projection.norm(dim=-1, keepdim=True))
    assert not torch.allclose(projection.norm(dim=-1), torch.ones(BATCH))


def test_represent_without_projector_raises() -> None:
    backbone, kwargs = FAMILIES["vit"]
    model = build_model(backbone, [ImageClassTask("digit", 5)], backbone_kwargs=kwargs)
    assert model.projector is None
    with pytest.raises(RuntimeError, match="projector"):
        model.represent(inputs_for("vit"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_construction_is_deterministic(family: str) -> None:
    first, again, other = make_model(family, 0), make_model(family, 0), make_model(family, 1)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_encoder_signature() -> None:
    vit = make_model("vit", seed=0)
    assert encoder_signature(vit) == encoder_signature(make_model("vit", seed=1))
    assert encoder_signature(vit) != encoder_signature(make_model("vit", depth=3))
    assert encoder_signature(vit) != encoder_signature(make_model("vit", embed_dim=48))
    bert = make_model("bert")
    assert encoder_signature(bert) != encoder_signature(make_model("bert", hidden_size=48))
    signatures = {encoder_signature(make_model(f)) for f in FAMILIES}
    assert len(signatures) == len(FAMILIES)
    # Decoders, heads and the projector are not part of the signature.
    backbone, kwargs = FAMILIES["vit"]
    torch.manual_seed(0)
    single = build_model(backbone, [ImageClassTask("digit", 2)], backbone_kwargs=kwargs)
    assert encoder_signature(single) == encoder_signature(vit)


def test_group_state_selects_groups_and_buffers() -> None:
    model = make_model("resnet")
    encoder_params = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    assert set(group_state(model, "encoder")) == encoder_params
    with_buffers = group_state(model, ["encoder."], include_buffers=True)
    assert set(with_buffers) == {k for k in model.state_dict() if k.startswith("encoder.")}
    assert "encoder.model.bn1.running_mean" in with_buffers

    seg_and_head = group_state(model, ["decoders.seg", "heads.digit"])
    assert set(seg_and_head) == {
        n for n, _ in model.named_parameters() if n.startswith(("decoders.seg.", "heads.digit."))
    }
    torch.testing.assert_close(seg_and_head["heads.digit.weight"], model.heads["digit"].weight)
    with pytest.raises(ValueError, match=r"decoders\.nope"):
        group_state(model, ["decoders.nope"])


def test_count_parameters() -> None:
    model = make_model("vit")
    assert count_parameters(model.heads["digit"]) == 16 * 5 + 5
    assert count_parameters(model.decoders["digit"]) == 32 * 16 + 16
    # projector: Linear(32, 32) + Linear(32, 12)
    assert model.projector is not None
    assert count_parameters(model.projector) == 32 * 32 + 32 + 32 * 12 + 12
    # ViT (embed 32, patch 4, 8x8 grid, 2 blocks, mlp 128): patch conv 1568, cls 32,
    # pos 65*32, per block 2*64 (norms) + 3168 (qkv) + 1056 (proj) + 4224 + 4128 (mlp), norm 64.
    assert count_parameters(model.encoder) == 1568 + 32 + 2080 + 2 * 12704 + 64
    # dense decoder: laterals 2 * (32*8 + 8), two 3x3 convs 8*8*9 without bias + BN 2*8 each.
    assert count_parameters(model.decoders["seg"]) == 2 * 264 + 2 * (576 + 16)
    total = count_parameters(model)
    assert total == 29152 + (528 + 528 + 1712) + (85 + 102 + 27) + 1452
    model.encoder.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - count_parameters(model.encoder)


def test_modality_mismatch_names_the_task() -> None:
    vit, vit_kwargs = FAMILIES["vit"]
    with pytest.raises(ValueError, match="'topic'"):
        build_model(vit, [TextClassTask("topic", 3)], backbone_kwargs=vit_kwargs)
    with pytest.raises(ValueError, match="'digit'"):
        build_model("bert", [ImageClassTask("digit", 3)], backbone_kwargs=BERT_KWARGS)
    with pytest.raises(ValueError, match="'seg'"):
        build_model("bert", [SegTask("seg", 3)], backbone_kwargs=BERT_KWARGS)
    # A dense task that accepts any modality still needs feature maps, which text lacks.
    with pytest.raises(ValueError, match="'depth_any'"):
        build_model("bert", [AnyDenseTask("depth_any", 1)], backbone_kwargs=BERT_KWARGS)


def test_ill_formed_tasks_are_rejected() -> None:
    vit, vit_kwargs = FAMILIES["vit"]
    with pytest.raises(ValueError, match="unique"):
        build_model(vit, [ImageClassTask("a", 2), SegTask("a", 2)], backbone_kwargs=vit_kwargs)
    with pytest.raises(ValueError, match=r"no '\.'"):
        build_model(vit, [ImageClassTask("a.b", 2)], backbone_kwargs=vit_kwargs)
    with pytest.raises(ValueError, match="at least one task"):
        build_model(vit, [], backbone_kwargs=vit_kwargs)


def test_unknown_backbone_lists_supported() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        create_encoder("efficientnet_b0")
    assert "efficientnet_b0" in str(info.value) and "distilbert" in str(info.value)


def test_hashing_tokenizer_is_deterministic_crc32() -> None:
    tokenizer = HashingTokenizer(vocab_size=1000, max_length=6)
    encoded = tokenizer(["Hello, World!", "cat-DOG", ""])
    # CRC-32: hello 907060870, world 980881731, cat 2656977832, dog 2167159165; id = 2 + crc % 998
    expected_ids = [[1, 628, 427, 0, 0, 0], [1, 438, 171, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert encoded["input_ids"].tolist() == expected_ids
    assert encoded["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ]
    again = HashingTokenizer(vocab_size=1000, max_length=6)(["Hello, World!", "cat-DOG", ""])
    assert torch.equal(again["input_ids"], encoded["input_ids"])

    truncated = HashingTokenizer(vocab_size=1000, max_length=3)(["hello world cat dog"])
    assert truncated["input_ids"].tolist() == [[1, 628, 427]]
    assert truncated["attention_mask"].tolist() == [[1, 1, 1]]


def test_text_encoder_accepts_captions_or_token_dicts() -> None:
    model = make_model("bert").eval()
    tokens = HashingTokenizer(vocab_size=100, max_length=32)(CAPTIONS)
    with torch.no_grad():
        from_captions = model(CAPTIONS)["topic"]
        from_tokens = model(tokens)["topic"]
        swapped = model(CAPTIONS[::-1])["topic"]
    torch.testing.assert_close(from_captions, from_tokens)
    torch.testing.assert_close(swapped, from_captions.flip(0))
    assert not torch.allclose(from_captions[0], from_captions[1])


def test_text_max_length_cannot_exceed_positions() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        create_encoder("bert", max_length=65, **BERT_KWARGS)


def _assert_same_encoder(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    reference_state = reference.state_dict()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(loaded_state[key], value), key


def _tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone().contiguous() for k, v in state.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrained_safetensors_round_trip(family: str, tmp_path: Path) -> None:
    backbone, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    reference = create_encoder(backbone, **kwargs)
    path = tmp_path / "encoder.safetensors"
    save_file(_tensors(reference.state_dict()), str(path))  # keys carry the "model." wrapper
    torch.manual_seed(1)
    loaded = create_encoder(backbone, pretrained=str(path), **kwargs)
    _assert_same_encoder(loaded, reference)


def test_pretrained_pth_with_raw_keys_and_classifier(tmp_path: Path) -> None:
    backbone, kwargs = FAMILIES["vit"]
    torch.manual_seed(0)
    full = timm.create_model(backbone, pretrained=False, num_classes=7, **kwargs)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": full.state_dict()}, path)  # nested, no prefix, with "head.*"
    assert "head.weight" in full.state_dict()
    torch.manual_seed(1)
    loaded = create_encoder(backbone, pretrained=str(path), **kwargs)
    for key, value in timm_model_of(loaded).state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key


def test_pretrained_from_full_model_checkpoint_and_directory(tmp_path: Path) -> None:
    model = make_model("resnet", seed=0)
    directory = tmp_path / "resnet"
    directory.mkdir()
    # A whole MultiTaskModel checkpoint: the "encoder." keys are taken, the rest skipped.
    save_file(_tensors(model.state_dict()), str(directory / "model.safetensors"))
    backbone, kwargs = FAMILIES["resnet"]
    torch.manual_seed(1)
    loaded = create_encoder(backbone, pretrained=str(directory), **kwargs)
    _assert_same_encoder(loaded, model.encoder)


def test_pretrained_strict_errors_list_keys(tmp_path: Path) -> None:
    backbone, kwargs = FAMILIES["vit"]
    state = _tensors(timm_model_of(create_encoder(backbone, **kwargs)).state_dict())

    missing = dict(state)
    del missing["cls_token"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \[cls_token\]"):
        create_encoder(backbone, pretrained=str(tmp_path / "missing.safetensors"), **kwargs)

    extra = {**state, "blocks.9.attn.qkv.weight": torch.zeros(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.9\.attn\.qkv\.weight\]"):
        create_encoder(backbone, pretrained=str(tmp_path / "extra.safetensors"), **kwargs)

    with pytest.raises(ValueError, match=r"shape mismatches.*pos_embed"):
        create_encoder(
            backbone, pretrained=str(tmp_path / "missing.safetensors"), **{**kwargs, "img_size": 48}
        )
    with pytest.raises(FileNotFoundError):
        create_encoder(backbone, pretrained=str(tmp_path / "absent.safetensors"), **kwargs)
    with pytest.raises(FileNotFoundError, match="no weight file"):
        create_encoder(backbone, pretrained=str(tmp_path), **kwargs)


def test_bert_pretrained_directory_uses_its_tokenizer(tmp_path: Path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)  # positional: v4 and v5
    torch.manual_seed(0)
    reference = BertModel(BertConfig(**BERT_KWARGS), add_pooling_layer=False)
    reference.save_pretrained(tmp_path)

    encoder = as_text_encoder(create_encoder("bert", pretrained=str(tmp_path), max_length=8))
    assert not isinstance(encoder.tokenizer, HashingTokenizer)
    tokens = encoder.tokenize(["Hello world", "world"])
    assert tokens["input_ids"].tolist() == [[2, 5, 6, 3], [2, 6, 3, 0]]
    assert tokens["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    _assert_same_encoder(encoder.model, reference)
    reference.eval()
    encoder.eval()
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state[:, 0]
        torch.testing.assert_close(encoder(["Hello world", "world"]).pooled, expected)
    assert F.cosine_similarity(expected[0], expected[1], dim=0) < 1


def test_bert_task_model_checkpoint_loads_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = BertModel(BertConfig(**BERT_KWARGS), add_pooling_layer=True)
    # As BertForSequenceClassification saves it: "bert." wrapper, pooler, classifier.
    state = {f"bert.{k}": v for k, v in _tensors(reference.state_dict()).items()}
    state["classifier.weight"] = torch.zeros(3, 32)
    save_file(state, str(tmp_path / "bert.safetensors"))
    torch.manual_seed(1)
    encoder = as_text_encoder(
        create_encoder("bert", pretrained=str(tmp_path / "bert.safetensors"), **BERT_KWARGS)
    )
    assert isinstance(encoder.tokenizer, HashingTokenizer)
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_bert_directory_without_tokenizer_is_rejected(tmp_path: Path) -> None:
    BertModel(BertConfig(**BERT_KWARGS), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer"):
        create_encoder("bert", pretrained=str(tmp_path))
