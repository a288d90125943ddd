"""Erase Concepts (text) inside the real ComfyUI (in-process), on the toy world's CLIP text encoder: identity when
nothing is chosen, a change only for the prompts in which the SAE detects a chosen concept, the original CLIP
untouched, composition, and clear errors. The SAE's "Hearts" latent reads the direction that separates the Hearts
prompt's token activations from the other objects' at the layer, so it fires where Hearts is named."""

import dataclasses
import types

import pytest
import torch

pytestmark = pytest.mark.comfy

LAYER = 1
HOOKPOINT = f"clip_l.text_model.encoder.layers.{LAYER}"
OBJECTS = ("Circles", "Squares", "Triangles", "Stars", "Hearts", "Crosses", "Rings", "Diamonds")


def encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return torch.cat([cond.reshape(-1), pooled.reshape(-1)])


def layer_activations(clip, text, layer=LAYER) -> torch.Tensor:
    """[77, d]: the token activations after CLIP-L's `layer` when `clip` encodes `text`."""
    seen = []
    module = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[layer]
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out.detach().clone()))
    try:
        encode(clip, text)
    finally:
        handle.remove()
    return seen[0][0]


def hearts_sae(clip, layer, path):
    """A text SAE at CLIP-L's `layer` whose concept Hearts reads the direction that separates the Hearts prompt's
    tokens from the other objects' prompts', with a threshold above every token of those; Neon never fires."""
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_core.sae_file import save_sae_file
    from saemnesia_tools.testing import random_sae, sae_file_with_assigned_latents

    acts = {o: layer_activations(clip, f"An image of {o}.", layer) for o in OBJECTS}
    hearts = acts.pop("Hearts")
    others = torch.stack(list(acts.values()))
    direction = (hearts - others.mean(0)).norm(dim=-1).argmax()  # the token where Hearts differs most
    row = hearts[direction] - others[:, direction].mean(0)
    sae = random_sae(d=row.numel(), n=64, k=64, seed=0)  # k = n: detection is the threshold alone
    with torch.no_grad():
        sae.encoder.weight[0] = row / row.norm()
        sae.encoder.bias[0] = 0.0
        sae.b_dec.zero_()
        pre = torch.cat([others.reshape(-1, row.numel()), hearts]) @ sae.encoder.weight[0]
    others_max, hearts_max = float(pre[:-hearts.shape[0]].max()), float(pre[-hearts.shape[0]:].max())
    assert hearts_max > others_max
    # a margin above the others' tokens: their max may be the BOS token, the same in every prompt
    theta = others_max + 0.1 * (hearts_max - others_max)
    save_sae_file(sae_file_with_assigned_latents(sae, [0, 1], ["Hearts", "Neon"], ["object", "style"], num_buckets=1,
                                                 thresholds=[theta, 1e30],
                                                 hookpoint=f"clip_l.text_model.encoder.layers.{layer}",
                                                 model_family="sd15"), path)
    return load_sae_path(path)


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_tools.toy import assets

    _, clip, _ = load_toy_model(assets.path(assets.MODEL))
    loaded = hearts_sae(clip, LAYER, tmp_path_factory.mktemp("text_sae") / "text.safetensors")
    prompts = [f"An image of {o}." for o in OBJECTS]
    return types.SimpleNamespace(clip=clip, loaded=loaded, prompts=prompts,
                                 plain={p: encode(clip, p) for p in (*prompts, "An image of Hearts in Neon style.")})


def erase(world, concepts, clip=None, **kw):
    from saemnesia_comfy.text_erase import erase_text_concepts

    return erase_text_concepts(clip or world.clip, world.loaded, concepts, kw.pop("strength", -1.0), **kw)


def test_the_text_node_is_registered(comfy_nodes):
    assert "SAEmnesiaEraseConceptsText" in comfy_nodes.NODE_CLASS_MAPPINGS


