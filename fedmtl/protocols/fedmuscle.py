"""FedMuscle's contrastive phase on the wire (``strategies.fedmuscle`` ↔ ``clients.fedmuscle``).

Two message types besides ``train`` and ``evaluate``:

- :data:`REPRESENT` (``query.represent``): config :data:`REPRESENT_EPOCH` (public epoch ``e``)
  and :data:`REPRESENT_BATCHES` (batch indices). The reply's arrays hold
  :func:`representation_key` ``z/<b>`` = ``Z_b`` (``[B_b, d]`` float32, rows L2-normalised) of
  every requested batch.
- :data:`ALIGN` (``train.align``): config :data:`EPOCH` and arrays :func:`payload_key`
  ``<b>/<name>`` (the server's payload for public batch ``b`` of epoch ``EPOCH``: ``peers``;
  ``targets`` + ``log_alpha``; or ``grad`` + ``loss``). The client takes one optimiser step per
  batch, in ascending batch order. The message may also carry a represent request
  (``REPRESENT_EPOCH``/``REPRESENT_BATCHES``), answered after the steps with the updated
  weights: that is how the per-batch schedule needs one round-trip per batch. With
  ``channel = "stream"`` one ``align`` message per client carries a stream ticket instead
  (:class:`fedmtl.stream.client.StreamTicket`) and the steps run over the stream.

Both sides walk the same :func:`contrastive_schedule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmtl.config import Experiment, FedMuscleConfig

# Message types (Flower requires "<train|evaluate|query>[.<identifier>]").
REPRESENT = "query.represent"
ALIGN = "train.align"

EPOCH = "fedmuscle.epoch"
REPRESENT_EPOCH = "fedmuscle.represent-epoch"
REPRESENT_BATCHES = "fedmuscle.represent-batches"


def representation_key(batch: int) -> str:
    """Array name of ``Z_b`` in a represent or align reply."""
    return f"z/{batch}"


def payload_key(batch: int, name: str) -> str:
    """Array name of payload tensor ``name`` for public batch ``batch`` in an align message."""
    return f"{batch}/{name}"


def represent_request(epoch: int, batches: list[int]) -> dict[str, Any]:
    """Config entries asking for ``Z_b`` of ``batches`` of public ``epoch``."""
    # ConfigRecord values may be lists of ints (make_content's annotation omits them).
    return {REPRESENT_EPOCH: epoch, REPRESENT_BATCHES: list(batches)}


def read_represent_request(config: Mapping[str, Any]) -> tuple[int, list[int]] | None:
    """The ``(epoch, batches)`` a message asks representations of, if it asks."""
    if REPRESENT_EPOCH not in config:
        return None
    batches = config.get(REPRESENT_BATCHES, [])
    return int(config[REPRESENT_EPOCH]), [int(b) for b in batches]


def split_payloads(received: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Group an align message's arrays by public batch: ``{b: {name: tensor}}``, ascending ``b``.

    Raises
    ------
    ValueError
        If a name is not ``<batch>/<name>``.
    """
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in received.items():
        batch, sep, name = key.partition("/")
        if not sep or not batch.isdigit() or not name:
            raise ValueError(f"align payload name {key!r} is not '<batch>/<name>'")
        out.setdefault(int(batch), {})[name] = value
    return dict(sorted(out.items()))


def contrastive_schedule(
    experiment: Experiment, round_: int, batches: int
) -> list[tuple[int, int]]:
    """The round's contrastive steps in order: ``(public epoch, batch)`` per step.

    Contrastive epoch ``e`` of round ``r`` is public epoch ``(r − 1)·T + e`` (``T`` =
    ``contrastive_epochs``), so every round visits the public data in a fresh order. Step
    ``k = e·batches + b`` also numbers the peer draw of that batch.
    """
    algorithm = experiment.algorithm
    assert isinstance(algorithm, FedMuscleConfig)
    epochs = algorithm.contrastive_epochs
    return [((round_ - 1) * epochs + e, b) for e in range(epochs) for b in range(batches)]
