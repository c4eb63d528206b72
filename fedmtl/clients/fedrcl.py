"""FedRCL client: FedAvg's, plus the relaxed supervised contrastive loss on each batch.

The loss (:func:`~fedmtl.losses.relaxed.relaxed_contrastive_loss`) acts on the pooled encoder
features of the batch's own forward pass, read by a forward hook on the encoder (no second
pass), with the labels of the client's first classification task. A client without a
classification task trains as a FedAvg client (no labels to contrast). The server is FedAvg's
(``fedmtl.strategies.baselines.FedRCL``): encoders among equal architectures, decoders among
equal decoders of the same dataset task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fedmtl.clients.base import ClientAlgorithm, register_client_algorithm
from fedmtl.clients.training import BatchLoss
from fedmtl.config import CLASS_KINDS
from fedmtl.losses.relaxed import relaxed_contrastive_loss
from fedmtl.models import MultiTaskModel


@register_client_algorithm("fedrcl")
class FedRCLClient(ClientAlgorithm):
    """FedAvg with the relaxed contrastive term (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._features: Tensor | None = None
        self._hook: RemovableHandle | None = None
        self._sums = {"scl": 0.0, "penalty": 0.0, "penalised": 0.0, "batches": 0.0}

    def _task(self) -> str | None:
        kinds = [t for t in self.session.tasks if t.kind in CLASS_KINDS]
        return kinds[0].name if kinds else None

    def before_training(
        self,
        model: nn.Module,
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Hook the encoder so each batch's pooled features are at hand for the loss."""
        if self._task() is not None and float(self.hyper.weight) > 0:
            assert isinstance(model, MultiTaskModel)

            def keep(module: nn.Module, inputs: Any, output: Any) -> None:
                self._features = output.pooled

            self._hook = model.encoder.register_forward_hook(keep)
        return {}

    def batch_loss(
        self, received: Mapping[str, Tensor], config: Mapping[str, Any]
    ) -> BatchLoss | None:
        """``weight·(SCL + beta·penalty)`` of the batch; none without a classification task."""
        task, hyper = self._task(), self.hyper
        if task is None or float(hyper.weight) == 0:
            return None

        def loss(model: nn.Module, targets: Mapping[str, Tensor]) -> Tensor:
            assert self._features is not None, "the encoder hook saw no forward pass"
            terms = relaxed_contrastive_loss(
                self._features, targets[task], hyper.tau, hyper.threshold, hyper.topk_neg
            )
            self._sums["scl"] += float(terms.scl.detach())
            self._sums["penalty"] += float(terms.penalty.detach())
            self._sums["penalised"] += terms.penalised_fraction
            self._sums["batches"] += 1
            return float(hyper.weight) * (terms.scl + float(hyper.beta) * terms.penalty)

        return loss

    def after_training(
        self,
        model: nn.Module,
        received: Mapping[str, Tensor],
        extras: dict[str, dict[str, Tensor]],
        round_: int,
        config: Mapping[str, Any],
    ) -> dict[str, float]:
        """Remove the hook; the round's mean SCL, penalty and penalised share of anchors."""
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._features = None, None
        batches = self._sums["batches"]
        if not batches:
            return {}
        return {
            "fedrcl/scl_loss": self._sums["scl"] / batches,
            "fedrcl/penalty": self._sums["penalty"] / batches,
            "fedrcl/penalised_fraction": self._sums["penalised"] / batches,
        }
