# SPDX-License-Identifier: GPL-3.0-or-later
"""Where does the toy model read its styles and its objects? Swap the prompt inside the cross-attention of
chosen blocks only, and count how often the judges still see the style, or the object.

Every object in every style (64 prompts, one seed each; Euler, 25 steps, CFG 5). Two swaps, each at every block
set: for styles the conditional branch's text conditioning at those blocks is replaced by that of
"An image of {object}." (the style removed, the object kept); for objects by that of the empty prompt (what the
model learnt without a prompt). The unconditional branch and every other block are untouched. What survives the
swap at a block set is read (also) somewhere else. This is why the toy world's style SAEs sit at the 16x16 decoder
level (`saemnesia_tools.toy.assets.SITES`), and why a third SAE pair sits at the 16x16 encoder level for multi-site
erasure (`assets.ENCODER_SITE`): the rows pairing an encoder level with a decoder level say where both must act.

    .venv/bin/python benchmarks/studies/prompt_swap.py      # about 18 minutes on 2 cores

Writes benchmarks/studies/results/prompt_swap.json and .md.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.patch import comfy_block_name, item_branches
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 5_000_000  # disjoint from the build's and the evaluation's seeds
BLOCK_SETS = {  # diffusers names of the toy model's cross-attention blocks (SD1.5 layout, none at 32x32)
    "none (no swap)": [],
    "encoder (16x16 and 8x8)": ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1",
                                "down_blocks.2.attentions.0", "down_blocks.2.attentions.1"],
    "middle block (4x4)": ["mid_block.attentions.0"],
    "decoder 8x8 (up_blocks.1, the object SAEs' level)": [f"up_blocks.1.attentions.{i}" for i in range(3)],
    "decoder 16x16 (up_blocks.2, the style SAEs' level)": [f"up_blocks.2.attentions.{i}" for i in range(3)],
    "encoder 16x16 (down_blocks.1)": ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1"],
    "encoder 8x8 (down_blocks.2)": ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1"],
}
DECODER_LEVELS = {"8x8": "decoder 8x8 (up_blocks.1, the object SAEs' level)",
                  "16x16": "decoder 16x16 (up_blocks.2, the style SAEs' level)"}
for encoder in ("encoder 16x16 (down_blocks.1)", "encoder 8x8 (down_blocks.2)"):  # what a two-site edit could cover
    for size, decoder in DECODER_LEVELS.items():
        BLOCK_SETS[f"{encoder.split(' (')[0]} + decoder {size}"] = BLOCK_SETS[encoder] + BLOCK_SETS[decoder]
BLOCK_SETS["everywhere"] = sorted({b for blocks in BLOCK_SETS.values() for b in blocks})


def swap_context(model, blocks: list[str], unstyled: torch.Tensor):
    """A clone of `model` whose `blocks` see `unstyled` [B, tokens, ctx] as the cond branch's text conditioning."""
    m = model.clone()
    for name in blocks:
        block = comfy_block_name(m, f"unet.{name}")
        module = m.get_model_object(f"diffusion_model.{block}")
        previous = m.get_model_object(f"diffusion_model.{block}.forward")

        def forward(self, x, context=None, transformer_options={}, previous=previous):
            cond = item_branches(transformer_options, x.shape[0]) == 0  # cond and uncond may come in separate calls
            if bool(cond.any()):
                context = context.clone()
                context[cond] = unstyled.to(context)
            return previous(x, context, transformer_options)

        m.add_object_patch(f"diffusion_model.{block}.forward", types.MethodType(forward, module))
    return m


def swap_rows(model, vae, encoder, judges, cells, replacement: torch.Tensor, what: str) -> list[dict]:
    """One row per block set: how often the style and the object are still seen with `replacement` [B, tokens,
    ctx] as the cond branch's conditioning at those blocks, and per concept of `what` ("style" or "object")."""
    prompts = [make_prompt(o, s) for o, s in cells]
    seeds = [SEED + i for i in range(len(cells))]
    concepts, position = (STYLES, 1) if what == "style" else (OBJECTS, 0)
    rows = []
    for name, blocks in BLOCK_SETS.items():
        images = generate(swap_context(model, blocks, replacement), vae, encoder, prompts, seeds,
                          batch_size=len(cells))
        objects, styles = judges.predict(images)
        style_kept = [p == s for p, (_, s) in zip(styles, cells)]
        object_kept = [p == o for p, (o, _) in zip(objects, cells)]
        kept = style_kept if what == "style" else object_kept
        per_concept = {c: sum(k for k, cell in zip(kept, cells) if cell[position] == c) / (len(cells) // len(concepts))
                       for c in concepts}
        rows.append({"blocks": name, "diffusers_names": blocks, "style_kept": sum(style_kept) / len(cells),
                     "object_kept": sum(object_kept) / len(cells), f"{what}_kept_per_{what}": per_concept})
        print(f"{what} swap, {name:<52} style kept {100 * rows[-1]['style_kept']:5.1f} %  object kept "
              f"{100 * rows[-1]['object_kept']:5.1f} %", flush=True)
    return rows


SWAPS = {"style": "the styled prompt swapped for the unstyled one (\"An image of {object}.\")",
         "object": "the prompt swapped for the empty prompt"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, vae, encoder, judges = load_toy_world()
    cells = [(o, s) for s in STYLES for o in OBJECTS]
    replacements = {"style": encoder.batch([make_prompt(o, None) for o, _ in cells]),
                    "object": encoder.batch([""] * len(cells))}
    parts = {what: swap_rows(model, vae, encoder, judges, cells, replacements[what], what) for what in SWAPS}
    result = {"written_by": "benchmarks/studies/prompt_swap.py", "images_per_row": len(cells), "seed_base": SEED,
              "steps": 25, "cfg": 5.0, "sampler": "euler", "rows": parts["style"], "object_rows": parts["object"]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "prompt_swap.json", result)
    lines = ["# Where the toy model reads its styles and objects: the prompt swapped at some blocks only", "",
             f"{len(cells)} prompts (8 objects × 8 styles), one seed each; judged. Written by "
             "`benchmarks/studies/prompt_swap.py`."]
    for what, rows in parts.items():
        concepts = STYLES if what == "style" else OBJECTS
        lines += ["", f"## {what.capitalize()}s: {SWAPS[what]}", "",
                  "| swapped at | style kept (%) | object kept (%) | " + " | ".join(concepts) + " |",
                  "|---|---:|---:|" + "---:|" * len(concepts)]
        for r in rows:
            lines.append(f"| {r['blocks']} | {100 * r['style_kept']:.1f} | {100 * r['object_kept']:.1f} | "
                         + " | ".join(f"{100 * r[f'{what}_kept_per_{what}'][c]:.0f}" for c in concepts) + " |")
    write_bytes_atomic(args.out / "prompt_swap.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
