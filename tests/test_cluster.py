"""Running on an existing Ray cluster, without one: pool sizing, the checks, state placement.

The pool sizes are hand-computed and also compared with Flower's own
``pool_size_from_resources`` fed the same ``ray.nodes()``; the checks run on fake clusters.
The cluster itself (a head and a second node on loopback) is in test_ray_cluster_e2e.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from fedmtl.cluster import (
    CHECK_STATE_ENV,
    STATE_MARKER,
    RayNode,
    actor_placement,
    actors_per_node,
    check_cluster,
    check_state_root_visible,
    describe_pool,
    live_nodes,
    mark_state_root,
    personal_state_dir,
)
from fedmtl.config import ConfigError, SimulationConfig, parse_experiment
from fedmtl.results import RunDirectory
from tests.helpers import tiny_experiment

HEAD, GPU_BOX, CPU_BOX = "a" * 56, "b" * 56, "c" * 56


def ray_node(
    node_id: str, ip: str, cpus: float, gpus: float = 0, *, head: bool = False, alive: bool = True
) -> dict[str, Any]:
    """One entry of ``ray.nodes()`` as Ray 2.55 returns it (the keys fedmtl and Flower read)."""
    resources: dict[str, float] = {f"node:{ip}": 1.0, "memory": 1e9, "object_store_memory": 1e8}
    if cpus:
        resources["CPU"] = cpus
    if gpus:
        resources["GPU"] = gpus
    if head:
        resources["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "Resources": resources}


# A head with 8 CPUs and 2 GPUs, a GPU box with 16 CPUs and 1 GPU, a CPU box with 4 CPUs.
CLUSTER = [
    ray_node(GPU_BOX, "10.0.0.2", 16, 1),
    ray_node(CPU_BOX, "10.0.0.3", 4),
    ray_node(HEAD, "10.0.0.1", 8, 2, head=True),
]


def sim(cpus: int = 1, gpus: float = 0.0, address: str = "10.0.0.1:6379") -> SimulationConfig:
    return SimulationConfig(num_cpus_per_client=cpus, num_gpus_per_client=gpus, ray_address=address)


def test_live_nodes_drop_dead_and_empty_nodes_and_put_the_head_first() -> None:
    raw = [
        *CLUSTER,
        ray_node("d" * 56, "10.0.0.4", 32, 4, alive=False),  # left the cluster
        {"NodeID": "e" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {}},
    ]
    nodes = live_nodes(raw)
    assert [n.node_id for n in nodes] == [HEAD, GPU_BOX, CPU_BOX]
    assert nodes[0] == RayNode(HEAD, "10.0.0.1", 8.0, 2.0, head=True)
    assert nodes[2] == RayNode(CPU_BOX, "10.0.0.3", 4.0, 0.0)


@pytest.mark.parametrize(
    ("cpus", "gpus", "expected"),
    [
        (1, 0.0, [8, 16, 4]),  # CPUs only: 8/1, 16/1, 4/1
        (3, 0.0, [2, 5, 1]),  # floor(8/3), floor(16/3), floor(4/3)
        (1, 0.5, [4, 2, 0]),  # min(8, 2/0.5), min(16, 1/0.5), no GPU
        (4, 0.25, [2, 4, 0]),  # min(8/4, 2/0.25 = 8), min(16/4, 1/0.25 = 4)
        (1, 1.0, [2, 1, 0]),
        (16, 0.0, [0, 1, 0]),
    ],
)
def test_actors_per_node_by_hand(cpus: int, gpus: float, expected: list[int]) -> None:
    assert actors_per_node(live_nodes(CLUSTER), cpus, gpus) == expected


@pytest.mark.parametrize(
    ("cpus", "gpus"), [(1, 0.0), (3, 0.0), (1, 0.5), (4, 0.25), (2, 0.1), (1, 0.3), (5, 2.0)]
)
def test_the_plan_is_the_pool_flower_builds(
    cpus: int, gpus: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.simulation.ray_transport import ray_actor

    # 0.7 GPU / 0.1 is 6.999… in floats: Flower builds 6 actors there, and so must the plan.
    raw = [*CLUSTER, ray_node("f" * 56, "10.0.0.6", 8, 0.7)]
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: raw)
    resources = {"num_cpus": cpus, "num_gpus": gpus}
    try:
        flower = ray_actor.pool_size_from_resources(resources)
    except ValueError:  # Flower's "ActorPool is empty"
        flower = 0
    assert sum(actors_per_node(live_nodes(raw), cpus, gpus)) == flower


def test_a_cluster_that_fits_returns_the_actors_per_node() -> None:
    counts = check_cluster(live_nodes(CLUSTER), sim(2, 0.5), clients=10, device="auto")
    assert counts == [4, 2, 0]  # min(8/2, 2/0.5), min(16/2, 1/0.5), no GPU


@pytest.mark.parametrize(
    ("simulation", "device", "field", "words"),
    [
        (
            sim(cpus=17),
            "auto",
            "simulation.num_cpus_per_client",
            ["17 CPUs", "more than 16", "CPU"],
        ),
        (
            sim(gpus=3.0),
            "auto",
            "simulation.num_gpus_per_client",
            ["3.0 GPUs", "more than 2", "GPU"],
        ),
        # each alone fits (16 CPUs on the GPU box, 2 GPUs on the head) but no node has both
        (sim(cpus=12, gpus=2.0), "auto", "simulation.num_cpus_per_client", ["both", "CPU and GPU"]),
    ],
)
def test_requests_no_node_can_hold_name_the_field_and_the_resource(
    simulation: SimulationConfig, device: str, field: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_cluster(live_nodes(CLUSTER), simulation, clients=3, device=device)
    message = str(caught.value)
    assert message.startswith(f"{field}: ")
    assert "the Ray cluster at 10.0.0.1:6379" in message
    for word in words:
        assert word in message, message


def test_gpu_requests_on_a_cpu_cluster() -> None:
    cpu_only = live_nodes([ray_node(HEAD, "10.0.0.1", 8, head=True), CLUSTER[1]])
    with pytest.raises(ConfigError, match=r"^simulation\.num_gpus_per_client: 0\.5 GPU .* no GPU"):
        check_cluster(cpu_only, sim(gpus=0.5), clients=2, device="auto")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' but .* has no GPU \(resource GPU\)"):
        check_cluster(cpu_only, sim(gpus=0.0), clients=2, device="cuda")
    with pytest.raises(ConfigError, match=r"^simulation\.ray_address: .* no live node"):
        check_cluster([], sim(), clients=2, device="auto")


def test_fedmuscle_stream_needs_every_client_at_once_on_this_machine() -> None:
    nodes = live_nodes(CLUSTER)
    # 1 CPU each: 8 + 16 + 4 = 28 actors; 29 clients cannot all hold one at once
    assert sum(check_cluster(nodes, sim(), clients=28, device="auto", all_at_once=True)) == 28
    with pytest.raises(ConfigError, match=r"all 29 clients at once, but .* holds 28 actors"):
        check_cluster(nodes, sim(), clients=29, device="auto", all_at_once=True)
    with pytest.raises(
        ConfigError, match=r"^algorithm\.channel: .*\['10\.0\.0\.2', '10\.0\.0\.3'\]"
    ):
        check_cluster(
            nodes, sim(), clients=3, device="auto", all_at_once=True, driver_ip="10.0.0.1"
        )
    one_machine = live_nodes([ray_node(HEAD, "10.0.0.1", 4, head=True)])
    check_cluster(
        one_machine, sim(), clients=3, device="auto", all_at_once=True, driver_ip="10.0.0.1"
    )


def test_describe_pool_and_placement() -> None:
    nodes = live_nodes(CLUSTER)
    assert describe_pool(nodes, [4, 2, 0]) == (
        "6 actors: 4 on node aaaaaaaaaaaa (10.0.0.1, head), 2 on node bbbbbbbbbbbb (10.0.0.2)"
    )
    table = [
        {"ActorClassName": "ClientAppActor", "State": "ALIVE", "Address": {"NodeID": GPU_BOX}},
        {"ActorClassName": "ClientAppActor", "State": "ALIVE", "Address": {"NodeID": HEAD}},
        {"ActorClassName": "ClientAppActor", "State": "ALIVE", "Address": {"NodeID": GPU_BOX}},
        {"ActorClassName": "ClientAppActor", "State": "DEAD", "Address": {"NodeID": CPU_BOX}},
        {"ActorClassName": "SomethingElse", "State": "ALIVE", "Address": {"NodeID": CPU_BOX}},
        {"ActorClassName": "ClientAppActor", "State": "ALIVE",
         "Address": {"NodeID": "9" * 56, "IPAddress": "10.0.0.9"}},  # joined after the plan
    ]  # fmt: skip
    hosts, counts = actor_placement(table, nodes)
    assert [h.node_id for h in hosts] == [HEAD, "9" * 56, GPU_BOX] and counts == [1, 1, 2]
    assert describe_pool(hosts, counts, verb=" ran") == (
        "4 actors ran: 1 on node aaaaaaaaaaaa (10.0.0.1, head), 1 on node 999999999999 "
        "(10.0.0.9), 2 on node bbbbbbbbbbbb (10.0.0.2)"
    )


def test_the_file_and_the_flag_check_the_address(tmp_path: Path) -> None:
    data = tiny_experiment().model_dump(mode="json")
    data["simulation"]["ray_address"] = "head-node"  # no port
    with pytest.raises(ConfigError, match=r"simulation\.ray_address: 'head-node' is not"):
        parse_experiment(data)
    for good in ("auto", "10.0.0.1:6379", "ray://head:10001"):
        data["simulation"]["ray_address"] = good
        assert parse_experiment(data).simulation.ray_address == good

    from fedmtl.cli import build_parser, main

    config = str(Path(__file__).parent / "data" / "tiny.toml")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["simulate", config, "--ray-address", "ray://head"])
    assert exited.value.code == 2
    args = build_parser().parse_args(["simulate", config, "--ray-address", "local"])
    assert isinstance(args, argparse.Namespace) and args.ray_address == "local"
    with pytest.raises(SystemExit) as exited:
        main(["simulate", config, "--engine", "inprocess", "--ray-address", "auto"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--resume", str(tmp_path), "--state-root", str(tmp_path)])
    assert exited.value.code == 2


def test_backend_config_names_the_cluster_and_no_resources() -> None:
    from fedmtl.simulation import backend_config

    experiment = tiny_experiment()
    private = backend_config(experiment)["init_args"]
    assert private["address"] == "local" and private["num_cpus"] >= 1
    on_cluster = experiment.model_copy(update={"simulation": sim(2, 0.5)})
    config = backend_config(on_cluster)  # no local GPU check: the GPUs are the cluster's
    assert config == {
        "client_resources": {"num_cpus": 2, "num_gpus": 0.5},
        "init_args": {"address": "10.0.0.1:6379", "logging_level": "ERROR", "log_to_driver": True},
    }
    over_client = experiment.model_copy(update={"simulation": sim(address="ray://head:10001")})
    assert backend_config(over_client)["init_args"] == {"address": "ray://head:10001"}


def test_a_cluster_that_cannot_run_the_file_exits_2_before_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    import fedmtl.simulation as simulation
    from fedmtl.cli import main

    started: list[dict[str, Any]] = []
    monkeypatch.setattr(simulation, "_start_ray", started.append)  # "connected"
    monkeypatch.setattr(ray, "nodes", lambda: [ray_node(HEAD, "10.0.0.1", 2, head=True)])
    config = tmp_path / "exp.toml"
    text = (Path(__file__).parent / "data" / "tiny.toml").read_text()
    config.write_text(text + "\n[simulation]\nnum_cpus_per_client = 4\n")
    out = tmp_path / "runs"
    code = main(["simulate", str(config), "--output", str(out), "--ray-address", "10.0.0.1:6379"])
    assert code == 2
    assert started and started[0]["init_args"]["address"] == "10.0.0.1:6379"
    printed = " ".join(capsys.readouterr().out.split())
    assert "simulation.num_cpus_per_client: 4 CPUs per client" in printed
    assert "more than 2 (resource CPU)" in printed
    assert not out.exists()  # refused before the run folder


def test_personal_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = Path("runs/tiny/20260101-120000-fedavg")  # relative, as --output runs gives
    assert personal_state_dir(run, None) == tmp_path / run / "clients"
    assert personal_state_dir(run, "shared") == tmp_path / "shared/tiny/20260101-120000-fedavg"
    assert personal_state_dir(run, "/mnt/nfs/state") == Path(
        "/mnt/nfs/state/tiny/20260101-120000-fedavg"
    )


def test_a_fresh_run_never_reuses_another_runs_state(tmp_path: Path) -> None:
    from fedmtl.simulation import state_dir_for

    shared = tmp_path / "shared"
    experiment = tiny_experiment().model_copy(
        update={"simulation": SimulationConfig(state_root=str(shared))}
    )
    run = RunDirectory.create(tmp_path / "runs", experiment)
    directory = state_dir_for(experiment, run, resume=False)
    assert directory == str(shared / "tiny" / run.path.name)
    assert not Path(directory).exists()  # private Ray: no marker needed, nothing written
    Path(directory).mkdir(parents=True)
    assert state_dir_for(experiment, run, resume=True) == directory  # resume finds it
    with pytest.raises(ConfigError, match=r"^simulation\.state_root: .* another run's"):
        state_dir_for(experiment, run, resume=False)
    on_cluster = experiment.model_copy(
        update={"simulation": SimulationConfig(state_root=str(shared), ray_address="auto")}
    )
    state_dir_for(on_cluster, run, resume=True)
    assert (Path(directory) / STATE_MARKER).is_file()


def test_a_client_that_cannot_see_the_state_folder_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp (in process): without the marker every client fails."""
    from fedmtl.strategies.loop import FederationFailed
    from tests.helpers import run_in_process

    with pytest.raises(RuntimeError, match=r"not visible on this machine"):
        check_state_root_visible(tmp_path)
    experiment = tiny_experiment(rounds=1)
    monkeypatch.setenv(CHECK_STATE_ENV, "1")
    with pytest.raises(FederationFailed, match=r"personal-state folder .*clients is not visible"):
        run_in_process(experiment, tmp_path / "unseen")
    run = RunDirectory.create(tmp_path / "seen", experiment)
    mark_state_root(run.clients_dir)
    run_dir, _ = run_in_process(experiment, tmp_path / "seen", run_dir=run)
    rows = run_dir.read_metrics()
    assert len(rows) == 3 and all(r.get("status") != "failed" for r in rows), rows


