"""FedMuscle server: representation exchange on a public dataset, contrastive payloads from M peers.

A round: the ordinary ``train`` phase (E local epochs on each client's
tasks; no weights are shared), then ``contrastive_epochs`` passes over the ``[public]`` dataset.
For public batch ``b`` the server draws M = ``num_peers`` peers for every client with
:func:`draw_peers` (seeded by experiment seed, round and the batch's number within the round,
re-drawn for every batch), builds each client's payload with :func:`client_payload`, and the
client takes one step on its encoder and projector (``fedmtl.clients.fedmuscle``; wire format:
:mod:`fedmtl.protocols.fedmuscle`). Clients are then evaluated as usual.

Schedules (``schedule``):

- ``epoch``: per contrastive epoch, one ``query.represent`` (each client sends ``Z_b`` of every
  public batch) and one ``train.align`` carrying every batch's payload, built from those
  epoch-start matrices; the client steps through the batches. Peers are up to one epoch stale.
  With ``peers``/``targets`` the anchor term uses the client's current ``Z_b``; with ``gradient``
  the server differentiates at the epoch-start ``Z_b``, so it equals the other two only when the
  epoch has one batch. 2·T exchanges per round.
- ``batch`` (the paper): one synchronous exchange per public batch. A ``query.represent`` asks
  for ``Z`` of the first batch; then the ``train.align`` of batch ``k`` carries its payload and
  asks for ``Z`` of batch ``k + 1`` (across epoch boundaries), which the client computes after its
  step. Every payload is built from matrices of the current weights, and the three protocols
  give the same updates. T·|D|/B + 1 exchanges per round.

Channels (``channel``, ``batch`` schedule only): ``flower`` sends the exchanges above as Flower
messages; ``stream`` runs the phase over fedmtl's gRPC stream (:class:`StreamChannel`). One
``train.align`` per client carries a ticket (address, per-run token, CA); the client then
sends ``Z`` of every step over its stream and gets the payload :meth:`FedMuscle._payloads`
builds, the same function and peer draw (the step is the batch's number in the round), so the
updates equal the Flower path's. If the port cannot be opened, or no client reaches it, the
run falls back to Flower messages with a warning naming the port.

Protocols (``protocol``) and what they reveal, per client per public batch. Uplink in all of
them: ``Z^n`` (``B·d`` floats) to the server, which therefore sees every client's
representations of the public data (never weights or private data). Downlink bytes are
``payload_bytes(protocol, B, d, M)``; fp32, B = 32, d = 128:

==========  ==================================  ==============  ==============  =============
protocol    the client receives                 M = 1           M = 2           M = 3
==========  ==================================  ==============  ==============  =============
peers       the M peers' ``Z^m`` (anonymous)     16,384 B        32,768 B        49,152 B
targets     ``Z^m/τ`` and ``−γ Z^m Z^m'ᵀ``       16,384 B        36,864 B        61,440 B
gradient    ``∂L^n/∂Z^n`` and ``L^n``            16,388 B        16,388 B        16,388 B
==========  ==================================  ==============  ==============  =============

``peers`` and ``targets`` disclose the peers' public-data representations (``targets`` is the
exact factorised form of the paper's ``S^n``/``α^n``, which disclose the same; the paper's
materialised form would cost ``B^M·(d+1)`` floats). ``gradient`` discloses only a mixture of
peer rows; the server then evaluates the loss itself (the exact factorised Muscle loss: per
client and public batch, time O(M²·B²·d + B^{M+1}) and memory O(M²·B² + B^M); no ``B^M × d``
tensor is ever built, in any protocol). ``loss = "infonce"`` is the Muscle loss with
``tau_prev = tau`` (pairwise InfoNCE) in every protocol; ``loss = "gram"`` (GRAM's τ = 0.07)
needs the raw peer vectors and hence ``protocol = "peers"`` (checked at construction).

Memory: with the ``batch`` schedule the server holds one public batch of representations at a
time (``N·B·d`` floats, plus that batch's payloads), whatever the size of the public set; the
``epoch`` schedule's single ``train.align`` per client carries every batch's payload, so it
holds one epoch's (``N·|D|·d``).

Validation and drop-outs: a representation reply must carry exactly the requested ``z/<b>``
as finite float32 ``[B_b, d]``. A reply that fails (NaN, wrong shape) is logged and the client
is left out of that batch (``batch`` schedule) or that contrastive epoch (``epoch``): it gets
no payload and is nobody's peer there, but is asked again for the next one. A client that does
not answer at all (error, timeout) is left out for the rest of the round's contrastive phase,
so a dead node costs one timeout, not one per batch. Peers are drawn among the clients with a
valid representation of the batch: a peer that dropped out is **replaced** by another
available client when enough remain, and the batch **proceeds with fewer peers** (the Muscle
loss holds for any M ≥ 1) when fewer than M others are available; a client alone skips the
batch. Clients whose ``train`` reply failed sit out the round's contrastive phase.

State: peers are a pure function of seed, round and batch, so the server keeps nothing beyond
the round number; clients keep model and optimiser state in their versioned personal state.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import RecordDict
from torch import Tensor

from fedmtl.aggregation.muscle_targets import client_payload, draw_peers, payload_bytes
from fedmtl.config import Experiment
from fedmtl.messages import ReplyError, TensorSpec, make_content, validate_tensors
from fedmtl.protocols.fedmuscle import (
    ALIGN,
    EPOCH,
    REPRESENT,
    contrastive_schedule,
    payload_key,
    represent_request,
    representation_key,
)
from fedmtl.strategies.base import ClientInfo, Federation, Reply, Strategy, register_strategy
from fedmtl.stream.channel import StreamChannel
from fedmtl.stream.server import PhaseReport
from fedmtl.stream.wire import payload_frame_bytes, representation_bytes

log = logging.getLogger("fedmtl.server")


@dataclass
class ContrastiveRound:
    """Book-keeping of one round's contrastive phase."""

    loop: Federation  # the round loop, as a strategy sees it
    round: int
    members: list[str]  # clients whose train reply was good, in experiment order
    active: set[str]  # members that still answer
    loss_sum: float = 0.0
    steps: int = 0
    exchanges: int = 0
    payloads: int = 0
    left_out: list[str] = field(default_factory=list)
    stream: PhaseReport | None = None  # channel = "stream": what the phase did
    exchange_seconds: list[float] = field(default_factory=list)  # per Flower exchange
    exchange_overhead: list[float] = field(default_factory=list)  # minus client handler time


