# SPDX-License-Identifier: GPL-3.0-or-later
"""A first look at shift mode through the node (DESIGN §6.9), with the rebuilt object SAE's detection, before its
file holds directions: they are computed here, in memory, from the build's held-out grid activations at the object
site and prompts without objects collected there (`build.site_activations`, runs/toy_build). Each object erased in
every look (seeds 5,200,000…), judged: removed (no object), still there, another object, look kept; and another
object's images while Circles is erased. Run while the world was being rebuilt (the object site done, before its
calibration); `removal_edits.py` is the full comparison.

    .venv/bin/python benchmarks/studies/shift_with_detection.py    # a few minutes once the object site is built

Writes benchmarks/studies/results/shift_with_detection.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_tools.comfyui.toy import build
from saemnesia_tools.comfyui.toy.recipe import Recipe
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.judges import NO_OBJECT, STYLE_CLASSES
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES
from saemnesia_tools.training.directions import concept_directions

t0 = time.time()
model, vae, encoder, judges = load_toy_world()
site, recipe, work = assets.SITES["object"], Recipe(), assets.REPO_ROOT / "runs" / "toy_build"
data = [build.site_activations(model, encoder, recipe, work, site, split) for split in ("heldout", "absence")]
loaded = load_sae_path(assets.path(site.saemnesia))
directions = concept_directions(data, loaded.file.concepts, loaded.file.num_buckets)
loaded = replace(loaded, file=replace(loaded.file, tables=replace(loaded.file.tables, directions=directions)))
print("directions", round(time.time() - t0), flush=True)
LOOKS = (*STYLES, None)
seeds = [5_200_000 + i for i in range(len(LOOKS))]
rows = []
for setting in [("exact", "both", -1.0), ("shift", "cond", -1.0), ("shift", "cond", -1.5), ("shift", "cond", -2.0),
                ("shift", "both", -1.0)]:
    mode, branches, gamma = setting
    total = {"removed": 0, "still": 0, "other": 0, "look_kept": 0, "n": 0}
    for obj in OBJECTS:
        prompts = [make_prompt(obj, s) for s in LOOKS]
        m = erase_concepts(model, loaded, {obj: gamma}, gamma, 0.0, 1.0, branches, mode)
        objects, styles = judges.predict(generate(m, vae, encoder, prompts, seeds))
        total["removed"] += sum(o == NO_OBJECT for o in objects)
        total["still"] += sum(o == obj for o in objects)
        total["other"] += sum(o not in (obj, NO_OBJECT) for o in objects)
        total["look_kept"] += sum(s == (l or STYLE_CLASSES[-1]) for s, l in zip(styles, LOOKS))
        total["n"] += len(prompts)
    print(setting, total, round(time.time() - t0), flush=True)
    rows.append({"setting": setting, **total})
# other objects' images untouched? erase Circles, look at Hearts images
m = erase_concepts(model, loaded, {"Circles": -2.0}, -2.0, 0.0, 1.0, "cond", "shift")
objects, _ = judges.predict(generate(m, vae, encoder, [make_prompt("Hearts", s) for s in LOOKS], seeds))
print("Hearts kept while erasing Circles:", sum(o == "Hearts" for o in objects), "of", len(LOOKS))
kept = sum(o == "Hearts" for o in objects)
out = Path(__file__).resolve().parent / "results" / "shift_with_detection.json"
out.write_text(json.dumps({"written_by": "python benchmarks/studies/shift_with_detection.py", "rows": rows,
                           "object_sae_calibrated": "calibration" in loaded.file.provenance,
                           "hearts_kept_while_erasing_circles": {"kept": kept, "of": len(LOOKS)}}, indent=1) + "\n")
