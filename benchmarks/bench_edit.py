"""The erasure edit at SD1.5 scale: our ConceptEraser (exact and paper mode) against the dense formulation of the
released SAeUron/SAEmnesia hook, on the same inputs.

d = 1280, n = 20480, k = 32; x = [2, 1280, 16, 16], i.e. one CFG step (cond + uncond) at 512 px. Random weights;
one concept erased (SAEmnesia-style file: 20 concepts, 50 buckets, one latent each).

Time: all variants run interleaved (one call of each per round), after warm-up; we report the median.
Memory: the peak resident memory one call adds above its inputs, measured per variant in a fresh subprocess:
Linux VmHWM after resetting it through /proc/self/clear_refs, with glibc's mmap threshold pinned at 64 KiB so
that freed buffers go back to the OS instead of hiding in the heap.

    python benchmarks/bench_edit.py [--repeats 15] [--dtype float32|bfloat16|float16]

Prints a table and writes benchmarks/results/bench_edit.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from saemnesia_core.concepts import Concept, ConceptTables
from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.sae import SAEConfig, TopKSAE, block_to_tokens, tokens_to_block

D, N_LATENTS, K = 1280, 20480, 32
BATCH, H, W = 2, 16, 16
CONCEPTS, BUCKETS = 20, 50
ERASED, GAMMA, T = "concept_0", -1.0, 0.5
BUCKET = int(T * BUCKETS)
RESULTS = Path(__file__).resolve().parent / "results"


def setup(dtype: torch.dtype, seed: int = 0):
    """The SAE, its concepts and tables, and the block activations, all seeded."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(D, N_LATENTS, K))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    latents = torch.randperm(N_LATENTS)[:CONCEPTS]
    concepts = [Concept(f"concept_{c}", "object", int(i)) for c, i in enumerate(latents)]
    shape = (CONCEPTS, BUCKETS, 1)
    tables = ConceptTables(latents.reshape(-1, 1, 1).expand(shape).clone(), torch.rand(shape) + 0.5,
                           torch.zeros(shape))  # θ = 0: the latent is edited wherever it is in the top k
    x = torch.randn(BATCH, D, H, W)
    direction = sae.encoder.weight[latents[0]].detach()
    x[:, :, :8] += 3 * direction[None, :, None, None] / direction.norm() * D**0.5  # the concept in half the image
    return sae.to(dtype), concepts, tables, x.to(dtype)


def dense_reference(sae: TopKSAE, tables: ConceptTables, x: torch.Tensor, bucket: int, exact: bool = False):
    """The released hook's formulation: scatter the code to a dense [N, n] buffer, decode twice, add x̂ − x.

    exact=True (for checking our exact mode only): x + (z' − z)·W_dec, computed densely.
    """
    tokens = block_to_tokens(x).reshape(-1, D)
    pre = torch.relu((tokens - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    acts, indices = pre.topk(K, dim=-1, sorted=False)
    z = acts.new_zeros(acts.shape[0], N_LATENTS).scatter_(-1, indices, acts)
    recon = z @ sae.W_dec + sae.b_dec
    error = (recon - tokens).float()
    idx = tables.latents[0, bucket]
    z_before = z.clone() if exact else None
    selected = z[:, idx]
    scaling = GAMMA * tables.mean_acts[0, bucket].to(x.dtype)
    z[:, idx] = torch.where(selected > tables.thresholds[0, bucket].to(x.dtype), selected * scaling, selected)
    if exact:
        out = (tokens.float() + ((z - z_before) @ sae.W_dec).float()).to(x.dtype)
    else:
        out = ((z @ sae.W_dec + sae.b_dec) + error).to(x.dtype)
    return tokens_to_block(out.reshape(BATCH, H * W, D), H, W)


def variants(sae, concepts, tables, x):
    exact = ConceptEraser(sae, concepts, tables, {ERASED: GAMMA}, mode="exact")
    paper = ConceptEraser(sae, concepts, tables, {ERASED: GAMMA}, mode="paper")

    def encoder_only():
        tokens = block_to_tokens(x)
        return sae.pre_acts(tokens).topk(K, dim=-1, sorted=False)

    return {
        "dense reference (released hook)": lambda: dense_reference(sae, tables, x, BUCKET),
        "ours, paper mode": lambda: paper(x, T),
        "ours, exact mode": lambda: exact(x, T),
        "encoder + top-k only (floor)": encoder_only,
    }


def vm_bytes(key: str) -> int | None:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else None


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
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.peak_of:
        print(json.dumps(measure_peak(args.peak_of, dtype)))
        return

    sae, concepts, tables, x = setup(dtype)
    fns = variants(sae, concepts, tables, x)
    times = {name: [] for name in fns}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in fns.items()}
        exact_dense = dense_reference(sae, tables, x, BUCKET, exact=True)
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    paper_diff = (outputs["ours, paper mode"].float() - outputs["dense reference (released hook)"].float()).abs().max()
    exact_diff = (outputs["ours, exact mode"].float() - exact_dense.float()).abs().max()
    edited = (outputs["ours, exact mode"] != x).any(1).float().mean()

    reference = statistics.median(times["dense reference (released hook)"])
    rows = []
    for name in fns:
        median = statistics.median(times[name])
        rows.append({"variant": name, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times[name]),
                     "speedup_vs_dense": reference / median, "peak_mb": _mb(peak_in_subprocess(name, args.dtype))})
    result = {
        "config": {"d": D, "n": N_LATENTS, "k": K, "x": [BATCH, D, H, W], "tokens": BATCH * H * W,
                   "dtype": args.dtype, "erased_concepts": 1, "buckets": BUCKETS, "repeats": args.repeats,
                   "warmup": args.warmup},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "python": platform.python_version(),
                        "load_average": os.getloadavg()},
        "checks": {"paper_vs_dense_max_abs_diff": float(paper_diff), "exact_vs_dense_max_abs_diff": float(exact_diff),
                   "tokens_edited_fraction": float(edited)},
        "memory_method": "peak RSS one call adds above its inputs: VmHWM after /proc/self/clear_refs, fresh "
                         "subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536",
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_edit.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    (RESULTS / "bench_edit.md").write_text(table + "\n")
    print(table)


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _markdown(result: dict) -> str:
    cfg, env, checks = result["config"], result["environment"], result["checks"]
    lines = [
        f"# Erasure edit at SD1.5 scale (d={cfg['d']}, n={cfg['n']}, k={cfg['k']}, {cfg['tokens']} tokens, "
        f"{cfg['dtype']}, CPU)",
        "",
        f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs ({env['machine']}), "
        f"load average {env['load_average'][0]:.2f}; median of {cfg['repeats']} interleaved calls.",
        "",
        "| variant | median ms | min ms | speed-up vs dense | peak MiB per call |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup_vs_dense']:.2f}× "
                     f"| {peak} |")
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