def test_nothing_chosen_encodes_every_prompt_bit_for_bit(world):
    patched = erase(world, {})
    assert patched.patcher.object_patches == world.clip.patcher.object_patches  # ComfyUI's own, if any
    for prompt, plain in world.plain.items():
        assert torch.equal(encode(patched, prompt), plain)


def test_a_chosen_concept_changes_exactly_the_prompts_the_sae_detects_it_in(world):
    from saemnesia_core.activation_maps import concept_activation_maps

    patched = erase(world, {"Hearts": None})
    changed = {p: not torch.equal(encode(patched, p), plain) for p, plain in world.plain.items()}
    file = world.loaded.file
    detected = {p: bool((concept_activation_maps(world.loaded.sae, file.concepts, file.tables,
                                                 layer_activations(world.clip, p)[None], 0.0, ["Hearts"])
                         > file.tables.thresholds[0, 0, 0]).any()) for p in world.plain}
    assert changed == detected
    assert changed["An image of Hearts."] and changed["An image of Hearts in Neon style."]
    assert sum(changed.values()) < len(changed)  # the other objects' prompts encode as before
    # a concept that never passes its threshold changes nothing, and the original CLIP is untouched
    assert torch.equal(encode(erase(world, {"Neon": None}), "An image of Hearts in Neon style."),
                       world.plain["An image of Hearts in Neon style."])
    assert torch.equal(encode(world.clip, "An image of Hearts."), world.plain["An image of Hearts."])


def test_the_edit_is_the_erasers_at_the_layer_and_strength_zero_ablates(world):
    """What the patched layer hands on is ConceptEraser's output for that layer's activations."""
    from saemnesia_core.eraser import ConceptEraser

    prompt = "An image of Hearts."
    for strength in (-1.0, 0.0):
        eraser = ConceptEraser.from_file(world.loaded.file, {"Hearts": strength}, sae=world.loaded.sae)
        expected = eraser(layer_activations(world.clip, prompt)[None], 0.0)[0]
        assert torch.equal(layer_activations(erase(world, {"Hearts": None}, strength=strength), prompt), expected)


def test_two_text_nodes_compose_and_each_clone_keeps_its_own_patches(world):
    once = erase(world, {"Hearts": None})
    twice = erase(world, {"Hearts": None}, clip=once)
    prompt = "An image of Hearts."
    once_out, twice_out = encode(once, prompt), encode(twice, prompt)
    assert not torch.equal(twice_out, once_out)  # the second patch wraps the first: Hearts erased twice over
    assert torch.equal(encode(once, prompt), once_out)
    assert [k for k in once.patcher.object_patches if k.endswith(".forward")] == \
        [f"clip_l.transformer.text_model.encoder.layers.{LAYER}.forward"]


def test_wrong_hookpoint_width_label_or_chain_fail_clearly(world):
    from saemnesia_comfy.patch import HookpointError
    from saemnesia_comfy.sae_library import LoadedSAE
    from saemnesia_core.concepts import UnknownConceptError
    from saemnesia_tools.testing import random_sae

    def with_file(**changes):
        file = dataclasses.replace(world.loaded.file, **changes)
        return dataclasses.replace(world.loaded, file=file)

    unet = with_file(hookpoint="unet.up_blocks.1.attentions.1")
    with pytest.raises(HookpointError, match=r"clip_l\.text_model\.encoder\.layers\.0, .*layers\.2"):
        erase(types.SimpleNamespace(clip=world.clip, loaded=unet), {"Hearts": None})
    narrow = random_sae(d=64, n=64, k=8)
    wrong = LoadedSAE("narrow", dataclasses.replace(world.loaded.file, config=narrow.cfg), narrow,
                      world.loaded.patcher)
    with pytest.raises(HookpointError, match="64-dimensional .* 128 wide"):
        erase(types.SimpleNamespace(clip=world.clip, loaded=wrong), {"Hearts": None})
    with pytest.raises(UnknownConceptError, match="Dogs"):
        erase(world, {"Dogs": None})
    with pytest.raises(ValueError, match="one SAE"):
        from saemnesia_comfy.text_erase import erase_text_concepts
        erase_text_concepts(world.clip, (world.loaded, world.loaded), {"Hearts": None}, -1.0)


