"""Tiny experiments and in-process federated runs for tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict

from fedmtl.client_app import app as client_app
from fedmtl.config import Experiment, parse_experiment
from fedmtl.results import RunDirectory
from fedmtl.strategies import FederatedLoop, create_strategy
from fedmtl.testing import FakeGrid

TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 1}


def _tiny_client(client_id: str, tasks: list[str]) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "dataset": "digits",
        "tasks": tasks,
        "samples": 24,
        "test_samples": 16,
        "model": {
            "backbone": "vit_tiny_patch16_224",
            "kwargs": TINY_VIT,
            "decoder_channels": 8,
            "decoder_hidden": 16,
        },
    }


def tiny_experiment(algorithm: str = "fedavg", rounds: int = 4, **overrides: Any) -> Experiment:
    """Three clients (two share an encoder architecture, one is multi-task) on 16-px digits."""
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "rounds": rounds,
        "device": "cpu",
        "algorithm": {"name": algorithm},
        "datasets": {"digits": {"kind": "quickstart", "image_size": 16}},
        # Only FedMuscle reads it; harmless elsewhere, so every strategy runs the same file.
        "public": {"dataset": "digits", "size": 16, "batch_size": 8},
        "defaults": {
            "local_epochs": 1,
            "batch_size": 8,
            "optimizer": "sgd",
            "lr": 0.05,
            "max_batches": 2,
        },
        "clients": [
            _tiny_client("a-digit", ["digit"]),
            _tiny_client("b-digit", ["digit"]),
            _tiny_client("c-seg-depth", ["segmentation", "depth"]),
        ],
    }
    for key, value in overrides.items():
        data[key] = value
    return parse_experiment(copy.deepcopy(data))


class StopAfter:
    """An observer that raises after a given round (simulates a server killed mid-run).

    With ``phase`` it raises right after that phase of the round instead, before the round's
    checkpoint (e.g. ``"train"``: the clients trained, the server died).
    """

    class Stopped(RuntimeError):
        pass

    def __init__(self, round_: int, phase: str | None = None) -> None:
        self.round = round_
        self.phase = phase

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        pass

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        if round_ == self.round and phase == self.phase:
            raise StopAfter.Stopped(f"stopped after {phase} of round {round_}")

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        if round_ == self.round and self.phase is None:
            raise StopAfter.Stopped(f"stopped after round {round_}")


def run_in_process(
    experiment: Experiment,
    out: Path,
    *,
    grid: FakeGrid | None = None,
    run_dir: RunDirectory | None = None,
    resume: bool = False,
    observer: Any = None,
    run_config: dict[str, Any] | None = None,
) -> tuple[RunDirectory, FakeGrid]:
    """Run ``experiment`` on a FakeGrid (one node per client) and return its run folder."""
    grid = grid or FakeGrid(client_app, len(experiment.clients))
    run_dir = run_dir or RunDirectory.create(out, experiment)
    strategy = create_strategy(experiment)
    loop = FederatedLoop(
        grid, experiment, strategy, run_dir, observer=observer, run_config=run_config
    )
    loop.run(resume=resume)
    return run_dir, grid


def eval_rows(run_dir: RunDirectory) -> list[dict[str, Any]]:
    """Rows with evaluation metrics, without timing fields (which differ between runs).

    Timing fields are those with ``seconds`` in their name (``seconds/train``,
    ``train/seconds``, ``server/fedmuscle/exchange_seconds_median``, ...).
    """
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in run_dir.read_metrics()]


def described_clients(experiment: Experiment) -> dict[str, Any]:
    """What each client's ``describe`` reply tells the server, built on the meta device.

    For strategy tests that need the shapes without running the ClientApp; the announced
    groups are the ClientApp's own (``fedmtl.client_app.ALL_GROUPS``).
    """
    from fedmtl.client_app import ALL_GROUPS
    from fedmtl.messages import TensorSpec
    from fedmtl.models.factory import shared_structure
    from fedmtl.strategies.base import ClientInfo

    out: dict[str, Any] = {}
    for index, client in enumerate(experiment.clients):
        shared = shared_structure(experiment, client, ALL_GROUPS)
        specs = {name: TensorSpec.of(tensor) for name, tensor in shared.items()}
        out[client.client_id] = ClientInfo(
            client.client_id, 101 + index, client.dataset, list(client.tasks), 0, 0, specs
        )
    return out


class TrainReplies:
    """A FakeGrid reply hook that keeps every train reply by (round, client id).

    FakeGrid numbers nodes from 101 in the order of ``ids``.
    """

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.replies: dict[tuple[int, str], RecordDict] = {}

    def __call__(self, node: int, message: Message, content: RecordDict) -> None:
        if message.metadata.message_type == "train":
            round_ = int(str(message.content["config"]["server-round"]))
            self.replies[(round_, self.ids[node - 101])] = content


def reply_arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    """The ``arrays`` record of a message's content as float64 tensors (empty if absent)."""
    if "arrays" not in content.array_records:
        return {}
    return {k: v.double() for k, v in content.array_records["arrays"].to_torch_state_dict().items()}


def run_recorded(experiment: Experiment, out: Path) -> tuple[RunDirectory, FakeGrid, TrainReplies]:
    """Run ``experiment`` in-process, keeping every train reply (see :class:`TrainReplies`)."""
    recorder = TrainReplies([c.client_id for c in experiment.clients])
    grid = FakeGrid(client_app, len(experiment.clients))
    grid.tamper = recorder
    run_dir, _ = run_in_process(experiment, out, grid=grid)
    return run_dir, grid, recorder


def train_messages(grid: FakeGrid, ids: list[str]) -> dict[tuple[int, str], Message]:
    """The train messages the server sent, by (round, client id)."""
    return {
        (int(str(m.content["config"]["server-round"])), ids[m.metadata.dst_node_id - 101]): m
        for m in grid.sent
        if m.metadata.message_type == "train"
    }
