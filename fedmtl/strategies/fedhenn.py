"""FedHeNN server: the global kernel of the clients' public-set representations.

Makhija et al., "Architecture Agnostic Federated Learning for Neural Networks" (ICML 2022).
Every client sends the linear kernel ``K_i = Z_i Z_iᵀ`` of its representations of the round's
public batch (wire format: :mod:`fedmtl.protocols.fedhenn`); the server averages them,
weighted by training examples, into ``K̄`` and sends ``K̄`` back; clients add
``η·(1 − CKA(K_i, K̄))`` to their task loss (``fedmtl.clients.fedhenn``). No weights cross the
wire, so any mix of architectures and tasks takes part; a kernel is ``n × n`` whatever the
feature width.

Server metrics: ``fedhenn/kernels`` (kernels averaged) and ``fedhenn/cka_distance_mean``, the
mean ``1 − CKA(K_i, K̄)`` of the round's kernels (falls as the clients align). State: ``K̄`` and
the round it is for, checkpointed so a resumed run sends the same kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmtl.aggregation.fedavg import weighted_average
from fedmtl.config import Experiment
from fedmtl.losses.cka import cka_distance
from fedmtl.messages import TensorSpec
from fedmtl.protocols.fedhenn import KERNEL, alignment_size
from fedmtl.strategies.base import ClientInfo, Reply, Strategy, register_strategy


@register_strategy("fedhenn")
class FedHeNN(Strategy):
    """Average the clients' kernels; send the average (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.size = alignment_size(experiment)
        self.kernel: Tensor | None = None  # K̄ on S_r
        self.kernel_round = 0  # r: the round whose alignment batch K̄ is on

    def train_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """``K̄`` on this round's batch, if last round's kernels made one."""
        if self.kernel is None or self.kernel_round != round_:
            return {}  # round 1, or a round after one without replies: K̄ is on another batch
        return {KERNEL: self.kernel}

    def evaluate_arrays(self, round_: int, client: ClientInfo) -> dict[str, Tensor]:
        """Nothing: each client evaluates its own model."""
        return {}

    def expected_reply(self, client: ClientInfo, upload: list[str] | None) -> dict[str, TensorSpec]:
        """The client's ``[n, n]`` float32 kernel on the next round's batch."""
        return {KERNEL: TensorSpec((self.size, self.size), "float32")}

    def aggregate(
        self, round_: int, replies: Mapping[str, Reply], clients: Mapping[str, ClientInfo]
    ) -> dict[str, float]:
        """``K̄`` for round ``round_ + 1``: the example-weighted mean of the uploaded kernels."""
        if not replies:
            return {"fedhenn/kernels": 0.0}
        order = sorted(replies)
        kernels = [replies[c].arrays[KERNEL] for c in order]
        weights = [float(replies[c].metrics["num-examples"]) for c in order]
        average = weighted_average([{KERNEL: k} for k in kernels], weights)[KERNEL]
        self.kernel, self.kernel_round = average, round_ + 1
        distances = [float(cka_distance(k.double(), average.double())) for k in kernels]
        return {
            "fedhenn/kernels": float(len(kernels)),
            "fedhenn/cka_distance_mean": sum(distances) / len(distances),
        }

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``K̄`` and the round it is for."""
        tensors = {} if self.kernel is None else {"kernel": self.kernel}
        return tensors, {"kernel_round": self.kernel_round}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.kernel = tensors.get("kernel")
        self.kernel_round = int(meta.get("kernel_round", 0))
