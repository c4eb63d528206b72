"""MultiTaskModel (encoder + per-task decoders and heads + projector) and its parameter groups."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmtl.models.decoders import (
    ClassificationDecoder,
    DenseDecoder,
    classification_head,
    dense_head,
    projector,
    resize_bilinear,
)
from fedmtl.models.registry import (
    ENCODER_REGISTRY,
    Encoder,
    EncoderOutput,
    create_encoder,
    resolve_family,
)
from fedmtl.models.text import TextInputs
from fedmtl.tasks.base import Task

ModelInputs = Tensor | TextInputs

# Top-level submodules of the parameter-group contract (docs/ARCHITECTURE.md); the per-task ones are
# split one level further, by task name.
_SHARED_GROUPS = ("encoder", "projector")
_PER_TASK_GROUPS = ("decoders", "heads")


class MultiTaskModel(nn.Module):
    """One encoder, a decoder and a head per task, and an optional projector.

    Parameters
    ----------
    encoder : Encoder
        The backbone, run once per batch for all tasks.
    decoders : Mapping[str, nn.Module]
        Task name → decoder (maps ``EncoderOutput`` to the head's input).
    heads : Mapping[str, nn.Module]
        Task name → final personal layer; same keys as ``decoders``.
    dense_tasks : Iterable[str]
        Tasks whose outputs are maps, upsampled to the input's H×W.
    projector : nn.Module | None
        Maps the pooled feature to the representation space (FedMuscle); optional.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoders: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        *,
        dense_tasks: Iterable[str] = (),
        projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if list(decoders) != list(heads):
            raise ValueError(f"decoders {list(decoders)} and heads {list(heads)} differ")
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.heads = nn.ModuleDict(heads)
        self.projector: nn.Module | None = projector
        self.dense_tasks = frozenset(dense_tasks)
        unknown = sorted(self.dense_tasks.difference(decoders))
        if unknown:
            raise ValueError(f"dense_tasks {unknown} have no decoder")

    @property
    def task_names(self) -> list[str]:
        """Names of the model's tasks, in construction order."""
        return list(self.decoders)

    def features(self, inputs: ModelInputs) -> EncoderOutput:
        """Run the encoder once; feed the result to ``decode`` / ``project``."""
        return self.encoder(inputs)

    def decode(
        self, features: EncoderOutput, tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """Task outputs from encoder features.

        Parameters
        ----------
        features : EncoderOutput
            The output of ``features``.
        tasks : Iterable[str] | None
            Tasks to decode; all of them when ``None``.

        Returns
        -------
        dict[str, Tensor]
            Task name → raw output; dense outputs are bilinearly upsampled to the input size.
        """
        outputs: dict[str, Tensor] = {}
        for name in self.task_names if tasks is None else tasks:
            output = self.heads[name](self.decoders[name](features))
            if name in self.dense_tasks:
                if features.input_size is None:
                    raise ValueError(f"dense task {name!r} needs image features with input_size")
                output = resize_bilinear(output, features.input_size)
            outputs[name] = output
        return outputs

    def forward(self, inputs: ModelInputs) -> dict[str, Tensor]:
        """Outputs of every task for one batch, from a single encoder pass."""
        return self.decode(self.features(inputs))

    def project(self, features: EncoderOutput) -> Tensor:
        """Unnormalised projector output ``[B, projector_dim]`` of the pooled feature."""
        if self.projector is None:
            raise RuntimeError("this model has no projector; build it with projector_dim set")
        return self.projector(features.pooled)

    def represent(self, inputs: ModelInputs) -> Tensor:
        """L2-normalised representation ``[B, projector_dim]`` of a batch."""
        return F.normalize(self.project(self.features(inputs)), dim=-1)

    def forward_with_representation(self, inputs: ModelInputs) -> tuple[dict[str, Tensor], Tensor]:
        """Task outputs and the unnormalised projector output from one encoder pass."""
        features = self.features(inputs)
        return self.decode(features), self.project(features)


def _check_tasks(tasks: Sequence[Task], modality: str, backbone: str) -> None:
    if not tasks:
        raise ValueError("a model needs at least one task")
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, repeated: {duplicates}")
    for task in tasks:
        if not task.name or "." in task.name:
            # A '.' would split the task's state-dict keys across parameter groups.
            raise ValueError(f"task name {task.name!r} must be non-empty and contain no '.'")
        if task.modality not in ("any", modality):
            raise ValueError(
                f"task {task.name!r} ({task.kind or type(task).__name__}) needs a "
                f"{task.modality} encoder, but {backbone!r} is a {modality} encoder"
            )


def build_model(
    backbone: str,
    tasks: Sequence[Task],
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    decoder_channels: int = 64,
    decoder_hidden: int = 128,
    projector_dim: int | None = None,
) -> MultiTaskModel:
    """Build a client's model: one encoder, a decoder and head per task, optional projector.

    Parameters
    ----------
    backbone : str
        Encoder name (see ``create_encoder``).
    tasks : Sequence[Task]
        The client's tasks; their modality must match the encoder's.
    backbone_kwargs : Mapping[str, Any] | None
        Architecture overrides for the encoder.
    pretrained : str | None
        Encoder weights: ``None``, a local file / directory, or ``"hub"``.
    decoder_channels : int
        Width of dense decoders.
    decoder_hidden : int
        Width of classification-type decoders.
    projector_dim : int | None
        Build a projector to this size when given.

    Returns
    -------
    MultiTaskModel
        Weights depend only on the torch seed and the arguments.

    Raises
    ------
    ValueError
        On duplicate or ill-formed task names, a modality mismatch, or a dense task on an
        encoder without feature maps; the message names the task.
    """
    _check_tasks(tasks, ENCODER_REGISTRY[resolve_family(backbone)].modality, backbone)
    encoder = create_encoder(backbone, pretrained=pretrained, **dict(backbone_kwargs or {}))
    decoders: dict[str, nn.Module] = {}
    heads: dict[str, nn.Module] = {}
    for task in tasks:
        if task.dense:
            if not encoder.feature_channels:
                raise ValueError(
                    f"dense task {task.name!r} needs feature maps, which {backbone!r} lacks"
                )
            decoders[task.name] = DenseDecoder(encoder.feature_channels, decoder_channels)
            heads[task.name] = dense_head(decoder_channels, task.out_channels)
        else:
            decoders[task.name] = ClassificationDecoder(encoder.num_features, decoder_hidden)
            heads[task.name] = classification_head(decoder_hidden, task.out_channels)
    return MultiTaskModel(
        encoder,
        decoders,
        heads,
        dense_tasks=[task.name for task in tasks if task.dense],
        projector=None if projector_dim is None else projector(encoder.num_features, projector_dim),
    )


def group_of(key: str) -> str:
    """Parameter group of a state-dict key: ``encoder``, ``decoders.<task>``, ... .

    Raises
    ------
    ValueError
        If the key is outside the parameter-group contract.
    """
    parts = key.split(".")
    if parts[0] in _SHARED_GROUPS and len(parts) > 1:
        return parts[0]
    if parts[0] in _PER_TASK_GROUPS and len(parts) > 2:
        return f"{parts[0]}.{parts[1]}"
    raise ValueError(f"state-dict key {key!r} is outside the parameter-group contract")


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name → the state-dict keys (parameters and buffers) in that group.

    Group names are ``"encoder"``, ``"decoders.<task>"``, ``"heads.<task>"`` and
    ``"projector"``, in state-dict order.
    """
    groups: dict[str, list[str]] = {}
    for key in model.state_dict():
        groups.setdefault(group_of(key), []).append(key)
    return groups


def group_state(
    model: nn.Module, prefixes: str | Iterable[str], include_buffers: bool = False
) -> dict[str, Tensor]:
    """State-dict entries whose keys lie under any of ``prefixes``.

    Parameters
    ----------
    model : nn.Module
        Usually a ``MultiTaskModel``.
    prefixes : str | Iterable[str]
        Group names or key prefixes, e.g. ``["encoder", "decoders.seg"]`` (a trailing ``.`` is
        optional).
    include_buffers : bool
        Also return buffers (BatchNorm running statistics), which stay local by default.

    Returns
    -------
    dict[str, Tensor]
        Detached tensors sharing storage with the model (as ``state_dict`` returns them).

    Raises
    ------
    ValueError
        If a prefix matches no state-dict key; the message lists the model's groups.
    """
    wanted = [p.rstrip(".") + "." for p in ([prefixes] if isinstance(prefixes, str) else prefixes)]
    state = model.state_dict()
    unmatched = [p for p in wanted if not any(k.startswith(p) for k in state)]
    if unmatched:
        groups = sorted(parameter_groups(model))
        raise ValueError(f"prefixes {unmatched} match no state-dict key; groups: {groups}")
    buffers = {name for name, _ in model.named_buffers()}
    return {
        k: v
        for k, v in state.items()
        if any(k.startswith(p) for p in wanted) and (include_buffers or k not in buffers)
    }


def shared_parameters(model: nn.Module, groups: tuple[str, ...]) -> dict[str, Tensor]:
    """Trainable parameters (never buffers) whose names fall in the parameter ``groups``.

    ``groups`` are parameter-group prefixes (docs/ARCHITECTURE.md): ``encoder``, ``decoders``,
    ``heads``, ``projector``; ``decoders`` covers every ``decoders.<task>.``.
    """
    prefixes = tuple(g + "." for g in groups)
    return {
        name: param.detach()
        for name, param in model.named_parameters()
        if name.startswith(prefixes) and param.requires_grad
    }


def load_tensors(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Overwrite named parameters/buffers of ``model`` in place, refusing unknown names."""
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise KeyError(f"received tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(
                    f"received {name} with shape {tuple(value.shape)}, "
                    f"model has {tuple(own[name].shape)}"
                )
            own[name].copy_(value.to(own[name].device, own[name].dtype))


def encoder_signature(model: MultiTaskModel) -> str:
    """Stable hash of the encoder's parameter names, shapes and dtypes.

    Clients whose signatures are equal have encoders that can be averaged element-wise.
    """
    digest = hashlib.sha256()
    for name, param in model.encoder.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
    return digest.hexdigest()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (only ``requires_grad`` ones if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
