"""The demo: the real ComfyUI, headless, runs the toy-world workflow with the same seed with and without erasing
concepts (an object, a style, both), judges every image, and writes the images, a labelled before/after grid and
the judges' verdicts (verdicts.json, with the caption the README shows), each image also checked by the
evaluation's artifact judge (flagged = looks broken).

    ./scripts/demo.sh                     (sets everything up, then runs this; writes output/demo/)
    ./scripts/demo.sh --out docs/demo     (the copy the README shows)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from saemnesia_tools.comfyui.server import ComfyServer
from saemnesia_core.concepts import DEFAULT_EDIT
from saemnesia_core.files import write_json_atomic
from saemnesia_tools.toy import assets, demo, workflow
from saemnesia_tools.toy.evaluation.quality import ArtifactJudge
from saemnesia_tools.toy.judges import Judges


def toy_prompt(text: str, seed: int, erase: dict[str, dict[str, float]], steps=25, cfg=5.0) -> dict:
    """The toy workflow (saemnesia_tools.toy.workflow) with one Erase Concepts per group erased, each with its group's
    SAE, at the node's defaults."""
    return workflow.toy_prompt(text, seed, steps, cfg, [
        workflow.erasing(assets.SITES[group].saemnesia, concepts) for group, concepts in erase.items()],
        prefix="saemnesia_demo")