def test_capture_train_and_erase_round_trip_at_a_text_layer(world, tmp_path):
    """Labelled prompts → the layer's token activations (the UNet's shard format) → the unsupervised SAE → the
    supervised fine-tune with one bucket → Erase Concepts (text): the file names the layer, and erasing a concept
    changes exactly the prompts in which the fine-tuned SAE detects it. A few training steps test the plumbing, not
    how well the SAE separates the concepts."""
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_tools.comfyui.text_capture import collect_from_clip
    from saemnesia_comfy.text_erase import erase_text_concepts
    from saemnesia_core.eraser import ConceptEraser
    from saemnesia_tools.training.shards import ActivationDataset
    from saemnesia_tools.training.specs import PromptSpec
    from saemnesia_tools.training.supervised import SupervisedConfig, finetune_supervised
    from saemnesia_tools.training.trainer import TrainConfig, train_unsupervised

    specs = [PromptSpec(f"An image of {o} in {s} style." if s else f"An image of {o}.",
                        {"object": o, **({"style": s} if s else {})})
             for o in OBJECTS for s in (None, "Neon", "Stripes")]
    data = collect_from_clip(world.clip, specs, tmp_path / "acts", hookpoint=HOOKPOINT, batch_size=6, progress=False)
    ds = ActivationDataset(data)
    assert (ds.d, ds.tokens_per_record, ds.hookpoint, ds.num_records) == (128, 77, HOOKPOINT, len(specs))
    first = ds.load_shard(0)
    assert first.sample[0] == 0 and first.labels[0].tolist() == [OBJECTS.index("Circles"), -1]
    assert torch.equal(first.acts[0], layer_activations(world.clip, specs[0].prompt).half())

    train_unsupervised(data, TrainConfig(num_latents=256, k=8, batch_size=256, max_steps=60, seed=0),
                       out=tmp_path / "text_saeuron.safetensors", model_family="toy", progress=False)
    finetune_supervised(tmp_path / "text_saeuron.safetensors", data,
                        SupervisedConfig(lr=1e-3, batch_records=8, max_epochs=3, num_buckets=1, val_fraction=0.25),
                        out=tmp_path / "text_saemnesia.safetensors", model_family="toy", progress=False)
    loaded = load_sae_path(tmp_path / "text_saemnesia.safetensors")
    assert loaded.file.hookpoint == HOOKPOINT and loaded.file.num_buckets == 1
    assert {"Hearts", "Neon"} <= set(loaded.labels)

    patched = erase_text_concepts(world.clip, loaded, {"Hearts": None}, -1.0)
    eraser = ConceptEraser.from_file(loaded.file, {"Hearts": -1.0}, sae=loaded.sae)
    detected, changed = {}, {}
    for spec in specs:
        acts = layer_activations(world.clip, spec.prompt)[None]
        detected[spec.prompt] = not torch.equal(eraser(acts, 0.0), acts)
        changed[spec.prompt] = not torch.equal(encode(patched, spec.prompt), encode(world.clip, spec.prompt))
    assert changed == detected
    assert 0 < sum(detected.values()) < len(specs)  # plumbing, not quality: this tiny SAE detects some prompts


@pytest.mark.parametrize("family, encoders", [("sd1", {"clip_l": (12, 768)}),
                                              ("sdxl", {"clip_l": (12, 768), "clip_g": (32, 1280)}),
                                              ("sd3", {"clip_l": (12, 768), "clip_g": (32, 1280)}),
                                              ("flux", {"clip_l": (12, 768)})])
