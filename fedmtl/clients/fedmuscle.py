"""FedMuscle client: represent the public dataset and step the encoder on server-made payloads.

Wire format: :mod:`fedmtl.protocols.fedmuscle` (the server side is
``fedmtl.strategies.fedmuscle``). The client answers ``query.represent`` and ``train.align``
(:attr:`FedMuscleClient.extra_messages`); its steps train the encoder and projector only
(decoders and heads are frozen).

Determinism: every contrastive forward of batch ``b`` of epoch ``e`` in round ``r`` runs under
a torch RNG seeded by ``(seed, client, r, e, b)``, and a representation computed only for the
server (no step) leaves BatchNorm buffers untouched. The ``Z_b`` a client sends is therefore
bit-identical to the one it recomputes when the payload arrives (same weights), which is what
makes the ``gradient`` protocol (back-propagate the server's ``∂L/∂Z``) exact on a CPU.

Optimiser: the client's ``training`` optimiser with ``lr = contrastive_lr`` (or its own ``lr``),
over encoder and projector parameters. Its state lives in the personal state as the extra
:data:`OPTIMIZER_EXTRA`, so it persists across the per-batch messages and the contrastive epochs
of a round; local training drops it, so every round's contrastive phase starts afresh (as the
local phase restarts its optimiser every round).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmtl.aggregation.muscle_targets import client_loss_from_payload
from fedmtl.clients.base import ClientAlgorithm, TrainOutcome, register_client_algorithm
from fedmtl.clients.public import public_batch, public_view, seeded
from fedmtl.clients.training import autocast, make_optimizer, to_device
from fedmtl.losses.muscle import gram_volume_loss
from fedmtl.messages import NUM_EXAMPLES
from fedmtl.models import MultiTaskModel
from fedmtl.protocols.fedmuscle import (
    ALIGN,
    EPOCH,
    REPRESENT,
    contrastive_schedule,
    read_represent_request,
    representation_key,
    split_payloads,
)
from fedmtl.seeding import derive_seed
from fedmtl.stream.client import (
    StreamClient,
    StreamLost,
    StreamRefused,
    StreamTicket,
    StreamUnreachable,
)

log = logging.getLogger("fedmtl.client")

OPTIMIZER_EXTRA = "align_optimizer"
ALIGNED_GROUPS = ("encoder.", "projector.")
# GRAM's own temperature (Cicchetti et al., ispamm/GRAM); `tau` is the Muscle/InfoNCE τ^(N).
GRAM_TAU = 0.07


def contrastive_objective(
    loss: str,
    protocol: str,
    z: Tensor,
    payload: Mapping[str, Tensor],
    tau: float,
    tau_prev: float,
) -> tuple[Tensor, float]:
    """The objective to back-propagate for one public batch, and the loss value to report.

    Parameters
    ----------
    loss : {"muscle", "infonce", "gram"}
        ``infonce`` is the Muscle loss with ``tau_prev = tau`` (γ = 0), i.e. the sum of pairwise
        InfoNCE terms, in every protocol; ``gram`` needs the ``peers`` protocol.
    protocol : {"peers", "targets", "gradient"}
        How the server's payload was built.
    z : Tensor
        ``[B, d]`` normalised representations, attached to the model.
    payload : mapping
        The server's tensors for this batch.
    tau, tau_prev : float
        τ^(N) and τ^(N−1).

    Returns
    -------
    objective, value
        For ``gradient`` the objective is the surrogate ``Σ z ∘ grad`` and the value the
        server's loss; otherwise both are the loss.
    """
    if loss == "gram":
        if protocol != "peers":
            raise ValueError(f"loss 'gram' needs protocol 'peers', got {protocol!r}")
        peers = payload.get("peers")
        if peers is None or peers.dim() != 3:
            raise ValueError("gram payload needs 'peers' [M, B, d]")
        value = gram_volume_loss(z, list(peers.to(z.dtype).unbind(0)), tau=GRAM_TAU)
        return value, float(value.detach())
    if loss == "infonce":
        tau_prev = tau
    objective = client_loss_from_payload(protocol, z, payload, tau, tau_prev)
    if protocol == "gradient":
        return objective, float(payload["loss"])
    return objective, float(objective.detach())


def aligned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the contrastive step trains: encoder and projector (``w^n``)."""
    return [
        p
        for name, p in model.named_parameters()
        if name.startswith(ALIGNED_GROUPS) and p.requires_grad
    ]


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimiser's per-parameter state as flat tensors ``"<param index>.<name>"``.

    Hyper-parameters (``param_groups``) are rebuilt from the config, so only state is kept.
    """
    out: dict[str, Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                out[f"{index}.{name}"] = value.detach().clone()
            elif isinstance(value, int | float):
                out[f"{index}.{name}"] = torch.tensor(float(value))
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    """Inverse of :func:`optimizer_state_tensors` on an optimiser over the same parameters."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )


