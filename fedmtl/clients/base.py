"""Client-side algorithm base and registry: what a client does with a train/evaluate message."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from fedmtl.catalog import ALGORITHM_NAMES
from fedmtl.clients.session import ClientSession
from fedmtl.clients.training import BatchLoss, TrainStats, train_epochs
from fedmtl.config import Experiment
from fedmtl.data import SampleSet
from fedmtl.messages import UPLOAD_GROUPS
from fedmtl.models.multitask import group_of, load_tensors, shared_parameters
from fedmtl.registry import Registry

CLIENT_ALGORITHMS: Registry[type[ClientAlgorithm]] = Registry(
    "client algorithm", allowed=ALGORITHM_NAMES
)


def register_client_algorithm(
    name: str,
) -> Callable[[type[ClientAlgorithm]], type[ClientAlgorithm]]:
    """Register the client side of algorithm ``name`` (``algorithm.name`` in the experiment)."""
    return CLIENT_ALGORITHMS.register(name)


def client_algorithm(experiment: Experiment, session: ClientSession) -> ClientAlgorithm:
    """The client side of the experiment's algorithm."""
    return CLIENT_ALGORITHMS[experiment.algorithm.name](session)


@dataclass
class TrainOutcome:
    """What a client sends back after training."""

    arrays: dict[str, Tensor]
    metrics: dict[str, float | int]
    extra_arrays: dict[str, dict[str, Tensor]] = field(default_factory=dict)


class ClientAlgorithm:
    """Client side of a weight-sharing algorithm (FedAvg behaviour by default).

    The flow of :meth:`train`: load the personal state of the previous round, overwrite it with
    the tensors the server sent (:meth:`receive`), run :meth:`before_training`, train on
    :meth:`train_split` with :meth:`extra_loss`, add :meth:`after_training`'s metrics, save the
    new personal state and return the parameters of the shared groups
    (``experiment.algorithm.shares``) the server asked for, plus :meth:`extra_uploads`.
    An algorithm overrides the hooks, not the flow.
    """

    uses_received_for_eval: ClassVar[bool] = True
    # Message types this algorithm answers besides train/evaluate → the method that handles
    # them, with the signature of :meth:`train`; the ClientApp routes them here.
    extra_messages: ClassVar[dict[str, str]] = {}

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.validation: SampleSet | None = None  # this message's held-out part, if any
        self.hyper: Any = session.experiment.algorithm
        self.shares: tuple[str, ...] = type(self.hyper).shares

    # -- hooks -------------------------------------------------------------------------

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load what the server sent into the model the round starts from."""
        if received:
            load_tensors(model, received)

    def train_split(self) -> tuple[SampleSet, SampleSet | None]:
        """The samples to train on, and a held-out validation part (none by default)."""
        return self.session.split("train"), None

    def before_training(
        self,
        model: nn.Module,
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Work on the model before the local epochs (SimCLR's pretraining); returns metrics."""
        return {}

    def extra_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> Callable[[nn.Module], Tensor] | None:
        """A regulariser added to the task loss (none for FedAvg)."""
        return None

    def batch_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> BatchLoss | None:
        """A term of each training batch, ``(model, targets) → loss`` (FedRCL's); none here."""
        return None

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Extra work after the shared model is trained (Ditto's personal model)."""
        return {}

    def extra_uploads(
        self, model: nn.Module, round_: int, config: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Tensors sent up besides the shared groups (FedHeNN's kernel), after saving the state."""
        return {}

    def evaluation_model(
        self, model: nn.Module, extras: Mapping[str, Mapping[str, Tensor]]
    ) -> nn.Module:
        """The model whose test metrics the client reports."""
        return model

    # -- message handlers --------------------------------------------------------------

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle a ``train`` message."""
        session = self.session
        start = time.perf_counter()
        model, extras, _ = session.load(round_ - 1)
        self.receive(model, received)
        train_data, self.validation = self.train_split()
        before = self.before_training(model, extras, round_, config)
        stats: TrainStats = train_epochs(
            model,
            session.batches(train_data, round_),
            session.tasks,
            session.client.training,
            session.device,
            extra_loss=self.extra_loss(received, config),
            batch_loss=self.batch_loss(received, config),
        )
        metrics: dict[str, float | int] = {
            "num-examples": len(train_data),
            "train/loss": stats.loss,
            "train/batches": stats.batches,
        }
        metrics.update({f"train/loss/{k}": v for k, v in stats.task_losses.items()})
        metrics.update(before)
        metrics.update(self.after_training(model, received, extras, round_, config))
        session.save(round_, model, extras)
        metrics["train/seconds"] = time.perf_counter() - start
        arrays = shared_parameters(model, self.shares)
        if UPLOAD_GROUPS in config:  # the server needs only groups someone else holds too
            wanted = set(config[UPLOAD_GROUPS])
            arrays = {k: v for k, v in arrays.items() if group_of(k) in wanted}
        arrays.update(self.extra_uploads(model, round_, config))
        return TrainOutcome(arrays=arrays, metrics=metrics)

    def evaluate(
        self, round_: int, received: Mapping[str, Tensor]
    ) -> tuple[dict[str, dict[str, float]], float, int]:
        """Handle an ``evaluate`` message: personal model of ``round_`` on the test split."""
        from fedmtl.clients.training import evaluate_model

        session = self.session
        model, extras, _ = session.load(round_)
        if received and self.uses_received_for_eval:
            load_tensors(model, received)
        target = self.evaluation_model(model, extras)
        return evaluate_model(target, session.eval_batches("test"), session.tasks, session.device)


class StartReporting(ClientAlgorithm):
    """A client that adds the parameters it started the round from when the server asks.

    Servers that compute updates themselves (FedHCA², MaT-FL) know a client's start point once
    they have sent it one; until then they set :attr:`report_start` in the config and the
    client adds the groups :meth:`start_groups` names, under :attr:`start_prefix`, to its reply.
    """

    report_start: ClassVar[str]  # the config key the server sets
    start_prefix: ClassVar[str] = "start/"

    def start_groups(self) -> tuple[str, ...]:
        """The groups whose start point the server needs (default: every shared group)."""
        return self.shares

    def train(
        self, round_: int, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> TrainOutcome:
        """Handle ``train``; add the ``start/…`` tensors if ``config`` asks for them."""
        self.start: dict[str, Tensor] | None = {} if config.get(self.report_start, False) else None
        outcome = super().train(round_, received, config)
        outcome.arrays.update(self.start or {})
        return outcome

    def receive(self, model: nn.Module, received: Mapping[str, Tensor]) -> None:
        """Load what the server sent; keep a copy of the start point when it is asked for."""
        super().receive(model, received)
        if self.start is not None:
            shared = shared_parameters(model, self.start_groups())
            self.start = {self.start_prefix + k: t.detach().clone() for k, t in shared.items()}
