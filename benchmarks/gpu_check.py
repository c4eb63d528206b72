"""GPU check: fedmtl on one CUDA device, in five parts, within 8 minutes on an H200.

1. ``simulation``: ``configs/gpu_check.toml`` (eight heterogeneous clients, 0.125 GPU each)
   through Flower's simulation engine: rounds completed, seconds per round (the first
   includes the actors' start-up), each client's allocator peak (``gpu/peak_mb``, reported
   by the ClientApp), each actor process's peak as ``nvidia-smi`` sees it (CUDA context
   included), and that no process holds GPU memory after the run.
2. ``throughput``: samples/s of fedmtl's ``train_epochs`` against a plain timm loop (AdamW,
   cross-entropy, bf16 autocast) on ViT-S and Swin-T at 224 px, same batch and data on the
   device, warm-up excluded, repetitions interleaved; target ratio ≥ 0.95.
3. ``fedhca2``: ``fedhca2_round`` at Swin-T scale (6 clients, 9 decoders; the builders of
   ``benchmarks/fedhca2_aggregation.py``) on the GPU against the CPU: time, max |difference|.
4. ``muscle``: ``muscle_loss`` forward + backward (B = 32, d = 256, M = 1…4), GPU against CPU.
5. ``machine``: GPU, memory, driver, torch / CUDA versions, threads, load.

Usage::

    python benchmarks/gpu_check.py [--parts simulation,throughput] [--out PATH]
    python benchmarks/gpu_check.py --dry-run   # every part on CPU at toy sizes, < 1 minute

``--dry-run`` still runs part 1 through Flower's simulation engine (Ray start-up dominates),
with three tiny clients of the same config on CPU; parts 3 and 4 then compare the CPU path
with itself. A failing part records its error and the others still run; the exit status is 1
if any part failed (an error or a failed check; the throughput target is reported, not
enforced). Writes ``benchmarks/results/gpu_check.json`` (``gpu_check_dry_run.json`` with
``--dry-run``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Sibling benchmark scripts: this folder is sys.path[0] when the script runs.
from fedhca2_aggregation import (
    SWIN_T_PARAMS,
    decoder_shapes,
    encoder_shapes,
    local_states,
    random_state,
)
from overhead import RoundTimer

from fedmtl.simulation import FLOWER_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpu_check.toml"
TOLERANCE = 1e-4  # max |GPU − CPU| accepted in parts 3 and 4
TARGET_RATIO = 0.95
RELEASE_SLACK_MIB = 100  # device memory in use after the run may exceed the start by this
# Toy architectures of each encoder family for --dry-run (as in tests/test_models.py).
TINY_KWARGS: dict[str, dict[str, Any]] = {
    "vit": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    "swin": {
        "img_size": 32,
        "window_size": 2,
        "embed_dim": 16,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
    },
    "resnet": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
}


@dataclass(frozen=True)
class Sizes:
    """How much work each part does."""

    dry_run: bool = False
    batch: int = 128  # throughput
    warmup: int = 5
    steps: int = 20
    repeats: int = 5
    classes: int = 1000
    hca_clients: int = 6  # fedhca2
    hca_params: int = SWIN_T_PARAMS
    hca_decoders: int = 9
    hca_repeats: int = 3
    muscle_batch: int = 32
    muscle_dim: int = 256
    muscle_max_peers: int = 4
    muscle_repeats: int = 10


FULL = Sizes()
DRY = replace(
    FULL,
    dry_run=True,
    batch=4,
    warmup=2,
    steps=3,
    repeats=3,
    classes=10,
    hca_clients=3,
    hca_params=20_000,
    hca_decoders=4,
    hca_repeats=1,
    muscle_batch=8,
    muscle_dim=16,
    muscle_repeats=2,
)


def device_of(sizes: Sizes) -> torch.device:
    """``cuda`` (an error if none is visible), or ``cpu`` in a dry run."""
    from fedmtl.clients.training import resolve_device

    return resolve_device("cpu" if sizes.dry_run else "cuda")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- nvidia-smi -------------------------------------------------------------------------


def nvidia_smi(kind: str, fields: str) -> list[list[str]] | None:
    """Rows of ``nvidia-smi --query-<kind>=<fields>``; ``None`` without a working nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, f"--query-{kind}={fields}", "--format=csv,noheader,nounits"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines() if line]