def _normalised_representation(model: MultiTaskModel, inputs: Any, device: torch.device) -> Tensor:
    with autocast(device):
        projected = model.project(model.features(inputs))
    return F.normalize(projected.float(), dim=-1)


@register_client_algorithm("fedmuscle")
class FedMuscleClient(ClientAlgorithm):
    """FedMuscle's client side: local training that shares nothing, then the contrastive phase.

    The contrastive phase runs through :meth:`represent` and :meth:`align` (module docstring).
    """

    extra_messages: ClassVar[dict[str, str]] = {REPRESENT: "represent", ALIGN: "align"}

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Drop the previous round's contrastive optimiser state."""
        extras.pop(OPTIMIZER_EXTRA, None)
        return {}

    # -- helpers -----------------------------------------------------------------------

    def _seed(self, round_: int, epoch: int, batch: int) -> int:
        session = self.session
        return derive_seed(
            session.experiment.seed, session.client_id, "contrastive", round_, epoch, batch
        )

    def _represent_batches(
        self, model: MultiTaskModel, round_: int, epoch: int, batches: Sequence[int]
    ) -> dict[str, Tensor]:
        """``Z_b`` of each batch with the model as it is, leaving its buffers untouched."""
        session, view = self.session, public_view(self.session)
        saved = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.train()  # the same mode as the step that will recompute Z_b
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for batch in batches:
                inputs = to_device(public_batch(view, epoch, batch), session.device)
                with seeded(self._seed(round_, epoch, batch), session.device):
                    z = _normalised_representation(model, inputs, session.device)
                out[representation_key(batch)] = z.cpu()
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
        return out

    # -- message handlers --------------------------------------------------------------

    def represent(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle ``query.represent``: ``Z_b`` of the requested public batches.

        Raises
        ------
        ValueError
            If the message has no represent request.
        """
        start = time.perf_counter()
        request = read_represent_request(config)
        if request is None:
            raise ValueError("represent message lacks its request (fedmuscle.represent-epoch)")
        model, _, _ = self.session.load(round_)
        arrays = self._represent_batches(model, round_, *request)
        metrics: dict[str, float | int] = {
            NUM_EXAMPLES: sum(int(z.shape[0]) for z in arrays.values()),
            "represent/seconds": time.perf_counter() - start,
        }
        return TrainOutcome(arrays=arrays, metrics=metrics)

    def _optimizer(
        self, model: MultiTaskModel, extras: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        """The contrastive optimiser over encoder and projector, with its saved state."""
        training = self.session.client.training
        lr = self.hyper.contrastive_lr or training.lr
        params = aligned_parameters(model)
        optimizer = make_optimizer(params, training.model_copy(update={"lr": lr}))
        if OPTIMIZER_EXTRA in extras:
            load_optimizer_state(optimizer, extras[OPTIMIZER_EXTRA])
        return optimizer, params

    def _step(
        self,
        model: MultiTaskModel,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        round_: int,
        epoch: int,
        batch: int,
        payload: Mapping[str, Tensor],
    ) -> tuple[float, int]:
        """One optimiser step on public batch ``batch`` of ``epoch``; returns (loss, examples).

        Raises
        ------
        FloatingPointError
            If the contrastive loss is not finite (the reply must not carry poisoned state).
        """
        session, hyper = self.session, self.hyper
        inputs = to_device(public_batch(public_view(session), epoch, batch), session.device)
        with seeded(self._seed(round_, epoch, batch), session.device):
            z = _normalised_representation(model, inputs, session.device)
        on_device = {k: v.to(session.device) for k, v in payload.items()}
        objective, value = contrastive_objective(
            hyper.loss, hyper.protocol, z, on_device, hyper.tau, hyper.tau_prev
        )
        if not torch.isfinite(objective.detach()).all():
            raise FloatingPointError(f"contrastive loss became {value} at batch {batch}")
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_clip = session.client.training.grad_clip
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return value, int(z.shape[0])

    def align(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle ``train.align``: one step per payload batch, then any represent request.

        A message that carries a stream ticket runs the whole phase over the stream instead
        (:meth:`align_stream`).

        Raises
        ------
        FloatingPointError
            If a contrastive loss is not finite (the reply must not carry poisoned state).
        """
        ticket = StreamTicket.from_config(config)
        if ticket is not None:
            return self.align_stream(round_, ticket)
        start = time.perf_counter()
        session = self.session
        payloads = split_payloads(received)
        request = read_represent_request(config)
        model, extras, _ = session.load(round_)
        metrics: dict[str, float | int] = {NUM_EXAMPLES: 0, "align/steps": 0}
        if payloads:
            epoch = int(config[EPOCH])
            optimizer, params = self._optimizer(model, extras)
            model.train()
            losses = []
            for batch, payload in payloads.items():
                value, examples = self._step(
                    model, optimizer, params, round_, epoch, batch, payload
                )
                losses.append(value)
                metrics[NUM_EXAMPLES] = int(metrics[NUM_EXAMPLES]) + examples
            extras[OPTIMIZER_EXTRA] = optimizer_state_tensors(optimizer)
            session.save(round_, model, extras)
            metrics["align/steps"] = len(losses)
            metrics["align/loss"] = sum(losses) / len(losses)
        arrays = self._represent_batches(model, round_, *request) if request else {}
        metrics["align/seconds"] = time.perf_counter() - start
        return TrainOutcome(arrays=arrays, metrics=metrics)

    def align_stream(self, round_: int, ticket: StreamTicket) -> TrainOutcome:
        """The round's whole contrastive phase over the stream (``batch`` schedule).

        For every step (public batch ``b`` of contrastive epoch ``e``) the client computes
        ``Z_b`` with its current weights, sends it, and takes the same optimiser step as the
        Flower path on the server's payload (none on a skip). A broken stream is reopened once
        per step with the same token; the client rejoins at the server's current step. The
        reply's metrics say how it went (``stream/*``); state is saved once, at the end.

        Raises
        ------
        StreamRefused
            If the server refuses the token (the Flower reply becomes an error).
        """
        start = time.perf_counter()
        session = self.session
        schedule = contrastive_schedule(
            session.experiment, round_, len(public_view(session).batch_indices(0))
        )
        model, extras, _ = session.load(round_)
        optimizer, params = self._optimizer(model, extras)
        ca_file = session.stream_ca
        root = Path(ca_file).read_bytes() if ca_file else None
        client = StreamClient(ticket, session.client_id, round_, root_certificates=root)
        metrics: dict[str, float | int] = {
            NUM_EXAMPLES: 0, "align/steps": 0, "stream/skipped": 0, "stream/reconnects": 0,
        }  # fmt: skip
        losses: list[float] = []
        try:
            next_step = client.connect(ticket.connect_deadline)
        except StreamUnreachable as exc:
            log.warning("%s: %s", session.client_id, exc)
            metrics["stream/unreachable"] = 1
            metrics["align/seconds"] = time.perf_counter() - start
            return TrainOutcome(arrays={}, metrics=metrics)
        with client:
            step = next_step
            while step < len(schedule):
                epoch, batch = schedule[step]
                z = self._represent_batches(model, round_, epoch, [batch])
                try:
                    payload, next_step = client.exchange(step, z[representation_key(batch)])
                except StreamLost as exc:
                    log.warning("%s: step %d: %s; reconnecting", session.client_id, step, exc)
                    metrics["stream/reconnects"] = int(metrics["stream/reconnects"]) + 1
                    try:
                        step = client.connect(ticket.batch_deadline)  # where the server is
                    except (StreamLost, StreamUnreachable, StreamRefused) as again:
                        # Refused now means the phase is over: keep the steps already taken.
                        log.warning("%s: gave up the stream: %s", session.client_id, again)
                        break
                    continue
                if payload is None:
                    metrics["stream/skipped"] = int(metrics["stream/skipped"]) + 1
                else:
                    model.train()
                    value, examples = self._step(
                        model, optimizer, params, round_, epoch, batch, payload
                    )
                    losses.append(value)
                    metrics[NUM_EXAMPLES] = int(metrics[NUM_EXAMPLES]) + examples
                step = next_step
        if losses:
            extras[OPTIMIZER_EXTRA] = optimizer_state_tensors(optimizer)
            session.save(round_, model, extras)
            metrics["align/steps"] = len(losses)
            metrics["align/loss"] = sum(losses) / len(losses)
        metrics["align/seconds"] = time.perf_counter() - start
        return TrainOutcome(arrays={}, metrics=metrics)
