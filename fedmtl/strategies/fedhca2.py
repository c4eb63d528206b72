"""FedHCA² server: conflict-averse encoders, cross-attention decoders, learned hyper weights.

The maths is :func:`fedmtl.aggregation.fedhca2.fedhca2_round` (Lu et al., "FedHCA²: Towards
Hetero-Client Federated Multi-Task Learning", CVPR 2024).

Clients and decoders. The N clients of the experiment are ordered single-task first, then
multi-task, each part in file order; the K decoders are the clients' decoders in that order, a
multi-task client's sorted by task name. α (one per client) and β (one per decoder and decoder
layer) are indexed by these positions, which are fixed by the experiment file (state is keyed by
``client_id``, never by Flower node id). All clients must share one encoder architecture (the
conflict-averse direction mixes every client's encoder update): checked on the experiment file
when the strategy is built (equal ``model.backbone`` and ``model.kwargs``) and on the shapes each
client announces in ``describe`` before every round, with an error naming the client. Decoders
may differ: cross-attention runs per layer among the decoders whose layer has the same signature
(``hyper_cross_attention``).

Shapes come from ``describe`` only (the server never builds a client model). The state is built
at the first round, from the announced shapes; a client that has not described itself by then
takes the shapes of a described client with the same model, dataset and tasks in the
experiment file, and without one the run stops with an error naming it.

Wire format and bytes. Shared are the *parameters* of ``encoder`` and ``decoders.<task>``
(``FedHCA2Config.shares``); heads and all buffers (BatchNorm statistics) never leave the client.

- Server → client (``train``): the client's own personalised encoder and decoders θ^last, once
  the server knows them; nothing else (no other client's tensors).
- Client → server: its parameters after local training θ^local. The server keeps every θ^last,
  so it computes Δ = θ^local − θ^last itself and nothing is sent twice.
- Start point: before a client's first accepted reply the server does not know its θ^last
  (in round 1 clients start from their seeded initial models); it asks for it
  (:mod:`fedmtl.protocols.fedhca2`), so that round's upload is twice the shared size. A client
  whose first replies fail is asked again until one is accepted.

Per round, with the clients that replied (``present``): the hyper-weight step from the previous
round's ``U``/``XA`` and this round's Δ, then ``U`` from the raw encoder updates, homo-group mean
Δ̃ (same dataset and task set), ``θ_i ← θ_i^last + Δ̃_i + clamp(α_i)·U``, and per decoder
``θ_k ← θ_k^last + Δ_k + clamp(β_k^l)·XA_k``. A client missing from a round (dropped, bad reply)
keeps θ^last, α and its decoders' β untouched, is left out of ``U`` and ``XA``, and is sent its
θ^last again, i.e. its personalised tensors from the last round it took part in. Evaluation uses
the freshly personalised tensors (``evaluate_arrays`` = next round's ``train_arrays``).

Server state (checkpointed every round, so ``--resume`` continues exactly): θ^last of every
encoder as one ``[N, d]`` buffer and of every decoder, α, β and their momentum buffers, ``U`` and
``XA`` of the last aggregation, and which clients' θ^last is known. It lives on the CPU; the
server also holds a second ``[N, d]`` buffer for the uploaded encoders, into which each reply
is copied as it arrives. When the two buffers exceed ``memory_budget_mb`` they live in a
memory-mapped file (:class:`~fedmtl.aggregation.spill.SpilledMatrix`) and every pass over them
releases its pages chunk by chunk: the same arithmetic, bit for bit, in bounded RAM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fedmtl.aggregation.fedhca2 import (
    FedHCA2State,
    FlatLayout,
    fedhca2_round,
    flatten_states,
    unflatten_state,
)
from fedmtl.aggregation.spill import SpilledMatrix
from fedmtl.aggregation.two_tier import check_single_encoder_architecture
from fedmtl.config import ClientConfig, Experiment
from fedmtl.messages import TensorSpec
from fedmtl.protocols.fedhca2 import REPORT_START, START_PREFIX
from fedmtl.strategies.base import ClientInfo, Federation, Reply, Strategy, register_strategy

ENCODER_PREFIX = "encoder."


def client_order(experiment: Experiment) -> list[str]:
    """Client ids in FedHCA² order: single-task clients first, then multi-task, in file order."""
    return [c.client_id for c in sorted(experiment.clients, key=lambda c: len(c.tasks) > 1)]


def decoder_order(experiment: Experiment, order: list[str]) -> list[tuple[str, str]]:
    """``(client_id, task)`` of the K decoders: clients in ``order``, tasks sorted by name."""
    return [(cid, task) for cid in order for task in sorted(experiment.client(cid).tasks)]


def model_signature(client: ClientConfig) -> str:
    """What makes two clients' encoders equal in the experiment file: backbone and its kwargs."""
    return json.dumps([client.model.backbone, client.model.kwargs], sort_keys=True)


