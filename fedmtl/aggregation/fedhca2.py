"""One FedHCA² server round on flat buffers: hyper-weight step, HCA encoders, HXA decoders."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmtl.aggregation.conflict_averse import conflict_averse_coefficients
from fedmtl.aggregation.cross_attention import Layers, decoder_layers, hyper_cross_attention
from fedmtl.aggregation.hyper_weights import (
    HyperWeights,
    decoder_agreement,
    hyper_weight_gradient,
)

# Columns per chunk × clients ≈ this many elements: a chunk of the [N, d] buffers stays in cache
# between the subtraction and the matmuls that consume it. GPUs want far larger launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_CHUNK_ELEMENTS_OTHER = 1 << 26

Release = Callable[[], None]  # called after each chunk a pass has consumed


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work on one intra-op thread, then restore the thread count.

    A round (and packing) is memory-bound chains of small ops (cache-sized chunks, decoder
    tensors, per-tensor copies): one thread streams ~0.2 s per pass over 6 × 27.5 M floats,
    while two threads sharing busy cores sit in OpenMP barriers once per op (measured 10-100×
    slower on a loaded 2-core machine). ``torch.set_num_threads`` is process-wide, so other
    Python threads running torch ops meanwhile also get one thread.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class FlatLayout:
    """Names and shapes of the tensors packed, in this order, into one flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> FlatLayout:
        """Take the layout of ``state`` in its key order."""
        return cls(tuple(state), tuple(t.shape for t in state.values()))

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(s.numel() for s in self.shapes)