def labelled_grid(images: dict, judged: dict, broken: dict, scale: int = 6) -> Image.Image:
    """Rows = cases, columns = original / erased, each image upscaled `scale`× with the judges' verdict below and
    a red frame where the artifact judge flags it."""
    cell, pad, head, side, foot = 32 * scale, 6, 26, 170, 14
    rows, columns = len(demo.CASES), len(demo.COLUMNS)
    grid = Image.new("RGB", (side + columns * (cell + pad), head + rows * (cell + foot + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(demo.COLUMNS):
        draw.text((side + j * (cell + pad) + 4, 6), col, fill="black")
    for i, (obj, style) in enumerate(demo.CASES):
        y = head + i * (cell + foot + pad)
        draw.text((6, y + cell // 2 - 12), f"{obj}\nin {style} style", fill="black")
        for j, col in enumerate(demo.COLUMNS):
            x = side + j * (cell + pad)
            grid.paste(images[(i, col)].resize((cell, cell), Image.NEAREST), (x, y))
            if broken[(i, col)]:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline="red", width=3)
            label = "judges: " + " / ".join(judged[(i, col)]) + ("  · broken" if broken[(i, col)] else "")
            draw.text((x + 2, y + cell + 1), label, fill="red" if broken[(i, col)] else "dimgray")
    return grid


def judge(images: dict) -> tuple[dict, dict]:
    """({key: (object, style)} as the judges name them, {key: flagged as broken by the artifact judge})."""
    judges = Judges.load(assets.path(assets.JUDGES))
    keys = sorted(images)
    batch = torch.from_numpy(np.stack([np.asarray(images[k], dtype=np.float32) / 255 for k in keys]))
    objects, styles = judges.predict(batch)
    flags = ArtifactJudge.load(assets.REPO_ROOT / demo.ARTIFACT_JUDGE, judges).flags(batch).tolist()
    return {k: (o, s) for k, o, s in zip(keys, objects, styles)}, dict(zip(keys, flags))


def caption(verdicts: dict) -> str:
    """The README's caption, from the verdicts alone."""
    n, t, edit = len(verdicts["rows"]), verdicts["tally"], verdicts["edit"]
    broken = {col: sum(row["broken"][col] for row in verdicts["rows"]) for col in demo.COLUMNS}
    return (f"The judges on these {n} rows (seed {verdicts['seed']}; Erase Concepts at its defaults: {edit['mode']} "
            f"mode, {edit['branches']} branch{'es' if edit['branches'] == 'both' else ''}, γ = {edit['strength']:g}, "
            "objects with the object SAE, styles with the style SAE): originals recognised (object and style) "
            f"{t['original_recognised']}/{n}; erase object → no object left, style kept "
            f"{t['object_removed_style_kept']}/{n}; erase style → unstyled, object kept "
            f"{t['style_removed_object_kept']}/{n}; erase both → no object left and unstyled {t['both_removed']}/{n} "
            "(another object or style in the erased one's place counts as not removed). Flagged as broken by the evaluation's artifact judge (red frames; AR per "
            "column): " + ", ".join(f"{col} {broken[col]}/{n}" for col in demo.COLUMNS) + ".")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=assets.REPO_ROOT / "output" / "demo")
    p.add_argument("--seed", type=int, default=demo.SEED)
    args = p.parse_args(argv)
    needed = [assets.path(assets.MODEL), assets.path(assets.JUDGES), assets.REPO_ROOT / demo.ARTIFACT_JUDGE] + \
        [assets.path(site.saemnesia) for site in assets.SITES.values()]
    for path in needed:
        if not path.exists():
            made_by = "saemnesia eval" if path.name == Path(demo.ARTIFACT_JUDGE).name else \
                "python -m saemnesia_tools.comfyui.toy.build"
            print(f"missing {path}: regenerate it with `{made_by}`")
            return 1
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    started = time.time()
    server = ComfyServer(assets.REPO_ROOT / "output" / "demo_server").start()
    print(f"ComfyUI {server.url} is up ({time.time() - started:.0f} s); "
          f"running {len(demo.CASES) * len(demo.COLUMNS)} prompts")
    images = {}
    try:
        for i, (obj, style) in enumerate(demo.CASES):
            for col, erase in demo.erasures(obj, style).items():
                entry = server.run(toy_prompt(demo.prompt(obj, style), args.seed, erase))
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(entry['status'])[:2000]}")
                png = server.images(entry, workflow.SAVE)[0]
                images[(i, col)] = Image.open(io.BytesIO(png)).convert("RGB")
                images[(i, col)].save(args.out / "images" / f"{obj}_{style}_{col.replace(' ', '_')}.png")
    finally:
        server.stop()
    judged, broken = judge(images)
    rows = [{"object": obj, "style": style,
             "judged": {col: list(judged[(i, col)]) for col in demo.COLUMNS},
             "broken": {col: broken[(i, col)] for col in demo.COLUMNS},
             **demo.outcomes(obj, style, {col: judged[(i, col)] for col in demo.COLUMNS})}
            for i, (obj, style) in enumerate(demo.CASES)]
    verdicts = {"written_by": "./scripts/demo.sh", "seed": args.seed, "edit": DEFAULT_EDIT._asdict(),
                "artifact_judge": demo.ARTIFACT_JUDGE,
                "sae_files": {group: site.saemnesia for group, site in assets.SITES.items()},
                "outcomes": demo.OUTCOMES, "rows": rows, "tally": demo.tally(rows)}
    verdicts["caption"] = caption(verdicts)
    write_json_atomic(args.out / "verdicts.json", verdicts)
    grid_path = args.out / "before_after_grid.png"
    labelled_grid(images, judged, broken).save(grid_path)
    for row in rows:
        seen = "  ".join(f"{col}: {'/'.join(row['judged'][col])}{' (broken)' if row['broken'][col] else ''}"
                         for col in demo.COLUMNS)
        print(f"{row['object']:>9} in {row['style']:<8} → judges see  {seen}")
    print(f"\n{verdicts['caption']}\n\nimages: {args.out / 'images'}\ngrid:   {grid_path}\n"
          f"verdicts: {args.out / 'verdicts.json'}\n({time.time() - started:.0f} s in all)")
    print("To play with the concept checklist in the UI: ./scripts/comfyui.sh, then open http://127.0.0.1:8188 "
          "and open Templates › saemnesia › \"Erase an object with the same seed\".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
