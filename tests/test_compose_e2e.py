"""Compose end to end: the image built from this checkout, a SuperLink and three SuperNode
containers from a ``fedmtl deploy compose --cpu`` file, TLS and node authentication on, runs
submitted with the host's ``flwr`` through the published port; faults injected for real.

Docker (engine + Compose v2) or podman + podman-compose: the same compose file. Every result is
checked against the in-process run of the same experiment inside the same image (same
libraries; one torch thread, like the nodes). One federation serves the module; the last test
tears it down and checks that no container, network or volume of its project is left.

``make test-compose`` runs this module. ``FEDMTL_BASE_IMAGE`` sets the image's base (default:
the Dockerfile's CUDA PyTorch image), ``FEDMTL_CONTAINER_ENGINE`` picks docker or podman.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from fedmtl.deploy.containers import ComposeDeployment, find_container_tool
from fedmtl.results import RunDirectory
from tests.helpers import eval_rows
from tests.test_deploy_e2e import assert_same_rows, write_experiment

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ("a", "b", "c")
RUN_TIMEOUT = 1200
IMAGE = os.environ.get("FEDMTL_IMAGE") or f"fedmtl:{version('fedmtl')}"
BASE_IMAGE = os.environ.get("FEDMTL_BASE_IMAGE") or None

pytestmark = [pytest.mark.slow, pytest.mark.compose]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeDeployment]:
    # Probed here, not at import: `make test` collects this module without running a tool.
    tool, missing = find_container_tool(os.environ.get("FEDMTL_CONTAINER_ENGINE") or None)
    if tool is None:
        pytest.skip(f"needs docker with Compose v2 or podman with podman-compose: {missing}")
    work = tmp_path_factory.mktemp("compose")
    experiment = write_experiment(work / "exp.toml", "fedavg", rounds=2, evaluate_every=2)
    deployment = ComposeDeployment(
        work,
        experiment,
        tool,
        project_root=ROOT,
        image=IMAGE,
        base_image=BASE_IMAGE,
        project=f"fedmtl-test-{os.getpid()}",
    )
    try:
        deployment.build()
    except RuntimeError as exc:
        hint = "set FEDMTL_BASE_IMAGE to a local base (make test-compose BASE_IMAGE=...)"
        pytest.fail(f"image build failed ({hint}): {exc}")
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.down()  # also when a test failed; test_teardown checks it leaves nothing
        print("\ncompose deployment timings (s):", json.dumps(deployment.timings))


@pytest.fixture
def cluster(federation: ComposeDeployment) -> ComposeDeployment:
    """Every SuperNode container running and online, no personal state left over."""
    for client_id in CLIENTS:
        if not _running(federation, f"supernode-{client_id}"):
            federation.start_service(f"supernode-{client_id}")
        state = federation.compose_dir / "state" / client_id
        for item in state.iterdir():
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    federation.wait_for(lambda: len(federation.online_nodes()) == len(CLIENTS), 600)
    return federation


def _running(deployment: ComposeDeployment, service: str) -> bool:
    name = deployment.container(service)
    result = subprocess.run(
        [deployment.tool.engine, "inspect", "--format", "{{.State.Running}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "true"


def app_dir(path: Path, experiment: Path) -> Path:
    """The Flower app ``flwr run`` bundles: the project's pyproject.toml and the experiment."""
    path.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", path / "pyproject.toml")
    shutil.copy(experiment, path / "exp.toml")  # the FAB carries it to the ServerApp
    return path


def submit(
    cluster: ComposeDeployment, tmp_path: Path, experiment: Path, app: str = "app", **extra: str
) -> int:
    """``flwr run`` of ``experiment``; its run folder lands in ``runs/<test folder>``."""
    config = {"experiment": "exp.toml", "output-dir": f"runs/{tmp_path.name}", **extra}
    return cluster.submit(config, app_dir(tmp_path / app, experiment))


def host_runs(cluster: ComposeDeployment, tmp_path: Path) -> Path:
    """Where the run folders of a test arrive on the host (the mounted ``runs`` volume)."""
    return cluster.compose_dir / "runs" / tmp_path.name


def only_run_dir(output: Path) -> RunDirectory:
    found = [p for p in output.glob("*/*") if (p / "config.json").is_file()]
    assert len(found) == 1, found
    return RunDirectory(found[0])


def reference_rows(cluster: ComposeDeployment, experiment: Path, out: Path) -> list[dict[str, Any]]:
    """The same experiment in-process (``fedmtl simulate --engine inprocess``) in the image.

    No network (nothing is downloaded), one torch thread like the nodes' ``num-threads=1``.
    """
    out.mkdir(parents=True)
    shutil.copy(experiment, out / "exp.toml")
    if os.getuid() == 0:
        os.chown(out, cluster.uid, cluster.gid)
    command = ["fedmtl", "simulate", "/app/ref/exp.toml", "--engine", "inprocess"]
    cluster.run_image(
        [*command, "--output", "/app/ref/runs"],
        mounts={out: "/app/ref"},
        env={"OMP_NUM_THREADS": "1"},
    )
    return eval_rows(only_run_dir(out / "runs"))


