"""The toy world: the renderer is deterministic, the shipped judges and model work in the real ComfyUI, the
shipped SAEmnesia SAE erases what it is asked to and keeps the rest, and the one-command regeneration runs."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

MODELS = REPO_ROOT / "models"


def test_the_renderer_is_deterministic_and_seeds_differ():
    from saemnesia_core.toy.render import OBJECTS, STYLES, render

    for obj, style in zip(OBJECTS, (*STYLES[:7], None)):
        a, b = render(obj, style, 5), render(obj, style, 5)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert not np.array_equal(a, render(obj, style, 6))


def test_the_renderer_refuses_unknown_concepts():
    from saemnesia_core.toy.render import render

    with pytest.raises(ValueError, match="Hearts"):
        render("Dogs", None, 0)
    with pytest.raises(ValueError, match="Neon"):
        render("Hearts", "Van_Gogh", 0)


def test_the_shipped_judges_recognise_fresh_renders():
    from saemnesia_core.toy.judges import Judges, default_judges_path, held_out_accuracy

    accuracy = held_out_accuracy(Judges.load(default_judges_path()), n=600, seed=424242)
    assert accuracy["object"] >= 0.98 and accuracy["style"] >= 0.98


@pytest.fixture(scope="module")
def toy(comfy):
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_comfy.toy_model import load_toy_model
    from saemnesia_comfy.toy_sampling import PromptEncoder
    from saemnesia_core.toy.judges import Judges, default_judges_path

    model, clip, vae = load_toy_model(MODELS / "toy" / "toy_world.safetensors")
    loaded = load_sae_path(MODELS / "saemnesia" / "toy_saemnesia.safetensors")
    return model, vae, PromptEncoder(clip), Judges.load(default_judges_path()), loaded


SEEDS = list(range(900, 908))


def _judge(toy, prompt, model=None):
    from saemnesia_comfy.toy_sampling import generate

    base, vae, encoder, judges, _ = toy
    images = generate(model or base, vae, encoder, [prompt] * len(SEEDS), SEEDS)
    return judges.predict(images)


def test_the_shipped_model_draws_the_requested_object_and_style(toy):
    objects, styles = _judge(toy, "An image of Hearts in Neon style.")
    assert objects.count("Hearts") >= 6 and styles.count("Neon") >= 6


def test_the_shipped_saemnesia_sae_erases_an_object_and_keeps_the_style(toy):
    from saemnesia_comfy.erase import erase_concepts

    erased = erase_concepts(toy[0], toy[-1], {"Hearts": None}, -5.0)  # the demo's object strength
    objects, styles = _judge(toy, "An image of Hearts in Neon style.", erased)
    assert objects.count("Hearts") <= 2
    assert styles.count("Neon") >= 6


def test_the_shipped_style_sae_erases_a_style_and_keeps_the_object(toy):
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.sae_library import load_sae_path

    styles_sae = load_sae_path(MODELS / "saemnesia" / "toy_saemnesia_styles.safetensors")
    assert styles_sae.file.hookpoint == "unet.up_blocks.2.attentions.2"
    erased = erase_concepts(toy[0], styles_sae, {"Stripes": None}, -0.2)  # the demo's style strength
    objects, styles = _judge(toy, "An image of Circles in Stripes style.", erased)
    assert styles.count("Stripes") <= 2
    assert objects.count("Circles") >= 4


@pytest.mark.slow
def test_the_regeneration_command_runs_end_to_end_in_smoke_mode(comfy, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "saemnesia_comfy.toy_build", "--smoke", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("toy/toy_judges.safetensors", "toy/toy_world.safetensors", "toy/build_report.json"):
        assert (out / path).exists(), path
    from saemnesia_comfy.toy_build import SAE_SITES
    from saemnesia_core.sae_file import read_header
    from saemnesia_core.toy.render import OBJECTS, STYLES

    for hookpoint, names in SAE_SITES.items():
        for name, supervised in zip(names, (True, False)):
            header = read_header(out / "saemnesia" / name)
            assert header.hookpoint == hookpoint and header.supervised == supervised
            assert {c.label for c in header.concepts} == set(OBJECTS) | set(STYLES)
    report = json.loads((out / "toy" / "build_report.json").read_text())
    assert 0 <= report["quality"]["object"] <= 1
