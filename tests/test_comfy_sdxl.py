"""Erase Concepts on an SDXL-topology UNet in the real ComfyUI (in-process): ComfyUI's own SDXL model class
(`model_base.SDXL`, with its pooled-text and size conditioning) at a tiny width with SDXL's block layout (three
levels, attention only at the two deeper ones), random weights. The plumbing, not the quality: the hookpoint maps
through `unet_to_diffusers`, nothing chosen samples bit for bit as the plain model, a chosen concept changes the
image, a wrong hookpoint lists SDXL's blocks."""

import pytest
import torch

pytestmark = pytest.mark.comfy

HOOKPOINT = "unet.up_blocks.0.attentions.1"  # SDXL's deepest decoder level, as sdxl-unbox's up.0.1


def sample(model) -> torch.Tensor:
    import comfy.sample

    g = torch.Generator().manual_seed(3)
    cond = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                    "width": 128, "height": 128}]]
    negative = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32), "width": 128, "height": 128}]]
    noise = torch.randn(1, 4, 16, 16, generator=g)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", cond, negative, torch.zeros_like(noise),
                               disable_pbar=True, seed=3)


def test_erase_concepts_on_an_sdxl_topology_unet(comfy, tmp_path):
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import HookpointError, comfy_block_name
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_core.sae_file import save_sae_file
    from saemnesia_tools.comfyui.testing import tiny_sdxl_model
    from saemnesia_tools.testing import random_sae, sae_file_with_assigned_latents

    model = tiny_sdxl_model()
    assert type(model.model).__name__ == "SDXL"
    assert comfy_block_name(model, HOOKPOINT) == "output_blocks.1.1"
    with pytest.raises(HookpointError, match="unet.up_blocks.0.attentions.0, .*unet.up_blocks.1.attentions.2"):
        comfy_block_name(model, "unet.up_blocks.2.attentions.0")  # SDXL has no attention at full resolution
    channels = model.get_model_object("diffusion_model.output_blocks.1.1").in_channels
    sae = random_sae(d=channels, n=32, k=32, seed=1)
    save_sae_file(sae_file_with_assigned_latents(sae, [0, 1], ["Hearts", "Neon"], ["object", "style"], num_buckets=4,
                                                 thresholds=[-1e30, 1e30], hookpoint=HOOKPOINT, model_family="sdxl"),
                  tmp_path / "sdxl.safetensors")
    loaded = load_sae_path(tmp_path / "sdxl.safetensors")

    plain = sample(model)
    assert torch.isfinite(plain).all()
    assert torch.equal(sample(erase_concepts(model, loaded, {}, -1.0)), plain)
    assert torch.equal(sample(erase_concepts(model, loaded, {"Neon": None}, -1.0)), plain)  # never fires
    erased = sample(erase_concepts(model, loaded, {"Hearts": None}, 0.0))
    assert torch.isfinite(erased).all() and not torch.equal(erased, plain)
