"""Find Concept Latents and Save SAE in the real ComfyUI (in-process) on the toy world: the shipped unsupervised object
SAE with its labels stripped learns "Hearts" from eight prompts (negatives: the same prompts without the object),
the taught SAE erases it through Erase Concepts (at its defaults, in shift mode, too), Save SAE writes it where Load SAE lists it; bad input, and Cancel,
leave the SAE, the model and the folder as they were."""

import dataclasses
import json
import types

import pytest
import torch

from saemnesia_tools.toy import assets
from saemnesia_tools.toy.render import STYLES

pytestmark = pytest.mark.comfy

POSITIVES = "\n".join(f"An image of Hearts in {style} style." for style in STYLES)


@pytest.fixture(scope="module")
def toy(comfy_nodes, tmp_path_factory):
    import folder_paths
    from saemnesia_comfy import sae_library
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_core.sae_file import load_sae_file, save_sae_file

    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    folder = tmp_path_factory.mktemp("saemnesia")
    shipped = load_sae_file(assets.path(assets.SITES["object"].saeuron))
    save_sae_file(dataclasses.replace(shipped, concepts=[], tables=None), folder / "unlabelled.safetensors")
    folder_paths.folder_names_and_paths[sae_library.SAE_FOLDER][0].insert(0, str(folder))
    return types.SimpleNamespace(model=model, clip=clip, vae=vae, folder=folder, shipped=shipped,
                                 loaded=sae_library.load_sae("unlabelled.safetensors"),
                                 latent={"samples": torch.zeros(1, 3, 32, 32)})


def find(toy, **kw):
    from saemnesia_comfy.teach import find_concept_latents

    loaded = kw.pop("loaded", toy.loaded)
    args = dict(label="Hearts", positive_text=POSITIVES, negative_text="", latent=toy.latent, seeds=1, steps=10,
                sampler="euler", scheduler="normal", cfg=5.0, vae=toy.vae)
    return find_concept_latents(toy.model, toy.clip, loaded, **{**args, **kw})


@pytest.fixture(scope="module")
def taught(toy):
    return find(toy)


def sample(model, clip, seed=3):
    import comfy.sample

    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, 10, 5.0, "euler", "normal", encode("An image of Hearts in Dots style."),
                               encode(""), torch.zeros_like(noise), disable_pbar=True, seed=seed)


def test_a_concept_is_found_from_prompts_and_separates_them(toy, taught):
    sae, preview, report = taught
    assert [c.label for c in toy.loaded.file.concepts] == []  # the SAE it was given is unchanged
    (concept,) = sae.file.concepts
    assert (concept.label, concept.group, concept.latent) == ("Hearts", "taught", None)
    assert sae.file.tables.latents.shape == (1, 50, 2) and sae.file.selection_mode == "saeuron"
    assert report["separation_auroc"] >= 0.9 and report["warning"] is None
    assert report["latents"] and preview.shape == (2, 32, 32, 3)
    how = sae.file.provenance["taught"]["Hearts"]
    assert how["negatives"][0] == "An image in Stripes style." and how["steps"] == 10 and how["seeds"] == 1
    shipped = toy.shipped.tables.latents[[c.label for c in toy.shipped.concepts].index("Hearts")]
    overlap = set(report["latents"]) & set(shipped[shipped >= 0].tolist())
    assert overlap, "none of the latents found is one the build selected for Hearts"


def test_the_taught_sae_erases_the_concept_through_erase_concepts(toy, taught):
    from saemnesia_comfy.erase import erase_concepts

    plain = sample(toy.model, toy.clip)
    erased = sample(erase_concepts(toy.model, taught[0], {"Hearts": None}, -1.0), toy.clip)
    assert torch.isfinite(erased).all() and not torch.equal(erased, plain)


