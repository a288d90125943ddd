# SPDX-License-Identifier: GPL-3.0-or-later
"""Does the text encoder's SAE remove a concept in the world with absence, or replace it?

Each concept erased with Erase Concepts (text) (the toy's text SAE, `assets.TEXT_SAE`, exact mode) at
several γ, on its images with every concept of the other group and none (an object in every look; a style on every
object and on no object), seeds of its own; judged: removed (no object / unstyled), still there, replaced by another
of its group, the other concept kept. A first look for issue 32's item 2 (the text encoder and a UNet block
together); `removal_edits.py` is the full comparison.

    .venv/bin/python benchmarks/studies/text_encoder_removal.py    # a few minutes on 2 cores

Writes benchmarks/studies/results/text_encoder_removal.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_comfy.text_erase import erase_text_concepts
from saemnesia_comfy.toy_model import load_toy_model
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.comfyui.toy.sampling import PromptEncoder, generate
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.judges import NO_OBJECT, UNSTYLED, Judges
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 5_300_000
GAMMAS = (-1.0, -2.0, -4.0)
GROUPS = {"object": (OBJECTS, NO_OBJECT, 0), "style": (STYLES, UNSTYLED, 1)}


def cells_of(group: str, concept: str) -> list[tuple[str | None, str | None]]:
    return [(concept, s) for s in (*STYLES, None)] if group == "object" else [(o, concept) for o in (*OBJECTS, None)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    judges, sae = Judges.load(assets.path(assets.JUDGES)), load_sae_path(assets.path(assets.TEXT_SAE))
    rows = []
    for group, (concepts, absent, own) in GROUPS.items():
        other = 1 - own
        for gamma in GAMMAS:
            total = {"group": group, "gamma": gamma, "images": 0, "removed": 0, "still_there": 0, "replaced": 0,
                     "other_kept": 0}
            for concept in concepts:
                cells = cells_of(group, concept)
                encoder = PromptEncoder(erase_text_concepts(clip, sae, {concept: gamma}, gamma))
                images = generate(model, vae, encoder, [make_prompt(o, s) for o, s in cells],
                                  [SEED + i for i in range(len(cells))])
                judged = list(zip(*judges.predict(images)))
                total["images"] += len(cells)
                total["removed"] += sum(j[own] == absent for j in judged)
                total["still_there"] += sum(j[own] == concept for j in judged)
                total["replaced"] += sum(j[own] not in (concept, absent) for j in judged)
                total["other_kept"] += sum(j[other] == (c[other] or (UNSTYLED if group == "object" else NO_OBJECT))
                                           for j, c in zip(judged, cells))
            rows.append(total)
    result = {"written_by": "python benchmarks/studies/text_encoder_removal.py", "first_seed": SEED, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "text_encoder_removal.json", result, indent=2)
    lines = ["# Removal by the text encoder's SAE", "", "Written by `benchmarks/studies/text_encoder_removal.py`: each "
             "concept erased with Erase Concepts (text), exact mode, on its images with every concept of the other "
             "group and none; counts over the group's concepts.", "",
             "| group | γ | images | removed | still there | replaced | other kept |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['gamma']:g} | {r['images']} | {r['removed']} | {r['still_there']} | "
              f"{r['replaced']} | {r['other_kept']} |" for r in rows]
    write_bytes_atomic(args.out / "text_encoder_removal.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
