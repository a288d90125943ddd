# SPDX-License-Identifier: GPL-3.0-or-later
"""Does moving a block's activations by the object's mean difference from an empty scene remove the object?

In the world with absence the model draws a scene with no object when asked, so there is a direction for "the object
gone, the rest kept": at the object site (`saemnesia_tools.toy.assets.SITES["object"]`), per sampling step, the mean
token of the object's images minus the mean token of the empty scenes of the same looks (the cond branch; every look,
FIT_SEEDS seeds each). This study adds −α times that difference to every token of the cond branch at every step (no
SAE, no detection: whether the direction removes the object at all, before anything is built on it), or of both
branches at some α, and judges the images of every object in every look at seeds of its own: removed (judged "No
object"), the look kept, and another object drawn instead.

    .venv/bin/python benchmarks/studies/removal_by_mean_difference.py    # a few minutes on 2 cores

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, vae, encoder, judges = load_toy_world()
    site = assets.SITES["object"]
    block = comfy_block_name(model, site.hookpoint)
    steps, targets = DEFAULT_STEPS, OBJECTS
    fit_seeds = [FIT_SEED + i for i in range(FIT_SEEDS)]
    cells = [(obj, look, seed) for obj in (None, *targets) for look in LOOKS for seed in fit_seeds]
    means = cond_means(model, vae, encoder, block, [make_prompt(o, s) for o, s, _ in cells],
                       [seed for *_, seed in cells], steps)
    per = len(LOOKS) * FIT_SEEDS
    empty = means[:per].mean(0)
    directions = {obj: means[per * (k + 1):per * (k + 2)].mean(0) - empty for k, obj in enumerate(targets)}

    rows = []
    for obj in targets:
        prompts = [make_prompt(obj, look) for look in LOOKS]
        seeds = [TEST_SEED + i for i in range(len(LOOKS))]
        for branches, alpha in [("cond", a) for a in ALPHAS] + [("both", a) for a in BOTH_BRANCH_ALPHAS]:
            images = generate(shifted(model, block, directions[obj], alpha, steps, branches), vae, encoder, prompts,
                              seeds, steps=steps)
            objects, styles = judges.predict(images)
            rows.append({"object": obj, "branches": branches, "alpha": alpha, "images": len(prompts),
                         "removed": sum(o == NO_OBJECT for o in objects),
                         "still_there": sum(o == obj for o in objects),
                         "other_object": sum(o not in (obj, NO_OBJECT) for o in objects),
                         "look_kept": sum(s == (look or STYLE_CLASSES[-1]) for s, look in zip(styles, LOOKS))})
    result = {"written_by": "python benchmarks/studies/removal_by_mean_difference.py", "block": site.hookpoint,
              "fit": {"seeds": fit_seeds, "looks": len(LOOKS)}, "test_first_seed": TEST_SEED, "rows": rows,
              "direction_norm_by_step": {obj: directions[obj].norm(dim=-1).tolist() for obj in targets}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "removal_by_mean_difference.json", result, indent=2)
    lines = ["# Removal by the mean difference from an empty scene", "",
             f"Written by `benchmarks/studies/removal_by_mean_difference.py`: −α × (mean token of the object's images − "
             f"mean token of empty scenes, per step, cond branch) added to every cond token at `{site.hookpoint}`; "
             f"each object in every look ({len(LOOKS)} images per row), judged.", "",
             "| object | branches | α | removed | still there | another object | look kept |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['object']} | {r['branches']} | {r['alpha']:g} | {r['removed']} | {r['still_there']} | {r['other_object']} | "
              f"{r['look_kept']} |" for r in rows]
    write_bytes_atomic(args.out / "removal_by_mean_difference.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
