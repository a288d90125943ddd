"""MultiGPU work units (ComfyUI 0.23+): a model patched by Erase Concepts, copied per device by ComfyUI's own
`deepclone_multigpu` / `match_multigpu_clones`, erases on every copy with that copy's own block and its own copy
of the SAE's weights. No second GPU exists here: the functions are called directly with the CPU as the "other"
device, which is all they need (they load a fresh model through `cached_patcher_init` and clone the patches)."""

import pytest
import torch

from saemnesia_tools.toy import assets

PROMPT = "An image of Hearts in Neon style."
SEEDS = [900, 901]


@pytest.fixture(scope="module")
def toy(comfy):
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"):
        pytest.skip("this ComfyUI has no MultiGPU work units (added in 0.23; the bundled host is 0.3.75)")
    from saemnesia_comfy.patch import block_for
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_tools.comfyui.toy.sampling import PromptEncoder

    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    loaded = load_sae_path(assets.path(assets.SITES["object"].saemnesia))
    block = block_for(model, loaded.file.hookpoint, loaded.file.config.d_in)
    return model, vae, PromptEncoder(clip), loaded, f"diffusion_model.{block}.forward"


def images(toy, model):
    from saemnesia_tools.comfyui.toy.sampling import generate

    _, vae, encoder, _, _ = toy
    return generate(model, vae, encoder, [PROMPT] * len(SEEDS), SEEDS, steps=8)


def erased(toy, model):
    from saemnesia_comfy.erase import erase_concepts

    return erase_concepts(model, toy[3], {"Hearts": None}, -5.0)


def assert_is_its_own(copy, original, toy):
    """The copy's block patch runs on the copy's module and erases with an SAE that is the copy's own."""
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY
    from saemnesia_comfy.patch import BlockOutputPatch

    key = toy[4]
    patch = copy.object_patches[key]
    assert isinstance(patch, BlockOutputPatch)
    own_module = copy.get_model_object(key.removesuffix(".forward"))
    assert patch.module is own_module and own_module is not original.get_model_object(key.removesuffix(".forward"))
    assert patch.previous.__self__ is own_module  # the block's own forward, of the copy's block
    (sae_patcher,) = copy.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    (original_sae,) = original.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert sae_patcher is not original_sae and sae_patcher.model.sae is not original_sae.model.sae
    assert torch.equal(sae_patcher.model.sae.encoder.weight, original_sae.model.sae.encoder.weight)
    return sae_patcher.model.sae


def test_erase_then_multigpu_copy_erases_with_its_own_block_and_sae(toy):
    model = toy[0]
    m = erased(toy, model)
    reference = images(toy, m)
    copy = m.deepclone_multigpu(new_load_device=torch.device("cpu"))
    sae = assert_is_its_own(copy, m, toy)
    assert torch.equal(images(toy, copy), reference)
    # Spoil the original's SAE and block weights: the copy must not notice.
    original_sae = m.get_additional_models_with_key("saemnesia_sae")[0].model.sae
    kept = {k: v.clone() for k, v in original_sae.state_dict().items()}
    try:
        with torch.no_grad():
            original_sae.encoder.weight.zero_()
        assert not torch.equal(images(toy, m), reference)  # the original did change
        assert torch.equal(images(toy, copy), reference)
        assert sae.encoder.weight.abs().sum() > 0
    finally:
        original_sae.load_state_dict(kept)


def test_multigpu_then_erase_matched_copies_erase_with_their_own_block_and_sae(toy):
    model = toy[0].clone()
    device_copy = model.deepclone_multigpu(new_load_device=torch.device("cpu"))
    device_copy.is_multigpu_base_clone = True
    model.set_additional_models("multigpu", [device_copy])
    m = erased(toy, model)
    m.match_multigpu_clones()  # what ComfyUI's prepare_sampling does before each run
    (copy,) = m.get_additional_models_with_key("multigpu")
    assert copy.model is device_copy.model  # the device's own model, now patched like the main one
    assert_is_its_own(copy, m, toy)
    assert torch.equal(images(toy, copy), images(toy, erased(toy, toy[0])))


def test_an_unerased_model_and_its_multigpu_copy_draw_the_same(toy):
    """Nothing chosen: no patch at all, on the model or its copies."""
    from saemnesia_comfy.erase import erase_concepts

    m = erase_concepts(toy[0], toy[3], {}, -5.0)
    copy = m.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert toy[4] not in copy.object_patches
    assert torch.equal(images(toy, copy), images(toy, toy[0]))
