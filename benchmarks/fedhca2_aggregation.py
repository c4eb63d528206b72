"""Benchmark: one FedHCA² server round on flat buffers vs an official-style dict implementation.

Usage::

    python benchmarks/fedhca2_aggregation.py --clients 6 --encoder-params 27520698 \
        --decoders 9 --repeats 3 --device cpu

Clients hold Swin-T-shaped encoders (177 tensors, 27,520,698 parameters at the default size)
and FedHCA²-shaped decoders (12 tensors, 175,776 parameters, 6 layers); local updates are random
(1e-3 per element). Each implementation runs in its own process: a first round without a
hyper-weight step (warm-up: first-touch allocations), then ``--repeats`` timed rounds, each a
hyper-weight step plus both aggregations. Per round the clients' encoders arrive as separate
tensors (as from messages); the fast path packs them into its persistent buffer
(``flatten_states``, timed separately) and runs ``fedhca2_round``; the baseline follows the
official ``aggregate.py`` / ``hyperweight.py`` (deep copies, per-client flatten, autograd through
the previous round's graph). Both use the same exact simplex solver and a float64-accumulated
Gram matrix, so their results must agree to 1e-6. ``--threads`` sets torch's thread count for
the baseline (``fedhca2_round`` and ``flatten_states`` use one CPU thread by design).

Peak memory is the rise of the resident high-water mark (reset before the timed rounds) over the
resident size on CPU, the allocator peak on CUDA; "CPU s" is the process CPU time of a round (all
threads), which other load on the machine inflates less than wall time. Writes
``benchmarks/results/fedhca2_aggregation.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.aggregation.conflict_averse import conflict_averse_coefficients
from fedmtl.aggregation.cross_attention import decoder_layers
from fedmtl.aggregation.fedhca2 import (
    FedHCA2State,
    FlatLayout,
    fedhca2_round,
    flatten_states,
    unflatten_state,
)

C = 0.4
MIB = 2**20
SWIN_T_PARAMS = 27_520_698


def swin_t_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of the mmseg Swin-T backbone (177 tensors, 27,520,698 parameters)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embed.projection.weight", (96, 3, 4, 4)),
        ("patch_embed.projection.bias", (96,)),
        ("patch_embed.norm.weight", (96,)),
        ("patch_embed.norm.bias", (96,)),
    ]
    for stage, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        dim = 96 * 2**stage
        for block in range(depth):
            p = f"stages.{stage}.blocks.{block}."
            shapes += [
                (p + "norm1.weight", (dim,)),
                (p + "norm1.bias", (dim,)),
                (p + "attn.w_msa.relative_position_bias_table", (169, heads)),
                (p + "attn.w_msa.qkv.weight", (3 * dim, dim)),
                (p + "attn.w_msa.qkv.bias", (3 * dim,)),
                (p + "attn.w_msa.proj.weight", (dim, dim)),
                (p + "attn.w_msa.proj.bias", (dim,)),
                (p + "norm2.weight", (dim,)),
                (p + "norm2.bias", (dim,)),
                (p + "ffn.layers.0.0.weight", (4 * dim, dim)),
                (p + "ffn.layers.0.0.bias", (4 * dim,)),
                (p + "ffn.layers.1.weight", (dim, 4 * dim)),
                (p + "ffn.layers.1.bias", (dim,)),
            ]
        if stage < 3:
            p = f"stages.{stage}.downsample."
            shapes += [
                (p + "norm.weight", (4 * dim,)),
                (p + "norm.bias", (4 * dim,)),
                (p + "reduction.weight", (2 * dim, 4 * dim)),
            ]
    for stage in range(4):
        shapes += [
            (f"norm{stage}.weight", (96 * 2**stage,)),
            (f"norm{stage}.bias", (96 * 2**stage,)),
        ]
    return shapes


def encoder_shapes(total: int) -> list[tuple[str, tuple[int, ...]]]:
    """Swin-T shapes, cycled or cut to ``total`` parameters (a 1-D remainder tensor closes it)."""
    base = swin_t_shapes()
    shapes: list[tuple[str, tuple[int, ...]]] = []
    count = 0
    index = 0
    while True:
        name, shape = base[index % len(base)]
        size = torch.Size(shape).numel()
        if count + size > total:
            break
        shapes.append((f"r{index // len(base)}.{name}" if index >= len(base) else name, shape))
        count += size
        index += 1
    if count < total:
        shapes.append(("remainder", (total - count,)))
    return shapes


def decoder_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The FedHCA² decoder: 4 Linear C_s→96, 1×1 Conv 384→96, BatchNorm(96)."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i, c_in in enumerate((96, 192, 384, 768)):
        shapes += [(f"linears.{i}.weight", (96, c_in)), (f"linears.{i}.bias", (96,))]
    shapes += [("linear_fuse.0.weight", (96, 384, 1, 1)), ("linear_fuse.0.bias", (96,))]
    shapes += [("linear_fuse.1.weight", (96,)), ("linear_fuse.1.bias", (96,))]
    return shapes


def random_state(
    shapes: list[tuple[str, tuple[int, ...]]], seed: int, scale: float, device: str
) -> dict[str, Tensor]:
    """Named tensors of the given shapes, deterministic in ``seed``, each its own allocation."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(torch.Size(s).numel() for _, s in shapes), generator=gen) * scale
    pieces = torch.split(flat, [torch.Size(s).numel() for _, s in shapes])
    return {name: p.view(s).to(device, copy=True) for (name, s), p in zip(shapes, pieces)}


