"""Reading local weight files and loading them strictly into a backbone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# File names timm and transformers use for the weights inside a model directory.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")

# Wrappers a checkpoint's keys may carry: fedmtl's own ("encoder." / "model."), DataParallel's
# ("module."), transformers task models' ("bert." / "distilbert."). The one under which most keys
# match the target is stripped.
_WRAPPER_PREFIXES = (
    "",
    "model.",
    "encoder.",
    "encoder.model.",
    "module.",
    "module.model.",
    "bert.",
    "distilbert.",
)

# Top-level keys under which training scripts commonly nest the state dict.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")


def find_weight_file(directory: Path) -> Path:
    """The weight file inside a model directory.

    Raises
    ------
    FileNotFoundError
        If none of ``WEIGHT_FILE_NAMES`` is in ``directory``.
    """
    for name in WEIGHT_FILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no weight file {list(WEIGHT_FILE_NAMES)} in directory {directory}")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file or directory.

    Parameters
    ----------
    path : str | Path
        A weight file, or a directory holding one of ``WEIGHT_FILE_NAMES``.

    Returns
    -------
    dict[str, Tensor]
        Tensors on the CPU; a state dict nested under ``"state_dict"`` / ``"model"`` is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        path = find_weight_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        state: object = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin"):
        # weights_only: a checkpoint must never execute code when it is read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported weight file {path}: use .safetensors, .pth, .pt or .bin")
    while isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        nested = next((state[k] for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            raise ValueError(f"{path} does not hold a state dict of tensors")
        state = nested
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _strip_wrapper_prefix(state: Mapping[str, Tensor], target: set[str]) -> dict[str, Tensor]:
    """Strip the wrapper prefix under which the most keys land on ``target``'s keys."""

    def overlap(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in target)

    prefix = max(_WRAPPER_PREFIXES, key=overlap)  # ties keep the earlier (shorter) prefix
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def load_state_dict_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    ignore_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state`` into ``module``, strict on every key except the ignored ones.

    Keys may carry a leading ``"model."`` / ``"encoder."`` / ``"module."`` wrapper; when one is
    stripped, keys outside it (e.g. a full fedmtl checkpoint's ``decoders.*``) are not part of
    the encoder and are skipped.

    Parameters
    ----------
    module : nn.Module
        The backbone to fill (all of its state-dict keys must be provided).
    state : Mapping[str, Tensor]
        The checkpoint's tensors.
    ignore_unexpected : Iterable[str]
        Key prefixes (e.g. the classifier ``"head"``) the checkpoint may hold that the backbone
        lacks.
    source : str
        Where ``state`` came from, for the error message.

    Raises
    ------
    ValueError
        If keys are missing, unexpected, or shaped differently; the message lists them.
    """
    target = module.state_dict()
    ignored = tuple(ignore_unexpected)
    state = _strip_wrapper_prefix(state, set(target))

    def is_ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignored)

    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target and not is_ignored(k))
    mismatched = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    )
    problems = [
        f"{label} {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        where = f"cannot load {source} into {type(module).__name__}"
        raise ValueError(f"{where}: " + "; ".join(problems))
    module.load_state_dict({k: state[k] for k in target}, strict=True)
