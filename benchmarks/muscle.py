"""Benchmark: factorised Muscle loss vs the paper's materialised S^n/α^n, and bytes per round.

Usage::

    python benchmarks/muscle.py --batch 32 --dim 256 --max-peers 4 --device cpu

Each (method, M) runs in a fresh process; its peak memory is the rise of the resident
high-water mark over the post-warm-up resident size on CPU, the allocator peak on CUDA.
Writes ``benchmarks/results/muscle.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedmtl.aggregation.muscle_targets import PROTOCOLS, payload_bytes
from fedmtl.losses.muscle import muscle_loss, peer_pairs

ROOT = Path(__file__).resolve().parents[1]


def _portable(path: str | Path) -> str:
    """``path`` as a result file records it: relative to the repository, never absolute."""
    full = Path(path).resolve()
    return full.relative_to(ROOT).as_posix() if full.is_relative_to(ROOT) else full.name


TAU, TAU_PREV = 0.2, 0.15
MIB = 2**20


def paper_loss(anchor: torch.Tensor, peers: list[torch.Tensor]) -> torch.Tensor:
    """The published computation: materialise S^n (B^M × d) and log α^n (B^M), then logsumexp."""
    batch, dim = anchor.shape
    num_peers = len(peers)
    gamma = 1.0 / TAU_PREV - 1.0 / TAU
    # Server: row j (row-major over the tuple (j_1, …, j_M)) is Σ_m z_{j_m}^m / τ.
    targets = torch.zeros((batch,) * num_peers + (dim,), dtype=anchor.dtype, device=anchor.device)
    log_alpha = torch.zeros((batch,) * num_peers, dtype=anchor.dtype, device=anchor.device)
    for m, peer in enumerate(peers):
        shape = [1] * num_peers + [dim]
        shape[m] = batch
        targets = targets + (peer / TAU).reshape(shape)
    for m, m2 in peer_pairs(num_peers):
        shape = [1] * num_peers
        shape[m] = shape[m2] = batch
        log_alpha = log_alpha - gamma * (peers[m] @ peers[m2].T).reshape(shape)
    targets = targets.reshape(-1, dim)
    # Client: logits against every tuple; the positive (i, …, i) sits at i (B^M − 1)/(B − 1).
    logits = anchor @ targets.T + log_alpha.reshape(-1)
    step = 1 if batch == 1 else (batch**num_peers - 1) // (batch - 1)
    positive = torch.arange(batch, device=anchor.device) * step
    rows = torch.arange(batch, device=anchor.device)
    return (torch.logsumexp(logits, dim=1) - logits[rows, positive]).mean()


def paper_bytes_estimate(batch: int, dim: int, num_peers: int, itemsize: int = 4) -> int:
    """Peak of the paper's computation: S^n twice (build + reshape copy) and three logit copies."""
    return (2 * batch**num_peers * dim + 3 * batch ** (num_peers + 1)) * itemsize


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(
    method: str, batch: int, dim: int, num_peers: int, device: str, repeats: int, threads: int
) -> dict:
    """Run in a child process: time forward+backward and record the peak memory increase."""
    if threads > 0:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = [
        F.normalize(torch.randn(batch, dim, generator=gen), dim=1) for _ in range(num_peers + 1)
    ]
    anchor = rows[0].to(device).requires_grad_(True)
    peers = [r.to(device) for r in rows[1:]]
    fn = muscle_loss if method == "factorised" else paper_loss
    cuda = device.startswith("cuda")

    def step() -> float:
        anchor.grad = None
        loss = fn(anchor, peers)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    loss_value = step()  # warm-up: one-time allocations (thread pools, caches) are not counted
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Reset the process's resident high-water mark (Linux ≥ 4.0), then read VmHWM.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        base = _status_kib("VmRSS") * 1024
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_value = step()
        seconds.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    return {
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "peak_mib": max(peak, 0) / MIB,
        "loss": loss_value,
    }


def timing_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    # A fixed mmap threshold makes glibc return large freed blocks to the OS, so the child's
    # resident size falls back after each step and VmHWM measures the step's own peak.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    rows = []
    for num_peers in range(1, args.max_peers + 1):
        for method in ("factorised", "paper"):
            row: dict[str, Any] = {"M": num_peers, "method": method}
            estimate = paper_bytes_estimate(args.batch, args.dim, num_peers)
            if method == "paper" and estimate > args.max_memory_gb * 2**30:
                row["skipped"] = f"S^n needs ~{estimate / 2**30:.1f} GiB > {args.max_memory_gb} GB"
            else:
                with ctx.Pool(1) as pool:
                    row |= pool.apply(
                        _measure,
                        (
                            method,
                            args.batch,
                            args.dim,
                            num_peers,
                            args.device,
                            args.repeats,
                            args.threads,
                        ),
                    )
            rows.append(row)
            print(row, flush=True)
    return rows


