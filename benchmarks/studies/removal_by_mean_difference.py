# SPDX-License-Identifier: GPL-3.0-or-later
"""Does moving a block's activations by a concept's mean difference from its absence remove the concept?

In the world with absence the model draws a scene with no object when asked, so there is a direction for "the object
gone, the rest kept": at the object site (`saemnesia_tools.toy.assets.SITES["object"]`), per sampling step, the mean
token of the object's images minus the mean token of the empty scenes of the same looks (the cond branch; every look,
FIT_SEEDS seeds each). For a style, at the style site, its images minus the unstyled images of the same objects. This
study adds −α times that difference to every token of the cond branch at every step (no SAE, no detection: whether
the direction removes the concept at all, before anything is built on it), or of both branches at some α, and judges
the images of every concept of the group with every concept of the other group (and none) at seeds of its own:
removed (no object; unstyled), still there, replaced by another concept of the group, and the other concept kept.

    .venv/bin/python benchmarks/studies/removal_by_mean_difference.py    # about a quarter of an hour on 2 cores

Writes benchmarks/studies/results/removal_by_mean_difference.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
import comfy.samplers  # noqa: E402
from saemnesia_comfy.patch import comfy_block_name, item_branches, item_sigmas, patch_block_output
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.comfyui.toy.sampling import DEFAULT_STEPS, generate, load_toy_world
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.judges import NO_OBJECT, STYLE_CLASSES
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
FIT_SEED, TEST_SEED = 5_000_000, 5_100_000  # disjoint from the build's, the evaluation's and the other studies'
FIT_SEEDS = 2
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)
BOTH_BRANCH_ALPHAS = (1.0, 2.0)  # the same shift on the uncond branch too
LOOKS = (*STYLES, None)


class StepOf:
    """The sampling step (0 … steps−1) of a block call, from its sigmas and the schedule every image here uses."""

    def __init__(self, model, steps: int):
        self.sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)[:-1]

    def __call__(self, options: dict, batch: int) -> torch.Tensor:
        sigma = item_sigmas(options["sigmas"].detach().float().cpu(), batch)
        return (sigma[:, None] - self.sigmas[None].float()).abs().argmin(1)


def cond_means(model, vae, encoder, block: str, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """The mean token of the block's output on the cond branch, per image and step: [N, steps, d] (one sampling
    call, so the cond items are the prompts in order)."""
    step_of, at_step = StepOf(model, steps), {}

    def record(out, options):
        cond = item_branches(options, out.shape[0]) == 0
        at_step[int(step_of(options, out.shape[0])[0])] = out[cond].float().mean((2, 3)).cpu()
        return out

    patched = model.clone()
    patch_block_output(patched, block, record)
    generate(patched, vae, encoder, prompts, seeds, steps=steps, batch_size=len(prompts))
    return torch.stack([at_step[s] for s in range(steps)], 1)


def shifted(model, block: str, direction: torch.Tensor, alpha: float, steps: int, branches: str):
    """The model with −α·direction[step] added to every token of the block's output on the cond branch, or on
    both."""
    step_of, patched = StepOf(model, steps), model.clone()

    def shift(out, options):
        cond = (item_branches(options, out.shape[0]) == 0 if branches == "cond"
                else torch.ones(out.shape[0], dtype=torch.bool)).to(out.device)
        move = direction[step_of(options, out.shape[0])].to(out.device, out.dtype)      # [B, d]
        return out - alpha * (cond[:, None] * move)[..., None, None]

    patch_block_output(patched, block, shift)
    return patched


GROUPS = {"object": (OBJECTS, NO_OBJECT), "style": (STYLES, STYLE_CLASSES[-1])}


def cells_of(group: str, concept: str | None) -> list[tuple[str | None, str | None]]:
    """(object, style) of the concept's images (None: its absence) with every concept of the other group and none."""
    if group == "object":
        return [(concept, look) for look in LOOKS]
    return [(obj, concept) for obj in (*OBJECTS, None)]


def site_variants(group: str) -> dict[str, tuple[assets.SAESite, ...]]:
    """Where to shift: the group's site; for styles also the encoder's 16×16 site, alone and with the style site
    (styles are read at both levels: benchmarks/studies/prompt_swap.py)."""
    if group == "object":
        return {"object site": (assets.SITES["object"],)}
    return {"style site": (assets.SITES["style"],), "encoder site": (assets.ENCODER_SITE,),
            "encoder and style sites": (assets.ENCODER_SITE, assets.SITES["style"])}


