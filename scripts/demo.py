"""The demo: the real ComfyUI, headless, runs the toy-world workflow with the same seeds with and without
erasing concepts (an object, a style, both), and writes the images and a labelled before/after grid. Every
row uses the same seed.

    ./scripts/demo.sh            (sets everything up, then runs this)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from comfy_server import REPO_ROOT, ComfyServer

# One SAE per group, each at the block where the toy model decides that group (README, "The toy world"):
# objects at up_blocks.1.attentions.1 (SAEmnesia's block), styles at up_blocks.2.attentions.2.
SAES = {"object": "toy_saemnesia.safetensors", "style": "toy_saemnesia_styles.safetensors"}
# Rows from a pool of all 8 objects × {Stripes, Dots, Outline, Gradient} at seed 7, judged in-process: the first
# three pass all three erasures, the others show partial results (README gives the pool's rates).
CASES = [("Circles", "Stripes"), ("Triangles", "Stripes"), ("Triangles", "Dots"), ("Hearts", "Stripes"),
         ("Squares", "Outline"), ("Crosses", "Stripes")]
# Strengths γ: SAEmnesia's −1 is too gentle for objects at the toy's 8x8 block and far too strong for styles at
# its 16x16 block (there it wipes the image); −0.2 erases Stripes cleanly, Dots and Outline in part (README).
GAMMAS = {"object": -5.0, "style": -0.2}
COLUMNS = ["original", "erase object", "erase style", "erase both"]


def toy_prompt(text: str, seed: int, erase: dict[str, dict[str, float]], steps=25, cfg=5.0) -> dict:
    """API-format toy workflow; for each group in `erase` ({group: {concept: γ}}), a Load SAE + Erase Concepts
    pair with that group's SAE is chained between the model and KSampler."""
    prompt = {
        "1": {"class_type": "SAEmnesiaToyModelLoader", "inputs": {"model_name": "toy_world.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "SAEmnesiaToyEmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                   "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "saemnesia_demo"}},
    }
    model = ["1", 0]
    for i, (group, concepts) in enumerate(erase.items()):
        load, eraser = str(10 + 2 * i), str(11 + 2 * i)
        prompt[load] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": SAES[group]}}
        prompt[eraser] = {"class_type": "SAEmnesiaEraseConcepts", "inputs": {
            "model": model, "sae": [load, 0], "concepts": json.dumps(concepts), "strength": -1.0,
            "start_percent": 0.0, "end_percent": 1.0, "branches": "both", "mode": "exact"}}
        model = [eraser, 0]
    prompt["5"]["inputs"]["model"] = model
    return prompt


def labelled_grid(images: dict, scale: int = 6) -> Image.Image:
    """Rows = cases, columns = original / erased, each image upscaled `scale`× with labels."""
    cell, pad, head, side = 32 * scale, 6, 26, 170
    grid = Image.new("RGB", (side + len(COLUMNS) * (cell + pad), head + len(CASES) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(COLUMNS):
        draw.text((side + j * (cell + pad) + 4, 6), col, fill="black")
    for i, (obj, style) in enumerate(CASES):
        y = head + i * (cell + pad)
        draw.text((6, y + cell // 2 - 12), f"{obj}\nin {style} style", fill="black")
        for j, col in enumerate(COLUMNS):
            grid.paste(images[(i, col)].resize((cell, cell), Image.NEAREST), (side + j * (cell + pad), y))
    return grid


def judge(images: dict) -> dict:
    import torch

    from saemnesia_core.toy.judges import Judges, default_judges_path

    judges = Judges.load(default_judges_path())
    keys = sorted(images)
    batch = torch.from_numpy(np.stack([np.asarray(images[k], dtype=np.float32) / 255 for k in keys]))
    objects, styles = judges.predict(batch)
    return {k: (o, s) for k, o, s in zip(keys, objects, styles)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "output" / "demo")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    models = REPO_ROOT / "models"
    for needed in [models / "toy" / "toy_world.safetensors"] + [models / "saemnesia" / n for n in SAES.values()]:
        if not needed.exists():
            print(f"missing {needed}: regenerate the toy world with `python -m saemnesia_comfy.toy_build`")
            return 1
    comfy_root = Path((REPO_ROOT / ".comfyui" / "comfyui_path").read_text().strip())
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    started = time.time()
    server = ComfyServer(comfy_root, args.out / "comfyui_base").start()
    print(f"ComfyUI {server.url} is up ({time.time() - started:.0f} s); running {len(CASES) * len(COLUMNS)} prompts")
    images = {}
    try:
        for i, (obj, style) in enumerate(CASES):
            text = f"An image of {obj} in {style} style."
            o, s = {"object": {obj: GAMMAS["object"]}}, {"style": {style: GAMMAS["style"]}}
            choices = ({}, o, s, {**o, **s})
            for col, erase in zip(COLUMNS, choices):
                entry = server.run(toy_prompt(text, args.seed, erase))
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(entry['status'])[:2000]}")
                png = server.images(entry, "7")[0]
                images[(i, col)] = Image.open(io.BytesIO(png)).convert("RGB")
                images[(i, col)].save(args.out / "images" / f"{obj}_{style}_{col.replace(' ', '_')}.png")
    finally:
        server.stop()
    grid_path = args.out / "before_after_grid.png"
    labelled_grid(images).save(grid_path)
    verdicts = judge(images)
    for i, (obj, style) in enumerate(CASES):
        row = "  ".join(f"{col}: {'/'.join(verdicts[(i, col)])}" for col in COLUMNS)
        print(f"{obj:>9} in {style:<8} → judges see  {row}")
    print(f"\nimages: {args.out / 'images'}\ngrid:   {grid_path}\n({time.time() - started:.0f} s in all)")
    print("To play with the concept checklist in the UI: ./scripts/comfyui.sh, then open http://127.0.0.1:8188 "
          "and load the template 'saemnesia' › erase_one_concept (Workflow › Browse Templates).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
