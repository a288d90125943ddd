# SPDX-License-Identifier: GPL-3.0-or-later
"""Sampling with vs without Erase Concepts, side by side in one process, and the edit's FLOPs vs the step's.

Two models, each sampled by ComfyUI (`comfy.sample.sample`, Euler, CFG, so every step runs cond + uncond):
- toy: the shipped toy-world model (32×32 pixels; 8×8 tokens of d = 128 at the hooked block) with the shipped
  SAEmnesia SAE (a random SAE of the toy's size if that file is missing), a batch of grid prompts;
- sd15: ComfyUI's UNet with SD1.5's real config (model_channels 320, context 768, 8 heads), random weights, at
  256×256 (latent 32×32, so 8×8 tokens of d = 1280 at output_blocks.4.1), with a random SAE of the papers' size
  (d = 1280, n = 20480, k = 32; 20 concepts, 50 buckets, θ = 0 so the edit never skips a token).
Variants: no erasure; Erase Concepts (ours: `erase_concepts`, the node's code) in exact and replace mode, each with
top-k and with threshold detection (DESIGN §6.4); the papers' dense hook
(DESIGN §6.1: scatter the top-k code to a dense [tokens, n] buffer, edit, decode twice, add the error x̂ − x;
`saemnesia_tools.testing.released_hook`), as a patch on the same block. Time: variants interleaved round by round after a warm-up, median.
FLOPs: one sampling step of each variant under torch's FlopCounterMode (with CPU attention counted, which it
misses by default); edit FLOPs = variant − no erasure. The measured overhead is compared with that ratio.

At scale (FLOPs only: these models cannot be sampled on a CPU), `--models sdxl,flux`: ComfyUI's own SDXL and Flux
model classes with the real configs (SDXL; Flux.1-dev as ComfyUI's detection reads it), built on the meta device,
one step's forward counted at 1024×1024 pixels (SDXL: cond + uncond; Flux: one pass, guidance-distilled); the
edit at one block (SDXL `unet.up_blocks.0.attentions.1`, 32×32 tokens of d = 1280; Flux's double-stream block,
64×64 image tokens of d = 3072) with an SAE of the papers' shape, n = 16·d and k = 32: ConceptEraser (exact and
replace) and the released dense hook, counted on real tensors of 256 tokens and scaled to the block's tokens
(every part of the edit is per token).

    python benchmarks/bench_sampling.py [--models toy,sd15] [--repeats 3] [--toy-steps 25 --toy-batch 16]
                                        [--sd-steps 3 --sd-size 256]
    python benchmarks/bench_sampling.py --models sdxl,flux --out-name bench_sampling_scale

Prints a table and writes benchmarks/results/bench_sampling.json and .md (--out-name changes the name). Timings are
only comparable within a run (other processes share the CPU; the load average is recorded). ComfyUI samples on
its device (a GPU when there is one: scripts/gpu_check.sh runs this at SD1.5 shape, 512 px).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
import comfy.model_management
import comfy.sample

from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.patch import StepGate, attach_weights, block_for, patch_block_output
from saemnesia_comfy.sae_library import LoadedSAE, load_sae_path
from saemnesia_tools.comfyui.testing import make_sd15_model
from saemnesia_core.sae import block_to_tokens, tokens_to_block
from saemnesia_core.sae_file import SAEFile, save_sae_file
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.timing import interleaved
from saemnesia_tools.testing import random_sae, released_hook, sae_file_with_assigned_latents
from saemnesia_tools.toy import assets

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOOKPOINT = "unet.up_blocks.1.attentions.1"
ERASED, GAMMA = "concept_0", -1.0
# CPU attention is not in FlopCounterMode's registry (it would count 0): the same formula as the GPU kernels.
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}


def random_sae_file(d: int, n: int, k: int, concepts: int = 20, buckets: int = 50, seed: int = 0) -> SAEFile:
    """An SAEmnesia-style file with random weights: one latent per concept, θ = 0, μ = 1."""
    latents = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:concepts].tolist()
    return sae_file_with_assigned_latents(random_sae(d, n, k, seed), latents, num_buckets=buckets,
                                          model_family="benchmark", made_by="benchmarks/bench_sampling.py")


def load_random_sae(sae_file: SAEFile, folder: Path) -> LoadedSAE:
    path = folder / f"random_sae_{sae_file.config.d_in}.safetensors"
    save_sae_file(sae_file, path)
    return load_sae_path(path)


def dense_hook(model, loaded: LoadedSAE, concept: str, gamma: float):
    """A clone of `model` with the released hook's dense formulation on the SAE's block (the papers' reference)."""
    m = model.clone()
    gate = StepGate(m, 0.0, 1.0, "both")
    sae, f = loaded.sae, loaded.file

    def edit(out, options):
        _, t = gate.items(options, out.shape[0], out.device)
        x = block_to_tokens(out).to(sae.encoder.weight.dtype)
        edited = released_hook(sae, f.concepts, f.tables, x, t.cpu(), {concept: gamma})
        return tokens_to_block(edited.to(out.dtype), *out.shape[2:])

    patch_block_output(m, block_for(m, loaded.file.hookpoint, loaded.file.config.d_in), edit)
    attach_weights(m, loaded.patcher)  # ComfyUI places the SAE on the model's device, as for Erase Concepts
    return m


def variants(model, loaded: LoadedSAE, concept: str) -> dict:
    def ours(mode, detection="topk"):
        return erase_concepts(model, loaded, {concept: GAMMA}, GAMMA, mode=mode, detection=detection)

    return {"no erasure": model,
            "Erase Concepts, exact (ours)": ours("exact"),
            "Erase Concepts, replace (ours)": ours("replace"),
            "Erase Concepts, exact, threshold detection (ours)": ours("exact", "threshold"),
            "Erase Concepts, replace, threshold detection (ours)": ours("replace", "threshold"),
            "dense hook (papers' formulation)": dense_hook(model, loaded, concept, GAMMA)}


# ---------------------------------------------------------------------------------------------------- models


def toy_setup(args, folder: Path):
    """(sample(model, steps), loaded SAE, description) for the toy model."""
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_tools.comfyui.toy.sampling import PromptEncoder, generate
    from saemnesia_tools.toy.prompts import make_prompt
    from saemnesia_tools.toy.render import OBJECTS, STYLES

    model, clip, vae = load_toy_model(args.toy_model)
    if args.toy_sae.exists():
        loaded, sae_note = load_sae_path(args.toy_sae), str(args.toy_sae.relative_to(ROOT))
        concept = loaded.file.concepts[0].label
    else:
        loaded = load_random_sae(random_sae_file(128, 2048, 8), folder)
        sae_note, concept = "random, toy size (d=128, n=2048, k=8)", ERASED
    encoder = PromptEncoder(clip)
    items = [(o, s) for o in OBJECTS for s in (*STYLES, None)][: args.toy_batch]
    prompts, seeds = [make_prompt(o, s) for o, s in items], list(range(len(items)))

    def sample(m, steps):
        return generate(m, vae, encoder, prompts, seeds, steps=steps)

    cfg = loaded.file.config
    return sample, variants(model, loaded, concept), {"model": "toy world, 32x32 pixels", "batch": len(prompts), "steps": args.toy_steps,
                            "sae": sae_note, "d": cfg.d_in, "n": cfg.num_latents, "k": cfg.k}


def sd15_model(dtype=torch.float32):
    """A ComfyUI MODEL: ComfyUI's UNet with SD1.5's real config, random weights, run in `dtype`."""
    return make_sd15_model(model_channels=320, context_dim=768, num_heads=8, dtype=dtype)


def sd15_sampler(pixels: int):
    """sample(model, steps) at `pixels`×`pixels` (latent pixels/8), fixed noise and random text conditioning."""
    side = pixels // 8
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, side, side, generator=gen)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]

    def sample(m, steps):
        return comfy.sample.sample(m, noise, steps, 7.5, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), disable_pbar=True, seed=0)

    return sample


