"""FedRCL's relaxed supervised contrastive loss (Seo et al., CVPR 2024, arXiv 2401.04928).

Read from the paper's description and the authors' configuration (``skynbe/FedRCL``:
``temp = 0.05``, one hardest positive, two hardest negatives, penalty threshold 0.7, both terms
of weight 1); written here from that description. With cosine similarities ``s_ij`` of the
L2-normalised features, for each anchor ``i`` with same-class set ``P_i`` (others of its class)
and other-class set ``N_i``:

- SCL term: ``−log( e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n ∈ N_i^k} e^{s_in/τ}) )`` with ``p`` the
  *least* similar member of ``P_i ∪ {i}`` (the hardest positive; ``i`` itself, ``s = 1``, when
  the batch holds no other sample of its class) and ``N_i^k`` the ``k`` *most* similar samples
  of other classes (none: the term is 0).
- Divergence penalty (the relaxation): ``−log( e^{1/τ} / (e^{1/τ} + e^{m_i/τ}) )`` where
  ``m_i = min_{p ∈ P_i} s_ip`` when that is at least ``threshold`` (even the least similar
  same-class sample is too close: the class collapses around ``i``), and no penalty otherwise
  (the authors' code puts ``s = −1`` there, whose term is below 1e-8 at τ = 0.05).

Both are means over the batch. The paper applies them at several depths of a ResNet; fedmtl's
encoders expose one pooled feature, so here they act on that one level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RelaxedContrastive:
    """The two terms of one batch and the share of anchors the penalty acted on."""

    scl: Tensor
    penalty: Tensor
    penalised_fraction: float


def relaxed_contrastive_loss(
    features: Tensor, labels: Tensor, tau: float, threshold: float, topk_neg: int
) -> RelaxedContrastive:
    """SCL with hardest positive and ``topk_neg`` hardest negatives, plus the divergence penalty.

    Parameters
    ----------
    features : Tensor
        ``[B, d]`` features (normalised here).
    labels : Tensor
        ``long [B]`` classes.
    tau, threshold : float
        Temperature and the similarity above which same-class pairs are penalised.
    topk_neg : int
        Hardest negatives per anchor.
    """
    z = F.normalize(features.float().flatten(1), dim=-1)
    sims = z @ z.T
    batch = sims.shape[0]
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(batch, dtype=torch.bool, device=sims.device)
    # hardest positive among the class, the anchor itself included (s_ii = 1)
    positive = sims.masked_fill(~same, float("inf")).min(dim=1).values
    k = min(topk_neg, batch)
    negatives = sims.masked_fill(same, float("-inf")).topk(k, dim=1).values  # [B, k]
    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1) / tau
    scl = -(logits[:, 0] - torch.logsumexp(logits, dim=1))
    # the least similar other member of the class, if every member is above the threshold
    others = same & ~eye
    least = sims.masked_fill(~others, float("inf")).min(dim=1).values
    penalised = others.any(dim=1) & (least >= threshold)
    pair = torch.stack(
        [torch.ones_like(least), torch.where(penalised, least, least.new_tensor(1.0))]
    )
    penalty_logits = pair.T / tau
    penalty = -(penalty_logits[:, 0] - torch.logsumexp(penalty_logits, dim=1))
    penalty = torch.where(penalised, penalty, torch.zeros_like(penalty))
    return RelaxedContrastive(
        scl=scl.mean(), penalty=penalty.mean(), penalised_fraction=float(penalised.float().mean())
    )