def flatten_states(
    states: Sequence[Mapping[str, Tensor]],
    layout: FlatLayout,
    *,
    out: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Pack N state dicts into one ``[N, d]`` buffer (row i = state i in ``layout`` order).

    Each row is written by a single ``torch.cat(..., out=row)``: no temporary per tensor; the
    only Python loop is over the N rows. Pass ``out`` to refill a persistent buffer instead of
    allocating (and first-touching) a new one every round.

    Parameters
    ----------
    states : sequence of mappings
        N state dicts containing every name of ``layout`` with its shape.
    layout : FlatLayout
        Order and shapes of the packed tensors.
    out : Tensor, optional
        ``[N, d]`` contiguous buffer to write into (its dtype and device win).
    dtype, device : optional
        Of a new buffer; default: those of the first tensor of the first state.

    Returns
    -------
    Tensor
        ``out`` or the new buffer.
    """
    if not states:
        raise ValueError("flatten_states needs at least one state")
    if out is None:
        first = states[0][layout.keys[0]]
        out = torch.empty(
            (len(states), layout.numel), dtype=dtype or first.dtype, device=device or first.device
        )
    elif out.shape != (len(states), layout.numel) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({len(states)}, {layout.numel}) buffer")
    with _one_cpu_thread(out.device):  # hundreds of small copies: see _one_cpu_thread
        for row, state in zip(out, states):
            for key, shape in zip(layout.keys, layout.shapes):
                if state[key].shape != shape:
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(shape)}")
            torch.cat([state[key].reshape(-1).to(out) for key in layout.keys], out=row)
    return out


def unflatten_state(flat: Tensor, layout: FlatLayout) -> dict[str, Tensor]:
    """Split a ``[d]`` vector into named tensors; the results are views sharing its memory."""
    if flat.shape != (layout.numel,):
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, expected ({layout.numel},)")
    pieces = torch.split(flat, [s.numel() for s in layout.shapes])
    return {k: p.view(s) for k, p, s in zip(layout.keys, pieces, layout.shapes)}


def group_mean_matrix(
    group_keys: Sequence[Hashable], device: torch.device | str | None = None
) -> Tensor:
    """Return ``M`` (float64 ``[N, N]``) such that ``M @ Δ`` replaces each row by its group mean.

    Clients are grouped by equal key (FedHCA²: dataset and task list), wherever they sit in the
    order — the official code only merges neighbours.
    """
    ids: dict[Hashable, int] = {}
    group = torch.tensor([ids.setdefault(key, len(ids)) for key in group_keys], device=device)
    same = (group[:, None] == group[None, :]).to(torch.float64)
    return same / same.sum(dim=1, keepdim=True)


@dataclass
class FedHCA2State:
    """Everything the FedHCA² server carries from one round to the next.

    Attributes
    ----------
    encoder_last : Tensor
        ``[N, d]`` personalised encoders sent to the clients (θ^last); updated in place.
    decoders_last : list of dict
        θ^last of the K decoders, names relative to the decoder.
    decoder_clients : list of int
        Owning client of each decoder (fixed order across rounds).
    layers : list of layer lists
        Layers of each decoder (:func:`fedmtl.aggregation.cross_attention.decoder_layers`).
    hyper : HyperWeights
        α, β and their momentum buffers.
    direction : Tensor or None
        ``U`` of the last aggregation (``[d]``).
    direction_clients : Tensor
        Boolean ``[N]``: clients whose θ^last was produced with ``direction`` (only these get an
        α step, since their next update answers that direction).
    cross : list of dict or None
        Per decoder, the ``XA`` that produced its θ^last (None before its first aggregation).
    """

    encoder_last: Tensor
    decoders_last: list[dict[str, Tensor]]
    decoder_clients: list[int]
    layers: list[Layers]
    hyper: HyperWeights
    direction: Tensor | None = None
    direction_clients: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    cross: list[dict[str, Tensor] | None] = field(default_factory=list)

    @classmethod
    def initial(
        cls,
        encoders: Tensor,
        decoders: Sequence[Mapping[str, Tensor]],
        decoder_clients: Sequence[int],
        *,
        init: float = 0.1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ) -> FedHCA2State:
        """Start state from the clients' initial parameters (``encoders`` is taken, not copied).

        Parameters
        ----------
        encoders : Tensor
            ``[N, d]`` initial encoders, e.g. from :func:`flatten_states`.
        decoders : sequence of mappings
            Initial parameters of the K decoders, names relative to the decoder.
        decoder_clients : sequence of int
            Owning client index of each decoder.
        init, lr, momentum, weight_decay : float
            Hyper-weight settings (see :class:`HyperWeights`).
        """
        n = encoders.shape[0]
        if len(decoder_clients) != len(decoders):
            raise ValueError(f"{len(decoders)} decoders but {len(decoder_clients)} owners")
        if any(not 0 <= owner < n for owner in decoder_clients):
            raise ValueError(f"decoder owners must be client indices in [0, {n})")
        layers = [decoder_layers(list(decoder)) for decoder in decoders]
        hyper = HyperWeights(
            n,
            [len(layer) for layer in layers],
            init=init,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            device=encoders.device,
        )
        return cls(
            encoder_last=encoders,
            decoders_last=[{k: t.clone() for k, t in decoder.items()} for decoder in decoders],
            decoder_clients=list(decoder_clients),
            layers=layers,
            hyper=hyper,
            direction_clients=torch.zeros(n, dtype=torch.bool, device=encoders.device),
            cross=[None] * len(decoders),
        )

    def state_dict(self) -> dict[str, Tensor]:
        """Return the round-to-round state as plain tensors (views, not copies) for checkpoints.

        Names: ``encoder_last``, ``direction`` (once set), ``direction_clients``,
        ``decoders_last.<k>.<name>``, ``cross.<k>.<name>`` (once set), ``hyper.<name>``. The
        structure (decoder owners and layers) is not included: rebuild it with :meth:`initial`.
        """
        out = {"encoder_last": self.encoder_last, "direction_clients": self.direction_clients}
        if self.direction is not None:
            out["direction"] = self.direction
        for k, (decoder, cross) in enumerate(zip(self.decoders_last, self.cross)):
            out.update({f"decoders_last.{k}.{name}": t for name, t in decoder.items()})
            if cross is not None:
                out.update({f"cross.{k}.{name}": t for name, t in cross.items()})
        out.update({f"hyper.{name}": t for name, t in self.hyper.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` into a state built by :meth:`initial` (same structure)."""
        if state["encoder_last"].shape != self.encoder_last.shape:
            raise ValueError("encoder_last has another shape than this state's encoders")
        self.encoder_last.copy_(state["encoder_last"])
        self.direction_clients = state["direction_clients"].to(self.encoder_last.device).clone()
        direction = state.get("direction")
        self.direction = None if direction is None else direction.to(self.encoder_last).clone()
        for k, decoder in enumerate(self.decoders_last):
            self.decoders_last[k] = {
                name: state[f"decoders_last.{k}.{name}"].to(t).clone()
                for name, t in decoder.items()
            }
            has_cross = f"cross.{k}.{next(iter(decoder))}" in state
            self.cross[k] = (
                {name: state[f"cross.{k}.{name}"].to(t).clone() for name, t in decoder.items()}
                if has_cross
                else None
            )
        prefix = "hyper."
        self.hyper.load_state_dict(
            {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
        )


def _update_chunks(
    last: Tensor, local: Tensor, rows: Tensor | None, release: Release | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(columns, Δ)`` for column chunks of the present rows, in one reused workspace.

    ``release`` is called after each chunk is consumed (memory-mapped buffers drop the pages
    the chunk touched: see :mod:`fedmtl.aggregation.spill`).
    """
    n = last.shape[0] if rows is None else rows.numel()
    d = last.shape[1]
    per_chunk = _CHUNK_ELEMENTS.get(last.device.type, _CHUNK_ELEMENTS_OTHER)
    width = max(1, min(d, per_chunk // max(n, 1)))
    workspace = torch.empty(n * width, dtype=last.dtype, device=last.device)
    for start in range(0, d, width):
        cols = slice(start, min(start + width, d))
        delta = workspace[: n * (cols.stop - start)].view(n, -1)
        if rows is None:
            torch.sub(local[:, cols], last[:, cols], out=delta)
        else:
            torch.sub(
                local[:, cols].index_select(0, rows), last[:, cols].index_select(0, rows), out=delta
            )
        yield cols, delta
        if release is not None:
            release()


def _encoder_statistics(
    last: Tensor,
    local: Tensor,
    rows: Tensor | None,
    direction: Tensor | None,
    release: Release | None = None,
) -> tuple[Tensor, Tensor | None]:
    """First pass: Gram matrix of the updates and their dots with ``direction`` (float64).

    Blockwise: one column chunk of ``Δ`` at a time, each chunk's ``[n, n]`` product summed in
    float64, so ``Δ`` is never materialised whole (nor read whole into RAM when the buffers
    are memory-mapped).
    """
    n = last.shape[0] if rows is None else rows.numel()
    gram = torch.zeros(n, n, dtype=torch.float64, device=last.device)
    dots = None if direction is None else torch.zeros(n, dtype=torch.float64, device=last.device)
    for cols, delta in _update_chunks(last, local, rows, release):
        gram += (delta @ delta.T).double()  # float64 accumulation across chunks
        if dots is not None and direction is not None:
            dots += (delta @ direction[cols]).double()
    return gram, dots


def _encoder_apply(
    last: Tensor,
    local: Tensor,
    rows: Tensor | None,
    mixing: Tensor,
    direction: Tensor,
    release: Release | None = None,
) -> None:
    """Second pass: ``last[rows] += mixing[:-1] @ Δ`` and ``direction = mixing[-1] @ Δ``."""
    n = mixing.shape[1]
    out: Tensor | None = None
    for cols, delta in _update_chunks(last, local, rows, release):
        if out is None:
            out = torch.empty(
                mixing.shape[0] * delta.shape[1], dtype=last.dtype, device=last.device
            )
        result = out[: mixing.shape[0] * delta.shape[1]].view(mixing.shape[0], -1)
        torch.mm(mixing, delta, out=result)
        if rows is None:
            last[:, cols].add_(result[:n])
        else:
            last[:, cols].index_add_(0, rows, result[:n])
        direction[cols].copy_(result[n])


def fedhca2_round(
    state: FedHCA2State,
    encoder_local: Tensor,
    decoders_local: Sequence[Mapping[str, Tensor] | None],
    group_keys: Sequence[Hashable],
    *,
    present: Tensor | None = None,
    c: float = 0.4,
    rescale: int = 1,
    release: Release | None = None,
) -> tuple[Tensor, list[dict[str, Tensor]], FedHCA2State]:
    """Run one FedHCA² aggregation; ``state`` is updated in place and returned.

    With ``Δ = local − last`` of the clients present this round:

    1. hyper-weight step (paper Eq. 15–17) from the stored ``U``/``XA`` of the previous round
       and this round's ``Δ``, before aggregating;
    2. ``U`` = :func:`~fedmtl.aggregation.conflict_averse.conflict_averse_direction` of the raw
       encoder updates;
    3. ``θ_i ← θ_i^last + Δ̃_i + clamp(α_i)·U`` with ``Δ̃`` the mean update of i's group
       (equal ``group_keys``), written into ``state.encoder_last``;
    4. decoders: ``θ_k ← θ_k^last + Δ_k + clamp(β_k^l)·XA_k`` with ``XA`` from
       :func:`~fedmtl.aggregation.cross_attention.hyper_cross_attention`.

    Steps 1–3 on the encoders are two streaming passes over the ``[N, d]`` buffers: everything
    after the Gram matrix is a linear map of ``Δ`` (``U = vᵀΔ``, group means ``MΔ``), so
    ``θ^last + (M + α vᵀ)Δ`` and ``U`` come out of one small matmul per chunk; no ``[N, d]``
    temporary is allocated.

    Parameters
    ----------
    state : FedHCA2State
        Server state; its buffers are modified in place.
    encoder_local : Tensor
        ``[N, d]`` encoders after local training (rows of absent clients are ignored).
    decoders_local : sequence
        The K decoders after local training (entries of absent clients' decoders are ignored
        and may be None).
    group_keys : sequence of hashable
        One key per client (dataset and task list) for the homo-group mean.
    present : Tensor, optional
        Boolean ``[N]``, clients that replied this round (default: all). Absent clients keep
        θ^last, α, their decoders' β and all momentum untouched.
    c : float
        CAGrad constant (``ca_c``).
    rescale : int
        CAGrad rescaling (see :func:`~fedmtl.aggregation.conflict_averse.rescale_divisor`).
    release : callable, optional
        Called after every column chunk of the two passes; memory-mapped ``[N, d]`` buffers
        (:class:`~fedmtl.aggregation.spill.SpilledMatrix`) drop their resident pages there, so
        the round's RAM is a chunk, not the buffers. The arithmetic is the same either way.

    Returns
    -------
    encoders : Tensor
        ``state.encoder_last``, the new personalised encoders ``[N, d]``.
    decoders : list of dict
        ``state.decoders_last``, the new decoders.
    state : FedHCA2State
        The same object, holding ``U`` and ``XA`` of this round for the next hyper-weight step.
    """
    with _one_cpu_thread(state.encoder_last.device):
        return _round(
            state, encoder_local, decoders_local, group_keys, present, c, rescale, release
        )


def _round(
    state: FedHCA2State,
    encoder_local: Tensor,
    decoders_local: Sequence[Mapping[str, Tensor] | None],
    group_keys: Sequence[Hashable],
    present: Tensor | None,
    c: float,
    rescale: int,
    release: Release | None = None,
) -> tuple[Tensor, list[dict[str, Tensor]], FedHCA2State]:
    last = state.encoder_last
    n = last.shape[0]
    if encoder_local.shape != last.shape:
        raise ValueError(f"encoder_local {tuple(encoder_local.shape)} != {tuple(last.shape)}")
    if len(group_keys) != n or len(decoders_local) != len(state.decoders_last):
        raise ValueError("need one group key per client and one entry per decoder")
    if present is None:
        present = torch.ones(n, dtype=torch.bool, device=last.device)
    present = present.to(device=last.device, dtype=torch.bool)
    rows_index = present.nonzero().flatten()
    if rows_index.numel() == 0:
        return last, state.decoders_last, state
    rows = None if rows_index.numel() == n else rows_index  # slices avoid gathers
    active = [k for k, owner in enumerate(state.decoder_clients) if bool(present[owner])]
    decoder_updates = {k: _decoder_update(state, decoders_local[k], k) for k in active}

    # 1. Hyper weights, from U/XA of the previous round and this round's updates.
    gram, dots = _encoder_statistics(last, encoder_local, rows, state.direction, release)
    hyper = state.hyper
    alpha_gradient = torch.zeros_like(hyper.alpha)
    if dots is not None:
        alpha_gradient[rows_index] = hyper_weight_gradient(hyper.alpha[rows_index], dots)
    beta_gradients: list[Tensor | None] = [None] * len(state.decoders_last)
    for k in active:
        cross = state.cross[k]
        if cross is not None:
            agreement = decoder_agreement(cross, decoder_updates[k], state.layers[k])
            beta_gradients[k] = hyper_weight_gradient(hyper.beta[k], agreement)
    alpha_mask = present & state.direction_clients
    if bool(alpha_mask.any()) or any(g is not None for g in beta_gradients):
        hyper.step(alpha_gradient, beta_gradients, alpha_mask)

    # 2–3. Conflict-averse direction, group means and personalised encoders in one pass.
    coefficients, _ = conflict_averse_coefficients(gram, c=c, rescale=rescale)
    keys = [group_keys[int(i)] for i in rows_index]
    alpha = hyper.clamped_alpha()[rows_index]
    mixing = torch.cat(
        [
            group_mean_matrix(keys, last.device) + torch.outer(alpha, coefficients),
            coefficients[None],
        ]
    ).to(last.dtype)
    direction = state.direction
    if direction is None or direction.shape != (last.shape[1],) or direction.dtype != last.dtype:
        direction = torch.empty(last.shape[1], dtype=last.dtype, device=last.device)
    _encoder_apply(last, encoder_local, rows, mixing, direction, release)
    state.direction = direction
    state.direction_clients = present.clone()

    # 4. Decoders: cross-attention among the present decoders.
    crosses = hyper_cross_attention(
        [decoder_updates[k] for k in active], [state.layers[k] for k in active]
    )
    for k, cross in zip(active, crosses):
        beta = hyper.clamped_beta(k)
        new: dict[str, Tensor] = {}
        for index, (_, names) in enumerate(state.layers[k]):
            for name in names:
                scaled = cross[name] * beta[index].to(cross[name].dtype)
                new[name] = state.decoders_last[k][name] + (decoder_updates[k][name] + scaled)
        state.decoders_last[k] = new
        state.cross[k] = cross
    return last, state.decoders_last, state


def _decoder_update(
    state: FedHCA2State, local: Mapping[str, Tensor] | None, k: int
) -> dict[str, Tensor]:
    last = state.decoders_last[k]
    if local is None or set(local) != set(last):
        raise ValueError(f"decoder {k}: local parameters missing or with other names")
    for name, tensor in last.items():
        if local[name].shape != tensor.shape:
            raise ValueError(f"decoder {k}: {name} has shape {tuple(local[name].shape)}")
    return {name: local[name] - tensor for name, tensor in last.items()}
