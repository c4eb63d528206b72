"""A real Ray cluster on loopback: a head and a second node, each one CPU, started by the test.

fedmtl connects to it (it starts no Ray), Flower's pool puts one actor on each node, the run is
stopped after round 1 and resumed through the CLI on the same cluster, and its metrics equal a
private-Ray run of the same experiment. Where each message ran is recorded independently of
fedmtl's own report: a recording ClientApp in front of fedmtl's writes each message's Ray node
id (``ray.get_runtime_context().get_node_id()``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmtl.client_app import app as fedmtl_app
from fedmtl.cluster import STATE_MARKER
from fedmtl.config import load_experiment
from fedmtl.messages import CONFIG, STATE_ROOT
from fedmtl.results import RunDirectory
from tests.helpers import StopAfter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

# --------------------------------------------------------------------------- recording app

recording_app = ClientApp()


def _recorded(msg: Message, context: Context) -> Message:
    """Note which Ray node runs this message, then let fedmtl's ClientApp answer it."""
    import ray

    root = Path(str(msg.content[CONFIG][STATE_ROOT]))
    line = {
        "node": ray.get_runtime_context().get_node_id(),
        "partition": int(context.node_config["partition-id"]),
        "type": msg.metadata.message_type,
    }
    with open(root / f".placement-{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")  # one file per actor process: no shared appends
    return fedmtl_app(msg, context)


recording_app.query("describe")(_recorded)
recording_app.train()(_recorded)
recording_app.evaluate()(_recorded)

