"""Erase Concepts inside the real ComfyUI (in-process): identity, no leaks, branches, step ranges, shapes,
hookpoint maps, composition and memory. The UNet is SD1.5-shaped with random weights; the SAE's concept owns
the latent that fires most on that UNet's block, so erasing it must show."""

import dataclasses
import types

import pytest
import torch

from helpers_comfy import NODE_IDS

pytestmark = pytest.mark.comfy

BLOCK = "output_blocks.4.1"


@pytest.fixture(scope="module")
def world(comfy_nodes, tmp_path_factory):
    import folder_paths
    from helpers_comfy import conditioning, record_block_outputs, sae_file_for_activations, sample
    from saemnesia_tools.comfyui.testing import make_sd15_model
    from saemnesia_comfy import sae_library
    from saemnesia_core.sae import block_to_tokens
    from saemnesia_core.sae_file import save_sae_file

    model = make_sd15_model(model_channels=32, context_dim=64, in_channels=4, seed=0)
    g = torch.Generator().manual_seed(0)
    pos = conditioning(torch.randn(1, 77, 64, generator=g))
    neg = conditioning(torch.randn(1, 77, 64, generator=g))
    latent = torch.zeros(1, 4, 32, 32)
    seen = record_block_outputs(model, BLOCK, lambda m: sample(m, pos, neg, latent))
    acts = torch.cat([block_to_tokens(out).reshape(-1, out.shape[1]) for out, _ in seen])
    folder = tmp_path_factory.mktemp("saemnesia_models")
    save_sae_file(sae_file_for_activations(acts), folder / "random_unet.safetensors")
    folder_paths.add_model_folder_path(sae_library.SAE_FOLDER, str(folder))
    return types.SimpleNamespace(model=model, pos=pos, neg=neg, latent=latent, sample=sample,
                                 loaded=sae_library.load_sae("random_unet.safetensors"), folder=folder)


def erase(world, concepts, **kw):
    from saemnesia_comfy.erase import erase_concepts

    return erase_concepts(world.model, world.loaded, concepts, kw.pop("strength", -1.0), **kw)


def run(world, model, **kw):
    return world.sample(model, kw.pop("pos", world.pos), world.neg, kw.pop("latent", world.latent), **kw)


def test_pack_registers_its_nodes(comfy_nodes):
    assert set(NODE_IDS) <= set(comfy_nodes.NODE_CLASS_MAPPINGS)


def test_nothing_selected_gives_the_same_image_bit_for_bit(world):
    assert torch.equal(run(world, erase(world, {})), run(world, world.model))


