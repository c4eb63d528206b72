"""Issue 19: aggregation folds each reply in as it arrives; server memory flat in N."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from fedmtl.aggregation.fedavg import RunningAverage, weighted_average
from fedmtl.client_app import app as client_app
from fedmtl.results import RunDirectory
from fedmtl.strategies import FederatedLoop, create_strategy
from fedmtl.strategies.base import ClientInfo, Reply
from fedmtl.testing import FakeGrid
from tests.helpers import TINY_VIT, tiny_experiment


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(7, 5, generator=gen),
            "h": torch.randn(3, generator=gen).half(),
            "n": torch.tensor(k + 10),
        }
        for k in range(n)
    ]


@pytest.mark.parametrize("weights", [[1, 3, 7, 2, 9], [24, 24, 24, 24, 24], [0.3, 0.1, 2.5, 1, 4]])
def test_running_average_with_the_planned_total_is_weighted_average_bit_for_bit(
    weights: list[float],
) -> None:
    states = _states(len(weights))
    running = RunningAverage(expected_total=sum(weights))
    for state, weight in zip(states, weights, strict=True):
        running.add(state, weight)
    out, reference = running.result(), weighted_average(states, weights)
    for key in reference:
        assert out[key].dtype == reference[key].dtype
        assert torch.equal(out[key], reference[key]), key
    assert out["n"].item() == 10  # integer tensors: the first participant's


def test_running_average_rescales_when_a_planned_client_is_missing() -> None:
    states, weights = _states(4), [5.0, 2.0, 3.0, 6.0]
    running = RunningAverage(expected_total=sum(weights))  # planned all four
    for state, weight in zip(states[:3], weights[:3], strict=True):  # the fourth dropped out
        running.add(state, weight)
    # By hand in float64: Σ w_k x_k / Σ w_k over the three that came.
    by_hand = sum(w * s["w"].double() for s, w in zip(states[:3], weights[:3], strict=True))
    by_hand = (by_hand / 10.0).float()
    assert torch.allclose(running.result()["w"], by_hand, rtol=0, atol=1e-6)
    unplanned = RunningAverage()
    for state, weight in zip(states[:3], weights[:3], strict=True):
        unplanned.add(state, weight)
    assert torch.allclose(unplanned.result()["w"], by_hand, rtol=0, atol=1e-6)


def test_running_average_refuses_what_weighted_average_refuses() -> None:
    running = RunningAverage()
    running.add({"w": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        running.add({"w": torch.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="names"):
        running.add({"v": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        running.add({"w": torch.zeros(2)}, -1.0)
    zero = RunningAverage()
    zero.add({"w": torch.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        zero.result()


class LazyGrid(FakeGrid):
    """A FakeGrid whose nodes answer only when pulled, one reply per pull.

    Replies then exist one at a time, as on a real grid whose clients finish one after
    another: whatever the server keeps alive, it keeps by itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Message] = {}
        self.most_in_flight = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = message
            ids.append(message_id)
        # messages with tensors (describe carries none and goes to every node at once)
        carrying = [m for m in self.pending.values() if m.metadata.message_type != "query.describe"]
        self.most_in_flight = max(self.most_in_flight, len(carrying))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for message_id in message_ids:
            if message_id in self.pending:
                return [self._deliver(self.pending.pop(message_id))]
        return []


def _watched_run(
    tmp_path: Path, rounds: int, keep: bool
) -> tuple[Any, list[int], dict[int, list[tuple[dict[str, torch.Tensor], float]]]]:
    """Six clients of one group through the loop; at each fold, how many upload tensors live.

    ``keep``: the fold answers False, as a strategy that does not fold would, and the loop
    keeps every reply's tensors to the end of the phase (the probe must see them pile up).
    """
    group = {
        "client_id": "w",
        "count": 6,
        "dataset": "digits",
        "tasks": ["digit"],
        "samples": 24,
        "test_samples": 8,
        "model": {"backbone": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "decoder_hidden": 16},
    }
    experiment = tiny_experiment("fedavg", rounds=rounds, clients=[group])
    strategy = create_strategy(experiment)
    alive: set[int] = set()  # ids of upload tensors not yet freed
    peak: list[int] = []
    uploads: dict[int, list[tuple[dict[str, torch.Tensor], float]]] = {}
    fold = strategy.fold  # type: ignore[attr-defined]

    def watched(round_: int, reply: Reply, info: ClientInfo) -> bool:
        for tensor in reply.arrays.values():
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
        peak.append(len(alive))
        copy = {k: v.clone() for k, v in reply.arrays.items()}
        uploads.setdefault(round_, []).append((copy, float(reply.metrics["num-examples"])))
        return fold(round_, reply, info) and not keep

    strategy.fold = watched  # type: ignore[attr-defined]
    grid = LazyGrid(client_app, len(experiment.clients))
    run_dir = RunDirectory.create(tmp_path, experiment)
    FederatedLoop(grid, experiment, strategy, run_dir).run()
    return strategy, peak, uploads


def test_fedavg_server_holds_one_upload_at_a_time(tmp_path: Path) -> None:
    strategy, peak, uploads = _watched_run(tmp_path / "fold", rounds=2, keep=False)
    per_upload = len(uploads[1][0][0])
    assert len(uploads[1]) == len(uploads[2]) == 6
    # At every fold only the arriving reply's tensors are alive, however many came before.
    assert max(peak) == per_upload, peak
    # The folded result is FedAvg's weighted average of the round's uploads, bit for bit.
    groups = strategy.global_groups
    assert sum(len(g) for g in groups.values()) == per_upload  # encoder + digit decoder
    for names in groups.values():
        expected = weighted_average(
            [{n: t[n] for n in names} for t, _ in uploads[2]], [w for _, w in uploads[2]]
        )
        assert all(torch.equal(names[n], expected[n]) for n in expected)
    # The probe sees retention: replies kept by the loop pile up to all six.
    _, kept, _ = _watched_run(tmp_path / "keep", rounds=1, keep=True)
    assert max(kept) == 6 * per_upload, kept


def test_messages_in_flight_bounds_the_downlink_and_changes_no_number(tmp_path: Path) -> None:
    group = {
        "client_id": "w",
        "count": 5,
        "dataset": "digits",
        "tasks": ["digit"],
        "samples": 16,
        "test_samples": 8,
        "model": {"backbone": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "decoder_hidden": 16},
    }
    rows, in_flight = {}, {}
    for window in (None, 2):
        experiment = tiny_experiment("fedavg", rounds=2, clients=[group], messages_in_flight=window)
        grid = LazyGrid(client_app, len(experiment.clients))
        run_dir = RunDirectory.create(tmp_path / str(window), experiment)
        FederatedLoop(grid, experiment, create_strategy(experiment), run_dir).run()
        rows[window] = [
            {k: v for k, v in row.items() if "seconds" not in k} for row in run_dir.read_metrics()
        ]
        in_flight[window] = grid.most_in_flight
    assert in_flight == {None: 5, 2: 2}
    assert rows[2] == rows[None]  # same replies in the same order: the same numbers
