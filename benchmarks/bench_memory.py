# SPDX-License-Identifier: GPL-3.0-or-later
"""Memory of erased models: 0, 1 and 20 chained Erase Concepts clones of one model share one copy of the SAE.

Each variant runs in a fresh subprocess: ComfyUI's UNet with SD1.5's real config and random weights (as in
bench_sampling.py), one random SAE of the papers' size (d = 1280, n = 20480, k = 32, ≈ 210 MB in fp32) loaded
once, then `erase_concepts` applied N times in a chain (clone i erases concept i and wraps clone i−1's patch, as
N Erase Concepts nodes in a row do), then one sampling step at 256 px with the last clone.
Reported per variant: resident memory added by loading the SAE and by building the chain, the peak resident
memory during the sampling step (Linux VmHWM, reset through /proc/self/clear_refs just before; glibc's mmap
threshold pinned at 64 KiB so freed buffers leave the process), and — over every clone of the chain — how many
distinct SAE parameter storages (one SAE = 4) and SAE ModelPatcher objects are attached (a model clone
clones its attached patchers too: one wrapper per clone, all over the same 4 storages).

    python benchmarks/bench_memory.py [--chain 1,20] [--size 256] [--steps 1]

Prints a table and writes benchmarks/results/bench_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def vm_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(chain: int, sae_path: Path, size: int, steps: int) -> dict:
    """In this (fresh) process: build the model, load the SAE (if chain > 0), chain `chain` clones, sample."""
    import torch

    from bench_sampling import sd15_model, sd15_sampler
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY
    from saemnesia_comfy.sae_library import load_sae_path

    model, sample = sd15_model(), sd15_sampler(size)
    rss_model = vm_bytes("VmRSS")
    clones, sae_rss, chain_rss = [model], 0, 0
    if chain:
        loaded = load_sae_path(sae_path)
        sae_rss = vm_bytes("VmRSS") - rss_model
        before = vm_bytes("VmRSS")
        for i in range(chain):
            clones.append(erase_concepts(clones[-1], loaded, {f"concept_{i}": -1.0}, -1.0))
        chain_rss = vm_bytes("VmRSS") - before
    storages, patchers = set(), set()
    for clone in clones:
        for patcher in clone.get_additional_models_with_key(ADDITIONAL_MODELS_KEY):
            patchers.add(id(patcher))
            storages.update(p.untyped_storage().data_ptr() for p in patcher.model.sae.parameters())
    with torch.no_grad():
        sample(clones[-1], 1)  # warm-up: one-time allocations are not the chain's
        Path("/proc/self/clear_refs").write_text("5")
        base = vm_bytes("VmRSS")
        start = time.perf_counter()
        sample(clones[-1], steps)
        seconds = time.perf_counter() - start
    return {"chain": chain, "model_rss_mb": rss_model / 2**20, "sae_load_rss_mb": sae_rss / 2**20,
            "chain_build_rss_mb": chain_rss / 2**20, "rss_before_sampling_mb": base / 2**20,
            "sampling_peak_above_before_mb": (vm_bytes("VmHWM") - base) / 2**20,
            "peak_rss_mb": vm_bytes("VmHWM") / 2**20, "sampling_s": seconds,
            "sae_parameter_storages": len(storages), "sae_patchers": len(patchers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chain", default="0,1,20", help="comma-separated chain lengths (0 = no erasure)")
    p.add_argument("--size", type=int, default=256, help="pixels")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sae", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.measure is not None:
        import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)

        print(json.dumps(measure(args.measure, args.sae, args.size, args.steps)))
        return

    import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
    from bench_sampling import random_sae_file
    from saemnesia_core.sae_file import save_sae_file

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sae_path = Path(folder) / "random_sae.safetensors"
        save_sae_file(random_sae_file(1280, 20480, 32), sae_path)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for chain in (int(c) for c in args.chain.split(",")):
            done = subprocess.run([sys.executable, __file__, "--measure", str(chain), "--sae", str(sae_path),
                                   "--size", str(args.size), "--steps", str(args.steps)], env=env,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"config": {"unet": "SD1.5 config, random weights", "sae": "d=1280, n=20480, k=32, fp32",
                         "pixels": args.size, "steps": args.steps},
              "environment": {"cpus": os.cpu_count(), "machine": platform.machine(), "load_average": os.getloadavg()},
              "method": "fresh subprocess per variant; VmRSS deltas; peak = VmHWM after /proc/self/clear_refs, "
                        "MALLOC_MMAP_THRESHOLD_=65536",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "bench_memory.md").write_text(table + "\n")
    print(table)


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Memory: chained Erase Concepts clones ({c['unet']}, {c['pixels']} px, {c['steps']} step(s); SAE "
             f"{c['sae']})", "",
             "| chained clones | SAE load MB | chain build MB | peak RSS MB | sampling peak above start MB "
             "| sampling s | SAE storages | SAE patchers |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['chain']} | {r['sae_load_rss_mb']:.0f} | {r['chain_build_rss_mb']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['sampling_peak_above_before_mb']:.0f} | {r['sampling_s']:.1f} | "
                     f"{r['sae_parameter_storages']} | {r['sae_patchers']} |")
    lines += ["", f"Method: {result['method']}. Load average at the end: {result['environment']['load_average'][0]:.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
