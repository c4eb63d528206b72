"""Learned FedHCA² hyper aggregation weights α (encoder) and β (decoder layers), Eq. 14–17.

The personalised update of round t−1 is ``θ_i = θ_i^last + Δ̃_i + clamp(α_i, 0, 1)·U`` (encoder)
and ``θ_k^p = θ_k^{p,last} + Δ_k^p + clamp(β_k^l, 0, 1)·XA_k^p`` (decoder tensor p of layer l).
The official code back-propagates that expression with upstream gradient
``θ^{agg,t−1} − θ^{local,t} = −Δ^t`` (the next local update standing in for the negative loss
gradient at the aggregated point). Only the ``clamp(·)·U`` / ``clamp(·)·XA`` terms depend on the
hyper weights, so in closed form::

    ∂/∂α_i   = −1[0 ≤ α_i ≤ 1]   · ⟨U^{t−1}, Δ_i^t⟩
    ∂/∂β_k^l = −1[0 ≤ β_k^l ≤ 1] · Σ_{p ∈ l} ⟨XA_k^{p,t−1}, Δ_k^{p,t}⟩

The indicator is the clamp subgradient of the torch the official code ran on (1 at exactly 0 and
1, pytorch#7049); recent torch returns 0 at the bounds, which differs only at those two values.
Weights are stored raw and clamped only where used, as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedmtl.aggregation.cross_attention import Layers


def hyper_weight_gradient(weight: Tensor, agreement: Tensor) -> Tensor:
    """Return ``−1[0 ≤ weight ≤ 1] · agreement``, the closed-form gradient of a hyper weight.

    Parameters
    ----------
    weight : Tensor
        Raw (unclamped) hyper weights.
    agreement : Tensor
        Same shape: ``⟨U^{t−1}, Δ_i^t⟩`` for α, ``Σ_{p∈l} ⟨XA_k^p, Δ_k^p⟩`` for β.
    """
    inside = (weight >= 0) & (weight <= 1)
    return -agreement.to(weight.dtype) * inside.to(weight.dtype)


def decoder_agreement(
    cross: Mapping[str, Tensor], update: Mapping[str, Tensor], layers: Layers
) -> Tensor:
    """Return ``Σ_{p ∈ l} ⟨XA^p, Δ^p⟩`` for each layer ``l`` of one decoder (float64 ``[L]``).

    Parameters
    ----------
    cross : mapping
        The decoder's cross-attention output ``XA`` of the previous round.
    update : mapping
        The decoder's update ``Δ`` of this round (same names and shapes).
    layers : list of (str, list of str)
        The decoder's layers (:func:`fedmtl.aggregation.cross_attention.decoder_layers`).
    """
    device = next(iter(update.values())).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    for index, (_, keys) in enumerate(layers):
        for key in keys:
            sums[index] += torch.dot(
                cross[key].reshape(-1).double(), update[key].reshape(-1).double()
            )
    return sums


def _sgd_step(
    param: Tensor,
    momentum_buffer: Tensor,
    gradient: Tensor,
    mask: Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.SGD`` step (dampening 0, no Nesterov) on the entries where ``mask``.

    The buffer starts at zero, so its first update ``0.9·0 + g`` equals torch's ``clone(g)``;
    entries outside ``mask`` (dropped clients) keep their value and buffer, untouched.
    """
    step = gradient.to(param.dtype).add(param, alpha=weight_decay)
    new_buffer = momentum_buffer.mul(momentum).add_(step)
    new_param = param.add(new_buffer, alpha=-lr)
    if mask is None:
        momentum_buffer.copy_(new_buffer)
        param.copy_(new_param)
    else:
        momentum_buffer.copy_(torch.where(mask, new_buffer, momentum_buffer))
        param.copy_(torch.where(mask, new_param, param))


class HyperWeights:
    """Raw hyper weights α (one per client) and β (one per decoder layer) with SGD state.

    Parameters
    ----------
    num_clients : int
        Length of α.
    decoder_layer_counts : sequence of int
        Number of layers of each decoder (length of each β_k).
    init : float
        Initial value of every weight (``enc_alpha_init`` = ``dec_beta_init`` = 0.1).
    lr, momentum, weight_decay : float
        ``torch.optim.SGD`` settings of the official code (0.01, 0.9, 1e-4).
    device : torch.device or str, optional
        Where the weights live (float64).
    """

    def __init__(
        self,
        num_clients: int,
        decoder_layer_counts: Sequence[int],
        *,
        init: float = 0.1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        device: torch.device | str | None = None,
    ) -> None:
        f64 = torch.float64
        self.alpha = torch.full((num_clients,), init, dtype=f64, device=device)
        self.alpha_momentum = torch.zeros_like(self.alpha)
        self.beta = [torch.full((n,), init, dtype=f64, device=device) for n in decoder_layer_counts]
        self.beta_momentum = [torch.zeros_like(b) for b in self.beta]
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def clamped_alpha(self) -> Tensor:
        """α clamped to [0, 1], as used in the personalised encoder update."""
        return self.alpha.clamp(0.0, 1.0)

    def clamped_beta(self, decoder: int) -> Tensor:
        """β of one decoder (one entry per layer) clamped to [0, 1]."""
        return self.beta[decoder].clamp(0.0, 1.0)

    def step(
        self,
        alpha_gradient: Tensor,
        beta_gradients: Sequence[Tensor | None],
        alpha_mask: Tensor | None = None,
    ) -> None:
        """Apply one SGD step to α and β.

        Parameters
        ----------
        alpha_gradient : Tensor
            ``[N]`` gradient of α (see :func:`hyper_weight_gradient`).
        beta_gradients : sequence
            One ``[L_k]`` gradient per decoder, or ``None`` to leave that decoder's β untouched.
        alpha_mask : Tensor, optional
            Boolean ``[N]``; clients outside it keep α and its momentum untouched.
        """
        if len(beta_gradients) != len(self.beta):
            raise ValueError(f"{len(beta_gradients)} β gradients for {len(self.beta)} decoders")
        settings = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}
        _sgd_step(self.alpha, self.alpha_momentum, alpha_gradient, alpha_mask, **settings)
        for beta, buffer, gradient in zip(self.beta, self.beta_momentum, beta_gradients):
            if gradient is not None:
                _sgd_step(beta, buffer, gradient, None, **settings)

    def state_dict(self) -> dict[str, Tensor]:
        """Return the weights and momentum buffers as plain tensors (for checkpoints)."""
        state = {"alpha": self.alpha.clone(), "alpha_momentum": self.alpha_momentum.clone()}
        for k, (beta, buffer) in enumerate(zip(self.beta, self.beta_momentum)):
            state[f"beta.{k}"] = beta.clone()
            state[f"beta_momentum.{k}"] = buffer.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore weights and momentum buffers written by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If names or shapes do not match this instance.
        """
        expected = self.state_dict()
        if set(state) != set(expected):
            raise ValueError(
                f"hyper-weight state names differ: {sorted(set(state) ^ set(expected))}"
            )
        targets = {"alpha": self.alpha, "alpha_momentum": self.alpha_momentum}
        for k, (beta, buffer) in enumerate(zip(self.beta, self.beta_momentum)):
            targets[f"beta.{k}"] = beta
            targets[f"beta_momentum.{k}"] = buffer
        for name, target in targets.items():
            if state[name].shape != target.shape:
                raise ValueError(
                    f"{name}: shape {tuple(state[name].shape)} != {tuple(target.shape)}"
                )
        for name, target in targets.items():
            target.copy_(state[name])
