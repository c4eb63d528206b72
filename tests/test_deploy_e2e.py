"""Deployment end to end: a real SuperLink and three real SuperNodes on loopback, TLS and node
authentication on, certificates and keys made by ``fedmtl.deploy``; faults injected for real.

Every result is checked against an in-process run of the same experiment (the real ClientApp
over ``FakeGrid``, one torch thread like the nodes): deployment must not change a single number.
One deployment serves the whole module; each test starts from wiped client state.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmtl.client_app import app as fedmtl_client_app
from fedmtl.clients.base import client_algorithm
from fedmtl.clients.session import ClientSession
from fedmtl.config import load_experiment
from fedmtl.deploy.commands import node_config, supernode_process
from fedmtl.deploy.credentials import write_node_keys
from fedmtl.deploy.local import LocalDeployment
from fedmtl.results import RunDirectory
from fedmtl.strategies import STRATEGIES
from fedmtl.testing import FakeGrid
from tests import faulty_client
from tests.helpers import eval_rows, run_in_process
from tests.layouts import write_cifar10

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ("a", "b", "c")
RUN_TIMEOUT = 1200  # seconds; a phase costs ~5 s on an idle 2-core box, far more when loaded
# A ServerApp/ClientApp process per message polls for work every second by default.
FAST_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}

EXPERIMENT = """
name = "deploy-e2e"
seed = 1
rounds = {rounds}
evaluate_every = {evaluate_every}
device = "cpu"
round_timeout = 600
algorithm = {{ name = "{algorithm}"{algorithm_extra} }}

[datasets.digits]
kind = "quickstart"
image_size = 16

[public]
dataset = "digits"
size = 8
batch_size = 8

[defaults]
batch_size = 8
optimizer = "sgd"
lr = 0.05
max_batches = 2

[[clients]]
client_id = "a"
dataset = "digits"
tasks = ["digit"]
samples = 24
test_samples = 16
model = {{ backbone = "vit_tiny_patch16_224", kwargs = {vit}, decoder_hidden = 16 }}

[[clients]]
client_id = "b"
dataset = "digits"
tasks = ["attributes"]
samples = 24
test_samples = 16
model = {{ backbone = "vit_tiny_patch16_224", kwargs = {vit}, decoder_hidden = 16 }}

[[clients]]
client_id = "c"
dataset = "digits"
tasks = ["segmentation"]
samples = 24
test_samples = 16
model = {{ backbone = "vit_tiny_patch16_224", kwargs = {vit}, decoder_channels = 8 }}
"""
VIT = "{ img_size = 16, patch_size = 4, depth = 1 }"


def write_experiment(
    path: Path, algorithm: str, rounds: int, evaluate_every: int, algorithm_extra: str = ""
) -> Path:
    path.write_text(
        EXPERIMENT.format(
            algorithm=algorithm,
            algorithm_extra=algorithm_extra,
            rounds=rounds,
            evaluate_every=evaluate_every,
            vit=VIT,
        )
    )
    return path


def make_app_dir(path: Path, clientapp: str) -> Path:
    """A Flower app directory: the project's pyproject.toml (components swapped) + the fault app."""
    path.mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace('clientapp = "fedmtl.client_app:app"', f'clientapp = "{clientapp}"')
    assert f'clientapp = "{clientapp}"' in text
    (path / "pyproject.toml").write_text(text)
    shutil.copy(Path(faulty_client.__file__), path / "faulty_client.py")
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    work = tmp_path_factory.mktemp("deployment")
    local = LocalDeployment(work, CLIENTS, env=FAST_ENV, num_threads=1)
    try:
        local.start(timeout=300)
        yield local
    finally:
        local.close()
    assert not local.processes


@pytest.fixture
def cluster(deployment: LocalDeployment) -> LocalDeployment:
    """The module's deployment with every SuperNode up and no personal state left over."""
    deployment.ensure_supernodes(timeout=300)
    for client_id in CLIENTS:
        shutil.rmtree(Path(deployment.settings.state_root) / client_id, ignore_errors=True)
    return deployment


def submit(
    cluster: LocalDeployment, app_dir: Path, experiment: Path, output: Path, **extra: str
) -> int:
    config = {"experiment": str(experiment), "output-dir": str(output), **extra}
    return cluster.submit(config, app_dir)


def only_run_dir(output: Path) -> RunDirectory:
    found = [p for p in output.glob("*/*") if (p / "config.json").is_file()]
    assert len(found) == 1, found
    return RunDirectory(found[0])