@pytest.mark.parametrize("patcher", ["ModelPatcher", "ModelPatcherDynamic"])
def test_nothing_chosen_gives_back_the_very_model_it_was_given_whatever_its_patcher(world, patcher, monkeypatch):
    """No concept chosen: Erase Concepts returns its input itself, in every mode and branch setting, having checked
    every other input, so no clone can make ComfyUI load or page the model again (for ComfyUI 0.33's dynamic VRAM
    patcher, a clone is a new model to place)."""
    import comfy.model_patcher
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_core.eraser import MODES

    cls = getattr(comfy.model_patcher, patcher, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {patcher} (ComfyUI 0.33 and later have it)")
    if cls is comfy.model_patcher.ModelPatcher:
        model = world.model
    else:  # its own initialisation allocates comfy-aimdo's CUDA host buffers: here only the plain patcher's state
        model = cls.__new__(cls)
        comfy.model_patcher.ModelPatcher.__init__(model, world.model.model, torch.device("cpu"), torch.device("cpu"))
    monkeypatch.setattr(model, "clone", lambda *a, **k: pytest.fail("cloned"))
    for mode in MODES:
        for branches in ("both", "cond", "uncond"):
            assert erase_concepts(model, world.loaded, {}, -1.0, 0.2, 0.8, branches, mode) is model
    with pytest.raises(ValueError, match="start_percent"):  # still checked, though nothing is erased
        erase_concepts(model, world.loaded, {}, -1.0, 0.9, 0.1)


def test_a_concept_that_never_passes_its_threshold_changes_nothing_bit_for_bit(world):
    assert torch.equal(run(world, erase(world, {"Neon": None})), run(world, world.model))


def test_erasing_changes_the_image_and_the_original_model_is_untouched(world):
    before = run(world, world.model)
    erased = run(world, erase(world, {"Hearts": None}))
    after = run(world, world.model)
    assert not torch.allclose(erased, before, atol=1e-3)
    assert torch.equal(before, after)


def test_paper_mode_differs_from_exact_mode(world):
    exact = run(world, erase(world, {"Hearts": None}, mode="exact"))
    paper = run(world, erase(world, {"Hearts": None}, mode="paper"))
    assert not torch.allclose(exact, paper, atol=1e-3)


def test_shift_mode_on_a_file_without_directions_erases_in_exact_mode_and_says_so(world, caplog):
    # the node's default mode is shift (DEFAULT_EDIT); an imported or taught file holds no directions (DESIGN §6.9)
    assert world.loaded.file.tables.directions is None
    exact = run(world, erase(world, {"Hearts": None}, mode="exact"))
    with caplog.at_level("WARNING"):
        shifted = run(world, erase(world, {"Hearts": None}, mode="shift"))
    assert torch.equal(shifted, exact) and not torch.allclose(shifted, run(world, world.model), atol=1e-3)
    assert "holds no directions for shift mode" in caplog.text and "random_unet" in caplog.text


def test_at_cfg_1_only_the_cond_branch_exists(world):
    plain = run(world, world.model, cfg=1.0)
    assert torch.equal(run(world, erase(world, {"Hearts": None}, branches="uncond"), cfg=1.0), plain)
    assert not torch.allclose(run(world, erase(world, {"Hearts": None}, branches="cond"), cfg=1.0), plain, atol=1e-3)


def test_cond_only_and_uncond_only_edit_different_halves(world):
    cond = run(world, erase(world, {"Hearts": None}, branches="cond"))
    uncond = run(world, erase(world, {"Hearts": None}, branches="uncond"))
    both = run(world, erase(world, {"Hearts": None}, branches="both"))
    plain = run(world, world.model)
    for out in (cond, uncond):
        assert not torch.allclose(out, plain, atol=1e-3)
        assert not torch.allclose(out, both, atol=1e-3)
    assert not torch.allclose(cond, uncond, atol=1e-3)


def test_edit_follows_the_sigma_not_a_call_counter_in_partial_schedules(world):
    """KSamplerAdvanced runs only steps 0–5 of 10: an edit limited to the second half must never fire."""
    patched = erase(world, {"Hearts": None}, start_percent=0.5, end_percent=1.0)
    plain_first_half = run(world, world.model, steps=10, last_step=5)
    assert torch.equal(run(world, patched, steps=10, last_step=5), plain_first_half)
    assert not torch.allclose(run(world, patched, steps=10, start_step=5), run(world, world.model, steps=10, start_step=5),
                              atol=1e-3)


def test_an_empty_step_range_changes_nothing(world):
    assert torch.equal(run(world, erase(world, {"Hearts": None}, start_percent=0.0, end_percent=0.0)),
                       run(world, world.model))


@pytest.mark.parametrize("sampler,steps", [("euler", 3), ("dpmpp_2m", 5), ("ddim", 4)])
def test_any_sampler_and_step_count(world, sampler, steps):
    plain = run(world, world.model, sampler=sampler, steps=steps)
    assert not torch.allclose(run(world, erase(world, {"Hearts": None}), sampler=sampler, steps=steps), plain,
                              atol=1e-3)


def test_odd_resolution_and_batches(world):
    latent = torch.zeros(3, 4, 40, 24)  # non-square; the hooked block sees 10×6 tokens
    pos = [[world.pos[0][0].expand(3, -1, -1), {}]]
    out = run(world, erase(world, {"Hearts": None}), latent=latent, pos=pos)
    plain = run(world, world.model, latent=latent, pos=pos)
    assert out.shape == (3, 4, 40, 24)
    assert torch.isfinite(out).all()
    assert all(not torch.allclose(out[i], plain[i], atol=1e-3) for i in range(3))


def test_each_image_of_a_batch_is_edited_as_if_alone(world):
    import comfy.sample

    latent = torch.zeros(2, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 7)
    pos = [[world.pos[0][0].expand(2, -1, -1), {}]]
    patched = erase(world, {"Hearts": None})
    batch = run(world, patched, latent=latent, pos=pos, noise=noise)
    alone = run(world, patched, latent=latent[1:], noise=noise[1:])
    assert torch.allclose(batch[1:], alone, rtol=1e-4, atol=1e-3)  # batched matmuls round differently


def test_chained_erasures_compose_and_share_one_copy_of_the_sae(world):
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY

    first = erase(world, {"Hearts": None})
    second = erase_concepts(first, world.loaded, {"Hearts": None}, -1.0)
    assert not torch.allclose(run(world, second), run(world, first), atol=1e-3)
    attached = second.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert len(attached) == 1 and attached[0].model.sae is world.loaded.sae
    chain = world.model
    for _ in range(20):
        chain = erase_concepts(chain, world.loaded, {"Hearts": None}, -1.0)
    assert len({id(p.model.sae) for p in chain.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)}) == 1


def test_unknown_concepts_fail_listing_the_known_ones(world):
    from saemnesia_core.concepts import UnknownConceptError

    with pytest.raises(UnknownConceptError, match="Hearts.*Neon|Neon.*Hearts") as info:
        erase(world, {"Dogs": None})
    assert "Dogs" in str(info.value)