def test_tidy_removes_a_state_folder_outside_the_run(tmp_path: Path) -> None:
    from fedmtl.server_app import tidy_client_state

    run = RunDirectory(tmp_path / "runs" / "tiny" / "r1")
    run.path.mkdir(parents=True)
    (run.path / "metrics.jsonl").write_bytes(b"x" * 10)
    state = tmp_path / "shared" / "tiny" / "r1"
    (state / "a").mkdir(parents=True)
    (state / "a" / "round-1.safetensors").write_bytes(b"y" * 100)
    mark_state_root(state)
    marker = len((state / STATE_MARKER).read_bytes())
    disk = tidy_client_state(run, keep=False, clients=state)
    assert disk["client_state_bytes"] == 100 + marker and disk["run_bytes"] == 10
    assert not state.exists() and not state.parent.exists()  # <root>/tiny was left empty
    assert (tmp_path / "shared").is_dir()  # the root itself is the user's


def test_an_address_where_no_head_listens_exits_2_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    import ray

    from fedmtl.cli import main

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # free once the with-block ends: nothing listens
    config = str(Path(__file__).parent / "data" / "tiny.toml")
    started = time.monotonic()
    code = main(
        ["simulate", config, "--output", str(tmp_path), "--ray-address", f"127.0.0.1:{port}"]
    )
    assert code == 2 and time.monotonic() - started < 60  # Ray alone retried for minutes
    printed = " ".join(capsys.readouterr().out.split())
    assert f"simulation.ray_address: nothing answers at 127.0.0.1:{port}" in printed
    assert not ray.is_initialized() and list(tmp_path.iterdir()) == []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))  # no `ray start` address file
    assert main(["simulate", config, "--output", str(tmp_path), "--ray-address", "auto"]) == 2
    assert "'auto' found no Ray cluster" in " ".join(capsys.readouterr().out.split())