def reference_rows(
    experiment: Path, out: Path, *, offline: Sequence[str] = (), app: Any = fedmtl_client_app
) -> list[dict[str, Any]]:
    """The same experiment in this process over FakeGrid (one torch thread, like the nodes)."""
    loaded = load_experiment(experiment)
    grid = FakeGrid(app, len(loaded.clients))
    grid.offline = {101 + loaded.client_index(c) for c in offline}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir, _ = run_in_process(loaded, out, grid=grid)
    finally:
        torch.set_num_threads(threads)
    return eval_rows(run_dir)


def assert_same_rows(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal rows; floats to 1e-5 relative (replies arrive, and are averaged, in any order)."""
    assert [(r["round"], r["client_id"]) for r in got] == [
        (r["round"], r["client_id"]) for r in expected
    ]
    for row, ref in zip(got, expected, strict=True):
        where = (row["round"], row["client_id"])
        assert set(row) == set(ref), (where, set(row) ^ set(ref))
        for key, value in ref.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[key]), (where, key)
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (where, key)
            else:
                assert row[key] == value, (where, key, row[key], value)


# --------------------------------------------------------------------------- the node gate


def test_unregistered_node_is_refused(cluster: LocalDeployment, tmp_path: Path) -> None:
    keys = write_node_keys(tmp_path / "keys", ["intruder"])
    settings = replace(cluster.settings, keys_dir=str(tmp_path / "keys"))
    argv = [*supernode_process(settings, "intruder", len(CLIENTS)).argv, "--max-retries", "2"]
    assert str(keys["intruder"].private) in argv
    cluster.start_supernode("intruder", argv)
    process = cluster.processes["supernode-intruder"]
    try:
        code = process.wait(timeout=300)
    finally:
        cluster.stop("supernode-intruder")
    log = cluster.log_path("supernode-intruder").read_text()
    # Flower logs its exit code 305 ("Failed to activate SuperNode"); the process exits non-zero.
    assert code != 0, log[-2000:]
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log[-2000:]
    assert len(cluster.online_nodes()) == len(CLIENTS)


# --------------------------------------------------------------------------- every algorithm


@pytest.mark.timeout(RUN_TIMEOUT + 600)
@pytest.mark.parametrize("algorithm", sorted(STRATEGIES))
def test_algorithm_runs_in_deployment(
    cluster: LocalDeployment, algorithm: str, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", algorithm, rounds=2, evaluate_every=2)
    app_dir = make_app_dir(tmp_path / "app", "fedmtl.client_app:app")
    run_id = submit(cluster, app_dir, experiment, tmp_path / "runs")
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    run_dir = only_run_dir(tmp_path / "runs")
    rows = run_dir.read_metrics()
    assert [(r["round"], r["client_id"]) for r in rows] == [(1, c) for c in CLIENTS] + [
        (2, c) for c in CLIENTS
    ]
    assert all(r.get("status") != "failed" for r in rows), rows
    summary = run_dir.read_summary()
    assert summary is not None and set(summary["clients"]) == set(CLIENTS)
    assert run_dir.checkpoint_rounds() == [1, 2]
    assert (run_dir.path / "metrics.png").stat().st_size > 1000
    assert info["network-traffic"]["total-bytes"] > 0
    assert_same_rows(eval_rows(run_dir), reference_rows(experiment, tmp_path / "reference"))


def test_fedmuscle_stream_runs_over_tls_in_deployment(
    cluster: LocalDeployment, tmp_path: Path
) -> None:
    # The per-batch schedule over fedmtl's gRPC stream, TLS with the SuperLink's certificate
    # (the plan's run config), must give the same personal models as over Flower messages.
    batch = ', schedule = "batch", contrastive_epochs = 2, connect_deadline = 300.0'
    stream = write_experiment(
        tmp_path / "stream.toml", "fedmuscle", 2, 2, batch + ', channel = "stream"'
    )
    app_dir = make_app_dir(tmp_path / "app", "fedmtl.client_app:app")
    run_id = submit(cluster, app_dir, stream, tmp_path / "runs")
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    rows = only_run_dir(tmp_path / "runs").read_metrics()
    for row in rows:
        assert row["server/fedmuscle/stream_steps"] == 2, row  # 2 epochs of 1 public batch
        assert row["server/fedmuscle/stream_clients"] == 3
        assert row["server/fedmuscle/steps"] == 6  # every client stepped on every batch
        assert row["stream/skipped"] == 0 and row.get("status") != "failed"
    flower = write_experiment(tmp_path / "flower.toml", "fedmuscle", 2, 2, batch)
    expected = reference_rows(flower, tmp_path / "reference")
    got = eval_rows(only_run_dir(tmp_path / "runs"))
    for row, ref in zip(got, expected, strict=True):
        for key in (k for k in ref if k.startswith("eval/")):
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (row["round"], key)


# --------------------------------------------------------------------------- faults


@pytest.mark.timeout(RUN_TIMEOUT + 600)
def test_malformed_replies_are_rejected_without_harming_others(
    cluster: LocalDeployment, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "fedavg", rounds=2, evaluate_every=1)
    app_dir = make_app_dir(tmp_path / "app", "faulty_client:app")
    index = CLIENTS.index("b")
    argv = list(cluster.plan.supernodes["b"].argv)
    argv[-1] = node_config(cluster.settings, "b", index) + f" {faulty_client.CORRUPT_KEY}=true"
    cluster.stop("supernode-b")
    cluster.start_supernode("b", argv)
    try:
        cluster.wait_for(lambda: len(cluster.online_nodes()) == len(CLIENTS), 300)
        run_id = submit(cluster, app_dir, experiment, tmp_path / "runs")
        info = cluster.wait_run(run_id, RUN_TIMEOUT)
    finally:
        cluster.stop("supernode-b")  # the cluster fixture restarts it with its planned command
    # b never completed a round, so the run ends failed (issue 12), after writing everything.
    assert info["status"] == "finished:failed", info
    assert only_run_dir(tmp_path / "runs").read_summary() is not None
    rows = only_run_dir(tmp_path / "runs").read_metrics()
    bad = {r["round"]: r for r in rows if r["client_id"] == "b"}
    assert bad[1]["status"] == "failed" and "shape" in bad[1]["error"], bad[1]
    assert bad[2]["status"] == "failed" and "NaN" in bad[2]["error"], bad[2]
    # a and c end exactly as in a federation without b: the garbage never reached them.
    others = [r for r in eval_rows(only_run_dir(tmp_path / "runs")) if r["client_id"] != "b"]
    without_b = reference_rows(experiment, tmp_path / "reference", offline=["b"])
    assert_same_rows(others, without_b)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 600)
def test_server_stopped_after_round_2_resumes_to_the_same_result(
    cluster: LocalDeployment, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "fedavg", rounds=3, evaluate_every=1)
    app_dir = make_app_dir(tmp_path / "app", "fedmtl.client_app:app")
    output = tmp_path / "runs"
    run_id = submit(cluster, app_dir, experiment, output)
    cluster.wait_for(lambda: any(output.glob("*/*/checkpoints/round-2.safetensors")), RUN_TIMEOUT)
    assert cluster.stop_run(run_id).get("success"), "flwr stop failed"
    info = cluster.wait_run(run_id, 300)
    assert info["status"] == "finished:stopped", info
    run_dir = only_run_dir(output)
    assert max(r["round"] for r in run_dir.read_metrics()) == 2
    assert run_dir.read_summary() is None

    resumed = submit(cluster, app_dir, experiment, output, resume=str(run_dir.path))
    assert cluster.wait_run(resumed, RUN_TIMEOUT)["status"] == "finished:completed"
    assert only_run_dir(output).path == run_dir.path  # the same folder was continued
    assert run_dir.read_summary() is not None
    assert_same_rows(eval_rows(run_dir), reference_rows(experiment, tmp_path / "reference"))


@pytest.mark.timeout(RUN_TIMEOUT + 900)
def test_killed_node_is_left_out_then_rejoins_from_its_state(
    cluster: LocalDeployment, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "local", rounds=4, evaluate_every=4)
    app_dir = make_app_dir(tmp_path / "app", "fedmtl.client_app:app")
    output = tmp_path / "runs"
    state_c = Path(cluster.settings.state_root) / "c"
    run_id = submit(cluster, app_dir, experiment, output)

    def rounds_written() -> int:
        run = [RunDirectory(p) for p in output.glob("*/*") if (p / "metrics.jsonl").exists()]
        return max((r["round"] for r in run[0].read_metrics()), default=0) if run else 0

    cluster.wait_for(lambda: rounds_written() >= 1, RUN_TIMEOUT, interval=0.2)
    cluster.stop("supernode-c", signal.SIGKILL)  # dies as round 2 starts
    snapshot = tmp_path / "state-c-at-kill"  # c's own folder, wherever it keeps its rounds
    shutil.copytree(next(state_c.rglob("round-1.safetensors")).parent, snapshot)
    killed_at = time.monotonic()
    cluster.wait_for(lambda: rounds_written() >= 2, RUN_TIMEOUT)
    detected_after = time.monotonic() - killed_at
    cluster.start_supernode("c")  # same key, same state dir
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info

    rows = only_run_dir(output).read_metrics()
    by_round = {(r["round"], r["client_id"]): r for r in rows}
    # Flower reports the dead node after its heartbeat patience (2 x 30 s); a and b carry on.
    assert by_round[(2, "c")]["status"] == "failed" and "error 5" in by_round[(2, "c")]["error"]
    assert detected_after > 20
    assert all(by_round[(2, c)].get("status") != "failed" for c in ("a", "b"))
    assert by_round[(4, "c")].get("status") != "failed" and "eval/loss" in by_round[(4, "c")]
    assert all(by_round[(r, c)].get("status") != "failed" for r in (1, 3, 4) for c in ("a", "b"))

    # Back, c trained from the personal state it had when it died (round 1), not from scratch.
    assert sorted(p.name for p in snapshot.glob("round-*")) == ["round-1.safetensors"]
    first = min(r for r in (3, 4) if (r, "c") in by_round and "train/loss" in by_round[(r, "c")])
    loaded = load_experiment(experiment)
    torch.set_num_threads(1)
    try:
        resumed = client_algorithm(loaded, ClientSession(loaded, "c", snapshot)).train(
            first, {}, {}
        )
        fresh_dir = tmp_path / "fresh"
        fresh = client_algorithm(loaded, ClientSession(loaded, "c", fresh_dir)).train(first, {}, {})
    finally:
        torch.set_num_threads(2)
    assert by_round[(first, "c")]["train/loss"] == pytest.approx(resumed.metrics["train/loss"])
    assert fresh.metrics["train/loss"] != resumed.metrics["train/loss"]


# --------------------------------------------------------------------------- data on clients


@pytest.mark.timeout(RUN_TIMEOUT + 600)
def test_server_reads_no_data_and_clients_read_their_data_dir(
    cluster: LocalDeployment, tmp_path: Path
) -> None:
    # Every client trains on CIFAR-10 from its node's data-dir; the experiment's root exists
    # nowhere, so the ServerApp (same machine here) could not open it even if it tried.
    data = write_cifar10(tmp_path / "client-data")
    missing = tmp_path / "c-has-no-data"
    missing.mkdir()
    text = write_experiment(tmp_path / "exp.toml", "fedavg", rounds=2, evaluate_every=2).read_text()
    text = text.replace(
        'kind = "quickstart"', f'kind = "cifar10"\nroot = "{tmp_path / "not-on-the-server"}"'
    )
    for task in ("digit", "attributes", "segmentation"):
        text = text.replace(f'tasks = ["{task}"]', 'tasks = ["label"]')
    experiment = tmp_path / "exp.toml"
    experiment.write_text(text)
    app_dir = make_app_dir(tmp_path / "app", "fedmtl.client_app:app")
    for index, client_id in enumerate(CLIENTS):
        directory = missing if client_id == "c" else data
        argv = list(cluster.plan.supernodes[client_id].argv)
        argv[-1] = node_config(cluster.settings, client_id, index) + f" data-dir='{directory}'"
        cluster.stop(f"supernode-{client_id}")
        cluster.start_supernode(client_id, argv)
    try:
        cluster.wait_for(lambda: len(cluster.online_nodes()) == len(CLIENTS), 300)
        run_id = submit(cluster, app_dir, experiment, tmp_path / "runs")
        info = cluster.wait_run(run_id, RUN_TIMEOUT)
    finally:
        for client_id in CLIENTS:  # the cluster fixture restarts them with their plan
            cluster.stop(f"supernode-{client_id}")
    run_dir = only_run_dir(tmp_path / "runs")  # the server started the run without the data
    rows = run_dir.read_metrics()
    for round_ in (1, 2):
        by_client = {r["client_id"]: r for r in rows if r["round"] == round_}
        assert all(by_client[c].get("status") != "failed" for c in ("a", "b")), by_client
        error = by_client["c"]["error"]
        assert by_client["c"]["status"] == "failed", by_client["c"]
        assert error.startswith("describe: FileNotFoundError: datasets.digits (data-dir "), error
        assert str(missing) in error and "cifar-10-batches-py" in error, error
    assert "eval/label/accuracy" in {k for r in rows if r["client_id"] == "a" for k in r}
    assert info["status"] == "finished:failed", info  # c never completed a round
