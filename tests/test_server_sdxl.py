"""SDXL end to end in a live ComfyUI server: a random SDXL-family checkpoint (saemnesia_tools.comfyui.testing) loaded by
CheckpointLoaderSimple (ComfyUI's own detection, two text encoders, the pooled output), then Load SAE + Erase
Concepts + KSampler through /prompt. Nothing chosen gives the same pixels, a concept that fires changes them, and
the concept route the checklist reads lists the SAE's concepts. Random weights: the plumbing, not the quality."""

import json

import pytest

from fixtures_server import execution_error, saved_pixels
from saemnesia_tools.comfyui.server import ComfyServer

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(3600)]

CHECKPOINT, SAE = "random_sdxl_vega.safetensors", "random_sdxl_sae.safetensors"
HOOKPOINT = "unet.up_blocks.0.attentions.1"  # output_blocks.1.1, 1280 channels


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    from saemnesia_tools.comfyui.testing import save_random_sdxl_checkpoint
    from saemnesia_core.sae_file import save_sae_file
    from saemnesia_tools.testing import random_sae, sae_file_with_assigned_latents

    base = tmp_path_factory.mktemp("sdxl_server")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "saemnesia").mkdir(parents=True)
    checkpoint = base / "models" / "checkpoints" / CHECKPOINT
    save_random_sdxl_checkpoint(checkpoint)
    # Hearts fires on every token (θ = −∞), Neon never
    sae = random_sae(d=1280, n=256, k=32, seed=1)
    save_sae_file(sae_file_with_assigned_latents(sae, [0, 1], ["Hearts", "Neon"], ["object", "style"], num_buckets=4,
                                                 thresholds=[-1e30, 1e30], hookpoint=HOOKPOINT, model_family="sdxl"),
                  base / "models" / "saemnesia" / SAE)
    s = ComfyServer(base)
    try:
        s.start(timeout=1200)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()
    checkpoint.unlink()  # 3.6 GB


def sdxl_prompt(concepts=None, prefix="sdxl", mode="exact") -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "An image of Hearts.", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if concepts is not None:
        prompt["7"] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": SAE}}
        prompt["8"] = {"class_type": "SAEmnesiaEraseConcepts", "inputs": {
            "model": ["1", 0], "sae": ["7", 0], "concepts": json.dumps(concepts), "strength": -1.0,
            "start_percent": 0.0, "end_percent": 1.0, "branches": "both", "mode": mode}}
        prompt["5"]["inputs"]["model"] = ["8", 0]
    return prompt


def run_ok(server, prompt) -> dict:
    entry = server.run(prompt, timeout=1800)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry


def test_an_sdxl_checkpoint_through_prompt_erases_only_when_a_concept_is_chosen(server):
    plain = saved_pixels(server, run_ok(server, sdxl_prompt(prefix="plain")))
    nothing = saved_pixels(server, run_ok(server, sdxl_prompt([], prefix="nothing")))
    never = saved_pixels(server, run_ok(server, sdxl_prompt(["Neon"], prefix="never")))  # its latent never fires
    # Random weights make the UNet's activations huge (its latents reach |322|), so exact mode's change, one latent
    # of a random SAE, stays below a pixel step (measured in-process: 1.5e-4 in the latent). Paper mode adds the
    # random SAE's reconstruction error too, which shows: the check is that the node's edit reaches the image.
    erased = saved_pixels(server, run_ok(server, sdxl_prompt(["Hearts"], prefix="erased", mode="paper")))
    assert plain.shape == (64, 64, 3)
    assert (nothing == plain).all() and (never == plain).all()
    assert (erased != plain).any()
    # ComfyUI's detection, as it logs it: the SDXL model class and SDXL's two-encoder CLIP
    assert "Requested to load SDXL\n" in server.log_text() and "Requested to load SDXLClipModel" in server.log_text()


def test_the_checklists_route_lists_the_sdxl_saes_concepts(server):
    r = server.get("/saemnesia/concepts", params={"name": SAE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["label"] for c in body["concepts"]] == ["Hearts", "Neon"]
    assert (body["hookpoint"], body["d_in"], body["model_family"]) == (HOOKPOINT, 1280, "sdxl")
