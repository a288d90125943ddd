"""The erasure edit at SD1.5 scale: our ConceptEraser (exact, paper and replace mode; top-k or threshold detection,
DESIGN §6.4) against the dense formulation of the released SAeUron/SAEmnesia hook, on the same inputs.

d = 1280, n = 20480, k = 32; x = [2, 1280, 16, 16], i.e. one CFG step (cond + uncond) at 512 px. Random weights;
one concept erased (SAEmnesia-style file: 20 concepts, 50 buckets, one latent each, μ = 1, θ = 0).

Time: all variants run interleaved (one call of each per round), after warm-up; we report the median and the
spread (min–max over the rounds). Kernels: the ATen ops one call launches (views aside), counted with a
TorchDispatchMode, against one call of the released hook as their code runs it (saemnesia_tools.testing.
released_hook_call). Ours is called as the ComfyUI patch calls it (each item's t and edit flag from the host).
Interrupted (Ctrl-C, or SIGINT from scripts/gpu_check.sh's time budget), it writes the rounds it has, marked partial.
Memory: the peak resident memory one call adds above its inputs, measured per variant in a fresh subprocess:
Linux VmHWM after resetting it through /proc/self/clear_refs, with glibc's mmap threshold pinned at 64 KiB so
that freed buffers go back to the OS instead of hiding in the heap.

    python benchmarks/bench_edit.py [--repeats 15] [--dtype float32|bfloat16|float16] [--device cpu|cuda]

Prints a table and writes benchmarks/results/bench_edit.json and .md (--out-name changes the name). On CUDA the
calls are synchronised for timing and the peak is the GPU memory one call allocates above its inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.timing import interleaved
from saemnesia_core.sae import TopKSAE, block_to_tokens, tokens_to_block
from saemnesia_core.sae_file import SAEFile
from torch.utils._python_dispatch import TorchDispatchMode

from saemnesia_tools.testing import random_sae, released_hook, released_hook_call, sae_file_with_assigned_latents

D, N_LATENTS, K = 1280, 20480, 32
BATCH, H, W = 2, 16, 16
CONCEPTS, BUCKETS = 20, 50
ERASED, GAMMA, T = "concept_0", -1.0, 0.5
RESULTS = Path(__file__).resolve().parent / "results"


def setup(dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """The SAE, its file (concepts and tables) and the block activations, all seeded."""
    sae = random_sae(D, N_LATENTS, K, seed)
    latents = torch.randperm(N_LATENTS, generator=torch.Generator().manual_seed(seed))[:CONCEPTS].tolist()
    # θ = 0: the latent is edited wherever it is in the top k
    sae_file = sae_file_with_assigned_latents(sae, latents, num_buckets=BUCKETS, made_by="benchmarks/bench_edit.py")
    x = torch.randn(BATCH, D, H, W, generator=torch.Generator().manual_seed(seed + 1))
    direction = sae.encoder.weight[latents[0]].detach()
    x[:, :, :8] += 3 * direction[None, :, None, None] / direction.norm() * D**0.5  # the concept in half the image
    return sae.to(device, dtype), sae_file, x.to(device, dtype)


def dense_reference(sae: TopKSAE, sae_file: SAEFile, x: torch.Tensor, exact: bool = False):
    """The released hook's formulation (saemnesia_tools.testing.released_hook) on the block x.
    exact=True (for checking our exact mode only): x + (z' − z)·W_dec, computed densely."""
    out = released_hook(sae, sae_file.concepts, sae_file.tables, block_to_tokens(x), T, {ERASED: GAMMA}, exact=exact)
    return tokens_to_block(out, H, W)


TS, EDIT = [T] * BATCH, [True] * BATCH  # as the ComfyUI patch passes them: each item's t and edit flag, on the host


def released_call(sae, sae_file, x):
    """One call of the released hook at the erased concept's latent (its θ and γ·μ at T's bucket)."""
    c = [c.label for c in sae_file.concepts].index(ERASED)
    b = min(int(T * BUCKETS), BUCKETS - 1)
    tables = sae_file.tables
    return released_hook_call(sae, tables.latents[c, b].to(x.device), tables.thresholds[c, b].to(x.device, x.dtype),
                              (GAMMA * tables.mean_acts[c, b]).to(x.device, x.dtype), x)


def variants(sae, sae_file, x):
    def eraser(mode, detection="topk"):
        return ConceptEraser(sae, sae_file.concepts, sae_file.tables, {ERASED: GAMMA}, mode=mode, detection=detection)

    exact, paper, replace = eraser("exact"), eraser("paper"), eraser("replace")
    exact_fast, replace_fast = eraser("exact", "threshold"), eraser("replace", "threshold")

    def encoder_only():
        tokens = block_to_tokens(x)
        return sae.pre_acts(tokens).topk(K, dim=-1, sorted=False)

    mixed = {}
    if sae.dtype != torch.float32:  # an fp32 SAE file on a half-precision UNet: its weights are cast to x's dtype
        sae32 = copy.deepcopy(sae).float()
        kept = ConceptEraser(sae32, sae_file.concepts, sae_file.tables, {ERASED: GAMMA})

        def fresh():
            return ConceptEraser(sae32, sae_file.concepts, sae_file.tables, {ERASED: GAMMA})(x, TS, EDIT)

        mixed = {"ours, exact mode, fp32 SAE (weights cast once, kept)": lambda: kept(x, TS, EDIT),
                 "ours, exact mode, fp32 SAE, a new eraser per call (a cast per call)": fresh}
    return {
        "dense reference (released hook)": lambda: released_call(sae, sae_file, x),
        "ours, paper mode": lambda: paper(x, TS, EDIT),
        "ours, exact mode": lambda: exact(x, TS, EDIT),
        "ours, replace mode": lambda: replace(x, TS, EDIT),
        "ours, exact mode, threshold detection": lambda: exact_fast(x, TS, EDIT),
        "ours, replace mode, threshold detection": lambda: replace_fast(x, TS, EDIT),
        **mixed,
        "encoder + top-k only (floor)": encoder_only,
    }


class Kernels(TorchDispatchMode):
    """Counts the ops that compute something (a view's output aliases its input and launches no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        self.count += schema.is_mutable or not any(r.alias_info is not None for r in schema.returns)
        return func(*args, **(kwargs or {}))


def kernels(fn) -> int:
    with Kernels() as counter:
        fn()
    return counter.count


def vm_bytes(key: str) -> int | None:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else None


def cuda_peak(fn) -> int:
    """GPU memory one call allocates at its peak, above what was allocated before it."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_peak(name: str, dtype: torch.dtype) -> int | None:
    """In this (fresh) process: the resident memory one call of `name` adds at its peak, or None if unmeasurable."""
    fn = variants(*setup(dtype))[name]
    with torch.no_grad():
        fn()  # warm-up: one-time allocations (thread pools, caches) are not the call's
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        base = vm_bytes("VmRSS")
        fn()
        return vm_bytes("VmHWM") - base


def peak_in_subprocess(name: str, dtype: str) -> int | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--peak-of", name, "--dtype", dtype], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out-name", default="bench_edit", help="results file name (without .json / .md)")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.peak_of:
        print(json.dumps(measure_peak(args.peak_of, dtype)))
        return

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sae, sae_file, x = setup(dtype, device=args.device)
    fns = variants(sae, sae_file, x)
    with torch.no_grad():
        outputs = {name: fn() for name, fn in fns.items()}
        counts = {name: kernels(fn) for name, fn in fns.items()}
        paper_dense = dense_reference(sae, sae_file, x)
        exact_dense = dense_reference(sae, sae_file, x, exact=True)
        times, partial = interleaved(fns, args.repeats, args.warmup, sync)
        peaks = {name: cuda_peak(fn) if cuda else None if partial else peak_in_subprocess(name, args.dtype)
                 for name, fn in fns.items()}
    paper_diff = (outputs["ours, paper mode"].float() - paper_dense.float()).abs().max()
    exact_diff = (outputs["ours, exact mode"].float() - exact_dense.float()).abs().max()
    edited = (outputs["ours, exact mode"] != x).any(1).float().mean()

    reference = statistics.median(times["dense reference (released hook)"])
    rows = []
    for name in fns:
        median = statistics.median(times[name])
        rows.append({"variant": name, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times[name]),
                     "max_ms": 1e3 * max(times[name]), "speedup_vs_dense": reference / median,
                     "peak_mb": _mb(peaks[name]), "kernels": counts[name]})
    result = {
        "config": {"d": D, "n": N_LATENTS, "k": K, "x": [BATCH, D, H, W], "tokens": BATCH * H * W,
                   "dtype": args.dtype, "device": torch.cuda.get_device_name() if cuda else "CPU",
                   "erased_concepts": 1, "buckets": BUCKETS, "repeats": len(times[next(iter(times))]),
                   "warmup": args.warmup, "partial": partial},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "python": platform.python_version(),
                        "load_average": os.getloadavg()},
        "checks": {"paper_vs_dense_max_abs_diff": float(paper_diff), "exact_vs_dense_max_abs_diff": float(exact_diff),
                   "tokens_edited_fraction": float(edited)},
        "memory_method": "peak GPU memory one call allocates above its inputs (torch.cuda.max_memory_allocated)"
                         if cuda else "peak RSS one call adds above its inputs: VmHWM after /proc/self/clear_refs, "
                         "fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536",
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.out_name}.json", result, indent=2)
    table = _markdown(result)
    write_bytes_atomic(RESULTS / f"{args.out_name}.md", (table + "\n").encode())
    print(table)


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _markdown(result: dict) -> str:
    cfg, env, checks = result["config"], result["environment"], result["checks"]
    lines = [
        f"# Erasure edit at SD1.5 scale (d={cfg['d']}, n={cfg['n']}, k={cfg['k']}, {cfg['tokens']} tokens, "
        f"{cfg['dtype']}, {cfg['device']})",
        "",
        f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs ({env['machine']}), "
        f"load average {env['load_average'][0]:.2f}; median of {cfg['repeats']} interleaved calls"
        + (" (partial: stopped by its time budget)." if cfg.get("partial") else "."),
        "",
        "| variant | median ms | spread ms (min–max) | speed-up vs dense | kernels per call | peak MiB per call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | "
                     f"{r['speedup_vs_dense']:.2f}× | {r['kernels']} | {peak} |")
    lines += [
        "",
        f"Paper mode vs the dense reference: max |Δ| = {checks['paper_vs_dense_max_abs_diff']:.2e}; exact mode vs "
        f"x + (z' − z)·W_dec computed densely: max |Δ| = {checks['exact_vs_dense_max_abs_diff']:.2e}; "
        f"{100 * checks['tokens_edited_fraction']:.0f} % of tokens edited.",
        f"Memory: {result['memory_method']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
