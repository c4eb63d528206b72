"""FedHCA² server: conflict-averse encoders, cross-attention decoders, learned hyper weights.

Spec: spec/fedhca2.md; the maths is :func:`fedmtl.aggregation.fedhca2.fedhca2_round`.

Clients and decoders. The N clients of the experiment are ordered single-task first, then
multi-task, each part in file order; the K decoders are the clients' decoders in that order, a
multi-task client's sorted by task name. α (one per client) and β (one per decoder and decoder
layer) are indexed by these positions, which are fixed by the experiment file (state is keyed by
``client_id``, never by Flower node id). All clients must share one encoder architecture (the
conflict-averse direction mixes every client's encoder update): checked on the experiment when
the strategy is built and on what each client announces in ``describe`` before every round, with
an error naming the client. Decoders may differ: cross-attention runs per layer among the
decoders whose layer has the same signature (``hyper_cross_attention``).

Wire format and bytes. Shared are the *parameters* of ``encoder`` and ``decoders.<task>``
(``FedHCA2Config.shares``); heads and all buffers (BatchNorm statistics) never leave the client.

- Server → client (``train``): the client's own personalised encoder and decoders θ^last, once
  the server knows them; nothing else (no other client's tensors).
- Client → server: its parameters after local training θ^local. The server keeps every θ^last,
  so it computes Δ = θ^local − θ^last itself and nothing is sent twice.
- Start point: before a client's first accepted reply the server does not know its θ^last
  (in round 1 clients start from their seeded initial models). Its ``train`` message then
  carries no tensors and sets ``fedhca2/report-start``; the client also uploads the parameters it
  started from as ``start/<name>`` (validated like the rest), so that round's upload is twice
  the shared size. A client whose first replies fail is asked again until one is accepted.

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
server also holds a second ``[N, d]`` buffer for the uploaded encoders.
"""

from __future__ import annotations

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
from fedmtl.aggregation.two_tier import architecture_signature, check_single_encoder_architecture
from fedmtl.clients.fedhca2 import REPORT_START, START_PREFIX
from fedmtl.clients.session import build_tasks, shared_parameters
from fedmtl.config import ClientConfig, Experiment
from fedmtl.messages import TensorSpec
from fedmtl.models import build_model
from fedmtl.strategies.base import ClientInfo, Reply, Strategy, register_strategy
from fedmtl.strategies.loop import FederatedLoop

ENCODER_PREFIX = "encoder."


def client_order(experiment: Experiment) -> list[str]:
    """Client ids in FedHCA² order: single-task clients first, then multi-task, in file order."""
    return [c.client_id for c in sorted(experiment.clients, key=lambda c: len(c.tasks) > 1)]


def decoder_order(experiment: Experiment, order: list[str]) -> list[tuple[str, str]]:
    """``(client_id, task)`` of the K decoders: clients in ``order``, tasks sorted by name."""
    return [(cid, task) for cid in order for task in sorted(experiment.client(cid).tasks)]