@register_strategy("fedmuscle")
class FedMuscle(Strategy):
    """The FedMuscle round: local training, then the contrastive phase (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        hyper = self.hyper
        if experiment.public is None:
            raise ValueError("public: fedmuscle needs a [public] dataset section")
        if hyper.loss == "gram" and hyper.protocol != "peers":
            raise ValueError(
                f"algorithm.protocol: loss 'gram' needs the peers' vectors, so protocol 'peers' "
                f"(got {hyper.protocol!r})"
            )
        size, batch = experiment.public.size, experiment.public.batch_size
        # PublicDataset cuts each epoch's permutation into consecutive chunks of batch_size.
        self.batch_sizes = [min(batch, size - start) for start in range(0, size, batch)]
        self.tau_prev = hyper.tau if hyper.loss == "infonce" else hyper.tau_prev
        # channel = "stream": the port is opened at the first phase and kept for the run.
        full = self.batch_sizes[0]
        down = payload_bytes(hyper.protocol, full, hyper.projector_dim, hyper.num_peers)
        self.stream = StreamChannel(
            [c.client_id for c in experiment.clients],
            default_port=hyper.stream_port,
            max_up=representation_bytes(full, hyper.projector_dim),
            max_down=payload_frame_bytes(down),
            connect_deadline=hyper.connect_deadline,
            batch_deadline=hyper.batch_deadline,
        )

    # -- numbering ---------------------------------------------------------------------

    def representation_spec(self, batch: int) -> TensorSpec:
        """Shape and dtype of ``Z_b``."""
        return TensorSpec((self.batch_sizes[batch], self.hyper.projector_dim), "float32")

    # -- the round ---------------------------------------------------------------------

    def run_round(self, federation: Federation, round_: int, clients: list[ClientInfo]) -> None:
        """Local training, then ``contrastive_epochs`` passes over the public dataset."""
        replies = federation.train_phase(round_, clients)
        members = [c.client_id for c in clients if c.client_id in replies]
        state = ContrastiveRound(federation, round_, members, set(members))
        if len(members) < 2:
            log.warning(
                "[ROUND %d] contrastive phase skipped: %d client(s) trained", round_, len(members)
            )
        elif self.hyper.schedule == "epoch":
            self._epoch_schedule(state)
        elif self.hyper.channel == "stream" and not self.stream.failed:
            self._stream_schedule(state)
        else:
            self._batch_schedule(state)
        federation.record_server(round_, self._metrics(state))

    def _epoch_schedule(self, state: ContrastiveRound) -> None:
        per_epoch = len(self.batch_sizes)
        all_batches = list(range(per_epoch))
        items = contrastive_schedule(self.experiment, state.round, per_epoch)
        for first in range(0, len(items), per_epoch):
            if len(state.active) < 2:
                break
            public_epoch = items[first][0]
            reps = self._represent(state, public_epoch, all_batches)
            payloads: dict[str, dict[str, Tensor]] = {}
            for batch in all_batches:
                batch_reps = {c: z[batch] for c, z in reps.items()}
                built = self._payloads(state, first + batch, batch_reps)  # step = batch number
                for anchor, tensors in built.items():
                    named = {payload_key(batch, k): v for k, v in tensors.items()}
                    payloads.setdefault(anchor, {}).update(named)
            if payloads:
                self._align(state, public_epoch, payloads, request=None)

    def _batch_schedule(self, state: ContrastiveRound) -> None:
        items = contrastive_schedule(self.experiment, state.round, len(self.batch_sizes))
        first_epoch, first_batch = items[0]
        reps = {
            c: z[first_batch] for c, z in self._represent(state, first_epoch, [first_batch]).items()
        }
        for step, (epoch, batch) in enumerate(items):
            if len(state.active) < 2:
                break
            built = self._payloads(state, step, reps)
            payloads = {
                anchor: {payload_key(batch, k): v for k, v in tensors.items()}
                for anchor, tensors in built.items()
            }
            # One public batch of representations at a time: this batch's go before the
            # next batch's arrive (the payloads keep only what the protocol sends).
            reps, built = {}, {}
            request = items[step + 1] if step + 1 < len(items) else None
            replies = self._align(state, epoch, payloads, request)
            if request is not None:
                reps = {c: z[request[1]] for c, z in replies.items()}

    # -- the stream channel ------------------------------------------------------------

    def _stream_schedule(self, state: ContrastiveRound) -> None:
        """The batch schedule over the stream: one Flower message opens it, then gRPC frames."""
        federation = state.loop
        members = [c for c in state.members if c in state.active]
        tickets = self.stream.tickets(federation.run_config, members)
        if tickets is None:
            self._batch_schedule(state)
            return
        items = contrastive_schedule(self.experiment, state.round, len(self.batch_sizes))
        specs = [self.representation_spec(batch) for _, batch in items]
        contents = {
            c: make_content({**federation.base_config(state.round, c), **tickets[c]})
            for c in members
        }
        with self.stream.phase(
            state.round, members, specs, lambda step, reps: self._payloads(state, step, reps)
        ) as phase:
            replies = self._exchange(state, "align", ALIGN, contents, {c: {} for c in members})
        done = phase.report
        self._add_losses(state, replies)
        for client, reply in replies.items():
            federation.record_client(
                state.round,
                client,
                {k: v for k, v in reply.metrics.items() if k.startswith("stream/")},
            )
        state.stream = done
        unreachable = sorted(set(members) - done.connected)
        if not done.connected:
            log.warning(
                "[ROUND %d] no client reached the FedMuscle stream at %s (is it open to them?): "
                "falling back to Flower messages for the rest of the run",
                state.round,
                self.stream.where(),
            )
            self.stream.give_up()
            self._batch_schedule(state)
        elif unreachable:
            log.warning(
                "[ROUND %d] %s did not reach the FedMuscle stream at %s and missed this round's "
                "contrastive phase",
                state.round,
                unreachable,
                self.stream.where(),
            )

    def close(self) -> None:
        """Close the stream's port."""
        self.stream.close()

    # -- phases ------------------------------------------------------------------------

    def _exchange(
        self,
        state: ContrastiveRound,
        phase: str,
        message_type: str,
        contents: Mapping[str, RecordDict],
        expected: Mapping[str, Mapping[str, TensorSpec]],
        *,
        timed: bool = True,
    ) -> dict[str, Reply]:
        """``federation.exchange`` with representation checks; drops clients that did not answer.

        ``timed`` exchanges (one public batch or epoch each) go into the round's latency
        metrics; the stream's opening message, which spans the whole phase, does not.
        """
        rejected: set[str] = set()

        def validate(client: ClientInfo, reply: Reply) -> None:
            try:
                validate_tensors(
                    reply.arrays, expected[client.client_id], client_id=client.client_id
                )
            except ReplyError:
                rejected.add(client.client_id)  # it answered: ask it again next time
                raise

        start = time.perf_counter()
        replies = state.loop.exchange(state.round, phase, message_type, contents, validate)
        wall = time.perf_counter() - start
        state.exchanges += 1
        if timed and replies:
            # Flower's share: the exchange's wall time minus the slowest client's handler.
            handler = max(float(r.metrics.get(f"{phase}/seconds", 0.0)) for r in replies.values())
            state.exchange_seconds.append(wall)
            state.exchange_overhead.append(max(wall - handler, 0.0))
        lost = sorted(set(contents) - set(replies) - rejected)
        if lost:
            log.warning(
                "[ROUND %d] %s: %s left out for the rest of the contrastive phase",
                state.round,
                phase,
                lost,
            )
            state.active.difference_update(lost)
            state.left_out.extend(lost)
        return replies

    def _represent(
        self, state: ContrastiveRound, public_epoch: int, batches: Sequence[int]
    ) -> dict[str, dict[int, Tensor]]:
        """``query.represent`` to every active client: ``{client: {b: Z_b}}`` of good replies."""
        clients = [c for c in state.members if c in state.active]
        config = represent_request(public_epoch, list(batches))
        base = state.loop.base_config
        contents = {c: make_content({**base(state.round, c), **config}) for c in clients}
        expected = {
            c: {representation_key(b): self.representation_spec(b) for b in batches}
            for c in clients
        }
        replies = self._exchange(state, "represent", REPRESENT, contents, expected)
        return {
            c: {b: reply.arrays[representation_key(b)] for b in batches}
            for c, reply in replies.items()
        }

    def _payloads(
        self, state: ContrastiveRound, batch_number: int, reps: Mapping[str, Tensor]
    ) -> dict[str, dict[str, Tensor]]:
        """Each anchor's payload for one public batch, from the valid representations."""
        hyper = self.hyper
        draws = draw_peers(
            state.members,
            hyper.num_peers,
            seed=self.experiment.seed,
            round=state.round,
            batch=batch_number,
            available=reps.keys(),
        )
        out: dict[str, dict[str, Tensor]] = {}
        for anchor in sorted(reps):
            peers = draws[anchor]
            if not peers:
                log.info(
                    "[ROUND %d] batch %d: %s has no peer, skips it",
                    state.round,
                    batch_number,
                    anchor,
                )
                continue
            out[anchor] = client_payload(
                hyper.protocol, anchor, reps, peers, hyper.tau, self.tau_prev
            )
        state.payloads += len(out)
        return out

    def _align(
        self,
        state: ContrastiveRound,
        public_epoch: int,
        payloads: Mapping[str, Mapping[str, Tensor]],
        request: tuple[int, int] | None,
    ) -> dict[str, dict[int, Tensor]]:
        """``train.align`` with each client's payloads (and a represent request, if any).

        Every active client is addressed when there is a request (it must send its next
        ``Z``), else only those with a payload. Returns the requested ``Z`` of good replies.
        """
        clients = [
            c for c in state.members if c in state.active and (request is not None or c in payloads)
        ]
        contents = {}
        expected: dict[str, dict[str, TensorSpec]] = {}
        for client in clients:
            config: dict[str, Any] = {
                **state.loop.base_config(state.round, client),
                EPOCH: public_epoch,
            }
            expected[client] = {}
            if request is not None:
                config.update(represent_request(request[0], [request[1]]))
                expected[client] = {
                    representation_key(request[1]): self.representation_spec(request[1])
                }
            contents[client] = make_content(config, dict(payloads.get(client, {})))
        replies = self._exchange(state, "align", ALIGN, contents, expected)
        self._add_losses(state, replies)
        if request is None:
            return {}
        key = representation_key(request[1])
        return {c: {request[1]: reply.arrays[key]} for c, reply in replies.items()}

    @staticmethod
    def _add_losses(state: ContrastiveRound, replies: Mapping[str, Reply]) -> None:
        """Fold the clients' contrastive steps and mean losses into the round's mean loss."""
        for reply in replies.values():
            steps = int(reply.metrics.get("align/steps", 0))
            if steps:
                state.loss_sum += float(reply.metrics["align/loss"]) * steps
                state.steps += steps

    def _metrics(self, state: ContrastiveRound) -> dict[str, float]:
        """Server metrics of the round (timings are in each row's ``seconds/<phase>``)."""
        hyper = self.hyper
        full_batch = self.batch_sizes[0]
        metrics = {
            "fedmuscle/clients": float(len(state.members)),
            "fedmuscle/exchanges": float(state.exchanges),
            "fedmuscle/payloads": float(state.payloads),
            "fedmuscle/steps": float(state.steps),
            "fedmuscle/downlink_bytes_per_batch": float(
                payload_bytes(hyper.protocol, full_batch, hyper.projector_dim, hyper.num_peers)
            ),
            "fedmuscle/left_out": float(len(state.left_out)),
        }
        if state.steps:
            metrics["fedmuscle/align_loss"] = state.loss_sum / state.steps
        peers = min(hyper.num_peers, len(state.members) - 1)
        if hyper.loss in ("muscle", "infonce") and peers > 0:
            # The loss when every representation is alike (nothing aligned): each of the M
            # peers contributes log B. Falling below it is the sign the contrastive step acts.
            metrics["fedmuscle/chance_loss"] = peers * math.log(full_batch)
        if state.exchange_seconds:
            metrics["fedmuscle/exchange_seconds_median"] = statistics.median(state.exchange_seconds)
            metrics["fedmuscle/exchange_overhead_seconds_median"] = statistics.median(
                state.exchange_overhead
            )
        if state.stream is not None:
            metrics.update(state.stream.metrics())
        return metrics
