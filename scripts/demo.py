"""The demo: the real ComfyUI, headless, runs the toy-world workflow with the same seeds with and without
erasing concepts (an object, a style, both), and writes the images and a labelled before/after grid.

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

SAE = "toy_saemnesia.safetensors"
CASES = [("Hearts", "Neon"), ("Triangles", "Gradient"), ("Diamonds", "Dots"), ("Crosses", "Checker"),
         ("Circles", "Stripes"), ("Squares", "Stripes")]
# Strengths γ for the toy SAE (SAEmnesia's −1 is too gentle at this block of the toy model): objects go at −5;
# styles need −15 and of the toy's styles only Stripes is reliably erased at this block (see README, results).
OBJECT_GAMMA, STYLE_GAMMA = -5.0, -15.0
COLUMNS = ["original", "erase object", "erase style", "erase both"]


def toy_prompt(text: str, seed: int, erase: dict[str, float] | None, steps=25, cfg=5.0) -> dict:
    """API-format toy workflow; with `erase`, Load SAE + Erase Concepts sit between the model and KSampler."""
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
    if erase:
        prompt["8"] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": SAE}}
        prompt["9"] = {"class_type": "SAEmnesiaEraseConcepts", "inputs": {
            "model": ["1", 0], "sae": ["8", 0], "concepts": json.dumps(erase), "strength": -1.0,
            "start_percent": 0.0, "end_percent": 1.0, "branches": "both", "mode": "exact"}}
        prompt["5"]["inputs"]["model"] = ["9", 0]
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
    for needed in (REPO_ROOT / "models" / "toy" / "toy_world.safetensors", REPO_ROOT / "models" / "saemnesia" / SAE):
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
            choices = (None, {obj: OBJECT_GAMMA}, {style: STYLE_GAMMA}, {obj: OBJECT_GAMMA, style: STYLE_GAMMA})
            for col, erase in zip(COLUMNS, choices):
                entry = server.run(toy_prompt(text, args.seed + i, erase))
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
