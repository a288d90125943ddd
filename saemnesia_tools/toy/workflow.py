"""The toy world's text-to-image workflow in ComfyUI's API format, with Erase Concepts nodes chained in front of the
sampler: what the demo queues and what the end-to-end tests queue on a live server."""

from __future__ import annotations

import json
from pathlib import Path

from saemnesia_core.concepts import DEFAULT_EDIT

from . import assets

SAVE = "9"
"""The SaveImage node's id (its images are the workflow's output)."""


def erasing(sae: str, concepts, strength: float = DEFAULT_EDIT.strength, branches: str = DEFAULT_EDIT.branches,
            mode: str = DEFAULT_EDIT.mode) -> dict:
    """One Load SAE + Erase Concepts pair of `toy_prompt`: `concepts` a JSON string, a list or a dict; the rest at
    the node's defaults unless given."""
    return {"sae": sae, "concepts": concepts if isinstance(concepts, str) else json.dumps(concepts),
            "strength": strength, "branches": branches, "mode": mode}


def toy_prompt(text: str, seed: int = 0, steps: int = 4, cfg: float = 5.0, erase: list[dict] = (),
               prefix: str = "toy") -> dict:
    """The toy workflow: Load Toy World Model → CLIPTextEncode (the prompt, and "" as the negative) → KSampler
    (euler, normal) → VAEDecode → SaveImage. Each of `erase` (`erasing(...)`) adds a Load SAE (ids 7, 10, 12, …)
    and an Erase Concepts node (8, 11, 13, …) between the model and the sampler, in order."""
    prompt = {
        "1": {"class_type": "SAEmnesiaToyModelLoader", "inputs": {"model_name": Path(assets.MODEL).name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "SAEmnesiaToyEmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    for i, edit in enumerate(erase):
        load, eraser = ("7", "8") if i == 0 else (str(8 + 2 * i), str(9 + 2 * i))
        prompt[load] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": edit["sae"]}}
        prompt[eraser] = {"class_type": "SAEmnesiaEraseConcepts", "inputs": {
            "model": model, "sae": [load, 0], "concepts": edit["concepts"], "strength": edit["strength"],
            "start_percent": 0.0, "end_percent": 1.0, "branches": edit["branches"], "mode": edit["mode"]}}
        model = [eraser, 0]
    prompt["5"]["inputs"]["model"] = model
    return prompt