def local_states(
    last: list[dict[str, Tensor]], shapes: list[tuple[str, tuple[int, ...]]], seed: int
) -> list[dict[str, Tensor]]:
    """``last + 1e-3·noise`` per client, new tensors (what arrives from the clients)."""
    out = []
    for i, state in enumerate(last):
        device = str(next(iter(state.values())).device)
        noise = random_state(shapes, seed * 1000 + i, 1e-3, device)
        out.append({k: state[k] + noise[k] for k in state})
    return out


class OfficialStyle:
    """The official aggregation structure: dict states, deep copies, Python loops, autograd."""

    def __init__(self, encoders: list[dict[str, Tensor]], decoders: list[dict[str, Tensor]]):
        self.encoders = encoders
        self.decoders = decoders
        self.keys = list(encoders[0])
        self.shapes = [encoders[0][k].shape for k in self.keys]
        self.layer_names = sorted({k.rsplit(".", 1)[0] for k in decoders[0]})
        device = encoders[0][self.keys[0]].device
        self.alpha = nn.Parameter(torch.full((len(encoders),), 0.1, device=device))
        self.beta = nn.ParameterDict(
            {
                n.replace(".", "_"): nn.Parameter(torch.full((len(decoders),), 0.1, device=device))
                for n in self.layer_names
            }
        )
        # Separate optimisers for α and β, as in the official train.py.
        self.alpha_opt = torch.optim.SGD([self.alpha], lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.beta_opt = torch.optim.SGD(
            self.beta.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
        )
        self.enc_output: list[Tensor] | None = None
        self.dec_output: list[dict[str, Tensor]] | None = None

    def update_hyperweight(
        self, enc_local: list[dict[str, Tensor]], dec_local: list[dict[str, Tensor]]
    ) -> None:
        assert self.enc_output is not None and self.dec_output is not None
        diff = [
            {k: self.encoders[i][k] - enc_local[i][k] for k in self.keys}
            for i in range(len(enc_local))
        ]
        flat_diff = [torch.cat([d[k].flatten() for k in self.keys]) for d in diff]
        self.alpha_opt.zero_grad()
        torch.autograd.backward(self.enc_output, flat_diff, retain_graph=True)
        self.alpha_opt.step()
        self.beta_opt.zero_grad()
        for i, local in enumerate(dec_local):
            names = list(local)
            outputs = [self.dec_output[i][k] for k in names]
            diffs = [self.decoders[i][k] - local[k] for k in names]
            torch.autograd.backward(outputs, diffs, retain_graph=True)
        self.beta_opt.step()

    def ca_delta(self, flat_deltas: list[Tensor]) -> Tensor:
        grads = torch.stack(flat_deltas).t()
        # Official: gram = grads.t().mm(grads). One float32 matmul over d = 27.5 M accumulates in
        # float32 and is ~1 % off on the diagonal (enough to move w by 1e-3), so both paths sum
        # float32 blocks in float64 and the comparison checks the implementation, not that error.
        n, block = len(flat_deltas), 1 << 20
        gram = torch.zeros(n, n, dtype=torch.float64, device=grads.device)
        for s in range(0, grads.shape[0], block):
            gram += grads[s : s + block].t().mm(grads[s : s + block]).double()
        g0_norm = (gram.mean() + 1e-8).sqrt()
        # Same exact solver as the fast path (the official SLSQP call only changes w by its
        # tolerance); the rest is the official tensor path, epsilons included.
        _, w = conflict_averse_coefficients(gram, c=C)
        c_eff = C * g0_norm + 1e-8
        gw = (grads * w.to(grads.dtype).reshape(1, -1)).sum(1)
        lam = c_eff / (gw.norm() + 1e-8)
        return (grads.mean(1) + lam * gw) / (1 + C**2)

    def round(
        self,
        enc_local: list[dict[str, Tensor]],
        dec_local: list[dict[str, Tensor]],
        hyper_step: bool,
    ) -> None:
        if hyper_step:
            self.update_hyperweight(enc_local, dec_local)
        n = len(enc_local)
        update_enc = copy.deepcopy(enc_local)
        delta = [{k: enc_local[i][k] - self.encoders[i][k] for k in self.keys} for i in range(n)]
        flat_last = [
            torch.cat([self.encoders[i][k].flatten() for k in self.keys]) for i in range(n)
        ]
        flat_delta = [torch.cat([d[k].flatten() for k in self.keys]) for d in delta]
        del delta
        direction = self.ca_delta(flat_delta)
        # Homo-group averaging: all clients have distinct (dataset, tasks) here, as in the
        # official 1c configurations, so every group is a singleton.
        new_flat = copy.deepcopy(flat_last)
        alpha = torch.clamp(self.alpha, 0, 1)
        for i in range(n):
            new_flat[i] += flat_delta[i] + alpha[i] * direction
        self.enc_output = new_flat
        for i in range(n):
            start = 0
            for k, shape in zip(self.keys, self.shapes):
                end = start + shape.numel()
                update_enc[i][k] = new_flat[i][start:end].reshape(shape)
                start = end
        self.encoders = [{k: t.detach() for k, t in s.items()} for s in update_enc]

        last_dec = self.decoders
        dec_delta = [
            {k: dec_local[j][k] - last_dec[j][k] for k in last_dec[j]}
            for j in range(len(dec_local))
        ]
        new_dec = copy.deepcopy(last_dec)
        for name in self.layer_names:
            layer_beta = torch.clamp(self.beta[name.replace(".", "_")], 0, 1)
            layer_keys = [k for k in dec_delta[0] if k.rsplit(".", 1)[0] == name]
            for key in layer_keys:
                cross = torch.stack([d[key].reshape(-1) for d in dec_delta])
                for i in range(len(dec_delta)):
                    q = dec_delta[i][key].reshape(1, -1)
                    attn = torch.softmax((q @ cross.T) * q.size(-1) ** -0.5, dim=-1)
                    out = attn @ cross
                    step = dec_delta[i][key] + layer_beta[i] * out.reshape(dec_delta[i][key].shape)
                    new_dec[i][key] = new_dec[i][key] + step
        self.dec_output = new_dec
        self.decoders = [{k: t.detach() for k, t in s.items()} for s in new_dec]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> int:
    """Reset the peak counter; return the current usage in bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
    return _status_kib("VmRSS") * 1024


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(method: str, args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """Run one implementation for 1 + repeats rounds; save its final tensors; return timings."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    enc_shapes = encoder_shapes(args.encoder_params)
    dec_shapes = decoder_shapes()
    clients = args.clients
    owners = [min(k, clients - 1) for k in range(args.decoders)]  # last client is multi-task
    keys = [f"client{i}" for i in range(clients)]
    encoders = [random_state(enc_shapes, i, 0.02, device) for i in range(clients)]
    decoders = [random_state(dec_shapes, 100 + k, 0.02, device) for k in range(args.decoders)]
    layout = FlatLayout.from_state(encoders[0])

    times: list[float] = []
    pack_times: list[float] = []
    cpu_times: list[float] = []
    peaks: list[int] = []
    state: FedHCA2State | None = None
    baseline: OfficialStyle | None = None
    local_buffer: Tensor | None = None
    if method == "fast":
        state = FedHCA2State.initial(flatten_states(encoders, layout), decoders, owners)
        local_buffer = torch.empty_like(state.encoder_last)
    else:
        baseline = OfficialStyle(encoders, decoders)
    del encoders

    for round_index in range(1 + args.repeats):
        if state is not None:
            last_enc = [unflatten_state(row, layout) for row in state.encoder_last]
            last_dec = state.decoders_last
        else:
            assert baseline is not None
            last_enc, last_dec = baseline.encoders, baseline.decoders
        enc_local = local_states(last_enc, enc_shapes, round_index + 1)
        dec_local = local_states(last_dec, dec_shapes, 500 + round_index)
        del last_enc
        before = _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        if local_buffer is not None:
            flatten_states(enc_local, layout, out=local_buffer)
            _sync(device)
        packed = time.perf_counter()
        cpu_start = time.process_time()
        if state is not None:
            assert local_buffer is not None
            fedhca2_round(state, local_buffer, dec_local, keys)
        else:
            assert baseline is not None
            with torch.enable_grad():
                baseline.round(enc_local, dec_local, hyper_step=round_index > 0)
        _sync(device)
        end = time.perf_counter()
        if round_index > 0:
            times.append(end - packed)
            cpu_times.append(time.process_time() - cpu_start)
            pack_times.append(packed - start)
            peaks.append(_peak(device) - before)
        del enc_local, dec_local

    if state is not None:
        encoders_out = state.encoder_last
        decoders_out = state.decoders_last
        alpha = state.hyper.alpha.float()
        beta = torch.stack([b.float() for b in state.hyper.beta])
    else:
        assert baseline is not None
        encoders_out = flatten_states(baseline.encoders, layout)
        decoders_out = baseline.decoders
        alpha = baseline.alpha.detach().clone()
        order = [name for name, _ in decoder_layers(list(baseline.decoders[0]))]
        beta = torch.stack([baseline.beta[n.replace(".", "_")].detach() for n in order], dim=1)
    torch.save(
        {"encoders": encoders_out.cpu(), "decoders": decoders_out, "alpha": alpha, "beta": beta},
        os.path.join(out_dir, f"{method}.pt"),
    )
    return {"round_s": times, "round_cpu_s": cpu_times, "pack_s": pack_times, "peak_bytes": peaks}


def _child(method: str, args: argparse.Namespace, out_dir: str, queue: Any) -> None:
    queue.put(worker(method, args, out_dir))


def run_isolated(method: str, args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """Run :func:`worker` in a fresh process so its memory peak is its own."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, args, out_dir, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{method} worker exited with {process.exitcode}")
    return result


def compare(out_dir: str) -> dict[str, float]:
    """Largest absolute differences between the two implementations' final tensors."""
    fast = torch.load(os.path.join(out_dir, "fast.pt"))
    base = torch.load(os.path.join(out_dir, "baseline.pt"))
    decoder_diff = max(
        (f[k] - b[k]).abs().max().item()
        for f, b in zip(fast["decoders"], base["decoders"])
        for k in f
    )
    return {
        "encoders": (fast["encoders"] - base["encoders"]).abs().max().item(),
        "decoders": decoder_diff,
        "alpha": (fast["alpha"] - base["alpha"]).abs().max().item(),
        "beta": (fast["beta"] - base["beta"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--encoder-params", type=int, default=SWIN_T_PARAMS)
    parser.add_argument("--decoders", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "fedhca2_aggregation.json",
    )
    args = parser.parse_args()
    if args.decoders < args.clients:
        parser.error("need at least one decoder per client")

    load_before = os.getloadavg()[0]  # other processes on the machine slow both paths
    with tempfile.TemporaryDirectory() as out_dir:
        results = {m: run_isolated(m, args, out_dir) for m in ("fast", "baseline")}
        diffs = compare(out_dir)

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    fast_s = statistics.median(results["fast"]["round_s"])
    base_s = statistics.median(results["baseline"]["round_s"])
    rows = [
        ("fedhca2_round (flat buffers)", results["fast"]),
        ("official-style (dict copies)", results["baseline"]),
    ]
    print(
        f"FedHCA² server round: {args.clients} clients × {args.encoder_params:,} encoder params, "
        f"{args.decoders} decoders, device {args.device}, torch threads {threads}"
    )
    print(f"load average during the run: {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':32s} {'median s':>9s} {'min s':>8s} {'CPU s':>8s} {'peak MiB':>9s}")
    for name, res in rows:
        print(
            f"{name:32s} {statistics.median(res['round_s']):9.3f} {min(res['round_s']):8.3f} "
            f"{statistics.median(res['round_cpu_s']):8.3f} {max(res['peak_bytes']) / MIB:9.0f}"
        )
    print(
        f"pack N state dicts into the buffer (flatten_states): "
        f"{statistics.median(results['fast']['pack_s']):.3f} s, not in the round time"
    )
    print(
        f"speed-up {base_s / fast_s:.1f}×; max |difference|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    ok = all(v <= 1e-6 for v in diffs.values())
    print("results equal to 1e-6" if ok else "RESULTS DIFFER")

    record = {
        "clients": args.clients,
        "encoder_params": args.encoder_params,
        "encoder_tensors": len(encoder_shapes(args.encoder_params)),
        "decoders": args.decoders,
        "decoder_params": sum(torch.Size(s).numel() for _, s in decoder_shapes()),
        "repeats": args.repeats,
        "device": args.device,
        "threads": threads,
        "load_average": [load_before, os.getloadavg()[0]],
        "fast": results["fast"],
        "baseline": results["baseline"],
        "median_round_s": {"fast": fast_s, "baseline": base_s},
        "speedup": base_s / fast_s,
        "max_abs_difference": diffs,
        "equal_to_1e-6": ok,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
