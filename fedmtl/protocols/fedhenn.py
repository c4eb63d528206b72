"""FedHeNN on the wire (``strategies.fedhenn`` ↔ ``clients.fedhenn``): kernels, not weights.

Round ``r`` aligns on one public batch, ``S_r`` = batch 0 of public epoch ``r − 1``
(:func:`alignment_batch`: a fresh random subset every round, as the paper's RAD sampling).
The ``train`` message of round ``r`` carries :data:`KERNEL`, the global kernel ``K̄`` on
``S_r`` (``[n, n]`` float32, ``n`` = :func:`alignment_size`), absent in round 1. The reply
carries :data:`KERNEL` too: the client's linear kernel on ``S_{r+1}`` after training, i.e.
its representations at the start of the next round, so one message per round suffices.
"""

from __future__ import annotations

from fedmtl.config import Experiment

KERNEL = "fedhenn/kernel"


def alignment_batch(round_: int) -> tuple[int, int]:
    """``(public epoch, batch)`` of ``S_r``, the public batch round ``round_`` aligns on."""
    return round_ - 1, 0


def alignment_size(experiment: Experiment) -> int:
    """``n``: the samples in ``S_r`` (the first batch of a public epoch is always full).

    Raises
    ------
    ValueError
        If the experiment has no ``[public]`` section.
    """
    if experiment.public is None:
        raise ValueError("public: fedhenn needs a [public] dataset section")
    return min(experiment.public.batch_size, experiment.public.size)