def settings(first: bool) -> list[tuple[str, float]]:
    """(branches, α): every one at the group's own site, the cond branch at α ≥ 1 elsewhere."""
    if first:
        return [("cond", a) for a in ALPHAS] + [("both", a) for a in BOTH_BRANCH_ALPHAS]
    return [("cond", a) for a in ALPHAS if a >= 1]


def study(group: str, model, vae, encoder, judges) -> dict:
    concepts, absent = GROUPS[group]
    steps, fit_seeds = DEFAULT_STEPS, [FIT_SEED + i for i in range(FIT_SEEDS)]
    cells = [(o, s, seed) for c in (None, *concepts) for o, s in cells_of(group, c) for seed in fit_seeds]
    per = len(cells_of(group, None)) * FIT_SEEDS
    variants, directions = site_variants(group), {}
    for site in {site for sites in variants.values() for site in sites}:
        block = comfy_block_name(model, site.hookpoint)
        means = cond_means(model, vae, encoder, block, [make_prompt(o, s) for o, s, _ in cells],
                           [seed for *_, seed in cells], steps)
        none = means[:per].mean(0)
        directions[site.hookpoint] = {c: means[per * (k + 1):per * (k + 2)].mean(0) - none
                                      for k, c in enumerate(concepts)}
    own, other = (0, 1) if group == "object" else (1, 0)
    rows = []
    for v, (name, sites) in enumerate(variants.items()):
        for concept in concepts:
            test = cells_of(group, concept)
            prompts, seeds = [make_prompt(o, s) for o, s in test], [TEST_SEED + i for i in range(len(test))]
            for branches, alpha in settings(v == 0):
                patched = model
                for site in sites:
                    patched = shifted(patched, comfy_block_name(model, site.hookpoint),
                                      directions[site.hookpoint][concept], alpha, steps, branches)
                judged = list(zip(*judges.predict(generate(patched, vae, encoder, prompts, seeds, steps=steps))))
                rows.append({"sites": name, "concept": concept, "branches": branches, "alpha": alpha,
                             "images": len(prompts), "removed": sum(j[own] == absent for j in judged),
                             "still_there": sum(j[own] == concept for j in judged),
                             "replaced": sum(j[own] not in (concept, absent) for j in judged),
                             "other_kept": sum(j[other] == (cell[other] or STYLE_CLASSES[-1] if group == "object"
                                                             else cell[other] or NO_OBJECT)
                                               for j, cell in zip(judged, test))})
    return {"sites": {name: [site.hookpoint for site in sites] for name, sites in variants.items()}, "rows": rows,
            "direction_norm_by_step": {hookpoint: {c: d.norm(dim=-1).tolist() for c, d in per_site.items()}
                                       for hookpoint, per_site in directions.items()}}


def markdown(result: dict) -> str:
    lines = ["# Removal by the mean difference from absence", "",
             "Written by `benchmarks/studies/removal_by_mean_difference.py`: −α × (mean token of the concept's images − "
             "mean token of its absence: no object, or unstyled; per step, cond branch) added to every token of the "
             "cond branch (or of both) at each site of a row, judged. Per row: the concept's images with every concept "
             "of the other group and none; removed (no object / unstyled), still there, replaced by another of its "
             "group, other concept kept."]
    for group, part in result["groups"].items():
        for name, hookpoints in part["sites"].items():
            rows = [r for r in part["rows"] if r["sites"] == name]
            lines += ["", f"## {group}s, {name} ({', '.join(f'`{h}`' for h in hookpoints)})", "",
                      f"| {group} | branches | α | removed | still there | replaced | other kept |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['concept']} | {r['branches']} | {r['alpha']:g} | {r['removed']} | {r['still_there']} | "
                      f"{r['replaced']} | {r['other_kept']} |" for r in rows]
            lines += ["", "| branches | α | removed | other kept | of |", "|---|---:|---:|---:|---:|"]
            for branches, alpha in dict.fromkeys((r["branches"], r["alpha"]) for r in rows):
                same = [r for r in rows if (r["branches"], r["alpha"]) == (branches, alpha)]
                lines.append(f"| {branches} | {alpha:g} | {sum(r['removed'] for r in same)} | "
                             f"{sum(r['other_kept'] for r in same)} | {sum(r['images'] for r in same)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, vae, encoder, judges = load_toy_world()
    result = {"written_by": "python benchmarks/studies/removal_by_mean_difference.py",
              "fit_seeds": [FIT_SEED + i for i in range(FIT_SEEDS)], "test_first_seed": TEST_SEED,
              "groups": {group: study(group, model, vae, encoder, judges) for group in GROUPS}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "removal_by_mean_difference.json", result, indent=2)
    write_bytes_atomic(args.out / "removal_by_mean_difference.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
