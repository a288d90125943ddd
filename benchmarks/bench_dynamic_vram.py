# SPDX-License-Identifier: GPL-3.0-or-later
"""Erase Concepts through ComfyUI's dynamic-VRAM model patcher (`ModelPatcherDynamic`), on a CUDA machine.

Newer ComfyUI hosts (0.33 here) start with comfy-aimdo's dynamic VRAM when it works, which is their default on
NVIDIA: the UNet's patcher is then a `ModelPatcherDynamic`, whose weights comfy-aimdo pages in as the layers run.
This script starts the host the way its `main.py` does (comfy-aimdo's library loaded before PyTorch, its devices
registered, `CoreModelPatcher` set to `ModelPatcherDynamic`), loads an SD1.5-shaped UNet with random weights
through ComfyUI's own loader (`comfy.sd.load_diffusion_model_state_dict`, what UNETLoader calls), and samples at
512 px in fp16 with Erase Concepts (a random SAE of the papers' size, d = 1280, n = 20480, k = 32; all
20 of its concepts chosen, so that some latent fires).

Checks (the run fails if one does not hold): the loaded model and Erase Concepts' clones are dynamic patchers;
nothing chosen gives the unpatched image bit for bit; a chosen concept changes it; the edit runs on the GPU with
the SAE's weights placed there by ComfyUI's memory manager. Time: no erasure vs exact and replace mode, interleaved.

    COMFYUI_PATH=<a ComfyUI 0.33+ host> python benchmarks/bench_dynamic_vram.py [--steps 20] [--repeats 10]

Writes benchmarks/results/gpu_dynamic_vram.json and .md (--out-name changes the name). scripts/gpu_check.sh runs it.
"""

import comfy_aimdo.control  # first (ComfyUI's main.py loads comfy-aimdo before PyTorch)

AIMDO_LOADED = comfy_aimdo.control.init()

import argparse
import statistics
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from saemnesia_tools.comfyui.host import import_comfy

RESULTS = Path(__file__).resolve().parent / "results"


