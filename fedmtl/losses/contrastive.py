"""NT-Xent, SimCLR's contrastive loss.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent_loss(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """Mean NT-Xent over the ``2B`` views of a batch.

    For view ``i`` with positive ``p(i)`` (the other view of the same sample),
    ``ℓ_i = −log( exp(s_{i,p(i)}/τ) / Σ_{k≠i} exp(s_{i,k}/τ) )`` over all ``2B − 1`` other
    views, ``s`` the cosine similarity; the loss is the mean of ``ℓ_i``.

    Parameters
    ----------
    z1, z2 : Tensor
        ``[B, d]`` projections of the two augmentations (normalised here).
    tau : float
        Temperature.
    """
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 1:
        raise ValueError(
            f"NT-Xent needs two [B, d] batches, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = z @ z.T / tau
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    index = torch.arange(batch, device=z.device)
    positives = torch.cat([index + batch, index])
    return F.cross_entropy(logits, positives)
