"""Concept Probe and Probe Report inside the real ComfyUI: they record where a concept fires (cond branch,
chosen steps), edit nothing, reset between runs, and report heatmaps and presence scores."""

import json

import pytest
import torch

from test_comfy_erase import run, world  # noqa: F401  (the shared random-UNet world fixture)

pytestmark = pytest.mark.comfy


def probe(world, labels, **kw):
    from saemnesia_comfy.probe import probe_concepts

    return probe_concepts(world.model, world.loaded, labels, **kw)


def test_probing_edits_nothing(world):
    model, _ = probe(world, ["Hearts", "Neon"])
    assert torch.equal(run(world, model), run(world, world.model))


def test_a_firing_concept_scores_above_zero_and_a_silent_one_scores_zero(world):
    model, record = probe(world, ["Hearts", "Neon"])
    run(world, model, steps=4)
    scores = record.scores()
    assert scores.shape == (1, 2)
    assert 0 < scores[0, 0] <= 1
    assert scores[0, 1] == 0


def test_each_run_starts_a_fresh_record(world):
    model, record = probe(world, ["Hearts"])
    run(world, model, steps=4)
    first = record.scores().clone()
    run(world, model, steps=4)
    assert record.steps == 4
    assert torch.equal(record.scores(), first)


def test_only_steps_in_range_are_recorded(world):
    model, record = probe(world, ["Hearts"], start_percent=0.5, end_percent=1.0)
    run(world, model, steps=10, sampler="euler")
    assert 0 < record.steps < 10


def test_report_gives_heatmaps_per_image_and_concept_and_flags(world):
    from saemnesia_comfy.probe import overlays, report

    latent = torch.zeros(2, 4, 32, 32)
    pos = [[world.pos[0][0].expand(2, -1, -1), {}]]
    model, record = probe(world, ["Hearts", "Neon"])
    run(world, model, latent=latent, pos=pos)
    images = torch.rand(2, 64, 64, 3)
    heat = overlays(record, images)
    assert heat.shape == (4, 64, 64, 3) and heat.min() >= 0 and heat.max() <= 1
    assert torch.allclose(heat[1], images[0], atol=1e-6)  # Neon never fires: its overlay is the image itself
    assert not torch.allclose(heat[0], images[0], atol=1e-3)
    result = json.loads(json.dumps(report(record, flag_threshold=0.0001)))
    assert [sorted(r) for r in result["images"]] == [["Hearts", "Neon"]] * 2
    assert result["images"][0]["Hearts"]["flagged"] and not result["images"][0]["Neon"]["flagged"]


def test_probing_an_unknown_concept_fails_listing_the_known_ones(world):
    from saemnesia_core.concepts import UnknownConceptError

    with pytest.raises(UnknownConceptError, match="Hearts"):
        probe(world, ["Dogs"])
