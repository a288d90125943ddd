# SPDX-License-Identifier: GPL-3.0-or-later
"""Does shift mode remove a style at the object site? (issue 32, item 2)

At the style site (16×16) the mean difference from the unstyled look mostly turns a style into another style
(`removal_by_mean_difference.md`). The object site's SAEmnesia file (8×8, `assets.SITES["object"]`) labels all 16
concepts, and its shift-mode directions include the styles' (style images minus unstyled images of the same objects).
Here each style is erased with that file on every object (seeds 5,300,000…, one per object), in shift mode on the
cond branch at several γ, in exact mode at γ −1, and, for comparison, with the style site's own file; judged: removed
(unstyled), still there, another style, object kept.

    .venv/bin/python benchmarks/studies/styles_at_the_object_site.py    # a few minutes on 2 cores

Writes benchmarks/studies/results/styles_at_the_object_site.json and .md.
"""

from __future__ import annotations

import time
from pathlib import Path

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.judges import STYLE_CLASSES
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = [5_300_000 + i for i in range(len(OBJECTS))]
UNSTYLED = STYLE_CLASSES[-1]
# (site whose SAEmnesia file erases, mode, branches, γ)
SETTINGS = [("object", "exact", "both", -1.0), ("object", "shift", "cond", -1.0), ("object", "shift", "cond", -2.0),
            ("object", "shift", "cond", -3.0), ("style", "shift", "cond", -1.0), ("style", "shift", "cond", -2.0)]


def main() -> None:
    t0 = time.time()
    model, vae, encoder, judges = load_toy_world()
    saes = {site: load_sae_path(assets.path(assets.SITES[site].saemnesia)) for site in {s[0] for s in SETTINGS}}
    rows = []
    for site, mode, branches, gamma in SETTINGS:
        total = {"removed": 0, "still": 0, "other": 0, "object_kept": 0, "n": 0}
        for style in STYLES:
            m = erase_concepts(model, saes[site], {style: gamma}, gamma, 0.0, 1.0, branches, mode)
            objects, styles = judges.predict(generate(m, vae, encoder, [make_prompt(o, style) for o in OBJECTS], SEEDS))
            total["removed"] += sum(s == UNSTYLED for s in styles)
            total["still"] += sum(s == style for s in styles)
            total["other"] += sum(s not in (style, UNSTYLED) for s in styles)
            total["object_kept"] += sum(o == obj for o, obj in zip(objects, OBJECTS))
            total["n"] += len(OBJECTS)
        print(site, mode, branches, gamma, total, round(time.time() - t0), flush=True)
        rows.append({"site": site, "mode": mode, "branches": branches, "gamma": gamma, **total})
    result = {"written_by": "python benchmarks/studies/styles_at_the_object_site.py", "seeds": SEEDS, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "styles_at_the_object_site.json", result, indent=2)
    lines = ["# Styles erased at the object site", "", "Written by `benchmarks/studies/styles_at_the_object_site.py`: "
             "each style on every object, one seed each; counts over the 8 styles.", "",
             "| SAE file | mode | branches | γ | removed (unstyled) | still there | another style | object kept | of |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} site | {r['mode']} | {r['branches']} | {r['gamma']:g} | {r['removed']} | {r['still']} | "
              f"{r['other']} | {r['object_kept']} | {r['n']} |" for r in rows]
    write_bytes_atomic(RESULTS / "styles_at_the_object_site.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