def sd15_setup(args, folder: Path):
    model = sd15_model(getattr(torch, args.sd_dtype))
    loaded = load_random_sae(random_sae_file(1280, 20480, 32), folder)
    side = args.sd_size // 8
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return sd15_sampler(args.sd_size), variants(model, loaded, ERASED), {
        "model": f"SD1.5 UNet config, random weights, {params / 1e6:.0f}M parameters, {args.sd_dtype}",
        "pixels": args.sd_size, "latent": [4, side, side], "tokens_at_block": (side // 4) ** 2, "batch": 1,
        "steps": args.sd_steps, "sae": "random, papers' size", "d": 1280, "n": 20480, "k": 32}


# ---------------------------------------------------------------------------------------------------- at scale
SCALE = {  # family -> (hookpoint, tokens at the block per image, d, CFG passes per step)
    "sdxl": ("unet.up_blocks.0.attentions.1", 32 * 32, 1280, 2),
    "flux": ("transformer.transformer_blocks.9", 64 * 64, 3072, 1),
}
COUNTED_TOKENS = 256  # the edit is counted on this many real tokens and scaled


def meta_step_flops(family: str) -> tuple[int, int]:
    """(FLOPs of one sampling step at 1024 px, parameters) of the family's real model, built on the meta device."""
    import comfy.supported_models

    from saemnesia_tools.comfyui.testing import flux_model_config, sdxl_unet_config

    meta, half = torch.device("meta"), torch.bfloat16
    if family == "sdxl":
        config = comfy.supported_models.SDXL(sdxl_unet_config([0, 0, 2, 2, 10, 10], 10, [0, 0, 0, 2, 2, 2, 10, 10, 10]))
        inputs = dict(x=torch.zeros(2, 4, 128, 128), timesteps=torch.zeros(2), context=torch.zeros(2, 77, 2048),
                      y=torch.zeros(2, 2816))
    else:  # Flux.1-dev, as ComfyUI's detection reads it
        config = flux_model_config(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                                   guidance_embed=True, txt_ids_dims=[])
        inputs = dict(x=torch.zeros(1, 16, 128, 128), timestep=torch.zeros(1), context=torch.zeros(1, 512, 4096),
                      y=torch.zeros(1, 768), guidance=torch.zeros(1))
    config.set_inference_dtype(half, None)
    model = config.get_model({}, device=meta).diffusion_model
    inputs = {k: v.to(meta, half if v.dim() > 1 else torch.float32) for k, v in inputs.items()}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(**inputs, transformer_options={})
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def edit_flops_at_scale(d: int, tokens: int) -> dict[str, float]:
    """FLOPs of the edit on `tokens` tokens of width d, per variant, with a random SAE of the papers' shape."""
    from saemnesia_core.eraser import ConceptEraser

    f = random_sae_file(d, 16 * d, 32)
    sae, x = f.build_sae(), torch.randn(1, COUNTED_TOKENS, d, generator=torch.Generator().manual_seed(0))
    edits = {f"Erase Concepts, {mode} (ours)": ConceptEraser.from_file(f, {ERASED: GAMMA}, mode, sae=sae)
             for mode in ("exact", "replace")}
    edits["dense hook (papers' formulation)"] = lambda x, t: released_hook(sae, f.concepts, f.tables, x, t,
                                                                           {ERASED: GAMMA})
    out = {}
    with torch.no_grad():
        for name, edit in edits.items():
            with FlopCounterMode(display=False) as counter:
                edit(x, 0.5)
            out[name] = counter.get_total_flops() * tokens / COUNTED_TOKENS
    return out


def run_at_scale(family: str) -> dict:
    hookpoint, tokens, d, passes = SCALE[family]
    step, params = meta_step_flops(family)
    rows = [{"variant": name, "edit_flops_per_step": flops, "flop_overhead": flops / step}
            for name, flops in edit_flops_at_scale(d, tokens * passes).items()]
    return {"config": {"model": f"{family.upper()} real config, {params / 1e9:.2f}B parameters, meta device",
                       "pixels": 1024, "hookpoint": hookpoint, "tokens_at_block": tokens, "passes_per_step": passes,
                       "sae": "random, papers' shape", "d": d, "n": 16 * d, "k": 32},
            "flops_per_step": step, "rows": rows}


# ---------------------------------------------------------------------------------------------------- measure


def count_flops(sample, models: dict) -> dict[str, int]:
    """FLOPs of one sampling step (cond + uncond) per variant. Each variant runs once uncounted first: the toy's
    first call also encodes its prompts (1.7 GFLOP that once made the patched step look cheaper)."""
    flops = {}
    with torch.no_grad():
        for name, m in models.items():
            sample(m, 1)
            with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
                sample(m, 1)
            flops[name] = counter.get_total_flops()
    return flops


PARTIAL = {"rounds_cut": False}
"""Set when a time budget (SIGINT) stopped the timing: the results hold the rounds every variant finished."""


def time_variants(sample, models: dict, steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per sampling run of each model (timing.interleaved); a cut timing sets PARTIAL."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        times, partial = interleaved({name: (lambda m=m: sample(m, steps)) for name, m in models.items()}, repeats,
                                     warmup, sync)
    PARTIAL["rounds_cut"] |= partial
    return times


def run_model(name: str, args, folder: Path) -> dict:
    sample, models, config = (toy_setup if name == "toy" else sd15_setup)(args, folder)
    steps = args.toy_steps if name == "toy" else args.sd_steps
    flops = count_flops(sample, models)
    times = time_variants(sample, models, steps, args.repeats, args.warmup)
    base_time, base_flops = statistics.median(times["no erasure"]), flops["no erasure"]
    rows = []
    for variant in models:
        median = statistics.median(times[variant])
        edit_flops = flops[variant] - base_flops
        rows.append({"variant": variant, "median_s": median, "min_s": min(times[variant]),
                     "max_s": max(times[variant]), "repeats": len(times[variant]),
                     "per_step_ms": 1e3 * median / steps, "measured_overhead": median / base_time - 1,
                     "flops_per_step": flops[variant], "edit_flops_per_step": edit_flops,
                     "flop_overhead": edit_flops / base_flops})
    return {"config": config, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="toy,sd15", help="comma-separated: toy, sd15; sdxl, flux (FLOPs only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--toy-steps", type=int, default=25)
    p.add_argument("--toy-batch", type=int, default=16, help="prompts per sampling call")
    p.add_argument("--toy-model", type=Path, default=assets.path(assets.MODEL))
    p.add_argument("--toy-sae", type=Path, default=assets.path(assets.SITES["object"].saemnesia))
    p.add_argument("--sd-steps", type=int, default=3)
    p.add_argument("--sd-size", type=int, default=256, help="pixels (latent = size/8; 512 gives 16x16 tokens)")
    p.add_argument("--sd-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--out-name", default="bench_sampling", help="results file name (without .json / .md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            results[name] = run_at_scale(name) if name in SCALE else run_model(name, args, Path(folder))
    device = comfy.model_management.get_torch_device()
    result = {"environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                              "machine": platform.machine(), "load_average_before": load_before,
                              "load_average_after": os.getloadavg()},
              "repeats": args.repeats, "warmup": args.warmup, "partial": PARTIAL["rounds_cut"], "models": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{args.out_name}.json", result, indent=2)
    table = markdown(result)
    write_bytes_atomic(args.out / f"{args.out_name}.md", (table + "\n").encode())
    print(table)


def markdown(result: dict) -> str:
    env = result["environment"]
    timed = any("flops_per_step" not in r for r in result["models"].values())
    lines = [f"# Sampling with vs without Erase Concepts ({env.get('device', 'CPU')})", "",
             f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs; load average "
             f"{env['load_average_before'][0]:.2f} before, {env['load_average_after'][0]:.2f} after; " +
             (f"median of {result['repeats']} interleaved repeats after {result['warmup']} warm-up" +
              (" (partial: the time budget stopped it; each row says its repeats)" if result.get("partial") else "") +
              ". FLOPs: one "
              "sampling step (cond + uncond) under FlopCounterMode." if timed else
              "FLOPs under FlopCounterMode: one step's forward of the real-size model on the meta device, and the edit "
              f"counted on {COUNTED_TOKENS} real tokens and scaled to the block's (no timing: a CPU cannot sample "
              "these models).")]
    for name, r in result["models"].items():
        c = r["config"]
        if "flops_per_step" in r:  # at scale: FLOPs only
            lines += ["", f"## {name}: {c['model']}; {c['pixels']} px, the edit at `{c['hookpoint']}` "
                          f"({c['tokens_at_block']} tokens × {c['passes_per_step']} pass(es) per step); SAE {c['sae']} "
                          f"(d={c['d']}, n={c['n']}, k={c['k']})", "",
                      f"One step: {r['flops_per_step'] / 1e12:.2f} TFLOP.", "",
                      "| variant | edit GFLOP / step | FLOP share of the step |", "|---|---:|---:|"]
            lines += [f"| {row['variant']} | {row['edit_flops_per_step'] / 1e9:.2f} | "
                      f"{100 * row['flop_overhead']:.3f} % |" for row in r["rows"]]
            continue
        lines += ["", f"## {name}: {c['model']}; {c['steps']} steps, batch {c['batch']}; SAE {c['sae']} "
                      f"(d={c['d']}, n={c['n']}, k={c['k']})", "",
                  "| variant | median s | spread s (min–max) | ms / step | measured overhead | GFLOP / step "
                  "| edit GFLOP / step | FLOP overhead |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {row['median_s']:.2f} | {row['min_s']:.2f}–{row['max_s']:.2f} | "
                         f"{row['per_step_ms']:.0f} | "
                         f"{100 * row['measured_overhead']:+.1f} % | {row['flops_per_step'] / 1e9:.2f} | "
                         f"{row['edit_flops_per_step'] / 1e9:.4f} | {100 * row['flop_overhead']:+.3f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
