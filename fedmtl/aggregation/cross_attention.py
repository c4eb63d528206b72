"""Layer-wise cross-attention over decoder updates, FedHCA² decoder aggregation (Eq. 12–13)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Layers = list[tuple[str, list[str]]]


def cross_attention(updates: Tensor) -> Tensor:
    """Let every row attend over all rows: ``softmax(D Dᵀ / sqrt(d), dim=1) @ D``.

    No learned projections: queries, keys and values are the updates themselves (official
    ``CrossAttention(q=Δ_k, k=D, v=D)`` batched over k).

    Parameters
    ----------
    updates : Tensor
        ``[K, d]`` flattened updates of one parameter tensor of K decoders.

    Returns
    -------
    Tensor
        ``[K, d]`` in the dtype and device of ``updates``; computed in at least float32 (the
        softmax subtracts the row maximum, so large logits do not overflow).
    """
    if updates.ndim != 2 or updates.shape[1] == 0:
        raise ValueError(f"updates must be [K, d] with d > 0, got shape {tuple(updates.shape)}")
    work = updates if updates.dtype in (torch.float32, torch.float64) else updates.float()
    logits = (work @ work.T) / (work.shape[1] ** 0.5)
    return (torch.softmax(logits, dim=1) @ work).to(updates.dtype)


def decoder_layers(keys: Sequence[str]) -> Layers:
    """Group a decoder's parameter names into layers.

    Rule: a layer is the **parent module** of a parameter, i.e. the name without its last
    dot-separated component (``linears.0.weight`` and ``linears.0.bias`` → layer ``linears.0``);
    a parameter registered on the decoder itself (no dot) is its own layer. Grouping compares
    whole module paths, so ``linears.1`` never captures ``linears.10.weight``. For the FedHCA²
    decoder this gives its 6 layers (4 Linear, the fuse Conv, the fuse BatchNorm); for fedmtl's
    decoders one layer per Linear / Conv / BatchNorm module.

    Parameters
    ----------
    keys : sequence of str
        Parameter names relative to the decoder (without ``decoders.<task>.``).

    Returns
    -------
    list of (str, list of str)
        ``(layer name, its parameter names)`` in order of first appearance.
    """
    layers: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        layers.setdefault(module if module else leaf, []).append(key)
    return list(layers.items())


def _layer_signature(
    name: str, keys: Sequence[str], update: Mapping[str, Tensor]
) -> tuple[object, ...]:
    """Identify a layer by its name and its parameters' names, shapes and dtypes."""
    return (name, tuple((key, tuple(update[key].shape), update[key].dtype) for key in sorted(keys)))


def hyper_cross_attention(
    decoder_updates: Sequence[Mapping[str, Tensor]], layers: Sequence[Layers]
) -> list[dict[str, Tensor]]:
    """Cross-attention of each decoder's update over the matching layers of all decoders.

    For every parameter tensor ``p`` the updates of the decoders that share ``p``'s layer are
    stacked into ``D_p ∈ R^{K_g × d_p}`` and ``XA_p = softmax(D_p D_pᵀ / sqrt(d_p)) D_p``
    (:func:`cross_attention`). Weight and bias get separate softmaxes, as in the official code;
    concatenating a layer's tensors first would share one softmax and scale the logits by
    ``1/sqrt(d_layer)`` instead. Layers matter for grouping and for β. Decoders of different
    tasks may differ in shape: decoders are grouped per layer by its signature (layer name and the
    names, shapes and dtypes of its parameters) and attend only within their group; a decoder alone
    in its group gets its own update (a softmax over one element is 1).

    Parameters
    ----------
    decoder_updates : sequence of mappings
        One ``name → update`` mapping per decoder, names relative to the decoder.
    layers : sequence of layer lists
        ``layers[k]`` is :func:`decoder_layers` of decoder k's names; it must cover every name.

    Returns
    -------
    list of dict
        ``XA_k``: one mapping per decoder, same names and shapes as its update.
    """
    if len(layers) != len(decoder_updates):
        raise ValueError(f"{len(decoder_updates)} decoders but {len(layers)} layer lists")
    # signature → (the layer's parameter names, member decoders)
    groups: dict[tuple[object, ...], tuple[list[str], list[int]]] = {}
    for k, (update, decoder_layers_k) in enumerate(zip(decoder_updates, layers)):
        covered = [key for _, keys in decoder_layers_k for key in keys]
        if sorted(covered) != sorted(update.keys()):
            raise ValueError(f"decoder {k}: layers do not cover exactly its parameter names")
        for name, keys in decoder_layers_k:
            groups.setdefault(_layer_signature(name, keys, update), (list(keys), []))[1].append(k)

    out: list[dict[str, Tensor]] = [{} for _ in decoder_updates]
    for keys, members in groups.values():
        for key in keys:
            stacked = torch.stack([decoder_updates[k][key].reshape(-1) for k in members])
            attended = cross_attention(stacked)
            shape = decoder_updates[members[0]][key].shape
            for row, k in enumerate(members):
                out[k][key] = attended[row].reshape(shape)
    return out