def gpu_processes() -> dict[int, float]:
    """PID → used GPU memory (MiB) of every compute process nvidia-smi lists."""
    rows = nvidia_smi("compute-apps", "pid,used_memory") or []
    return {int(pid): float(used) for pid, used, *_ in rows if used.replace(".", "").isdigit()}


def gpu_memory_used() -> float | None:
    """Memory in use on all GPUs (MiB), whoever holds it; ``None`` without nvidia-smi.

    Unlike the process list this also sees processes of other PID namespaces (containers).
    """
    rows = nvidia_smi("gpu", "memory.used")
    return None if rows is None else sum(float(row[0]) for row in rows)


class GpuMemorySampler(threading.Thread):
    """Peak GPU memory of each process and of the devices, polled every ``interval`` s."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self.device_peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for pid, used in gpu_processes().items():
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), used)
            self.device_peak = max(self.device_peak, gpu_memory_used() or 0.0)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- 1. simulation ----------------------------------------------------------------------


def dry_experiment(experiment: Any) -> Any:
    """The first client of each encoder family, tiny, on CPU: one round of two batches."""
    from fedmtl.config import parse_experiment
    from fedmtl.models.registry import resolve_family

    data = experiment.model_dump(mode="json")
    clients, families = [], set()
    for client in data["clients"]:
        family = resolve_family(client["model"]["backbone"])
        if family in families:
            continue
        families.add(family)
        client["model"].update(kwargs=TINY_KWARGS[family], decoder_channels=8, decoder_hidden=16)
        client.update(samples=16, test_samples=16)
        client["training"].update(batch_size=8, max_batches=2)
        clients.append(client)
    data.update(device="cpu", rounds=1, clients=clients)
    data["simulation"].update(num_cpus_per_client=1, num_gpus_per_client=0.0)
    for dataset in data["datasets"].values():
        dataset["image_size"] = 32
    return parse_experiment(data)


def wait_for_release(
    ignore: set[int], baseline: float | None, timeout: float = 30.0
) -> tuple[dict[int, float], float | None, float | None]:
    """Wait until no new process holds GPU memory and usage is back to ``baseline``.

    Returns the processes still holding memory, the memory in use, and the seconds it took
    (``None`` if it did not happen within ``timeout``): Ray actors exit asynchronously.
    """
    start = time.monotonic()
    while True:
        left = {p: m for p, m in gpu_processes().items() if p not in ignore}
        used = gpu_memory_used()
        back = used is None or baseline is None or used <= baseline + RELEASE_SLACK_MIB
        released = not left and back
        waited = time.monotonic() - start
        if released or waited > timeout:
            return left, used, round(waited, 1) if released else None
        time.sleep(1)


def part_simulation(sizes: Sizes) -> dict[str, Any]:
    """Run the bundled config through ``fedmtl.simulation.simulate`` (Flower + Ray)."""
    from fedmtl.config import load_experiment
    from fedmtl.results import RunDirectory
    from fedmtl.simulation import simulate

    experiment = load_experiment(ROOT / CONFIG)
    if sizes.dry_run:
        experiment = dry_experiment(experiment)
    else:
        device_of(sizes)  # fail early and clearly without CUDA
    cuda = experiment.device.startswith("cuda")
    # This process has not touched CUDA yet (this part runs first): whatever is on the GPU now
    # is someone else's and not counted as left over.
    before, used_before = gpu_processes(), gpu_memory_used()
    sampler = GpuMemorySampler() if cuda and used_before is not None else None
    timer = RoundTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDirectory.create(tmp, experiment)
        if sampler is not None:
            sampler.start()
        try:
            simulate(experiment, run_dir, observer=timer)
        finally:
            if sampler is not None:
                sampler.stop()
        rows = run_dir.read_metrics()
    ids = [c.client_id for c in experiment.clients]
    ok_rounds = {
        r
        for r in {row["round"] for row in rows}
        if {row["client_id"] for row in rows if row["round"] == r and "train/loss" in row}
        == set(ids)
    }
    peaks: dict[str, float | None] = dict.fromkeys(ids)
    for row in rows:
        if "gpu/peak_mb" in row:
            peaks[row["client_id"]] = max(peaks[row["client_id"]] or 0.0, row["gpu/peak_mb"])
    leftover: dict[int, float] = {}
    used_after, released, actor_peaks = None, None, None
    if sampler is not None:
        leftover, used_after, released = wait_for_release(set(before) | {os.getpid()}, used_before)
        actor_peaks = sorted(m for p, m in sampler.peaks.items() if p not in before)
    edges = [timer.start, *timer.ends]
    result: dict[str, Any] = {
        "clients": len(ids),
        "rounds_requested": experiment.rounds,
        "rounds_completed": len(ok_rounds),
        "round_seconds": [round(b - a, 3) for a, b in itertools.pairwise(edges)],
        "num_gpus_per_client": experiment.simulation.num_gpus_per_client,
        "client_peak_mib": peaks,
        "actor_peak_mib": actor_peaks,
        "gpu_used_mib": {
            "before": used_before,
            "peak": None if sampler is None else sampler.device_peak,
            "after": used_after,
        },
        "leftover_gpu_processes": [{"pid": p, "used_mib": m} for p, m in leftover.items()],
        "gpu_released_after_s": released,
        "checks": {
            "all_rounds_completed": len(ok_rounds) == experiment.rounds,
            "no_failed_client_rows": not any(row.get("status") == "failed" for row in rows),
        },
    }
    if cuda:
        result["checks"]["every_client_reported_gpu_peak"] = all(
            v is not None for v in peaks.values()
        )
    if sampler is not None:
        result["checks"]["gpu_released_after_run"] = released is not None
    elif cuda:
        result["note"] = "no nvidia-smi: actor peaks and the release of the GPU not measured"
    return result


# -- 2. throughput ----------------------------------------------------------------------


def measure_throughput(backbone: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Samples/s of fedmtl's ``train_epochs`` and of a plain timm loop on one backbone."""
    import timm

    from fedmtl.clients.training import make_optimizer, train_epochs
    from fedmtl.config import TrainingConfig
    from fedmtl.models import build_model, count_parameters
    from fedmtl.models.registry import resolve_family
    from fedmtl.tasks import create_task

    kwargs = TINY_KWARGS[resolve_family(backbone)] if sizes.dry_run else {}
    pixels = int(kwargs.get("img_size", 224))
    torch.manual_seed(0)
    task = create_task("classification", "label", sizes.classes)
    ours = build_model(backbone, [task], backbone_kwargs=kwargs).to(device)
    plain = timm.create_model(backbone, pretrained=False, num_classes=sizes.classes, **kwargs)
    plain = plain.to(device)
    cfg = TrainingConfig(
        batch_size=sizes.batch, optimizer="adamw", lr=1e-4, weight_decay=0.05, grad_clip=None
    )
    ours_opt = make_optimizer(ours.parameters(), cfg)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(sizes.batch, 3, pixels, pixels, generator=gen).to(device)
    labels = torch.randint(0, sizes.classes, (sizes.batch,), generator=gen).to(device)
    batch = (images, {task.name: labels})

    def run_ours(steps: int) -> None:
        train_epochs(
            ours,
            lambda _epoch: itertools.repeat(batch, steps),
            [task],
            cfg,
            device,
            epochs=1,
            optimizer=ours_opt,
        )

    def run_plain(steps: int) -> None:
        plain.train()
        for _ in range(steps):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(plain(images), labels)
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()

    def samples_per_s(run: Callable[[int], None]) -> float:
        sync(device)
        start = time.perf_counter()
        run(sizes.steps)
        sync(device)
        return sizes.batch * sizes.steps / (time.perf_counter() - start)

    run_ours(sizes.warmup)
    run_plain(sizes.warmup)
    fedmtl_sps, timm_sps = [], []
    for _ in range(sizes.repeats):  # interleaved: drifts in clock or load hit both alike
        fedmtl_sps.append(samples_per_s(run_ours))
        timm_sps.append(samples_per_s(run_plain))
    ratio = statistics.median(fedmtl_sps) / statistics.median(timm_sps)
    return {
        "pixels": pixels,
        "batch": sizes.batch,
        "params": {"fedmtl": count_parameters(ours), "timm": count_parameters(plain)},
        "fedmtl_samples_per_s": fedmtl_sps,
        "timm_samples_per_s": timm_sps,
        "ratio": ratio,
        "meets_target": ratio >= TARGET_RATIO,
    }