def test_the_taught_concept_has_shift_modes_direction_and_is_removed_at_the_nodes_default(toy, taught):
    """Its direction is the mean token of its prompts minus the same prompts' without it (DESIGN §6.9), as the build
    measures on the held-out grid; at Erase Concepts' defaults (shift mode) the Hearts are gone and the look stays."""
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_core.concepts import DEFAULT_EDIT as D
    from saemnesia_tools.comfyui.toy.sampling import PromptEncoder, generate
    from saemnesia_tools.toy.judges import NO_OBJECT, Judges

    direction = taught[0].file.tables.directions
    built = toy.shipped.tables.directions[[c.label for c in toy.shipped.concepts].index("Hearts")]
    assert direction.shape == (1, 50, built.shape[-1])
    assert torch.nn.functional.cosine_similarity(direction[0], built, dim=-1).min() >= 0.95
    erased = erase_concepts(toy.model, taught[0], {"Hearts": None}, D.strength, 0.0, 1.0, D.branches, D.mode)
    seeds = list(range(900, 908))
    images = generate(erased, toy.vae, PromptEncoder(toy.clip), ["An image of Hearts in Neon style."] * 8, seeds)
    objects, styles = Judges.load(assets.path(assets.JUDGES)).predict(images)
    assert objects.count(NO_OBJECT) >= 6 and styles.count("Neon") >= 6  # regression thresholds (8 and 8 measured)


def test_save_sae_writes_it_where_load_sae_lists_it_and_keeps_what_exists(toy, taught):
    from saemnesia_comfy import sae_library
    from saemnesia_comfy.teach import save_sae
    from saemnesia_core.sae_file import read_header

    path = save_sae(taught[0], "hearts_taught")
    assert path.parent == toy.folder and "hearts_taught.safetensors" in sae_library.list_sae_entries()
    header = read_header(path)
    assert [c.label for c in header.concepts] == ["Hearts"] and header.provenance["taught"]["Hearts"]["steps"] == 10
    assert header.has_directions and header.format_version == 3  # shift mode's direction travels with it
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        save_sae(taught[0], "hearts_taught.safetensors")
    for bad in ("../outside", "a/b", "", ".hidden", "x" * 101):
        with pytest.raises(ValueError, match="invalid SAE file name"):
            save_sae(taught[0], bad)
    assert path.read_bytes() == before and not (toy.folder.parent / "outside.safetensors").exists()
    assert save_sae(taught[0], "hearts_taught", overwrite=True) == path


@pytest.mark.parametrize("kw, message", [
    ({"positive_text": "\n  \n"}, "at least one prompt that shows the concept"),
    ({"negative_text": POSITIVES}, "prompts on both sides"),
    ({"label": "  "}, "1 to 80 printable characters"),
    ({"label": "x" * 81}, "1 to 80 printable characters"),
    ({"label": "#12"}, "names a latent"),
])
def test_bad_input_is_refused_before_any_sampling(toy, kw, message, monkeypatch):
    import comfy.sample

    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match=message):
        find(toy, **kw)


def test_a_label_the_sae_knows_is_taught_again_only_when_asked(toy, taught):
    with pytest.raises(ValueError, match="already knows 'Hearts'"):
        find(toy, loaded=taught[0])
    again, _, _ = find(toy, loaded=taught[0], replace_existing=True, top_n=3)
    assert [c.label for c in again.file.concepts] == ["Hearts"] and again.file.tables.latents.shape[2] == 3


def test_an_sae_of_a_block_the_model_lacks_fails_clearly(toy):
    from saemnesia_comfy.patch import HookpointError

    other = dataclasses.replace(toy.loaded, file=dataclasses.replace(toy.loaded.file,
                                                                      hookpoint="unet.up_blocks.3.attentions.0"))
    with pytest.raises(HookpointError, match="not a transformer block of this model"):
        find(toy, loaded=other)


def test_cancel_stops_within_a_step_and_leaves_nothing_behind(toy, monkeypatch):
    import comfy.model_management

    calls = []
    original = comfy.model_management.throw_exception_if_processing_interrupted

    def cancel_at_the_third_step():
        calls.append(1)
        if len(calls) == 3:
            comfy.model_management.interrupt_current_processing(True)
        original()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", cancel_at_the_third_step)
    files = sorted(p.name for p in toy.folder.iterdir())
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        find(toy)
    comfy.model_management.interrupt_current_processing(False)
    assert len(calls) == 3 and toy.loaded.file.concepts == []
    assert sorted(p.name for p in toy.folder.iterdir()) == files
    assert not toy.model.object_patches  # the caller's model carries no patch


def test_the_report_is_json_and_the_statistics_stay_bounded(taught):
    _, _, report = taught
    assert json.loads(json.dumps(report)) == report
    assert len(report["auroc_per_bucket"]) == 50 and report["positives"] == report["negatives"] == 8
