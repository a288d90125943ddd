# SPDX-License-Identifier: GPL-3.0-or-later
"""The shipped toy model's own generations of the full grid, as one picture: columns are the 8 objects, rows the
8 styles and then unstyled; one seed per prompt (seeds 0–71, column-major); Euler, 25 steps, CFG 5.

    .venv/bin/python benchmarks/studies/toy_model_grid.py     # about a minute on 2 cores

Writes docs/images/toy_model_grid.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.toy_model import load_toy_model
from saemnesia_tools.comfyui.toy.sampling import PromptEncoder, generate
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, SIZE, STYLES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=assets.REPO_ROOT / "docs" / "images" / "toy_model_grid.png")
    p.add_argument("--scale", type=int, default=3)
    args = p.parse_args(argv)
    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    looks = (*STYLES, None)
    cells = [(o, s) for o in OBJECTS for s in looks]
    images = generate(model, vae, PromptEncoder(clip), [make_prompt(o, s) for o, s in cells], list(range(len(cells))))
    cell, side, head = SIZE * args.scale, 70, 18
    grid = Image.new("RGB", (side + len(OBJECTS) * cell, head + len(looks) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, obj in enumerate(OBJECTS):
        draw.text((side + i * cell + 2, 4), obj, fill="black")
    for j, style in enumerate(looks):
        draw.text((4, head + j * cell + cell // 2 - 6), style or "unstyled", fill="black")
    for k, (obj, style) in enumerate(cells):
        tile = Image.fromarray((images[k].clamp(0, 1) * 255).round().byte().numpy()).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (side + OBJECTS.index(obj) * cell, head + looks.index(style) * cell))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