def round_seconds(run_dir: RunDirectory) -> dict[int, float]:
    """Wall time of each round: the sum of its phases' ``seconds/<phase>``."""
    out: dict[int, float] = {}
    for row in run_dir.read_metrics():
        phases = {k: v for k, v in row.items() if k.startswith("seconds/")}
        out[row["round"]] = round(sum(phases.values()), 1)
    return out


# --------------------------------------------------------------------------- the image


def test_image_runs_as_app_user_without_test_dependencies(federation: ComposeDeployment) -> None:
    engine = federation.tool.engine
    inspect = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Config.User}}", federation.image],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inspect.stdout.strip() == "app"
    probe = (
        "import importlib.util as u, os, fedmtl; "
        "print(os.getuid(), fedmtl.__version__, fedmtl.__file__, "
        "[m for m in ('pytest', 'ruff', 'mypy', 'grpc_tools') if u.find_spec(m)])"
    )
    result = subprocess.run(
        [engine, "run", "--rm", "--network", "none", federation.image, "python", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    uid, installed_version, path, dev = result.stdout.split(maxsplit=3)
    assert uid == "49999"
    assert installed_version == version("fedmtl")
    assert path.startswith("/opt/fedmtl/"), path  # installed, not a mounted checkout
    assert dev.strip() == "[]", dev


# --------------------------------------------------------------------------- runs


@pytest.mark.timeout(RUN_TIMEOUT + 900)
def test_two_rounds_equal_the_in_process_run(cluster: ComposeDeployment, tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "fedavg", rounds=2, evaluate_every=2)
    started = time.monotonic()
    run_id = submit(cluster, tmp_path, experiment)
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    cluster.timings["fedavg run (2 rounds, submit to finished)"] = round(
        time.monotonic() - started, 1
    )
    assert info["status"] == "finished:completed", (info, cluster.logs("superlink")[-3000:])
    run_dir = only_run_dir(host_runs(cluster, tmp_path))
    for round_, seconds in round_seconds(run_dir).items():
        cluster.timings[f"fedavg round {round_}"] = seconds
    rows = run_dir.read_metrics()
    assert [(r["round"], r["client_id"]) for r in rows] == [(r, c) for r in (1, 2) for c in CLIENTS]
    assert all(r.get("status") != "failed" for r in rows), rows
    assert run_dir.read_summary() is not None and run_dir.checkpoint_rounds() == [1, 2]
    # The run folder came through the volume and belongs to the containers' user, who is the
    # host user (or, when the host user is root, the image's user 49999).
    for path in [run_dir.path, *run_dir.path.rglob("*")]:
        mode = path.stat()
        assert mode.st_uid == cluster.uid, (path, mode.st_uid)
        assert mode.st_mode & stat.S_IRUSR, path
        assert not path.is_dir() or mode.st_mode & stat.S_IXUSR, path
    assert info["network-traffic"]["total-bytes"] > 0
    assert_same_rows(eval_rows(run_dir), reference_rows(cluster, experiment, tmp_path / "ref"))


@pytest.mark.timeout(RUN_TIMEOUT + 900)
def test_fedmuscle_stream_between_containers(cluster: ComposeDeployment, tmp_path: Path) -> None:
    # Clients reach the ServerApp's stream at superlink:9100 (service name, TLS with the
    # SuperLink's certificate), so every client steps on every public batch of both epochs.
    batch = ', schedule = "batch", contrastive_epochs = 2, connect_deadline = 300.0'
    stream = write_experiment(
        tmp_path / "stream.toml", "fedmuscle", 2, 2, batch + ', channel = "stream"'
    )
    run_id = submit(cluster, tmp_path, stream)
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", (info, cluster.logs("superlink")[-3000:])
    run_dir = only_run_dir(host_runs(cluster, tmp_path))
    for row in run_dir.read_metrics():
        assert row["server/fedmuscle/stream_steps"] == 2, row  # 2 epochs of 1 public batch
        assert row["server/fedmuscle/stream_clients"] == 3
        assert row["server/fedmuscle/steps"] == 6  # every client stepped on every batch
        assert row["stream/skipped"] == 0 and row.get("status") != "failed"
    # The same updates as over Flower messages (the in-process engine cannot run a stream).
    flower = write_experiment(tmp_path / "flower.toml", "fedmuscle", 2, 2, batch)
    expected = reference_rows(cluster, flower, tmp_path / "ref")
    for row, ref in zip(eval_rows(run_dir), expected, strict=True):
        for key in (k for k in ref if k.startswith("eval/")):
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (row["round"], key)


# --------------------------------------------------------------------------- faults


RESUMED_LOSS = """
import json, sys, torch
from pathlib import Path
from fedmtl.clients.base import client_algorithm
from fedmtl.clients.session import ClientSession
from fedmtl.config import load_experiment

torch.set_num_threads(1)
experiment, round_ = load_experiment("/app/check/exp.toml"), int(sys.argv[1])
losses = {}
for name in ("snapshot", "fresh"):
    session = ClientSession(experiment, "c", Path("/app/check") / name)
    losses[name] = client_algorithm(experiment, session).train(round_, {}, {}).metrics["train/loss"]
print(json.dumps(losses))
"""


@pytest.mark.timeout(RUN_TIMEOUT + 900)
def test_killed_node_container_is_left_out_then_rejoins_from_its_state(
    cluster: ComposeDeployment, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "local", rounds=4, evaluate_every=4)
    output = host_runs(cluster, tmp_path)
    state_c = cluster.compose_dir / "state" / "c"
    run_id = submit(cluster, tmp_path, experiment)

    def rounds_written() -> int:
        run = [RunDirectory(p) for p in output.glob("*/*") if (p / "metrics.jsonl").exists()]
        return max((r["round"] for r in run[0].read_metrics()), default=0) if run else 0

    cluster.wait_for(lambda: rounds_written() >= 1, RUN_TIMEOUT, interval=0.2)
    cluster.kill("supernode-c")  # dies as round 2 starts
    killed_at = time.monotonic()
    check = tmp_path / "check"
    shutil.copytree(next(state_c.rglob("round-1.safetensors")).parent, check / "snapshot")
    cluster.wait_for(lambda: rounds_written() >= 2, RUN_TIMEOUT)
    detected_after = time.monotonic() - killed_at
    cluster.timings["killed node left out after"] = round(detected_after, 1)
    assert not _running(cluster, "supernode-c")  # no restart policy brought it back early
    cluster.start_service("supernode-c")  # same key, same state volume
    info = cluster.wait_run(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info

    by_round = {(r["round"], r["client_id"]): r for r in only_run_dir(output).read_metrics()}
    # Flower reports the dead node after its heartbeat patience; a and b carry on.
    assert by_round[(2, "c")]["status"] == "failed", by_round[(2, "c")]
    assert detected_after > 20
    assert all(by_round[(2, c)].get("status") != "failed" for c in ("a", "b"))
    assert all(by_round[(r, c)].get("status") != "failed" for r in (1, 3, 4) for c in ("a", "b"))
    assert by_round[(4, "c")].get("status") != "failed" and "eval/loss" in by_round[(4, "c")]

    # Back, c trained from the personal state it had when it died (round 1), not from scratch:
    # its first training after the restart, recomputed in the image from the snapshot.
    assert sorted(p.name for p in (check / "snapshot").glob("round-*")) == ["round-1.safetensors"]
    first = min(r for r in (3, 4) if "train/loss" in by_round.get((r, "c"), {}))
    shutil.copy(experiment, check / "exp.toml")
    (check / "fresh").mkdir()
    if os.getuid() == 0:
        for item in [check, *check.rglob("*")]:
            os.chown(item, cluster.uid, cluster.gid)
    result = cluster.run_image(
        ["python", "-c", RESUMED_LOSS, str(first)], mounts={check: "/app/check"}
    )
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert by_round[(first, "c")]["train/loss"] == pytest.approx(losses["snapshot"], rel=1e-5)
    assert losses["fresh"] != pytest.approx(losses["snapshot"], rel=1e-5)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 900)
def test_server_container_restarted_between_rounds_then_resumed(
    cluster: ComposeDeployment, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path / "exp.toml", "fedavg", rounds=3, evaluate_every=1)
    output = host_runs(cluster, tmp_path)
    run_id = submit(cluster, tmp_path, experiment)
    cluster.wait_for(lambda: any(output.glob("*/*/checkpoints/round-2.safetensors")), RUN_TIMEOUT)
    started = time.monotonic()
    cluster.restart_service("superlink")  # the ServerApp dies with it; the database stays
    cluster.wait_for(lambda: len(cluster.online_nodes()) == len(CLIENTS), 600)
    cluster.timings["superlink restart until nodes online"] = round(time.monotonic() - started, 1)
    assert cluster.run_info(run_id)["status"] != "finished:completed"
    run_dir = only_run_dir(output)
    assert run_dir.read_summary() is None
    assert max(r["round"] for r in run_dir.read_metrics()) == 2

    # The run folder as the ServerApp sees it (cwd /app, runs mounted at /app/runs).
    inside = run_dir.path.relative_to(cluster.compose_dir).as_posix()
    resumed = submit(cluster, tmp_path, experiment, app="resume-app", resume=inside)
    info = cluster.wait_run(resumed, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", (info, cluster.logs("superlink")[-3000:])
    assert only_run_dir(output).path == run_dir.path  # the same folder was continued
    assert run_dir.read_summary() is not None
    assert_same_rows(eval_rows(run_dir), reference_rows(cluster, experiment, tmp_path / "ref"))


# --------------------------------------------------------------------------- teardown


def test_teardown_leaves_no_container_network_or_volume(federation: ComposeDeployment) -> None:
    assert any(federation.leftovers().values())  # the federation exists before ...
    left = federation.down()
    assert left == {"containers": [], "networks": [], "volumes": []}, left  # ... and not after
