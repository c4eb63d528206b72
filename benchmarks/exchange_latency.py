"""FedMuscle per-batch exchange latency: the gRPC stream vs a Flower request/response.

(a) **Stream, loopback.** fedmtl's ``ExchangeServer`` and one round's ``StreamPhase`` with
the strategy's own payload code (``draw_peers`` + ``client_payload``), and N client
*processes* (default 6) that each keep one stream and, for every step, send a random
normalised ``Z`` (B × d, default 32 × 256) and wait for their payload (M = 3 peers). A
client's latency per batch is send → payload received, so it includes waiting for the
slowest client of that batch, the server's payload computation and both transfers; the
clients do no model compute, so this is the channel's own cost. Run with TLS (the default in
deployment, certificates from ``fedmtl deploy``'s code) and without.

(b) **Flower, deployment.** A SuperLink and one SuperNode per client as real processes on
loopback (TLS + SuperNode auth, ``fedmtl.deploy.local``), running a tiny FedMuscle experiment
with ``schedule = "batch"`` over Flower messages: one request/response per public batch. The
server records each exchange's wall time and the same minus the slowest client's handler time
(``fedmuscle/exchange_seconds_median``, ``fedmuscle/exchange_overhead_seconds_median``). The
same cluster then runs the experiment with ``channel = "stream"``, whose per-step server time
(step open → payloads sent, including the clients' model steps) shows the stream in
deployment.

Usage::

    python benchmarks/exchange_latency.py [--clients 6] [--steps 300] [--skip-flower]

Prints a table and writes ``benchmarks/results/exchange_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.nn.functional as F

from fedmtl.aggregation.muscle_targets import client_payload, draw_peers, payload_bytes
from fedmtl.deploy.credentials import write_certificates
from fedmtl.messages import TensorSpec
from fedmtl.simulation import FLOWER_ENV
from fedmtl.stream.client import StreamClient, StreamTicket
from fedmtl.stream.server import ExchangeServer, StreamEndpoint, StreamPhase
from fedmtl.stream.wire import payload_frame_bytes, representation_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "exchange_latency.json"
TARGET_MEDIAN_MS = 20.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p99, mean and max in milliseconds."""
    ms = [1000 * s for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
        "n": len(ms),
    }


# --------------------------------------------------------------------------- (a) stream