def shared_structure(
    experiment: Experiment, client: ClientConfig, shares: tuple[str, ...]
) -> dict[str, Tensor]:
    """The parameters ``client`` shares, built on the meta device (names, shapes, dtypes only)."""
    with torch.device("meta"):
        model = build_model(
            client.model.backbone,
            build_tasks(experiment, client),
            backbone_kwargs=client.model.kwargs,
            decoder_channels=client.model.decoder_channels,
            decoder_hidden=client.model.decoder_hidden,
        )
    return shared_parameters(model, shares)


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
        hyper = self.hyper
        self.order = client_order(experiment)
        self.index = {cid: i for i, cid in enumerate(self.order)}
        self.structure = {
            c.client_id: shared_structure(experiment, c, self.shares) for c in experiment.clients
        }
        encoders = {
            cid: {k: v for k, v in shared.items() if k.startswith(ENCODER_PREFIX)}
            for cid, shared in self.structure.items()
        }
        try:
            check_single_encoder_architecture(
                {cid: architecture_signature(encoders[cid]) for cid in self.order}
            )
        except ValueError as exc:
            raise ValueError(
                f"FedHCA² mixes the encoder updates of all clients, so they must share one "
                f"encoder architecture: {exc}"
            ) from None
        reference = encoders[self.order[0]]
        self.layout = FlatLayout.from_state(reference)
        self.decoders = decoder_order(experiment, self.order)
        self.client_decoders: dict[str, list[int]] = {cid: [] for cid in self.order}
        initial_decoders = []
        for k, (cid, task) in enumerate(self.decoders):
            self.client_decoders[cid].append(k)
            prefix = f"decoders.{task}."
            initial_decoders.append(
                {
                    name.removeprefix(prefix): torch.zeros(t.shape, dtype=t.dtype)
                    for name, t in self.structure[cid].items()
                    if name.startswith(prefix)
                }
            )
        self.group_keys = [
            (experiment.client(cid).dataset, tuple(sorted(experiment.client(cid).tasks)))
            for cid in self.order
        ]
        dtype = next(iter(reference.values())).dtype
        self.state = FedHCA2State.initial(
            torch.zeros(len(self.order), self.layout.numel, dtype=dtype),
            initial_decoders,
            [self.index[cid] for cid, _ in self.decoders],
            init=hyper.alpha_init,
            lr=hyper.hyper_lr,
            momentum=hyper.hyper_momentum,
            weight_decay=hyper.hyper_weight_decay,
        )
        for beta in self.state.hyper.beta:  # HyperWeights starts α and β at one value
            beta.fill_(hyper.beta_init)
        self.known = torch.zeros(len(self.order), dtype=torch.bool)  # θ^last received?
        self._local: Tensor | None = None  # [N, d] uploaded encoders, reused every round

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

    def expected_reply(self, client: ClientInfo) -> dict[str, TensorSpec]:
        """Its encoder and decoder parameters, plus ``start/…`` copies when asked for them."""
        specs = {k: TensorSpec.of(t) for k, t in self.structure[client.client_id].items()}
        if bool(self.known[self.index[client.client_id]]):
            return specs
        return {**specs, **{START_PREFIX + k: spec for k, spec in specs.items()}}

    # -- the round ---------------------------------------------------------------------

    def check_clients(self, clients: Iterable[ClientInfo]) -> None:
        """Check that every client announced the shared tensors its experiment entry implies.

        Raises
        ------
        ValueError
            Naming the client and the first differing tensor (e.g. another encoder).
        """
        for client in clients:
            announced = {
                name: spec
                for specs in client.group_specs(self.shares).values()
                for name, spec in specs.items()
            }
            expected = {k: TensorSpec.of(t) for k, t in self.structure[client.client_id].items()}
            if announced != expected:
                differing = sorted(
                    name
                    for name in set(announced) | set(expected)
                    if announced.get(name) != expected.get(name)
                )
                raise ValueError(
                    f"client {client.client_id!r} announced shared tensors that differ from the "
                    f"model its experiment entry describes (FedHCA² needs one encoder "
                    f"architecture): first differing tensors {differing[:3]}"
                )

    def run_round(self, loop: FederatedLoop, round_: int, clients: list[ClientInfo]) -> None:
        """Check what every known client announced, then train and aggregate."""
        self.check_clients(loop.clients.values())
        super().run_round(loop, round_, clients)

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """Learn new start points, then run one FedHCA² aggregation over the repliers."""
        state = self.state
        if self._local is None:
            self._local = torch.zeros_like(state.encoder_last)
        present = torch.zeros(len(self.order), dtype=torch.bool)
        decoders_local: list[dict[str, Tensor] | None] = [None] * len(self.decoders)
        for client_id, reply in replies.items():
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
            flatten_states([reply.arrays], self.layout, out=self._local[i : i + 1])
            for k in self.client_decoders[client_id]:
                decoders_local[k] = self._decoder(k, reply.arrays)
            present[i] = True
        fedhca2_round(
            state,
            self._local,
            decoders_local,
            self.group_keys,
            present=present,
            c=self.hyper.ca_c,
            rescale=self.hyper.rescale,
        )
        return self.metrics(present)

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
        return {**self.state.state_dict(), "known": self.known}, meta

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
        self.state.load_state_dict({k: v for k, v in tensors.items() if k != "known"})
        self.known = tensors["known"].to(torch.bool).clone()