def part_throughput(sizes: Sizes) -> dict[str, Any]:
    """ViT-S and Swin-T (toy versions in a dry run)."""
    device = device_of(sizes)
    models = {
        name: measure_throughput(name, sizes, device)
        for name in ("vit_small_patch16_224", "swin_tiny_patch4_window7_224")
    }
    return {"device": str(device), "target_ratio": TARGET_RATIO, "models": models, "checks": {}}


# -- 3. FedHCA2 aggregation ---------------------------------------------------------------


def fedhca2_rounds(device: torch.device, sizes: Sizes) -> tuple[list[float], dict[str, Any]]:
    """1 + ``hca_repeats`` rounds of ``fedhca2_round``; the timed rounds and the final state."""
    from fedmtl.aggregation.fedhca2 import (
        FedHCA2State,
        FlatLayout,
        fedhca2_round,
        flatten_states,
        unflatten_state,
    )

    dev = str(device)
    enc_shapes, dec_shapes = encoder_shapes(sizes.hca_params), decoder_shapes()
    encoders = [random_state(enc_shapes, i, 0.02, dev) for i in range(sizes.hca_clients)]
    decoders = [random_state(dec_shapes, 100 + k, 0.02, dev) for k in range(sizes.hca_decoders)]
    owners = [min(k, sizes.hca_clients - 1) for k in range(sizes.hca_decoders)]
    keys = [f"client{i}" for i in range(sizes.hca_clients)]
    layout = FlatLayout.from_state(encoders[0])
    state = FedHCA2State.initial(flatten_states(encoders, layout), decoders, owners)
    local = torch.empty_like(state.encoder_last)
    del encoders
    seconds = []
    for index in range(1 + sizes.hca_repeats):  # the first round warms up (no hyper step)
        last = [unflatten_state(row, layout) for row in state.encoder_last]
        flatten_states(local_states(last, enc_shapes, index + 1), layout, out=local)
        dec_local = local_states(state.decoders_last, dec_shapes, 500 + index)
        sync(device)
        start = time.perf_counter()
        fedhca2_round(state, local, dec_local, keys)
        sync(device)
        if index > 0:
            seconds.append(time.perf_counter() - start)
    final = {
        "encoders": state.encoder_last.cpu(),
        "decoders": [{k: t.cpu() for k, t in d.items()} for d in state.decoders_last],
        "alpha": state.hyper.alpha.float().cpu(),
        "beta": torch.stack([b.float() for b in state.hyper.beta]).cpu(),
    }
    return seconds, final


