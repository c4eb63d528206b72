"""Majority votes over clients' predicted classes (CoFED's server step)."""

from __future__ import annotations

import torch
from torch import Tensor


def majority_vote(votes: Tensor, min_agreement: float) -> tuple[Tensor, Tensor]:
    """Per sample, the most voted class and the share of votes it got.

    Parameters
    ----------
    votes : Tensor
        ``[K, P]`` class indices (any dtype holding integers), one row per voter.
    min_agreement : float
        A sample is labelled only when its majority share is *above* this (0.5: a strict
        majority; with two voters, both must agree).

    Returns
    -------
    labels, share
        ``labels`` ``long [P]``: the majority class (ties go to the smallest class), −1 where
        the share is not above ``min_agreement``; ``share`` ``float64 [P]`` in (0, 1].
    """
    if votes.dim() != 2 or votes.shape[0] < 1:
        raise ValueError(f"votes must be [K ≥ 1, P], got {tuple(votes.shape)}")
    classes = votes.long()
    if bool((classes < 0).any()):
        raise ValueError("votes must be class indices ≥ 0")
    counts = torch.nn.functional.one_hot(classes, int(classes.max()) + 1).sum(dim=0)  # [P, C]
    mode = counts.argmax(dim=-1)  # argmax keeps the first maximum: ties go to the smallest class
    share = counts.max(dim=-1).values.double() / classes.shape[0]
    labels = torch.where(share > min_agreement, mode, torch.full_like(mode, -1))
    return labels, share
