# SPDX-License-Identifier: GPL-3.0-or-later
"""How often threshold detection decides differently from top-k detection (DESIGN §6.4).

Top-k detection (the default): a chosen latent fires on a token when it is among the token's k largest
pre-activations *and* exceeds θ. Threshold detection: it exceeds θ (only the chosen latents' pre-activations are
computed). For every concept of each file, at every token and step, both decisions are taken on the same
activations and compared:
- toy: the four shipped SAEs on the toy model's own activations at their blocks (every grid prompt, one seed,
  Euler 25 steps, CFG 5, both branches), each concept with its file's latents and thresholds;
- sd15: a random SAE of the papers' size (d = 1280, n = 20480, k = 32) on random activations with each concept's
  direction added to half the tokens (as bench_edit.py), θ = the latent's mean activation over all tokens (what
  the statistics stage stores: the mean over every concept's data).
Agreement = share of (token, concept) decisions that are the same; also the share of tokens detected by either.

    python benchmarks/bench_detection.py      # about 5 minutes on 2 cores

Writes benchmarks/results/bench_detection.json and .md.
"""

from __future__ import annotations

from pathlib import Path

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.patch import block_for
from saemnesia_comfy.patch import StepGate, patch_block_output
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_core.sae import block_to_tokens
from saemnesia_tools.testing import random_sae
from saemnesia_core.timesteps import bucket_index
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 12_000_000  # apart from every other seed base


def decisions(sae, latents: torch.Tensor, thresholds: torch.Tensor, tokens: torch.Tensor):
    """(top-k, threshold) bool [N, C] for tokens [N, d] and, per concept, latents/thresholds [C, L] (−1 = none)."""
    with torch.no_grad():
        pre = sae.pre_acts(tokens.float())                                   # [N, n]
        in_topk = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(sae.cfg.k, dim=1).indices, True)
    valid = latents >= 0
    ids = latents.clamp(min=0)
    passes = (pre[:, ids] > thresholds) & valid                              # [N, C, L]
    return (passes & in_topk[:, ids]).any(-1), passes.any(-1)


def count(topk: torch.Tensor, threshold: torch.Tensor) -> dict:
    return {"decisions": topk.numel(), "differ": int((topk != threshold).sum()),
            "detected_either": int((topk | threshold).sum())}


def toy() -> dict:
    """Both sites' SAEs, judged on the activations of one sampling run of the grid (a patch per site)."""
    model, vae, encoder, _ = load_toy_world()
    prompts = [make_prompt(o, s) for o in OBJECTS for s in (*STYLES, None)]
    gate, m, rows = StepGate(model, 0.0, 1.0, "both"), model.clone(), {}
    for site in assets.SITES.values():
        files = {method: load_sae_path(assets.path(site.sae(method))) for method in ("saemnesia", "saeuron")}
        totals = {method: {"decisions": 0, "differ": 0, "detected_either": 0, "file": site.sae(method)}
                  for method in files}
        for method in files:
            rows[f"{site.hookpoint.removeprefix('unet.')} ({method})"] = totals[method]

        def record(out, options, files=files, totals=totals):
            _, t = gate.items(options, out.shape[0], out.device)
            for method, loaded in files.items():
                f, sae = loaded.file, loaded.sae.float()
                for item, bucket in enumerate(bucket_index(t, f.num_buckets).tolist()):
                    topk, threshold = decisions(sae, f.tables.latents[:, bucket], f.tables.thresholds[:, bucket],
                                                block_to_tokens(out[item : item + 1])[0])
                    for key, value in count(topk, threshold).items():
                        totals[method][key] += value
            return out

        sae = files["saemnesia"].file
        patch_block_output(m, block_for(m, sae.hookpoint, sae.config.d_in), record)
    generate(m, vae, encoder, prompts, [SEED + i for i in range(len(prompts))])
    return rows


def sd15(tokens: int = 4096, concepts: int = 20) -> dict:
    d, n, k = 1280, 20480, 32
    sae = random_sae(d, n, k, seed=0)
    g = torch.Generator().manual_seed(1)
    latents = torch.randperm(n, generator=g)[:concepts]
    x = torch.randn(tokens, d, generator=g)
    for c, latent in enumerate(latents.tolist()):  # each concept's direction in its own slice of the tokens
        rows = slice(c * tokens // (2 * concepts), (c + 1) * tokens // (2 * concepts))
        direction = sae.encoder.weight[latent].detach()
        x[rows] += 3 * direction / direction.norm() * d**0.5
    with torch.no_grad():
        thresholds = sae.pre_acts(x)[:, latents].mean(0)  # mean activation over all tokens (top-k aside)
    topk, threshold = decisions(sae, latents[:, None], thresholds[:, None], x)
    return {"random SAE, d=1280 n=20480 k=32": {**count(topk, threshold), "file": None}}


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = {"toy": toy(), "sd15": sd15()}
    for group in rows.values():
        for r in group.values():
            r["agreement"] = 1 - r["differ"] / r["decisions"]
            r["differ_among_detected"] = r["differ"] / max(1, r["detected_either"])
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "bench_detection.json", {"target_agreement": 0.999, "rows": rows}, indent=2)
    lines = ["# Threshold vs top-k detection: decision agreement", "",
             "| model | SAE (block, method) | token × concept decisions | differ | agreement | differ among detected |",
             "|---|---|---:|---:|---:|---:|"]
    for model, group in rows.items():
        for name, r in group.items():
            lines.append(f"| {model} | {name} | {r['decisions']} | {r['differ']} | {100 * r['agreement']:.3f} % | "
                         f"{100 * r['differ_among_detected']:.2f} % |")
    lines += ["", "Target: agreement ≥ 99.9 % on the toy's shipped SAEs. Written by benchmarks/bench_detection.py.", ""]
    write_bytes_atomic(RESULTS / "bench_detection.md", "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