def part_fedhca2(sizes: Sizes) -> dict[str, Any]:
    """GPU against CPU (CPU against CPU in a dry run)."""
    device = device_of(sizes)
    cpu_s, cpu = fedhca2_rounds(torch.device("cpu"), sizes)
    dev_s, dev = fedhca2_rounds(device, sizes)
    diffs = {
        "encoders": (cpu["encoders"] - dev["encoders"]).abs().max().item(),
        "decoders": max(
            (a[k] - b[k]).abs().max().item()
            for a, b in zip(cpu["decoders"], dev["decoders"])
            for k in a
        ),
        "alpha": (cpu["alpha"] - dev["alpha"]).abs().max().item(),
        "beta": (cpu["beta"] - dev["beta"]).abs().max().item(),
    }
    return {
        "device": str(device),
        "clients": sizes.hca_clients,
        "encoder_params": sizes.hca_params,
        "decoders": sizes.hca_decoders,
        "cpu_round_s": cpu_s,
        "device_round_s": dev_s,
        "speedup": statistics.median(cpu_s) / statistics.median(dev_s),
        "max_abs_difference": diffs,
        "checks": {"equal_to_tolerance": max(diffs.values()) <= TOLERANCE},
    }


# -- 4. Muscle loss -----------------------------------------------------------------------