def test_an_sae_for_another_width_fails_naming_both_widths(world, tmp_path):
    from saemnesia_tools.testing import make_random_sae_file
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import HookpointError
    from saemnesia_comfy.sae_library import LoadedSAE

    other = make_random_sae_file(d=64, n=128, k=4, concepts=("Hearts",))
    loaded = LoadedSAE("other", other, other.build_sae(), world.loaded.patcher)
    with pytest.raises(HookpointError, match="64.*128|128.*64"):
        erase_concepts(world.model, loaded, {"Hearts": None}, -1.0)


def test_an_sae_for_a_block_the_model_lacks_fails_listing_the_blocks(world):
    from dataclasses import replace

    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import HookpointError
    from saemnesia_comfy.sae_library import LoadedSAE

    moved = replace(world.loaded.file, hookpoint="unet.up_blocks.0.attentions.0")  # SD1.5 has no attention there
    loaded = LoadedSAE("moved", moved, world.loaded.sae, world.loaded.patcher)
    with pytest.raises(HookpointError, match="up_blocks.1.attentions.1"):
        erase_concepts(world.model, loaded, {"Hearts": None}, -1.0)


def _model_like(unet_config):
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config=unet_config)))


def test_sd15_hookpoints_map_to_comfyui_blocks(comfy):
    from saemnesia_tools.comfyui.testing import sd15_unet_config
    from saemnesia_comfy.patch import comfy_block_name

    cfg = sd15_unet_config(model_channels=320, context_dim=768)  # SD1.5's own layout and widths
    model = _model_like(cfg)
    assert [comfy_block_name(model, f"unet.up_blocks.1.attentions.{i}") for i in range(3)] == \
        ["output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"]
    assert comfy_block_name(model, "unet.mid_block.attentions.0") == "middle_block.1"
    assert comfy_block_name(model, "unet.down_blocks.2.attentions.1") == "input_blocks.8.1"


