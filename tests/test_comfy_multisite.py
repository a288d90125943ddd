"""Erase Concepts at several blocks (DESIGN §6.6): Load SAE nodes chained through `also` pass one SAE per block, and
Erase Concepts erases each chosen concept at every block whose SAE knows it. The toy world ships such a pair: its
object and style SAEmnesia files read two blocks and both know all 16 concepts."""

import json

import pytest
import torch

from saemnesia_tools.toy import assets

pytestmark = pytest.mark.comfy

OBJECT_SAE, STYLE_SAE = assets.SITES["object"].saemnesia, assets.SITES["style"].saemnesia


@pytest.fixture(scope="module")
def toy(comfy_nodes):
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_tools.comfyui.toy.sampling import PromptEncoder

    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    encoder = PromptEncoder(clip)
    saes = {name: load_sae_path(assets.path(name)) for name in (OBJECT_SAE, STYLE_SAE)}
    return model, vae, encoder, saes, comfy_nodes.NODE_CLASS_MAPPINGS


def images(toy, model):
    from saemnesia_tools.comfyui.toy.sampling import generate

    _, vae, encoder, _, _ = toy
    prompts = ["An image of Hearts in Neon style.", "An image of Circles in Dots style."]
    return generate(model, vae, encoder, prompts, [0, 1], steps=6)


def patched_blocks(model) -> list[str]:
    return sorted(key.removesuffix(".forward") for key in model.object_patches if key.endswith(".forward"))


def test_chained_load_sae_nodes_pass_one_sae_per_block_and_refuse_two_for_one_block(toy):
    from saemnesia_comfy.erase import chain_saes, sae_sites

    _, _, _, saes, _ = toy
    both = chain_saes(saes[OBJECT_SAE], saes[STYLE_SAE])
    assert [s.file.hookpoint for s in both] == ["unet.up_blocks.1.attentions.1", "unet.up_blocks.2.attentions.2"]
    assert sae_sites(both) == list(both) and sae_sites(saes[OBJECT_SAE]) == [saes[OBJECT_SAE]]
    with pytest.raises(ValueError, match="same block unet.up_blocks.1.attentions.1"):
        chain_saes(both, saes[OBJECT_SAE])


def test_nothing_chosen_at_several_blocks_is_the_identity_bit_for_bit(toy):
    from saemnesia_comfy.erase import chain_saes, erase_concepts

    model, _, _, saes, _ = toy
    erased = erase_concepts(model, chain_saes(saes[OBJECT_SAE], saes[STYLE_SAE]), {}, -5.0)
    assert patched_blocks(erased) == []
    assert torch.equal(images(toy, erased), images(toy, model))


def test_a_concept_is_erased_at_every_block_whose_sae_knows_it(toy):
    from saemnesia_comfy.erase import chain_saes, erase_concepts

    model, _, _, saes, _ = toy
    chosen = {"Hearts": -5.0}
    both = erase_concepts(model, chain_saes(saes[OBJECT_SAE], saes[STYLE_SAE]), chosen, -1.0)
    assert patched_blocks(both) == ["diffusion_model.output_blocks.4.1", "diffusion_model.output_blocks.8.1"]
    plain = images(toy, model)
    one = {name: images(toy, erase_concepts(model, saes[name], chosen, -1.0)) for name in saes}
    two = images(toy, both)
    assert not any(torch.equal(two, image) for image in (plain, *one.values()))


@pytest.mark.parametrize("group", sorted(assets.MULTI_SITE))
def test_the_shipped_multi_site_chain_is_the_identity_with_nothing_chosen_and_acts_at_each_block(toy, group):
    """The toy world's multi-site edit (assets.MULTI_SITE: the 16x16 encoder level and the group's own site): no
    patch and the same pixels with nothing chosen; the group's concept at the node's default strength patches every
    block of the chain and changes the image beyond what either block alone does."""
    from saemnesia_comfy.erase import chain_saes, erase_concepts, sae_sites
    from saemnesia_comfy.sae_library import load_sae_path

    model = toy[0]
    encoder_level, own = (load_sae_path(assets.path(site.saemnesia)) for site in assets.MULTI_SITE[group])
    chain = chain_saes(encoder_level, own)  # what Load SAE (own) with Load SAE (encoder level) in `also` passes on
    assert [s.file.hookpoint for s in sae_sites(chain)] == [site.hookpoint for site in assets.MULTI_SITE[group]]
    nothing = erase_concepts(model, chain, {}, -1.0)
    assert patched_blocks(nothing) == [] and torch.equal(images(toy, nothing), images(toy, model))
    concept = {"object": "Hearts", "style": "Neon"}[group]
    both = erase_concepts(model, chain, {concept: None}, -1.0)
    assert len(patched_blocks(both)) == len(assets.MULTI_SITE[group])
    alone = [images(toy, erase_concepts(model, loaded, {concept: None}, -1.0)) for loaded in sae_sites(chain)]
    assert not any(torch.equal(images(toy, both), image) for image in (images(toy, model), *alone))