def muscle_step(anchor: torch.Tensor, peers: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Median seconds of forward + backward after one warm-up; the loss and the gradient."""
    from fedmtl.losses.muscle import muscle_loss

    seconds, loss = [], torch.tensor(0.0)
    for index in range(1 + repeats):
        anchor.grad = None
        sync(anchor.device)
        start = time.perf_counter()
        loss = muscle_loss(anchor, peers)
        loss.backward()
        sync(anchor.device)
        if index > 0:
            seconds.append(time.perf_counter() - start)
    assert anchor.grad is not None
    grad = anchor.grad.to("cpu", copy=True)
    return {"s": statistics.median(seconds), "loss": loss.item(), "grad": grad}


def part_muscle(sizes: Sizes) -> dict[str, Any]:
    """M = 1…4 peers, GPU against CPU (CPU against CPU in a dry run)."""
    device = device_of(sizes)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for num_peers in range(1, sizes.muscle_max_peers + 1):
        data = [
            F.normalize(torch.randn(sizes.muscle_batch, sizes.muscle_dim, generator=gen), dim=1)
            for _ in range(num_peers + 1)
        ]
        runs = []
        for where in (torch.device("cpu"), device):
            anchor = data[0].to(where, copy=True).requires_grad_(True)
            peers = [p.to(where, copy=True) for p in data[1:]]
            runs.append(muscle_step(anchor, peers, sizes.muscle_repeats))
        cpu, dev = runs
        rows.append(
            {
                "M": num_peers,
                "cpu_s": cpu["s"],
                "device_s": dev["s"],
                "loss": cpu["loss"],
                "loss_difference": abs(cpu["loss"] - dev["loss"]),
                "grad_max_abs_difference": (cpu["grad"] - dev["grad"]).abs().max().item(),
            }
        )
    worst = max(max(r["loss_difference"], r["grad_max_abs_difference"]) for r in rows)
    return {
        "device": str(device),
        "batch": sizes.muscle_batch,
        "dim": sizes.muscle_dim,
        "rows": rows,
        "checks": {"equal_to_tolerance": worst <= TOLERANCE},
    }


# -- 5. machine ---------------------------------------------------------------------------


def part_machine(sizes: Sizes) -> dict[str, Any]:
    """Versions, threads, GPU and load (run last: it initialises CUDA in this process)."""
    import flwr
    import timm

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "timm": timm.__version__,
        "flwr": flwr.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()),
        "gpus": [],
        "checks": {},
    }
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    smi = nvidia_smi("gpu", "name,memory.total,driver_version,utilization.gpu,memory.used")
    if smi:
        keys = ("name", "memory_total_mib", "driver", "utilization_percent", "memory_used_mib")
        info["nvidia_smi"] = [dict(zip(keys, row)) for row in smi]
    return info


# -- driver ---------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Sizes], dict[str, Any]]] = {
    "simulation": part_simulation,  # first: before this process initialises CUDA
    "throughput": part_throughput,
    "fedhca2": part_fedhca2,
    "muscle": part_muscle,
    "machine": part_machine,
}


def run_part(name: str, sizes: Sizes) -> dict[str, Any]:
    """Run one part; an exception or a failed check marks it failed, the others still run."""
    print(f"== {name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = PARTS[name](sizes)
        failed = [check for check, ok in result.get("checks", {}).items() if not ok]
        result["ok"] = not failed
        if failed:
            result["error"] = "failed checks: " + ", ".join(failed)
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s")
    return result


def print_table(record: dict[str, Any]) -> None:
    """One rich table per measured part."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    parts = record["parts"]

    def table(title: str, *columns: str) -> Table:
        out = Table(title=title)
        for column in columns:
            out.add_column(column, justify="right")
        return out

    status = table("GPU check " + record["mode"], "part", "status", "seconds")
    for name, result in parts.items():
        status.add_row(name, "ok" if result["ok"] else result["error"][:80], f"{result['seconds']}")
    console.print(status)
    sim = parts.get("simulation", {})
    if "round_seconds" in sim:
        columns = ("rounds", "s/round", "client peak MiB", "actor peak MiB", "GPU released")
        t = table("1. simulation", *columns)
        client = [v for v in sim["client_peak_mib"].values() if v is not None]
        actors = sim["actor_peak_mib"]
        released = sim["gpu_released_after_s"]
        release = "NO" if released is None else f"after {released} s"
        t.add_row(
            f"{sim['rounds_completed']}/{sim['rounds_requested']}",
            ", ".join(f"{s:.1f}" for s in sim["round_seconds"]),
            f"{max(client):.0f} (max of {len(client)})" if client else "n/a",
            f"{max(actors):.0f} ({len(actors)} processes)" if actors else "n/a",
            "n/a" if actors is None else release,
        )
        console.print(t)
    if "models" in parts.get("throughput", {}):
        t = table("2. throughput (samples/s, median)", "model", "fedmtl", "timm", "ratio")
        for name, m in parts["throughput"]["models"].items():
            flag = "" if m["meets_target"] else f" < {TARGET_RATIO}"
            t.add_row(
                name,
                f"{statistics.median(m['fedmtl_samples_per_s']):.1f}",
                f"{statistics.median(m['timm_samples_per_s']):.1f}",
                f"{m['ratio']:.3f}{flag}",
            )
        console.print(t)
    hca = parts.get("fedhca2", {})
    if "speedup" in hca:
        t = table("3. FedHCA2 round", "CPU s", f"{hca['device']} s", "speed-up", "max |Δ|")
        t.add_row(
            f"{statistics.median(hca['cpu_round_s']):.3f}",
            f"{statistics.median(hca['device_round_s']):.4f}",
            f"{hca['speedup']:.1f}x",
            f"{max(hca['max_abs_difference'].values()):.1e}",
        )
        console.print(t)
    if "rows" in parts.get("muscle", {}):
        dev = parts["muscle"]["device"]
        t = table("4. Muscle loss fwd+bwd", "M", "CPU s", f"{dev} s", "|Δloss|", "max |Δgrad|")
        for r in parts["muscle"]["rows"]:
            t.add_row(
                str(r["M"]),
                f"{r['cpu_s']:.5f}",
                f"{r['device_s']:.5f}",
                f"{r['loss_difference']:.1e}",
                f"{r['grad_max_abs_difference']:.1e}",
            )
        console.print(t)
    machine = parts.get("machine", {})
    if "torch" in machine:
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in machine["gpus"]) or "none"
        driver = (machine.get("nvidia_smi") or [{}])[0].get("driver", "n/a")
        console.print(
            f"5. machine: {gpus}, driver {driver}, torch {machine['torch']}, CUDA "
            f"{machine['cuda']}, {machine['cpus']} CPUs; load "
            f"{record['load_average']['start'][0]:.1f} → {record['load_average']['end'][0]:.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU, toy sizes")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    sizes = DRY if args.dry_run else FULL
    out = args.out or ROOT / "benchmarks" / "results" / (
        "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    )
    start = time.perf_counter()
    record: dict[str, Any] = {
        "mode": "dry-run (CPU, toy sizes)" if args.dry_run else "cuda",
        "config": CONFIG,
        "sizes": asdict(sizes),
        "load_average": {"start": list(os.getloadavg())},
        "parts": {},
    }
    for name in PARTS:  # fixed order: the simulation runs before CUDA starts in this process
        if name in parts:
            record["parts"][name] = run_part(name, sizes)
    record["load_average"]["end"] = list(os.getloadavg())
    record["failed"] = [name for name, result in record["parts"].items() if not result["ok"]]
    record["seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"total {record['seconds']:.1f} s; wrote {out}")
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