def bytes_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Bytes per client per round (uplink, downlink, exchanges) per protocol and schedule.

    ``batch``: one exchange per public batch and CL epoch (faithful). ``epoch``: one snapshot
    exchange per round, peers frozen for the round's T CL epochs (documented deviation; no
    ``gradient`` form, which needs the current Z^n after every step). ``paper`` is the
    materialised S^n + α^n downlink, for comparison.
    """
    b, d, nb, epochs, item = args.batch, args.dim, args.public_batches, args.cl_epochs, 4
    fedavg = int(args.model_params * args.param_bytes)
    rows: list[dict[str, Any]] = [
        {"M": None, "protocol": "fedavg", "schedule": "round", "up": fedavg, "down": fedavg,
         "exchanges": 1}
    ]  # fmt: skip
    upload = nb * b * d * item
    for num_peers in range(1, args.max_peers + 1):
        paper = (b**num_peers * d + b**num_peers) * item
        per_batch = {p: payload_bytes(p, b, d, num_peers) for p in PROTOCOLS} | {"paper": paper}
        snapshot = {p: nb * size for p, size in per_batch.items()} | {"gradient": None}
        for protocol, down in per_batch.items():
            rows.append({"M": num_peers, "protocol": protocol, "schedule": "batch",
                         "up": epochs * upload, "down": epochs * nb * down,
                         "exchanges": epochs * nb})  # fmt: skip
            rows.append({"M": num_peers, "protocol": protocol, "schedule": "epoch",
                         "up": upload, "down": snapshot[protocol], "exchanges": 1})  # fmt: skip
    for row in rows:
        total = None if row["down"] is None else row["up"] + row["down"]
        row["vs_fedavg"] = None if total is None else total / (2 * fedavg)
    return rows


def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / MIB:10.2f} MiB" if value < 2**30 else f"{value / 2**30:10.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--max-peers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (0: torch default; 1 is stable)"
    )
    parser.add_argument("--max-memory-gb", type=float, default=8.0)
    parser.add_argument("--public-size", type=int, default=5000, help="|D| public samples")
    parser.add_argument("--public-batches", type=int, default=None, help="default ⌈|D|/B⌉")
    parser.add_argument("--cl-epochs", type=int, default=1, help="T")
    parser.add_argument("--model-params", type=float, default=5.7e6, help="FedAvg model size")
    parser.add_argument("--param-bytes", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/muscle.json"))
    args = parser.parse_args()
    if args.public_batches is None:
        args.public_batches = math.ceil(args.public_size / args.batch)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"B={args.batch} d={args.dim} device={args.device} threads={torch.get_num_threads()}")
    timing = timing_table(args)
    print(f"\n{'M':>2} {'method':>10} {'median s':>10} {'min s':>9} {'peak MiB':>9}  note")
    by_key = {(r["M"], r["method"]): r for r in timing}
    for r in timing:
        if "skipped" in r:
            print(f"{r['M']:>2} {r['method']:>10} {'-':>10} {'-':>9} {'-':>9}  {r['skipped']}")
            continue
        note = ""
        other = by_key.get((r["M"], "paper"))
        if r["method"] == "factorised" and other and "seconds_median" in other:
            speedup = other["seconds_median"] / r["seconds_median"]
            r["speedup"] = speedup
            note = f"{speedup:.1f}x faster; |Δloss| {abs(other['loss'] - r['loss']):.1e}"
        print(
            f"{r['M']:>2} {r['method']:>10} {r['seconds_median']:>10.4f} "
            f"{r['seconds_min']:>9.4f} {r['peak_mib']:>9.1f}  {note}"
        )

    sizes = bytes_table(args)
    print(
        f"\nBytes per client per round: {args.public_batches} public batches, "
        f"T={args.cl_epochs}, fp32; FedAvg of {args.model_params / 1e6:.1f} M params"
    )
    print(f"{'M':>4} {'protocol':>9} {'schedule':>8} {'uplink':>14} {'downlink':>14} "
          f"{'exchanges':>9} {'vs FedAvg':>9}")  # fmt: skip
    for r in sizes:
        m = "-" if r["M"] is None else r["M"]
        ratio = "n/a" if r["vs_fedavg"] is None else f"{r['vs_fedavg']:.3g}x"
        print(
            f"{m:>4} {r['protocol']:>9} {r['schedule']:>8} {_fmt_bytes(r['up']):>14} "
            f"{_fmt_bytes(r['down']):>14} {r['exchanges']:>9} {ratio:>9}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (_portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["torch"] = torch.__version__
    config["threads"] = torch.get_num_threads()
    args.out.write_text(json.dumps({"config": config, "timing": timing, "bytes": sizes}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