def test_the_text_layers_of_each_familys_encoders_at_their_real_shapes(comfy, family, encoders):
    """The text encoders ComfyUI builds for SD1.x, SDXL, SD3 and Flux (on the meta device: the shapes without the
    weights): every CLIP layer is offered under the same name in each, with its real width, and T5 is not."""
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    from saemnesia_comfy.text_erase import layer_path, text_layers

    build = {"sd1": lambda: comfy.sd1_clip.SD1ClipModel(device="meta"),
             "sdxl": lambda: comfy.sdxl_clip.SDXLClipModel(device="meta"),
             "sd3": lambda: comfy.text_encoders.sd3_clip.SD3ClipModel(device="meta"),
             "flux": lambda: comfy.text_encoders.flux.FluxClipModel(device="meta")}[family]
    model = build()
    meta = torch.device("meta")
    clip = types.SimpleNamespace(cond_stage_model=model,
                                 patcher=comfy.model_patcher.ModelPatcher(model, load_device=meta, offload_device=meta))
    layers = text_layers(clip)
    assert list(layers) == [f"{name}.text_model.encoder.layers.{i}" for name, (count, _) in encoders.items()
                            for i in range(count)]
    for name, (count, width) in encoders.items():
        assert layer_path(clip, f"{name}.text_model.encoder.layers.{count - 1}", width) == \
            f"{name}.transformer.text_model.encoder.layers.{count - 1}"


def random_clip(tokenizer, model):
    """A CLIP as ComfyUI builds it for a family (real sizes, real tokenizer), with random weights (seeded)."""
    import comfy.sd
    import comfy.supported_models_base

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in clip.cond_stage_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.02)
    return clip


def test_erasure_at_a_real_size_clip_l_with_random_weights(comfy, tmp_path):
    """SD1.x's CLIP-L as ComfyUI builds it (12 layers, 768 wide, the real tokenizer), random weights: nothing chosen
    encodes bit for bit as before; Hearts chosen changes the Hearts prompt and leaves the other objects' prompts."""
    import comfy.sd1_clip
    from saemnesia_comfy.text_erase import erase_text_concepts

    clip = random_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    loaded = hearts_sae(clip, 5, tmp_path / "clip_l.safetensors")
    assert loaded.file.config.d_in == 768
    prompts = [f"An image of {o}." for o in OBJECTS]
    plain = {p: encode(clip, p) for p in prompts}
    assert all(torch.equal(encode(erase_text_concepts(clip, loaded, {}, -1.0), p), plain[p]) for p in prompts)
    erased = erase_text_concepts(clip, loaded, {"Hearts": None}, -1.0)
    assert {p for p in prompts if not torch.equal(encode(erased, p), plain[p])} == {"An image of Hearts."}


@pytest.mark.slow
def test_a_clip_l_sae_in_sdxls_two_encoders_edits_clip_l_and_leaves_clip_g(comfy, tmp_path):
    """SDXL's text encoder as ComfyUI builds it (CLIP-L and CLIP-G at their real sizes, random weights), encoding as
    its CLIPTextEncodeSDXL does: a CLIP-L SAE changes the CLIP-L half of the Hearts prompt's conditioning and
    leaves the CLIP-G half, and the pooled output (CLIP-G's), bit for bit; the other prompts encode unchanged."""
    import comfy.sdxl_clip
    from saemnesia_comfy.text_erase import erase_text_concepts

    clip = random_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    loaded = hearts_sae(clip, 5, tmp_path / "clip_l.safetensors")

    def sdxl_encode(c, text):  # CLIPTextEncode on SDXL (and CLIPTextEncodeSDXL with the same text for both)
        return c.encode_from_tokens(c.tokenize(text), return_pooled=True)

    erased = erase_text_concepts(clip, loaded, {"Hearts": None}, -1.0)
    for obj in ("Hearts", "Stars"):
        (cond, pooled), (cond_e, pooled_e) = (sdxl_encode(c, f"An image of {obj}.") for c in (clip, erased))
        assert cond.shape[-1] == 768 + 1280 and torch.equal(pooled_e, pooled)
        assert torch.equal(cond_e[..., 768:], cond[..., 768:])  # CLIP-G's half
        assert torch.equal(cond_e[..., :768], cond[..., :768]) == (obj != "Hearts")  # CLIP-L's half