def test_one_erase_node_per_block_draws_what_one_node_with_the_chain_draws(toy):
    """Two Erase Concepts nodes in a row, each with one block's SAE (how a workflow gives each block its own strength,
    as the removal study's per-block candidates do), erase exactly as one node with both blocks chained."""
    from saemnesia_comfy.erase import chain_saes, erase_concepts
    from saemnesia_comfy.sae_library import load_sae_path

    model = toy[0]
    encoder_level, own = (load_sae_path(assets.path(site.saemnesia)) for site in assets.MULTI_SITE["object"])
    edit = dict(strength=-1.0, mode="shift", branches="cond")
    one_node = erase_concepts(model, chain_saes(encoder_level, own), {"Hearts": -2.0}, **edit)
    two_nodes = erase_concepts(erase_concepts(model, encoder_level, {"Hearts": -2.0}, **edit), own, {"Hearts": -2.0},
                               **edit)
    assert patched_blocks(two_nodes) == patched_blocks(one_node)
    assert torch.equal(images(toy, two_nodes), images(toy, one_node))
    assert not torch.equal(images(toy, one_node), images(toy, model))


def test_an_unknown_concept_lists_what_every_chained_sae_knows(toy):
    from dataclasses import replace

    from saemnesia_comfy.erase import chain_saes, erase_concepts
    from saemnesia_core.concepts import UnknownConceptError

    model, _, _, saes, _ = toy
    styles_only = saes[STYLE_SAE]
    concepts = [c for c in styles_only.file.concepts if c.group == "style"]
    keep = [i for i, c in enumerate(styles_only.file.concepts) if c.group == "style"]
    tables = styles_only.file.tables
    tables = type(tables)(tables.latents[keep], tables.mean_acts[keep], tables.thresholds[keep])
    styles_only = replace(styles_only, file=replace(styles_only.file, concepts=concepts, tables=tables))
    chained = chain_saes(saes[OBJECT_SAE], styles_only)
    with pytest.raises(UnknownConceptError, match="'Dogs'") as caught:
        erase_concepts(model, chained, {"Dogs": None, "Hearts": None}, -1.0)
    assert caught.value.unknown == ["Dogs"] and "Neon" in caught.value.known and "Hearts" in caught.value.known
    only_objects_site = erase_concepts(model, chained, {"Hearts": None}, -1.0)  # the styles-only SAE lacks it
    assert patched_blocks(only_objects_site) == ["diffusion_model.output_blocks.4.1"]


def test_concept_probe_refuses_a_chain(toy):
    from saemnesia_comfy.erase import chain_saes

    model, _, _, saes, node_classes = toy
    with pytest.raises(ValueError, match="Concept Probe reads one SAE"):
        node_classes["SAEmnesiaConceptProbe"].execute(model, chain_saes(saes[OBJECT_SAE], saes[STYLE_SAE]),
                                                      '["Hearts"]', 0.0, 1.0)


@pytest.mark.slow
def test_chained_load_sae_nodes_erase_at_both_blocks_through_the_server(toy_servers):
    from fixtures_server import execution_error, saved_pixels, toy_prompt

    server = toy_servers("host")

    def chained(concepts):
        prompt = toy_prompt(concepts=concepts, strength=-5.0, sae=OBJECT_SAE, prefix="multisite")
        prompt["10"] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": STYLE_SAE, "also": ["7", 0]}}
        prompt["8"]["inputs"]["sae"] = ["10", 0]
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        return saved_pixels(server, entry)

    plain = saved_pixels(server, server.run(toy_prompt(prefix="multisite_plain")))
    single = server.run(toy_prompt(concepts=["Hearts"], strength=-5.0, sae=OBJECT_SAE, prefix="multisite_one"))
    assert (chained([]) == plain).all()
    both = chained(["Hearts"])
    assert (both != plain).any() and (both != saved_pixels(server, single)).any()
    refused = toy_prompt(concepts=json.dumps(["Hearts"]), sae=OBJECT_SAE)
    refused["10"] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": OBJECT_SAE, "also": ["7", 0]}}
    refused["8"]["inputs"]["sae"] = ["10", 0]
    entry = server.run(refused)
    assert entry["status"]["status_str"] == "error" and "same block" in execution_error(entry)
