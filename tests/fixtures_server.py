"""The toy world on a live ComfyUI server: a synthetic test SAE fitted to the toy model's hooked block, a server
whose models/saemnesia holds it (beside the shipped SAEs, which the pack's own models folder provides), and
API-format prompts for the toy workflow (with or without Erase Concepts).

The synthetic SAE has a name of its own, so it never hides a shipped file: its concepts are the toy world's 8
objects and 8 styles, each owning one of the latents that fire most on the toy model's `output_blocks.4.1`
(d = 128) while it samples toy prompts, so erasing any of them changes the image, at any strength.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saemnesia_tools.comfyui.server import ComfyServer
from saemnesia_tools.toy import assets, workflow
from saemnesia_tools.toy.workflow import erasing

REPO_ROOT = assets.REPO_ROOT
TOY_MODEL = Path(assets.MODEL).name
SAE_NAME = "synthetic_test_sae.safetensors"  # not a shipped name: the shipped SAEs stay visible and unshadowed
BLOCK = "output_blocks.4.1"
EXAMPLES = REPO_ROOT / "example_workflows"

# the test SAE depends only on the toy model file: kept across sessions, remade when the model file changes
SAE_CACHE = REPO_ROOT / ".pytest_cache" / "saemnesia"
SAE_RECIPE = "v1"  # bump when _build_toy_sae changes


def toy_labels() -> tuple[list[str], list[str]]:
    from saemnesia_tools.toy.render import OBJECTS, STYLES

    return list(OBJECTS) + list(STYLES), ["object"] * len(OBJECTS) + ["style"] * len(STYLES)


def make_toy_sae(folder: Path) -> Path:
    """Copy the test SAE into `folder` as SAE_NAME (made first if the cache has none for this toy model)."""
    model = assets.path(assets.MODEL)
    stat = model.stat()
    cached = SAE_CACHE / f"toy_sae_{SAE_RECIPE}_{stat.st_size}_{stat.st_mtime_ns}.safetensors"
    if not cached.exists():
        SAE_CACHE.mkdir(parents=True, exist_ok=True)
        _build_toy_sae(model, cached)  # written atomically
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, folder / SAE_NAME)
    return folder / SAE_NAME


def _build_toy_sae(model_path: Path, out: Path) -> None:
    from helpers_comfy import record_block_outputs, sae_file_for_activations, sample
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_core.sae import block_to_tokens
    from saemnesia_core.sae_file import save_sae_file

    model, clip, _ = load_toy_model(model_path)

    def cond(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    seen = record_block_outputs(model, BLOCK, lambda m: sample(m, cond("An image of Hearts in Neon style."), cond(""),
                                                              torch.zeros(1, 3, 32, 32), steps=4))
    acts = torch.cat([block_to_tokens(o).reshape(-1, o.shape[1]) for o, _ in seen])
    labels, groups = toy_labels()
    save_sae_file(sae_file_for_activations(acts, labels=labels, groups=groups, never_fires=()), out)


def start_toy_server(base: Path, front_end_root: Path | None = None) -> ComfyServer:
    """A live server (this pack, the toy model, the test SAE and a corrupt SAE file in models/saemnesia), serving
    the host's own frontend or the one at `front_end_root`."""
    server = ComfyServer(base, front_end_root=front_end_root)
    make_toy_sae(base / "models" / "saemnesia")
    header = b"{not a json header}"
    (base / "models" / "saemnesia" / "corrupt.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    try:
        return server.start(timeout=1200)  # generous: the machine may be busy
    except BaseException:
        server.stop()
        raise


def toy_prompt(text: str = "An image of Hearts in Neon style.", seed: int = 0, steps: int = 4, cfg: float = 5.0,
               concepts=None, strength: float = -1.0, prefix: str = "toy", branches: str = "both",
               sae: str = SAE_NAME, mode: str = "exact") -> dict:
    """The toy workflow in API format (saemnesia_tools.toy.workflow); with `concepts` (a JSON string, a list or a
    dict) Load SAE (node 7) + Erase Concepts (node 8) sit between the model and the sampler."""
    erase = [] if concepts is None else [erasing(sae, concepts, strength, branches, mode)]
    return workflow.toy_prompt(text, seed, steps, cfg, erase, prefix)


def execution_error(entry: dict) -> str:
    """The exception message of a failed prompt's history entry."""
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors, f"no execution error in {entry['status']}"
    return errors[0]["exception_message"]


def pixels(png: bytes) -> np.ndarray:
    """The decoded pixels of a PNG (its metadata, which holds the prompt, is ignored)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def saved_pixels(server: ComfyServer, entry: dict, node_id: str = "9") -> np.ndarray:
    (png,) = server.images(entry, node_id)
    return pixels(png)