def start_dynamic_vram() -> str:
    """ComfyUI's start-up steps for dynamic VRAM (its main.py): register the devices with comfy-aimdo and make
    ComfyUI's loaders build ModelPatcherDynamic. Returns the host's version."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfyui_version

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        sys.exit(f"ComfyUI {comfyui_version.__version__} has no ModelPatcherDynamic: point COMFYUI_PATH at 0.33+")
    if not AIMDO_LOADED or not comfy_aimdo.control.init_devices(
            (d.index, 0) for d in comfy.model_management.get_all_torch_devices()):
        sys.exit("comfy-aimdo did not start on this machine: ComfyUI would fall back to its classic ModelPatcher")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return comfyui_version.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512, help="pixels (latent = size/8)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out-name", default="gpu_dynamic_vram", help="results file name (without .json / .md)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_dynamic_vram: no CUDA device; ComfyUI uses its classic ModelPatcher on the CPU")
        return
    import_comfy(cpu=False)
    import comfy.sd
    from bench_sampling import PARTIAL, load_random_sae, random_sae_file, sd15_model, sd15_sampler, time_variants

    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY, block_for, patch_block_output
    from saemnesia_core.files import write_bytes_atomic, write_json_atomic

    # The random weights are made first: under dynamic VRAM, ComfyUI's layers are built without weights.
    state = sd15_model(torch.float16).model.diffusion_model.state_dict()
    host = start_dynamic_vram()
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float16})
    del state
    sample = sd15_sampler(args.size)
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_random_sae(random_sae_file(1280, 20480, 32), Path(folder))
    every = {c.label: -1.0 for c in loaded.file.concepts}  # 20 random latents: some fire on some tokens
    variants = {"no erasure": model,
                "Erase Concepts, nothing chosen": erase_concepts(model, loaded, {}, -1.0),
                "Erase Concepts, exact": erase_concepts(model, loaded, every, -1.0),
                "Erase Concepts, replace": erase_concepts(model, loaded, every, -1.0, mode="replace")}

    watched, placements = variants["Erase Concepts, exact"].clone(), []
    (sae_patcher,) = watched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    sae_bytes = sum(p.numel() * p.element_size() for p in sae_patcher.model.parameters())

    def where_the_sae_is(out, options):  # per call: the SAE's device, dtype and storage, and the block's device
        w = sae_patcher.model.sae.W_dec
        placements.append((str(w.device), str(w.dtype), w.data_ptr(), str(out.device)))
        return out

    patch_block_output(watched, block_for(watched, loaded.file.hookpoint, loaded.file.config.d_in), where_the_sae_is)
    with torch.no_grad():
        first = {name: sample(m, args.steps) for name, m in variants.items()}  # the first run pages weights in
        images = {name: sample(m, args.steps) for name, m in variants.items()}
        sample(watched, 2)

    plain, nothing = images["no erasure"], images["Erase Concepts, nothing chosen"]
    # The host's own behaviour, not a check of ours: a model's first run under dynamic VRAM (weights paged in as
    # the layers run) need not equal its later runs bit for bit.
    observations = {
        "no erasure, first run = second run, bit for bit": torch.equal(first["no erasure"], plain),
        "no erasure, first vs second run, max abs diff": float((first["no erasure"] - plain).abs().max()),
    }
    checks = {
        "model patcher": type(model).__name__,
        "Erase Concepts' clones are dynamic": all(m.is_dynamic() for m in variants.values()),
        "SAE patcher": type(sae_patcher).__name__,
        "nothing chosen = no erasure (second runs), bit for bit": torch.equal(nothing, plain),
        "exact mode changes the image": not torch.equal(images["Erase Concepts, exact"], images["no erasure"]),
        "replace mode changes the image": not torch.equal(images["Erase Concepts, replace"], images["no erasure"]),
        "edit calls seen": len(placements),
        "SAE weights and block output on the GPU at every call": bool(placements) and all(
            w.startswith("cuda") and o.startswith("cuda") for w, _, _, o in placements),
    }
    # where the SAE lives at each call of a 2-step run, and how often it was placed anew (each time, its bytes move)
    storages = [ptr for _, _, ptr, _ in placements]
    moves = 1 + sum(a != b for a, b in zip(storages, storages[1:])) if storages else 0
    residency = {"calls": len(placements), "devices": sorted({w for w, _, _, _ in placements}),
                 "dtypes": sorted({d for _, d, _, _ in placements}), "placements": moves,
                 "sae_bytes": sae_bytes, "bytes_moved_per_run": moves * sae_bytes}
    times = time_variants(sample, variants, args.steps, args.repeats, args.warmup)
    base = statistics.median(times["no erasure"])
    rows = [{"variant": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": len(t),
             "per_step_ms": 1e3 * statistics.median(t) / args.steps, "overhead": statistics.median(t) / base - 1,
             "overhead_spread": [min(t) / base - 1, max(t) / base - 1]} for name, t in times.items()]
    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "comfyui": host, "comfy_aimdo": version("comfy-aimdo")},
              "config": {"model": "SD1.5 UNet config, random weights, fp16, loaded by comfy.sd.load_diffusion_model_"
                                  "state_dict", "pixels": args.size, "steps": args.steps, "sampler": "euler",
                         "cfg": 7.5, "sae": "random, d=1280, n=20480, k=32", "repeats": args.repeats,
                         "warmup": args.warmup},
              "observations": observations, "checks": checks, "residency": residency,
              "partial": PARTIAL["rounds_cut"], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.out_name}.json", result, indent=2)
    table = markdown(result)
    write_bytes_atomic(RESULTS / f"{args.out_name}.md", (table + "\n").encode())
    print(table)
    failed = [name for name, ok in checks.items() if ok is False]
    if failed or checks["model patcher"] != "ModelPatcherDynamic":
        sys.exit(f"bench_dynamic_vram: checks failed: {failed or ['model patcher']}")


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# Erase Concepts under ComfyUI's dynamic VRAM ({env['device']})", "",
             (f"ComfyUI {env['comfyui']}, comfy-aimdo {env['comfy_aimdo']}, torch {env['torch']}. {cfg['model']}; "
              f"{cfg['pixels']} px, {cfg['steps']} {cfg['sampler']} steps, CFG {cfg['cfg']}; SAE {cfg['sae']}. "
              f"Every variant sampled twice (the checks read the second runs), then timed: median of "
              f"{cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up."), "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in result["checks"].items()]
    lines += ["", "The host's own behaviour (not a check): a model's first run under dynamic VRAM, with the weights paged "
              "in as the layers run, against its second run.", "", "| observation | result |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in result["observations"].items()]
    res = result["residency"]
    lines += ["", f"Where the SAE lives (a 2-step run with exact mode): at {res['calls']} calls on {res['devices']} in "
              f"{res['dtypes']}; placed {res['placements']} time(s), "
              f"{res['bytes_moved_per_run'] / 2**20:.1f} MiB moved "
              f"per run (the SAE holds {res['sae_bytes'] / 2**20:.1f} MiB)."]
    lines += ["", "| variant | median s | spread s (min–max) | ms / step | overhead | overhead spread |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | {r['per_step_ms']:.1f} | "
              f"{100 * r['overhead']:+.1f} % | "
              f"{100 * r['overhead_spread'][0]:+.1f} … {100 * r['overhead_spread'][1]:+.1f} % |"
              for r in result["rows"]]
    if result.get("partial"):
        lines += ["", "Partial: the time budget stopped the timing; each row says its repeats."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