# --------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ray_start(args: list[str], temp_dir: str, cwd: Path, resource: str) -> subprocess.Popen[str]:
    """One Ray node in the foreground (``--block``), in its own process group we own.

    Its own agent and metrics ports: two nodes on one machine must not share them. Its own
    working directory: a worker resolves relative paths there, not in the driver's.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [
        RAY, "start", *args, "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
        f"--temp-dir={temp_dir}", f"--resources={json.dumps({resource: 1})}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]  # fmt: skip
    log = open(cwd / "ray-start.log", "w")  # the child holds it; closed when it exits
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM the node's process group (``ray start --block`` stops its daemons), then KILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A head (resource ``node_a``) and a second node (``node_b``) on 127.0.0.1:<port>.

    Yields ``address`` and ``nodes`` (``node_a``/``node_b`` → Ray node id, read from the
    cluster by their custom resources). Both nodes are stopped by their PIDs at the end, and
    no process carrying this cluster's temp dir may outlive the test.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are bounded
    port = _free_port()
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    head = _ray_start(["--head", f"--port={port}", "--include-dashboard=false"], temp_dir,
                      tmp_path / "head-cwd", "node_a")  # fmt: skip
    processes = [head]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (tmp_path / "head-cwd" / "ray-start.log").read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the Ray head never listened"
            time.sleep(0.5)
        processes.append(
            _ray_start([f"--address={address}"], temp_dir, tmp_path / "worker-cwd", "node_b")
        )
        ray.init(address=address, logging_level="ERROR")
        try:
            while True:
                alive = [n for n in ray.nodes() if n["Alive"]]
                if len(alive) == 2:
                    break
                assert time.monotonic() < deadline, f"the second node never joined: {alive}"
                time.sleep(0.5)
            nodes = {
                name: n["NodeID"] for n in alive for name in ("node_a", "node_b")
                if name in n["Resources"]
            }  # fmt: skip
        finally:
            ray.shutdown()  # a driver of its own: the test's connection must not be fedmtl's
        print(f"cluster of 2 nodes up in {time.monotonic() - started:.1f} s: {nodes}")
        yield {"address": address, "nodes": nodes, "temp_dir": temp_dir}
    finally:
        for process in reversed(processes):
            _stop(process)
        time.sleep(2)  # raylets exit asynchronously after their parent
        leftover = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
        for pid in leftover.stdout.split():
            os.kill(int(pid), signal.SIGKILL)  # ours: its command line names our temp dir
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert leftover.stdout == "", f"Ray processes outlived the cluster: {leftover.stdout}"


# --------------------------------------------------------------------------- the test


def _metric_rows(run_dir: RunDirectory) -> dict[tuple[int, str], dict[str, float]]:
    """Numeric values of each (round, client) row, without timings."""
    rows = {}
    for row in run_dir.read_metrics():
        values = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and "seconds" not in k and k != "round"
        }
        rows[(row["round"], row["client_id"])] = values
    return rows


@pytest.mark.timeout(900)
def test_a_run_spreads_over_the_clusters_nodes_resumes_there_and_matches_private_ray(
    ray_cluster: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmtl.simulation import connect, simulate

    address, nodes = ray_cluster["address"], ray_cluster["nodes"]
    base = load_experiment(ROOT / "tests" / "data" / "tiny.toml")
    shared = tmp_path / "shared-state"
    on_cluster = base.model_copy(
        update={
            "simulation": base.simulation.model_copy(
                update={"ray_address": address, "state_root": str(shared)}
            )
        }
    )

    # 1. Connect: one 1-CPU actor fits on each 1-CPU node.
    started = time.monotonic()
    connection = connect(on_cluster)
    assert connection.address == address
    assert {n.node_id for n in connection.nodes} == set(nodes.values())
    assert connection.actors == [1, 1]
    print("\n".join(connection.lines()))
    run_dir = RunDirectory.create(tmp_path / "runs", on_cluster)

    # 2. Round 1 on the cluster, then the server stops (as if killed), through the recording app.
    monkeypatch.setattr("fedmtl.client_app.app", recording_app)
    with pytest.raises(StopAfter.Stopped):  # Flower re-raises the ServerApp's error
        simulate(on_cluster, run_dir, observer=StopAfter(1), connection=connection)
    monkeypatch.undo()
    first_seconds = time.monotonic() - started
    assert run_dir.checkpoint_rounds() == [1]
    state = shared / "tiny-e2e" / run_dir.path.name
    assert (state / STATE_MARKER).is_file() and not run_dir.clients_dir.exists()
    assert (
        sorted(p.name for p in state.glob("*/round-1.safetensors")) == ["round-1.safetensors"] * 3
    )
    # fedmtl's report of where its actors ran: one on each node
    assert connection.placement is not None
    hosts, counts = connection.placement
    assert {h.node_id: c for h, c in zip(hosts, counts)} == {nodes["node_a"]: 1, nodes["node_b"]: 1}
    placement_line = connection.placement_line()
    print(placement_line)
    # the recording app's independent account: messages ran on both nodes
    recorded = [
        json.loads(line)
        for path in state.glob(".placement-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(recorded) == 3 * 3  # describe, train, evaluate for 3 clients
    by_node: dict[str, list[str]] = {}
    for entry in recorded:
        by_node.setdefault(entry["node"], []).append(f"{entry['type']}:{entry['partition']}")
    print("messages per node:", {node[:12]: sorted(m) for node, m in by_node.items()})
    assert set(by_node) == set(nodes.values())

    # 3. Resume through the CLI: config.json names the cluster, so it resumes there.
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COLUMNS="200", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    resumed = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "simulate", "--resume", str(run_dir.path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=400,
    )
    resume_seconds = time.monotonic() - started
    output = resumed.stdout
    assert resumed.returncode == 0, output[-3000:] + resumed.stderr[-3000:]
    print(output[-1500:])
    assert f"connected to the Ray cluster at {address}; fedmtl will not start or stop it" in output
    assert (
        f"Ray: pool of 2 actors: 1 on node {nodes['node_a'][:12]} (" in output
        and f"1 on node {nodes['node_b'][:12]} (" in output
    )
    ran = [line for line in output.splitlines() if "actors ran" in line]
    assert len(ran) == 1 and nodes["node_a"][:12] in ran[0] and nodes["node_b"][:12] in ran[0]
    assert run_dir.is_finished()
    assert not state.exists()  # the finished run's state went, as <run>/clients would

    # 4. The same experiment on a private Ray instance (the cluster still up: not joined).
    started = time.monotonic()
    private_dir = simulate(base, RunDirectory.create(tmp_path / "private", base))
    private_seconds = time.monotonic() - started
    cluster_rows, private_rows = _metric_rows(run_dir), _metric_rows(private_dir)
    assert (
        set(cluster_rows) == set(private_rows) == {(r, c) for r in (1, 2) for c in ("a", "b", "c")}
    )
    largest = 0.0
    for key, values in private_rows.items():
        assert set(cluster_rows[key]) == set(values), key
        for name, value in values.items():
            difference = abs(cluster_rows[key][name] - value)
            assert difference <= 1e-5 or (
                math.isnan(value) and math.isnan(cluster_rows[key][name])
            ), (key, name)
            largest = max(largest, difference)
    print(
        f"cluster: round 1 {first_seconds:.1f} s, resume {resume_seconds:.1f} s; private run "
        f"{private_seconds:.1f} s; {sum(len(v) for v in private_rows.values())} values, "
        f"largest difference {largest:.3g}"
    )
