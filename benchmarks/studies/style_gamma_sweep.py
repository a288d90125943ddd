# SPDX-License-Identifier: GPL-3.0-or-later
"""Which strength erases a style at the style site? Every style erased at several γ with the shipped style SAE
(`saemnesia_tools.toy.assets.SITES["style"]`), on every object.

Per style and γ: 8 images (each object in that style, one seed; Euler, 25 steps, CFG 5; exact mode with the
papers' formula, the file's calibrations set aside), judged:
how often the style is still seen, and how often the object still is; γ = 0 is no erasure. The demo's style
strength comes from here (`saemnesia_tools.toy.demo.GAMMAS`).

    .venv/bin/python benchmarks/studies/style_gamma_sweep.py     # about 5 minutes on 2 cores

Writes benchmarks/studies/results/style_gamma_sweep.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 6_000_000  # disjoint from the build's and the evaluation's seeds
GAMMAS = (0.0, -0.2, -0.5, -1.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, vae, encoder, judges = load_toy_world()
    sae = load_sae_path(assets.path(assets.SITES["style"].saemnesia))
    # the papers' formula z·γ·μ, which this sweep measured: the file's calibrations (DESIGN §6.7) are set aside
    sae = sae.with_calibrations(dict.fromkeys(sae.labels))
    seeds = [SEED + i for i in range(len(OBJECTS))]
    rows = []
    for style in STYLES:
        prompts = [make_prompt(o, style) for o in OBJECTS]
        for gamma in GAMMAS:
            m = erase_concepts(model, sae, {style: gamma}, gamma) if gamma else model
            objects, styles = judges.predict(generate(m, vae, encoder, prompts, seeds))
            rows.append({"style": style, "gamma": gamma, "style_left": sum(s == style for s in styles),
                         "objects_kept": sum(o == obj for o, obj in zip(objects, OBJECTS)), "images": len(OBJECTS)})
            print(f"{style:<9} γ {gamma:5.1f}: style left {rows[-1]['style_left']}/8, objects kept "
                  f"{rows[-1]['objects_kept']}/8", flush=True)
    result = {"written_by": "benchmarks/studies/style_gamma_sweep.py", "sae": assets.SITES["style"].saemnesia,
              "hookpoint": assets.SITES["style"].hookpoint, "seed_base": SEED, "steps": 25, "cfg": 5.0,
              "mode": "exact", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "style_gamma_sweep.json", result)
    lines = ["# Style erasure at the style site: γ sweep", "",
             f"`{result['sae']}` at `{result['hookpoint']}`, exact mode; per cell: style still seen / object still "
             "seen, out of 8 images (every object in that style, one seed). γ = 0: no erasure. Written by "
             "`benchmarks/studies/style_gamma_sweep.py`.", "",
             "| style | " + " | ".join(f"γ = {g:g}" for g in GAMMAS) + " |", "|---|" + "---|" * len(GAMMAS)]
    for style in STYLES:
        cells = [r for r in rows if r["style"] == style]
        lines.append(f"| {style} | " + " | ".join(f"{r['style_left']} / {r['objects_kept']}" for r in cells) + " |")
    write_bytes_atomic(args.out / "style_gamma_sweep.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