def shape_twin(experiment: Experiment, client: ClientConfig) -> str:
    """Clients with equal twins build models with equal shared shapes (same ``init_model``)."""
    model = client.model.model_dump(exclude={"pretrained"})
    kind = experiment.datasets[client.dataset].kind
    return json.dumps([model, kind, sorted(client.tasks)], sort_keys=True, default=str)


def placeholders(specs: Mapping[str, TensorSpec], device: str = "cpu") -> dict[str, Tensor]:
    """Zero tensors (``device="meta"``: shapes only) of the given names, shapes and dtypes."""
    return {
        name: torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
        for name, spec in specs.items()
    }


@register_strategy("fedhca2")
class FedHCA2(Strategy):
    """FedHCA² round loop over the shared aggregation maths (module docstring).

    Raises
    ------
    ValueError
        If the experiment's clients do not share one encoder architecture (naming them).
    """

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.order = client_order(experiment)
        self.index = {cid: i for i, cid in enumerate(self.order)}
        try:
            check_single_encoder_architecture(
                {cid: model_signature(experiment.client(cid)) for cid in self.order}
            )
        except ValueError as exc:
            raise ValueError(
                f"FedHCA² mixes the encoder updates of all clients, so they must share one "
                f"encoder architecture (model.backbone and model.kwargs): {exc}"
            ) from None
        self.decoders = decoder_order(experiment, self.order)
        self.client_decoders: dict[str, list[int]] = {cid: [] for cid in self.order}
        for k, (cid, _) in enumerate(self.decoders):
            self.client_decoders[cid].append(k)
        self.group_keys = [
            (experiment.client(cid).dataset, tuple(sorted(experiment.client(cid).tasks)))
            for cid in self.order
        ]
        self.structure: dict[str, dict[str, TensorSpec]] = {}  # shared specs, from describe
        self._state: FedHCA2State | None = None  # built by prepare() from the shapes
        self.layout = FlatLayout((), ())  # the encoder's, set with the state
        self.known = torch.zeros(len(self.order), dtype=torch.bool)  # θ^last received?
        self._local: Tensor | None = None  # [N, d] uploaded encoders, reused every round
        self._spilled: list[SpilledMatrix] = []  # θ^last and uploads, when over the budget
        # The round being folded: who replied, their decoders (see fold).
        self._round = 0
        self._present = torch.zeros(len(self.order), dtype=torch.bool)
        self._decoders_local: list[dict[str, Tensor] | None] = []
        self._pending: dict[str, Tensor] | None = None  # checkpoint loaded before prepare()

    @property
    def state(self) -> FedHCA2State:
        """The round-to-round state (exists once :meth:`prepare` has seen the shapes).

        Raises
        ------
        RuntimeError
            Before :meth:`prepare`.
        """
        if self._state is None:
            raise RuntimeError("FedHCA² state is built from the clients' describe replies first")
        return self._state

    def prepare(self, clients: Mapping[str, ClientInfo]) -> None:
        """Learn the clients' shared shapes from ``describe``; build the state once.

        Raises
        ------
        ValueError
            If a client announces shapes that differ from its earlier announcement or from the
            encoder the others announce, or the state must be built while a client whose
            shapes no described client shares has not described itself (naming it).
        """
        self.check_clients(clients.values())
        for cid, info in clients.items():
            self.structure.setdefault(cid, self._announced(info))
        if self._state is not None:
            return
        twins = {
            cid: shape_twin(self.experiment, self.experiment.client(cid)) for cid in self.order
        }
        for cid in self.order:
            if cid not in self.structure:
                twin = next((c for c in self.structure if twins[c] == twins[cid]), None)
                if twin is None:
                    raise ValueError(
                        f"FedHCA² needs the shapes of every client's decoders before its first "
                        f"aggregation; client {cid!r} has not described itself and no described "
                        f"client has its model, dataset and tasks"
                    )
                self.structure[cid] = dict(self.structure[twin])
        self._build_state()

    def _build_state(self) -> None:
        hyper = self.hyper
        encoders = {
            cid: {k: v for k, v in specs.items() if k.startswith(ENCODER_PREFIX)}
            for cid, specs in self.structure.items()
        }
        signatures = {
            cid: hashlib.sha256(repr(sorted(e.items())).encode()).hexdigest()[:16]
            for cid, e in encoders.items()
        }
        try:
            check_single_encoder_architecture(signatures)
        except ValueError as exc:
            raise ValueError(
                f"FedHCA² mixes the encoder updates of all clients, so they must share one "
                f"encoder architecture: {exc}"
            ) from None
        reference = placeholders(encoders[self.order[0]], device="meta")
        self.layout = FlatLayout.from_state(reference)
        initial_decoders = []
        for cid, task in self.decoders:
            prefix = f"decoders.{task}."
            specs = {
                name.removeprefix(prefix): spec
                for name, spec in self.structure[cid].items()
                if name.startswith(prefix)
            }
            initial_decoders.append(placeholders(specs))
        dtype = next(iter(reference.values())).dtype
        n, d = len(self.order), self.layout.numel
        size = 2 * n * d * torch.empty(0, dtype=dtype).element_size()  # θ^last and uploads
        budget = hyper.memory_budget_mb
        if budget is not None and size > budget * 2**20:
            self._spilled = [SpilledMatrix(n, d, dtype, hyper.spill_dir) for _ in range(2)]
            last, self._local = (m.tensor for m in self._spilled)
        else:
            last, self._local = torch.zeros(n, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
        self._state = FedHCA2State.initial(
            last,
            initial_decoders,
            [self.index[cid] for cid, _ in self.decoders],
            init=hyper.alpha_init,
            lr=hyper.hyper_lr,
            momentum=hyper.hyper_momentum,
            weight_decay=hyper.hyper_weight_decay,
        )
        for beta in self._state.hyper.beta:  # HyperWeights starts α and β at one value
            beta.fill_(hyper.beta_init)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def _announced(self, client: ClientInfo) -> dict[str, TensorSpec]:
        """The shared specs ``client`` announced (encoder and decoders)."""
        return {
            name: spec
            for specs in client.group_specs(self.shares).values()
            for name, spec in specs.items()
        }

    # -- what clients receive and send -------------------------------------------------

    def personalised(self, client_id: str) -> dict[str, Tensor]:
        """θ^last of the client's encoder and decoders under their state-dict names."""
        i = self.index[client_id]
        out = unflatten_state(self.state.encoder_last[i], self.layout)
        for k in self.client_decoders[client_id]:
            task = self.decoders[k][1]
            out.update({f"decoders.{task}.{n}": t for n, t in self.state.decoders_last[k].items()})
        return out

    def train_config(self, round_: int, client: ClientInfo) -> dict[str, Any]:
        """Ask for the start point while the server does not know the client's θ^last."""
        return {} if bool(self.known[self.index[client.client_id]]) else {REPORT_START: True}

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """The client's personalised tensors (none before its first accepted reply)."""
        if not bool(self.known[self.index[client.client_id]]):
            return {}
        return self.personalised(client.client_id)

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """Its encoder and decoder parameters, plus ``start/…`` copies when asked for them."""
        specs = self.structure[client.client_id]
        if bool(self.known[self.index[client.client_id]]):
            return specs
        return {**specs, **{START_PREFIX + k: spec for k, spec in specs.items()}}

    # -- the round ---------------------------------------------------------------------

    def check_clients(self, clients: Iterable[ClientInfo]) -> None:
        """Check that every client announces the shared tensors it announced before.

        Raises
        ------
        ValueError
            Naming the client and the first differing tensor (e.g. another encoder).
        """
        for client in clients:
            expected = self.structure.get(client.client_id)
            if expected is None:
                continue
            announced = self._announced(client)
            if announced != expected:
                differing = sorted(
                    name
                    for name in set(announced) | set(expected)
                    if announced.get(name) != expected.get(name)
                )
                raise ValueError(
                    f"client {client.client_id!r} announced shared tensors that differ from the "
                    f"ones it announced before (FedHCA² needs one encoder architecture): first "
                    f"differing tensors {differing[:3]}"
                )

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Check what every known client announced (building the state once), then train.

        Each reply's encoder is written into its row of the uploads buffer as it arrives
        (:meth:`fold`), so the server holds the ``[N, d]`` buffer, not N uploads besides it.
        """
        self.prepare(federation.clients)
        self._begin(round_)

        def fold(client_id: str, reply: Reply) -> bool:
            return self.fold(round_, client_id, reply)

        replies = federation.train_phase(round_, clients, on_reply=fold)
        federation.record_server(round_, self.aggregate(round_, replies, federation.clients))

    def _begin(self, round_: int) -> None:
        self._round = round_
        self._present = torch.zeros(len(self.order), dtype=torch.bool)
        self._decoders_local = [None] * len(self.decoders)

    def fold(self, round_: int, client_id: str, reply: Reply) -> bool:
        """Take one good reply: its start point if new, its encoder row and its decoders.

        Returns ``True``: the reply's tensors are copied in (decoders are kept by reference),
        so the loop need not keep them.
        """
        if self._round != round_:
            self._begin(round_)
        state = self.state
        i = self.index[client_id]
        if not bool(self.known[i]):
            start = {
                name.removeprefix(START_PREFIX): tensor
                for name, tensor in reply.arrays.items()
                if name.startswith(START_PREFIX)
            }
            flatten_states([start], self.layout, out=state.encoder_last[i : i + 1])
            for k in self.client_decoders[client_id]:
                state.decoders_last[k] = self._decoder(k, start, clone=True)
            self.known[i] = True
        assert self._local is not None
        flatten_states([reply.arrays], self.layout, out=self._local[i : i + 1])
        self._release()
        for k in self.client_decoders[client_id]:
            self._decoders_local[k] = self._decoder(k, reply.arrays)
        self._present[i] = True
        return True

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Learn new start points, then run one FedHCA² aggregation over the repliers.

        In a round run by :meth:`run_round` the replies were folded as they arrived; called
        on its own, it folds ``replies`` first.
        """
        state = self.state
        if self._round != round_:
            self._begin(round_)
            for client_id, reply in replies.items():
                self.fold(round_, client_id, reply)
        assert self._local is not None
        present = self._present
        fedhca2_round(
            state,
            self._local,
            self._decoders_local,
            self.group_keys,
            present=present,
            c=self.hyper.ca_c,
            rescale=self.hyper.rescale,
            release=self._release if self._spilled else None,
        )
        self._release()
        self._round, self._decoders_local = 0, []  # the next call starts a new round
        return self.metrics(present)

    def _release(self) -> None:
        """Drop the resident pages of memory-mapped buffers (nothing when in RAM)."""
        for matrix in self._spilled:
            matrix.release()

    def close(self) -> None:
        """Unmap the memory-mapped buffers, if any."""
        self._spilled = []

    def _decoder(
        self, k: int, tensors: Mapping[str, Tensor], clone: bool = False
    ) -> dict[str, Tensor]:
        """Decoder ``k``'s tensors from a state-dict-keyed mapping, names relative to it."""
        prefix = f"decoders.{self.decoders[k][1]}."
        names = self.state.decoders_last[k]
        return {n: tensors[prefix + n].clone() if clone else tensors[prefix + n] for n in names}

    def metrics(self, present: Tensor) -> dict[str, float]:
        """Raw α per client, raw β per decoder layer, ``‖U‖`` and the number of repliers."""
        hyper = self.state.hyper
        out = {"fedhca2/clients": float(present.sum())}
        if self.state.direction is not None:
            out["fedhca2/direction_norm"] = float(self.state.direction.norm())
        for i, cid in enumerate(self.order):
            out[f"fedhca2/alpha/{cid}"] = float(hyper.alpha[i])
        for k, (cid, task) in enumerate(self.decoders):
            for (layer, _), value in zip(self.state.layers[k], hyper.beta[k]):
                out[f"fedhca2/beta/{cid}/{task}/{layer}"] = float(value)
        return out

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every θ^last, α, β and momenta, ``U``, ``XA`` and which θ^last are known."""
        meta = {"order": self.order, "decoders": [list(d) for d in self.decoders]}
        if self._state is None:  # no client described itself yet: nothing learnt
            return dict(self._pending or {}), meta
        return {**self._state.state_dict(), "known": self.known}, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (for the same experiment).

        Raises
        ------
        ValueError
            If the checkpoint was written for another client or decoder order.
        """
        if list(meta["order"]) != self.order or [tuple(d) for d in meta["decoders"]] != list(
            self.decoders
        ):
            raise ValueError(
                f"checkpoint clients/decoders {meta['order']} / {meta['decoders']} differ from "
                f"this experiment's {self.order} / {self.decoders}"
            )
        if self._state is None:  # a resume: the shapes come with the clients' describe replies
            self._pending = dict(tensors)
        else:
            self._restore(tensors)

    def _restore(self, tensors: Mapping[str, Tensor]) -> None:
        self.state.load_state_dict({k: v for k, v in tensors.items() if k != "known"})
        if "known" in tensors:
            self.known = tensors["known"].to(torch.bool).clone()
