# SPDX-License-Identifier: GPL-3.0-or-later
"""The pool the demo's rows were chosen from: every object in each of `saemnesia_tools.toy.demo.POOL_STYLES` at the
demo's seed, in the demo's four columns (original, object erased, style erased, both), judged.

The same workflow as the demo (Euler, 25 steps, CFG 5, the same modes, strengths and SAE files, each image sampled
alone with noise from its seed) but in-process, through the Erase Concepts node's own patch path, instead of
over HTTP. It reports how often each outcome holds in the pool, so the demo's chosen rows can be read against it.

    .venv/bin/python benchmarks/studies/demo_pool.py     # about 3 minutes on 2 cores

Writes benchmarks/studies/results/demo_pool.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_tools.comfyui.toy.sampling import generate, load_toy_world
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.toy import assets, demo
from saemnesia_tools.toy.render import OBJECTS

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, vae, encoder, judges = load_toy_world()
    saes = {group: load_sae_path(assets.path(site.saemnesia)) for group, site in assets.SITES.items()}
    rows = []
    for style in demo.POOL_STYLES:
        for obj in OBJECTS:
            judged = {}
            for column, erase in demo.erasures(obj, style).items():
                m = model
                for group, concepts in erase.items():  # chained, as two Erase Concepts nodes
                    m = erase_concepts(m, saes[group], concepts, -1.0, mode=demo.MODES[group])
                image = generate(m, vae, encoder, [demo.prompt(obj, style)], [demo.SEED], batch_size=1)
                (o,), (s,) = judges.predict(image)
                judged[column] = (o, s)
            rows.append({"object": obj, "style": style, "judged": judged, **demo.outcomes(obj, style, judged)})
            print(obj, style, judged, flush=True)
    tally = demo.tally(rows)
    shown = [r for r in rows if (r["object"], r["style"]) in demo.CASES]
    result = {"written_by": "benchmarks/studies/demo_pool.py", "seed": demo.SEED, "modes": demo.MODES,
              "strengths": {group: demo.strength(group) for group in demo.MODES},
              "pool": {"objects": list(OBJECTS), "styles": list(demo.POOL_STYLES), "rows": len(rows)},
              "outcomes": demo.OUTCOMES, "tally": tally, "per_style": {
                  style: demo.tally([r for r in rows if r["style"] == style]) for style in demo.POOL_STYLES},
              "all_three_erasures": sum(r["object_gone_style_kept"] and r["style_gone_object_kept"] and r["both_gone"]
                                        for r in rows),
              "shown_rows": {"rows": len(shown), "tally": demo.tally(shown)}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "demo_pool.json", result)
    n = len(rows)
    lines = ["# The demo's pool", "",
             f"Every object × {', '.join(demo.POOL_STYLES)} at seed {demo.SEED} ({n} rows), in-process; judged. "
             "Written by `benchmarks/studies/demo_pool.py`.", "", "| outcome | pool | " + " | ".join(
                 demo.POOL_STYLES) + " | the demo's rows |", "|---|---:|" + "---:|" * (len(demo.POOL_STYLES) + 1)]
    for key, label in demo.OUTCOMES.items():
        lines.append(f"| {label} | {tally[key]}/{n} | " + " | ".join(
            f"{result['per_style'][s][key]}/{len(OBJECTS)}" for s in demo.POOL_STYLES)
            + f" | {result['shown_rows']['tally'][key]}/{len(shown)} |")
    lines += ["", f"All three erasures clean in {result['all_three_erasures']}/{n} rows."]
    write_bytes_atomic(args.out / "demo_pool.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