def stream_client(ticket: StreamTicket, client: str, steps: int, batch: int, dim: int,
                  out: Any) -> None:  # fmt: skip
    """One client process: keep a stream, time every exchange."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(sum(map(ord, client)))
    latencies: list[float] = []
    with StreamClient(ticket, client, 1) as stream:
        step = stream.connect(60.0)
        while step < steps:
            z = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
            start = time.perf_counter()
            payload, step = stream.exchange(step, z)
            latencies.append(time.perf_counter() - start)
            if payload is None:
                raise RuntimeError(f"{client}: step skipped")
    out.put((client, latencies))


def run_stream(clients: int, steps: int, batch: int, dim: int, peers: int, protocol: str,
               tls_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """(a): one phase of ``steps`` batches with ``clients`` client processes."""
    ids = [f"client-{i}" for i in range(clients)]
    tokens = {c: f"token-{c}" for c in ids}
    endpoint = StreamEndpoint(port=0)
    if tls_dir is not None:
        write_certificates(tls_dir, ["localhost"], force=True)
        endpoint = StreamEndpoint.from_certs_dir(tls_dir, address="localhost")
    down = payload_frame_bytes(payload_bytes(protocol, batch, dim, peers))
    up = representation_bytes(batch, dim)
    server = ExchangeServer(endpoint, max_receive=up, max_send=down, max_clients=clients)

    def build(step: int, reps: Any) -> dict[str, dict[str, torch.Tensor]]:
        draws = draw_peers(ids, peers, seed=0, round=1, batch=step, available=reps.keys())
        return {c: client_payload(protocol, c, reps, draws[c], 0.2, 0.15) for c in reps if draws[c]}

    phase = StreamPhase(
        1, tokens, [TensorSpec((batch, dim), "float32")] * steps, build,
        batch_deadline=30.0, connect_deadline=120.0,
    )  # fmt: skip
    server.phase = phase
    coordinator = threading.Thread(target=phase.run, daemon=True)
    coordinator.start()
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = []
    for client in ids:
        ticket = StreamTicket(
            address=server.address, token=tokens[client], ca_pem=endpoint.ca_pem(),
            connect_deadline=60.0, batch_deadline=30.0, max_receive=down, max_send=up,
        )  # fmt: skip
        process = context.Process(
            target=stream_client, args=(ticket, client, steps, batch, dim, out)
        )
        process.start()
        processes.append(process)
    results = dict(out.get(timeout=600) for _ in ids)
    for process in processes:
        process.join(60)
    coordinator.join(60)
    server.stop()
    # The first steps include connection set-up and imports settling: drop 5 % warm-up.
    warm = max(1, steps // 20)
    latencies = [s for c in ids for s in results[c][warm:]]
    return {
        "tls": tls_dir is not None,
        "client_latency": summary_ms(latencies),
        "server_step": summary_ms(phase.report.step_seconds[warm:]),
        "bytes_up_per_client": up,
        "bytes_down_per_client": down,
    }


# --------------------------------------------------------------------------- (b) Flower


def muscle_experiment(out: Path, channel: str, clients: int, batch: int, dim: int,
                      batches: int) -> Path:  # fmt: skip
    """tests/data/tiny.toml as a FedMuscle experiment with the batch schedule."""
    data = tomllib.loads((ROOT / "tests" / "data" / "tiny.toml").read_text())
    data.update(rounds=1, device="cpu", name=f"latency-{channel}")
    data["clients"] = data["clients"][:clients]
    data["public"] = {"dataset": "digits", "size": batch * batches, "batch_size": batch}
    data["algorithm"] = {
        "name": "fedmuscle", "schedule": "batch", "channel": channel, "projector_dim": dim,
        "num_peers": min(3, clients - 1), "connect_deadline": 120.0,
    }  # fmt: skip
    path = out / f"{channel}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def run_flower(clients: int, batch: int, dim: int, batches: int, work: Path) -> dict[str, Any]:
    """(b): the Flower batch schedule, then the stream, on one loopback deployment."""
    from fedmtl.deploy.local import LocalDeployment
    from fedmtl.results import RunDirectory

    app_dir = work / "app"
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    ids = [f"{c}" for c in "abc"][:clients]
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    out: dict[str, Any] = {"clients": clients, "security": "TLS + SuperNode auth"}
    with LocalDeployment(work / "deployment", ids, env=env, num_threads=1) as cluster:
        cluster.start(timeout=600)
        for channel in ("flower", "stream"):
            experiment = muscle_experiment(work, channel, clients, batch, dim, batches)
            runs = work / f"runs-{channel}"
            # submit adds the plan's stream address, port and the SuperLink's TLS files.
            run_id = cluster.submit({"experiment": str(experiment), "output-dir": str(runs)},
                                    app_dir)  # fmt: skip
            info = cluster.wait_run(run_id, timeout=1800)
            if info.get("status") != "finished:completed":
                raise RuntimeError(f"{channel} run did not complete: {info}")
            (run_path,) = [p for p in runs.glob("*/*") if (p / "config.json").exists()]
            row = RunDirectory(run_path).read_metrics()[0]
            server = {k.removeprefix("server/"): v for k, v in row.items() if "server/" in k}
            out[channel] = server
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--protocol", default="peers", choices=("peers", "targets", "gradient"))
    parser.add_argument("--flower-clients", type=int, default=3)
    parser.add_argument("--flower-batches", type=int, default=8)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "setup": {
            k: getattr(args, k) for k in ("clients", "steps", "batch", "dim", "peers", "protocol")
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_1min_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "target_median_ms": TARGET_MEDIAN_MS,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = (args.clients, args.steps, args.batch, args.dim, args.peers, args.protocol)
        result["stream_tls"] = run_stream(*common, work / "certs")
        result["stream_plain"] = run_stream(*common, None)
        if not args.skip_flower:
            result["deployment"] = run_flower(
                args.flower_clients, args.batch, args.dim, args.flower_batches, work / "dep"
            )
    result["machine"]["load_1min_end"] = round(os.getloadavg()[0], 2)

    print(f"per-batch exchange, {args.clients} clients, B={args.batch}, d={args.dim}, "
          f"M={args.peers}, {args.protocol}")  # fmt: skip
    print(f"{'channel':<34} {'median ms':>10} {'p99 ms':>10}")
    for name in ("stream_tls", "stream_plain"):
        lat = result[name]["client_latency"]
        label = "stream, loopback, " + name.removeprefix("stream_")
        print(f"{label:<34} {lat['median_ms']:>10.2f} {lat['p99_ms']:>10.2f}")
    if "deployment" in result:
        dep = result["deployment"]
        flower = dep["flower"]
        print(f"{'Flower request/response (deploy)':<34} "
              f"{1000 * flower['fedmuscle/exchange_seconds_median']:>10.1f} {'':>10}")  # fmt: skip
        print(f"{'  minus client handler time':<34} "
              f"{1000 * flower['fedmuscle/exchange_overhead_seconds_median']:>10.1f}")  # fmt: skip
        stream = dep["stream"]
        print(f"{'stream step in deployment (models)':<34} "
              f"{1000 * stream['fedmuscle/stream_step_seconds_median']:>10.1f}")  # fmt: skip
    median = result["stream_tls"]["client_latency"]["median_ms"]
    print(f"stream median {median:.2f} ms (target <= {TARGET_MEDIAN_MS} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