def test_sdxl_hookpoints_map_to_comfyui_blocks(comfy):
    import comfy.supported_models
    from saemnesia_comfy.patch import comfy_block_name

    # SDXL's block layout (three levels, 2/10 transformer layers); ComfyUI's own detection must accept it as SDXL
    cfg = {**comfy.supported_models.SDXL.unet_config, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
           "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
    assert comfy.supported_models.SDXL.matches(cfg)
    model = _model_like(cfg)
    assert [comfy_block_name(model, f"unet.up_blocks.0.attentions.{i}") for i in range(3)] == \
        ["output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1"]
    assert comfy_block_name(model, "unet.up_blocks.1.attentions.1") == "output_blocks.4.1"
    assert comfy_block_name(model, "unet.down_blocks.2.attentions.1") == "input_blocks.8.1"


@pytest.mark.parametrize("layout", ["sparsify", "saemnesia"])
def test_load_sae_lists_and_loads_every_checkpoint_folder_layout_the_importer_reads(world, layout):
    from helpers_core import write_openai_folder, write_sparsify_folder
    from saemnesia_comfy import sae_library
    from saemnesia_tools.testing import random_sae

    sae = random_sae(d=128, n=256, k=8, seed=3)
    write = write_sparsify_folder if layout == "sparsify" else write_openai_folder
    write(world.folder / f"{layout}_ckpt" / "unet.up_blocks.1.attentions.1", sae)
    name = f"{layout}_ckpt/unet.up_blocks.1.attentions.1"
    assert name in sae_library.list_sae_entries()
    loaded = sae_library.load_sae(name)
    assert loaded.file.hookpoint == "unet.up_blocks.1.attentions.1"
    assert torch.equal(loaded.sae.W_dec, sae.W_dec)


def test_an_fp32_sae_on_a_bf16_model_is_converted_once_held_by_its_own_patcher_and_shared(world):
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY
    from saemnesia_tools.comfyui.testing import make_sd15_model
    from saemnesia_core.eraser import ConceptEraser

    model = make_sd15_model(model_channels=32, context_dim=64, in_channels=4, seed=0, dtype=torch.bfloat16)
    first = erase_concepts(model, world.loaded, {"Hearts": -1.0}, -1.0)
    chained = erase_concepts(first, world.loaded, {"Hearts": -2.0}, -1.0)
    attached = chained.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    converted = world.loaded.for_dtype(torch.bfloat16)
    assert world.loaded.sae.dtype == torch.float32 and converted.sae.dtype == torch.bfloat16
    assert converted.sae is world.loaded.for_dtype(torch.bfloat16).sae       # made once
    other_tables = dataclasses.replace(world.loaded.file, concepts=list(world.loaded.file.concepts))
    variant = dataclasses.replace(world.loaded, file=other_tables).for_dtype(torch.bfloat16)
    assert variant.file is other_tables and variant.sae is converted.sae      # a variant keeps its own file
    assert {id(p.model.sae) for p in attached} == {id(converted.sae)}         # the only SAE the chain attaches
    assert converted.patcher is not world.loaded.patcher                      # ComfyUI manages the copy itself
    # the edit with the converted copy is the edit with the fp32 weights cast per call (up to bf16 rounding)
    x = torch.randn(2, 128, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    tables, concepts = world.loaded.file.tables, world.loaded.file.concepts
    per_call = ConceptEraser(world.loaded.sae, concepts, tables, {"Hearts": -1.0})(x, 0.5)
    once = ConceptEraser(converted.sae, concepts, tables, {"Hearts": -1.0})(x, 0.5)
    assert not torch.equal(per_call, x)
    torch.testing.assert_close(once.float(), per_call.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------- replace mode, masks


def erase_on(model, world, concepts, **kw):
    from saemnesia_comfy.erase import erase_concepts

    return erase_concepts(model, world.loaded, concepts, kw.pop("strength", -1.0), **kw)


def edits_seen(world, patched_from, latent=None, pos=None):
    """(block output before the edit, after it, transformer_options) per block call while sampling the model that
    `patched_from(model)` makes from a clone that records before; a second recorder on top sees after."""
    from saemnesia_comfy.patch import patch_block_output

    before, after = [], []
    inner = world.model.clone()
    patch_block_output(inner, BLOCK, lambda out, options: before.append(out.clone()) or out)
    outer = patched_from(inner).clone()
    patch_block_output(outer, BLOCK, lambda out, options: after.append((out.clone(), dict(options))) or out)
    run(world, outer, **({"latent": latent} if latent is not None else {}), **({"pos": pos} if pos is not None else {}))
    return [(b, a, o) for b, (a, o) in zip(before, after, strict=True)]


def test_replace_mode_changes_the_image_and_is_the_identity_when_nothing_is_detected(world):
    plain = run(world, world.model)
    assert not torch.allclose(run(world, erase(world, {"Hearts": None}, mode="replace")), plain, atol=1e-3)
    assert torch.equal(run(world, erase(world, {"Neon": None}, mode="replace")), plain)
    calls = edits_seen(world, lambda m: erase_on(m, world, {"Hearts": None}, mode="replace"))
    changed = torch.stack([(a != b).any(1) for b, a, _ in calls])  # tokens replaced, per call
    assert changed.any() and not changed.all()


@pytest.mark.parametrize("mode", ["exact", "paper", "replace"])
def test_a_mask_limits_the_edit_to_its_region_in_every_mode(world, mode):
    mask = torch.zeros(1, 256, 256)  # image size of the 32×32 latent
    mask[:, :, :128] = 1.0           # the left half
    calls = edits_seen(world, lambda m: erase_on(m, world, {"Hearts": None}, mode=mode, mask=mask))
    for before, after, _ in calls:
        half = before.shape[3] // 2
        assert torch.equal(after[..., half:], before[..., half:])
    assert any((after[..., : before.shape[3] // 2] != before[..., : before.shape[3] // 2]).any() for before, after, _ in calls)
    everywhere = run(world, erase(world, {"Hearts": None}, mode=mode, mask=torch.ones(256, 256)))
    assert torch.equal(everywhere, run(world, erase(world, {"Hearts": None}, mode=mode)))
    assert torch.equal(run(world, erase(world, {"Hearts": None}, mode=mode, mask=torch.zeros(1, 64, 64))),
                       run(world, world.model))


def test_each_image_of_a_batch_takes_its_own_mask_in_both_cfg_branches(world):
    latent = torch.zeros(2, 4, 32, 32)
    pos = [[world.pos[0][0].expand(2, -1, -1), {}]]
    mask = torch.zeros(2, 256, 256)
    mask[0, :, :128] = 1.0  # image 0: the left half; image 1: the right half
    mask[1, :, 128:] = 1.0
    calls = edits_seen(world, lambda m: erase_on(m, world, {"Hearts": None}, mask=mask), latent=latent, pos=pos)
    for before, after, options in calls:
        half = before.shape[3] // 2
        for i in range(before.shape[0]):
            image = i % 2  # chunk-major: [cond images…, uncond images…]
            kept = slice(half, None) if image == 0 else slice(None, half)
            assert torch.equal(after[i, ..., kept], before[i, ..., kept])
    assert {len(o["cond_or_uncond"]) for _, _, o in calls} == {2}


def test_a_mask_of_the_wrong_shape_or_range_fails_before_anything_is_patched(world):
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        erase(world, {"Hearts": None}, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        erase(world, {"Hearts": None}, mask=torch.full((8, 8), 2.0))
