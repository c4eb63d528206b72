"""transformers text backbones (BERT, DistilBERT) with the tokenizer they own."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from fedmtl.models.pretrained import load_state_dict_strict, read_state_dict
from fedmtl.models.registry import Encoder, EncoderOutput, register_encoder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

TextInputs = Sequence[str] | Mapping[str, Tensor]


def _transformers(name: str) -> Any:
    """A class of ``transformers``, imported on first use.

    Importing transformers takes seconds; a deployed ClientApp is a new process per message,
    so only processes that build a text encoder pay for it.
    """
    import transformers

    return getattr(transformers, name)


class Tokenizer(Protocol):
    """What the encoder needs from a tokenizer: captions in, model inputs out."""

    def __call__(self, texts: list[str]) -> Mapping[str, Tensor]:  # pragma: no cover - protocol
        """Tokenize a batch into ``input_ids`` and ``attention_mask``."""
        ...


class HashingTokenizer:
    """Deterministic word-level tokenizer needing no vocabulary file.

    Lower-cases, splits on non-alphanumerics, puts [CLS] first and hashes each word with CRC-32
    into ``vocab_size - 2`` buckets; pads / truncates to ``max_length``.

    Parameters
    ----------
    vocab_size : int
        Size of the encoder's embedding table (ids 0 and 1 are [PAD] and [CLS]).
    max_length : int
        Tokens per sequence, [CLS] included.
    """

    pad_id = 0
    cls_id = 1
    _word = re.compile(r"[a-z0-9]+")

    def __init__(self, vocab_size: int, max_length: int = 32) -> None:
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def token_id(self, word: str) -> int:
        """The id of one (already lower-cased) word; stable across processes and runs."""
        return 2 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 2)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize ``texts`` into ``input_ids`` and ``attention_mask``, both ``long [B, L]``."""
        input_ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, text in enumerate(texts):
            words = self._word.findall(text.lower())[: self.max_length - 1]
            ids = [self.cls_id, *(self.token_id(w) for w in words)]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class _PretrainedTokenizer:
    """A transformers tokenizer loaded from a local directory, padded to the batch's longest."""

    # BERT-family vocabularies; without one, transformers silently builds an empty-vocabulary
    # tokenizer that maps every word to [UNK].
    vocabulary_files = ("tokenizer.json", "vocab.txt")

    def __init__(self, path: str, max_length: int, *, local: bool = False) -> None:
        directory = Path(path).expanduser()
        if local and not directory.is_dir():
            # never let a typo in a local path turn into a hub download
            raise ValueError(f"tokenizer directory does not exist: {path}")
        if directory.is_dir() and not any((directory / f).is_file() for f in self.vocabulary_files):
            what = "tokenizer" if local else "pretrained"
            raise ValueError(
                f"{what} directory {path} has no tokenizer {list(self.vocabulary_files)};"
                " save one there with save_pretrained"
            )
        options = {"local_files_only": True} if directory.is_dir() else {}
        try:
            self.tokenizer = _transformers("AutoTokenizer").from_pretrained(
                str(directory) if directory.is_dir() else path, **options
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"no loadable tokenizer in directory {path}: {err}") from err
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {path} has no padding token (pad_token)")
        self.max_length = max_length

    def __len__(self) -> int:
        """Ids the tokenizer can produce (its vocabulary and added tokens)."""
        return len(self.tokenizer)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class TextEncoder(Encoder):
    """A transformers encoder built from its config; pooled is the [CLS] hidden state.

    Parameters
    ----------
    backbone : str
        ``"bert"`` or ``"distilbert"``.
    pretrained : str | None
        ``None``; a local weight file (random-config model + strict load, hashing tokenizer);
        a local directory (``from_pretrained`` with its own tokenizer); or ``"hub"``
        (download ``hub_id``, only when the user asks for it).
    max_length : int
        Tokens per caption, [CLS] included.
    hub_id : str | None
        Hub repository for ``pretrained="hub"``; defaults to the family's base uncased model.
    tokenizer : str | None
        A local directory holding a tokenizer saved with ``save_pretrained`` (``vocab.txt`` or
        ``tokenizer.json``); it replaces the hashing tokenizer (or the pretrained directory's).
        A model built from its config gets ``vocab_size`` = the tokenizer's size unless the
        kwargs set it; a smaller ``vocab_size`` is an error. Never downloads.
    **kwargs : Any
        Config fields (e.g. ``hidden_size=32``, ``num_hidden_layers=2``).
    """

    modality: ClassVar[str] = "text"
    config_class_name: ClassVar[str]  # transformers class names (imported lazily)
    model_class_name: ClassVar[str]
    default_hub_id: ClassVar[str]
    # Checkpoint keys of task heads and legacy buffers that the bare encoder lacks.
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    model_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        backbone: str,
        *,
        pretrained: str | None = None,
        max_length: int = 32,
        hub_id: str | None = None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if hub_id is not None and pretrained != "hub":
            raise ValueError("hub_id is only used with pretrained='hub'")
        self.tokenizer: Tokenizer
        source = (hub_id or self.default_hub_id) if pretrained == "hub" else pretrained
        model_class: type[PreTrainedModel] = _transformers(self.model_class_name)
        config_class: type[PretrainedConfig] = _transformers(self.config_class_name)
        local = (
            None if tokenizer is None else _PretrainedTokenizer(tokenizer, max_length, local=True)
        )
        if source is not None and (pretrained == "hub" or Path(source).is_dir()):
            self.model = model_class.from_pretrained(source, **self.model_kwargs, **kwargs)
            self.tokenizer = (
                local if local is not None else _PretrainedTokenizer(source, max_length)
            )
        else:
            if local is not None:
                kwargs.setdefault("vocab_size", len(local))  # one embedding row per token id
            self.model = model_class(config_class(**kwargs), **self.model_kwargs)
            if source is not None:
                load_state_dict_strict(
                    self.model,
                    read_state_dict(source),
                    ignore_unexpected=self.ignored_checkpoint_keys,
                    source=source,
                )
            self.tokenizer = (
                local
                if local is not None
                else HashingTokenizer(self.model.config.vocab_size, max_length)
            )
        vocab_size = int(self.model.config.vocab_size)
        if local is not None and len(local) > vocab_size:
            raise ValueError(
                f"the tokenizer in {tokenizer} has {len(local)} token ids but the model's "
                f"vocab_size is {vocab_size}; raise vocab_size or leave it unset"
            )
        max_positions = int(self.model.config.max_position_embeddings)
        if max_length > max_positions:
            raise ValueError(
                f"max_length {max_length} exceeds max_position_embeddings {max_positions}"
            )
        self.num_features = int(self.model.config.hidden_size)
        self.feature_channels = []

    def tokenize(self, inputs: TextInputs) -> dict[str, Tensor]:
        """Turn captions (or already tokenized inputs) into tensors on the encoder's device."""
        if isinstance(inputs, Mapping):
            encoded = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
            if "input_ids" not in encoded:
                raise ValueError("tokenized text inputs need an 'input_ids' tensor")
        elif isinstance(inputs, str):
            raise TypeError("text inputs must be a batch (list of str), not a single str")
        else:
            encoded = dict(self.tokenizer(list(inputs)))
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in encoded.items()}

    def forward(self, inputs: TextInputs) -> EncoderOutput:
        """Encode a batch of captions (``list[str]``) or a dict with ``input_ids``."""
        hidden = self.model(**self.tokenize(inputs)).last_hidden_state
        return EncoderOutput(hidden[:, 0])


@register_encoder("bert")
class BertEncoder(TextEncoder):
    """BERT without its pooler (pooled is the raw [CLS] state, so no parameter goes unused)."""

    config_class_name = "BertConfig"
    model_class_name = "BertModel"
    default_hub_id = "bert-base-uncased"
    ignored_checkpoint_keys = ("pooler", "cls", "classifier", "embeddings.position_ids")
    model_kwargs: ClassVar[dict[str, Any]] = {"add_pooling_layer": False}


@register_encoder("distilbert")
class DistilBertEncoder(TextEncoder):
    """DistilBERT (config fields ``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``)."""

    config_class_name = "DistilBertConfig"
    model_class_name = "DistilBertModel"
    default_hub_id = "distilbert-base-uncased"
    ignored_checkpoint_keys = (
        "vocab_transform",
        "vocab_layer_norm",
        "vocab_projector",
        "pre_classifier",
        "classifier",
        "embeddings.position_ids",
    )
