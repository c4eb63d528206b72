"""FedMuscle's gRPC stream: the phase against real clients, security, failures, equivalence."""

from __future__ import annotations

import filecmp
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedmtl.client_app import app
from fedmtl.config import ConfigError, parse_experiment
from fedmtl.deploy.credentials import write_certificates
from fedmtl.messages import TensorSpec
from fedmtl.simulation import backend_config
from fedmtl.stream.client import StreamClient, StreamRefused, StreamTicket, StreamUnreachable
from fedmtl.stream.server import ExchangeServer, StreamEndpoint, StreamPhase
from fedmtl.stream.wire import representation_bytes
from fedmtl.testing import FakeGrid
from tests.test_fedmuscle import CLIENTS, final_state, muscle_experiment, run

ROOT = Path(__file__).resolve().parents[1]
B, D = 4, 8
TOKENS = {"a": "token-a", "b": "token-b", "c": "token-c"}


def others_payload(step: int, reps: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Each client gets the others' Z stacked in name order (a payload easy to check by hand)."""
    return {c: {"peers": torch.stack([reps[p] for p in sorted(reps) if p != c])} for c in reps}


def z_of(client: str, step: int) -> torch.Tensor:
    """A distinct, deterministic, normalised Z per client and step."""
    seed = 1000 * step + sum(map(ord, client))
    return F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


class Harness:
    """An ExchangeServer with one phase running in a thread, and tickets for clients."""

    def __init__(
        self,
        steps: int,
        *,
        batch_deadline: float = 20.0,
        connect_deadline: float = 20.0,
        endpoint: StreamEndpoint | None = None,
        tokens: Mapping[str, str] = TOKENS,
        build: Callable[..., Any] = others_payload,
    ) -> None:
        self.endpoint = endpoint or StreamEndpoint(port=0)
        limit = representation_bytes(B, D)
        self.server = ExchangeServer(
            self.endpoint, max_receive=limit, max_send=10 * limit, max_clients=len(tokens)
        )
        self.phase = StreamPhase(
            1,
            tokens,
            [TensorSpec((B, D), "float32")] * steps,
            build,
            batch_deadline=batch_deadline,
            connect_deadline=connect_deadline,
        )
        self.server.phase = self.phase
        self.thread = threading.Thread(target=self.phase.run, daemon=True)
        self.thread.start()

    def ticket(self, client: str, *, token: str | None = None, address: str | None = None,
               ca: bytes | None = None) -> StreamTicket:  # fmt: skip
        limit = representation_bytes(B, D)
        return StreamTicket(
            address=address or self.server.address,
            token=token if token is not None else TOKENS[client],
            ca_pem=ca if ca is not None else self.endpoint.ca_pem(),
            connect_deadline=5.0,
            batch_deadline=5.0,
            max_receive=10 * limit,
            max_send=10 * limit,
        )

    def finish(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the phase did not end"
        self.server.stop()


def run_client(
    harness: Harness,
    client: str,
    steps: int,
    results: dict[str, dict[int, Any]],
    z: Callable[[str, int], torch.Tensor] = z_of,
) -> None:
    """A well-behaved client: send Z for every step it is told to, record what comes back."""
    with StreamClient(harness.ticket(client), client, 1) as stream:
        step = stream.connect(5.0)
        while step < steps:
            payload, step_next = stream.exchange(step, z(client, step))
            results.setdefault(client, {})[step] = payload
            step = step_next


def start_clients(harness: Harness, clients: list[str], steps: int, **kwargs: Any) -> tuple[
    list[threading.Thread], dict[str, dict[int, Any]]
]:  # fmt: skip
    results: dict[str, dict[int, Any]] = {}
    threads = [
        threading.Thread(target=run_client, args=(harness, c, steps, results), kwargs=kwargs)
        for c in clients
    ]
    for thread in threads:
        thread.start()
    return threads, results


def join(threads: list[threading.Thread], timeout: float = 30.0) -> None:
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive()


# --------------------------------------------------------------------------- the phase


def test_every_step_answers_each_client_with_the_others_representations() -> None:
    harness = Harness(steps=3)
    threads, results = start_clients(harness, ["a", "b", "c"], 3)
    join(threads)
    harness.finish()
    for client in "abc":
        assert sorted(results[client]) == [0, 1, 2]
        for step in range(3):
            expected = torch.stack([z_of(p, step) for p in "abc" if p != client])
            assert torch.equal(results[client][step]["peers"], expected)
    report = harness.phase.report
    assert (report.steps, report.rejected, report.late, report.missed) == (3, 0, 0, 0)
    assert report.connected == {"a", "b", "c"}


def test_wrong_token_is_refused_before_any_tensor_is_read() -> None:
    harness = Harness(steps=1, connect_deadline=3.0)
    stream = StreamClient(harness.ticket("a", token="forged"), "a", 1)
    with pytest.raises(StreamRefused, match=r"UNAUTHENTICATED.*invalid token"):
        stream.connect(5.0)
    stream.close()
    # A valid token of another client is no better.
    stream = StreamClient(harness.ticket("a", token=TOKENS["b"]), "a", 1)
    with pytest.raises(StreamRefused, match="UNAUTHENTICATED"):
        stream.connect(5.0)
    stream.close()
    # Nor is the right token for another round.
    stream = StreamClient(harness.ticket("a"), "a", 2)
    with pytest.raises(StreamRefused, match=r"FAILED_PRECONDITION.*round 2"):
        stream.connect(5.0)
    stream.close()
    harness.finish()
    assert harness.phase.report.connected == set()
    assert harness.phase.report.unreachable  # nobody got in


def test_tls_is_required_when_configured(tmp_path: Path) -> None:
    write_certificates(tmp_path / "certs", ["localhost"])
    other = write_certificates(tmp_path / "other", ["localhost"])
    endpoint = StreamEndpoint.from_certs_dir(tmp_path / "certs", address="localhost")
    assert endpoint.tls
    harness = Harness(steps=1, endpoint=endpoint, tokens={"a": "token-a", "b": "token-b"})
    plain = StreamClient(harness.ticket("a", ca=b""), "a", 1)
    assert plain.root_certificates is None
    with pytest.raises(StreamUnreachable, match="plaintext"):
        plain.connect(2.0)
    plain.close()
    stranger = StreamClient(harness.ticket("a", ca=other.ca_cert.read_bytes()), "a", 1)
    with pytest.raises(StreamUnreachable, match="TLS"):
        stranger.connect(2.0)  # a server its CA did not sign is not trusted
    stranger.close()
    assert harness.phase.report.connected == set()
    threads, results = start_clients(harness, ["a", "b"], 1)
    join(threads)
    harness.finish()
    assert torch.equal(results["a"][0]["peers"][0], z_of("b", 0))


def test_malformed_tensors_are_rejected_and_the_client_rejoins_next_step() -> None:
    harness = Harness(steps=3)

    def bad_at_step_1(client: str, step: int) -> torch.Tensor:
        if client == "c" and step == 1:
            return torch.full((B, D), float("nan"))
        if client == "c" and step == 2:
            return torch.zeros(B + 1, D)  # wrong shape
        return z_of(client, step)

    threads, results = start_clients(harness, ["a", "b", "c"], 3, z=bad_at_step_1)
    join(threads)
    harness.finish()
    assert results["c"][1] is None and results["c"][2] is None  # answered with a skip
    for step in (1, 2):  # a and b got each other only
        assert torch.equal(results["a"][step]["peers"], z_of("b", step)[None])
    assert torch.equal(results["a"][0]["peers"][1], z_of("c", 0))
    assert harness.phase.report.rejected == 2


def test_oversized_frame_is_refused_by_the_size_bound() -> None:
    harness = Harness(steps=2, batch_deadline=3.0)

    def huge(client: str, step: int) -> torch.Tensor:
        return torch.zeros(64 * B, D) if client == "c" else z_of(client, step)

    results: dict[str, dict[int, Any]] = {}
    good = [threading.Thread(target=run_client, args=(harness, c, 2, results)) for c in ("a", "b")]
    for thread in good:
        thread.start()
    with StreamClient(harness.ticket("c"), "c", 1) as stream, pytest.raises(Exception):  # noqa: B017
        stream.connect(5.0)
        stream.exchange(0, huge("c", 0))
    join(good)
    harness.finish()
    assert "c" not in results
    assert torch.equal(results["a"][1]["peers"], z_of("b", 1)[None])


def test_client_missing_the_deadline_is_left_out_and_catches_up() -> None:
    harness = Harness(steps=4, batch_deadline=1.0)

    def slow(client: str, step: int) -> torch.Tensor:
        if client == "c" and step == 1:
            time.sleep(1.5)  # misses step 1's deadline, sends during step 2
        return z_of(client, step)

    threads, results = start_clients(harness, ["a", "b", "c"], 4, z=slow)
    join(threads)
    harness.finish()
    assert torch.equal(results["a"][1]["peers"], z_of("b", 1)[None])  # step 1 went on without c
    assert results["c"][1] is None  # its late Z was answered with a skip and the open step
    assert sorted(results["c"]) == [0, 1, 2, 3]
    for step in (2, 3):  # c caught up and took part again
        assert torch.equal(results["a"][step]["peers"], torch.stack([z_of("b", step),
                                                                     z_of("c", step)]))  # fmt: skip
    assert (harness.phase.report.late, harness.phase.report.missed) == (1, 1)


def test_reconnecting_client_rejoins_at_the_current_step() -> None:
    harness = Harness(steps=8, batch_deadline=10.0)

    def paced(client: str, step: int) -> torch.Tensor:
        time.sleep(0.25)  # the phase lasts about 2 s
        return z_of(client, step)

    threads, results = start_clients(harness, ["a", "b"], 8, z=paced)
    stream = StreamClient(harness.ticket("c"), "c", 1)
    assert stream.connect(5.0) == 0
    payload, _ = stream.exchange(0, z_of("c", 0))
    assert payload is not None
    stream.close()  # the connection drops; the others go on without waiting for c
    time.sleep(0.5)
    again = StreamClient(harness.ticket("c"), "c", 1)
    step = again.connect(5.0)
    assert 1 <= step < 8  # rejoined where the server is, not at 0
    payload, _ = again.exchange(step, z_of("c", step))
    again.close()
    join(threads)
    harness.finish()
    assert harness.phase.report.reconnects == 1
    assert payload is not None
    assert torch.equal(payload["peers"], torch.stack([z_of("a", step), z_of("b", step)]))
    assert torch.equal(results["a"][step]["peers"], torch.stack([z_of("b", step),
                                                                 z_of("c", step)]))  # fmt: skip


PEER_SCRIPT = """
import sys, time, torch
from fedmtl.stream.client import StreamClient, StreamTicket
from tests.test_stream import z_of
ticket = StreamTicket(sys.argv[1], "token-c", None, 5.0, 5.0, 1 << 20, 1 << 20)
stream = StreamClient(ticket, "c", 1)
step = stream.connect(5.0)
while True:
    payload, step = stream.exchange(step, z_of("c", step))
    print(step, flush=True)
    if step == 2:
        time.sleep(60)  # killed here
"""


def test_client_killed_mid_phase_does_not_stall_the_others() -> None:
    harness = Harness(steps=5, batch_deadline=60.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT, harness.server.address],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    threads, results = start_clients(harness, ["a", "b"], 5)
    try:
        assert peer.stdout is not None
        while peer.stdout.readline().strip() != "2":
            assert peer.poll() is None, "the peer process ended early"
        start = time.monotonic()
        os.killpg(peer.pid, signal.SIGKILL)
        join(threads, timeout=50)
        # The others did not wait out the 60 s deadline for the dead client.
        assert time.monotonic() - start < 45
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
        peer.wait()
    harness.finish()
    assert torch.equal(results["a"][0]["peers"][1], z_of("c", 0))  # c took part before
    assert torch.equal(results["a"][4]["peers"], z_of("b", 4)[None])  # and not after


# --------------------------------------------------------------------------- configuration


def test_endpoint_reads_the_run_config(tmp_path: Path) -> None:
    endpoint = StreamEndpoint.from_run_config(
        {"stream-address": "server.lan", "stream-port": 0, "stream-certfile": ""}, 9100
    )
    assert (endpoint.bind, endpoint.port, endpoint.tls) == ("0.0.0.0", 9100, False)
    assert endpoint.announced(9100) == "server.lan:9100"
    assert StreamEndpoint(address="nat.example:19100").announced(9100) == "nat.example:19100"
    assert StreamEndpoint().announced(5555) == "127.0.0.1:5555"
    assert StreamEndpoint(address="::1").announced(9100) == "[::1]:9100"
    assert StreamEndpoint(address="[::1]:9200").announced(9100) == "[::1]:9200"
    with pytest.raises(ValueError, match="together"):
        StreamEndpoint.from_run_config({"stream-certfile": "server.pem"}, 9100)


def test_stream_needs_the_batch_schedule() -> None:
    data = muscle_experiment().model_dump(mode="json")
    data["algorithm"].update({"channel": "stream", "schedule": "epoch"})
    with pytest.raises(ConfigError, match="schedule"):
        parse_experiment(data)


def test_simulation_gives_every_stream_client_an_actor() -> None:
    experiment = muscle_experiment(schedule="batch", channel="stream")
    config = backend_config(experiment)
    cpus = os.cpu_count() or 1
    assert config["init_args"]["num_cpus"] == max(cpus, len(CLIENTS))
    plain = backend_config(muscle_experiment(schedule="batch"))
    assert plain["init_args"]["num_cpus"] == cpus


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    target = tmp_path / "out"
    target.mkdir()
    proto = "fedmtl/proto/muscle_stream.proto"
    args = ["protoc", "-I", str(ROOT), f"--python_out={target}", f"--pyi_out={target}",
            f"--grpc_python_out={target}", str(ROOT / proto)]  # fmt: skip
    assert protoc.main(args) == 0
    for name in ("muscle_stream_pb2.py", "muscle_stream_pb2.pyi", "muscle_stream_pb2_grpc.py"):
        generated = target / "fedmtl" / "proto" / name
        assert filecmp.cmp(generated, ROOT / "fedmtl" / "proto" / name, shallow=False), (
            f"{name} is stale: run `make proto`"
        )


# --------------------------------------------------------------------------- end to end


def stream_grid(experiment: Any) -> FakeGrid:
    return FakeGrid(app, len(experiment.clients), concurrent={"train.align"})


def server_rows(run_dir: Any) -> list[dict[str, Any]]:
    return [row for row in run_dir.read_metrics() if row["client_id"] == CLIENTS[0]]


def test_stream_gives_the_same_client_updates_as_flower_messages(tmp_path: Path) -> None:
    common = {"schedule": "batch", "contrastive_epochs": 2}
    flower = muscle_experiment(rounds=2, **common)
    flower_dir, _, _ = run(flower, tmp_path / "flower")
    stream = muscle_experiment(rounds=2, channel="stream", stream_port=0, **common)
    stream_dir, grid, _ = run(stream, tmp_path / "stream", grid=stream_grid(stream))
    kinds = [m.metadata.message_type for m in grid.sent]
    # One align message per client and round opens the phase; no represent messages.
    assert kinds.count("train.align") == 2 * len(CLIENTS)
    assert "query.represent" not in kinds
    rows = zip(server_rows(flower_dir), server_rows(stream_dir), strict=True)
    for row_flower, row_stream in rows:
        assert row_stream["server/fedmuscle/stream_steps"] == 4  # 2 epochs × 2 batches
        assert row_stream["server/fedmuscle/steps"] == row_flower["server/fedmuscle/steps"] == 12
        assert row_stream["server/fedmuscle/align_loss"] == pytest.approx(
            row_flower["server/fedmuscle/align_loss"], rel=1e-6
        )
    for client in CLIENTS:
        expected, got = final_state(flower_dir, client), final_state(stream_dir, client)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key  # bit-identical on a CPU


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_port_in_use_falls_back_to_flower_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock, port = _busy_port()
    try:
        experiment = muscle_experiment(schedule="batch", channel="stream", stream_port=port)
        with caplog.at_level(logging.WARNING, logger="fedmtl.server"):
            run_dir, _, _ = run(experiment, tmp_path / "stream", grid=stream_grid(experiment))
    finally:
        sock.close()
    assert f"port {port} cannot be opened" in caplog.text
    assert "falling back to Flower messages" in caplog.text
    flower_dir, _, _ = run(muscle_experiment(schedule="batch"), tmp_path / "flower")
    for client in CLIENTS:
        expected, got = final_state(flower_dir, client), final_state(run_dir, client)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_unreachable_stream_falls_back_to_flower_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock, closed_port = _busy_port()
    sock.close()
    experiment = muscle_experiment(
        schedule="batch", channel="stream", stream_port=0, connect_deadline=2.0
    )
    # The server announces an address where nothing listens: what a firewall looks like.
    run_config = {"stream-address": f"127.0.0.1:{closed_port}", "stream-bind": "127.0.0.1"}
    with caplog.at_level(logging.WARNING):
        run_dir, _, _ = run(
            experiment, tmp_path / "stream", grid=stream_grid(experiment), run_config=run_config
        )
    assert "no client reached the FedMuscle stream" in caplog.text
    assert "falling back to Flower messages" in caplog.text
    rows = [r for r in run_dir.read_metrics() if r["client_id"] == CLIENTS[0]]
    assert rows[0]["stream/unreachable"] == 1
    assert rows[0]["server/fedmuscle/steps"] == 6  # the round's phase ran over Flower instead
    flower_dir, _, _ = run(muscle_experiment(schedule="batch"), tmp_path / "flower")
    for client in CLIENTS:
        expected, got = final_state(flower_dir, client), final_state(run_dir, client)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
