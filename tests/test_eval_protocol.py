"""The evaluation's pure parts, without ComfyUI: the metric arithmetic on hand-made judge outputs, the
(UA + IRA)/2 selection, the sequential bookkeeping, the percentile scaling, the item sets, report paths, and the
`eval` command's registration."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saemnesia_core.concepts import select_saeuron
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.evaluation.metrics import best_candidate, erasure_metrics, selection_score
from saemnesia_tools.toy.evaluation.protocol import (OBJECT, PAPER_PERCENTILES, QUICK, STYLE, Item, Judged, grid_items,
                                                    rephrase_items, scaled_percentile, selection_items)
from saemnesia_tools.toy.evaluation.report import default_against_bar, judged_instead, shown_path


def _judged(answers):
    """Judged items from {(object, style): (judged object, judged style)}."""
    return [Judged(Item(o, s, 0), po, ps) for (o, s), (po, ps) in answers.items()]


def test_object_metrics_count_the_target_images_the_other_objects_and_the_styled_images():
    answers = {
        ("Circles", "Dots"): ("Squares", "Dots"),       # target erased, style kept
        ("Circles", None): ("Circles", "Unstyled"),     # target still there
        ("Squares", "Dots"): ("Squares", "Stripes"),    # other object kept, style lost
        ("Squares", None): ("Stars", "Unstyled"),       # other object lost
        ("Stars", "Neon"): ("Stars", "Neon"),
    }
    m = erasure_metrics(_judged(answers), OBJECT, {"Circles"})
    assert m["UA"] == pytest.approx(1 / 2)    # 1 of Circles' 2 images not judged Circles
    assert m["IRA"] == pytest.approx(2 / 3)   # Squares/Dots and Stars/Neon right, Squares/unstyled wrong
    assert m["CRA"] == pytest.approx(2 / 3)   # the 3 styled images (the target's included): 2 right


def test_style_metrics_leave_unstyled_images_out_of_ira_but_not_out_of_cra():
    answers = {
        ("Circles", "Dots"): ("Circles", "Unstyled"),   # target style erased
        ("Squares", "Dots"): ("Stars", "Dots"),         # target style kept, object lost
        ("Circles", "Neon"): ("Circles", "Neon"),
        ("Stars", "Neon"): ("Stars", "Outline"),
        ("Squares", None): ("Squares", "Neon"),         # unstyled: not in IRA, in CRA
    }
    m = erasure_metrics(_judged(answers), STYLE, {"Dots"})
    assert m["UA"] == pytest.approx(1 / 2)
    assert m["IRA"] == pytest.approx(1 / 2)   # the two Neon images only
    assert m["CRA"] == pytest.approx(4 / 5)   # object accuracy over all five images


def test_sequential_metrics_pool_the_erased_set_and_retain_the_rest():
    answers = {("Circles", None): ("Squares", "Unstyled"), ("Squares", None): ("Squares", "Unstyled"),
               ("Stars", None): ("Stars", "Unstyled"), ("Hearts", None): ("Circles", "Unstyled")}
    judged = _judged(answers)
    one = erasure_metrics(judged, OBJECT, ["Circles"])
    two = erasure_metrics(judged, OBJECT, ["Circles", "Squares"])
    assert (one["UA"], one["IRA"]) == (1.0, pytest.approx(2 / 3))
    assert (two["UA"], two["IRA"]) == (0.5, 0.5)
    everything = erasure_metrics(judged, OBJECT, ["Circles", "Squares", "Stars", "Hearts"])
    assert everything["UA"] == 0.5 and everything["IRA"] is None and everything["CRA"] is None  # no styled image


def test_selection_maximises_ua_plus_ira_ignores_cra_and_keeps_the_first_on_ties():
    candidates = [{"gamma": g, "UA": ua, "IRA": ira, "CRA": cra}
                  for g, ua, ira, cra in ((-1, 0.2, 1.0, 1.0), (-5, 0.9, 0.7, 0.1), (-10, 0.7, 0.9, 0.9),
                                          (-15, 1.0, 0.2, 1.0))]
    for c in candidates:
        c["score"] = selection_score(c)
    assert [c["score"] for c in candidates] == pytest.approx([0.6, 0.8, 0.8, 0.6])
    assert best_candidate(candidates)["gamma"] == -5


@pytest.mark.parametrize("n", [2048, 20480, 4096])
def test_scaled_percentiles_keep_one_two_three_latents_like_the_papers_at_20480(n):
    scores = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    for kept in (1, 2, 3):
        selected = select_saeuron(scores, scaled_percentile(n, kept))
        assert ((selected >= 0).sum(-1) == kept).all()
        if n == 20480:
            paper = select_saeuron(scores, PAPER_PERCENTILES[kept])
            assert torch.equal(selected, paper)


def test_selection_sets_cover_the_target_and_use_other_seeds_than_the_test_set():
    quick = QUICK
    test_seeds = {i.seed for i in grid_items(5)}
    for group, concept, own in ((OBJECT, "Hearts", 9), (STYLE, "Neon", 8)):
        items = selection_items(group, concept, quick)
        assert sum(i.concept(group) == concept for i in items) == own
        others = [i.concept(group) for i in items if i.concept(group) != concept]
        assert len(others) == 7 and None not in others          # one image of each other concept
        assert not test_seeds & {i.seed for i in items}
        rephrased = rephrase_items(group, concept, 1)
        assert {i.concept(group) for i in rephrased} == {concept} and all(i.template is not None for i in rephrased)
    assert len(grid_items(1)) == 72 and len({i.seed for i in grid_items(2)}) == 144


def test_the_eval_command_is_registered_without_importing_comfyui():
    code = ("import sys; from saemnesia_tools.cli import build_parser; "
            "a = build_parser().parse_args(['eval', '--full', '--out', 'x']); "
            "assert a.argv == ['--full', '--out', 'x'], a; "
            "assert not any(m.split('.')[0] in ('comfy', 'saemnesia_comfy') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_paths_inside_the_repository_are_relative():
    assert shown_path(assets.path(assets.SITES["style"].saemnesia)) == f"models/saemnesia/{assets.SITES['style'].saemnesia}"
    assert shown_path(Path("/elsewhere/x.safetensors")) == "/elsewhere/x.safetensors"


def test_a_settings_cache_key_leaves_out_the_fields_added_later_at_their_defaults():
    from dataclasses import asdict

    from saemnesia_tools.toy.evaluation.protocol import Setting

    plain = Setting(("saemnesia", "object"), (("Hearts", -1.0, 0),))
    assert plain.key() == {k: v for k, v in asdict(plain).items()  # the images made before them
                           if k not in ("uncalibrated", "branches", "site_strengths", "text_strength")}
    for later in ({"uncalibrated": True}, {"branches": "cond"}, {"site_strengths": (-1.0, -2.0)},
                  {"text_strength": -1.0}):
        assert Setting(("saemnesia", "object"), (("Hearts", -1.0, 0),), **later).key() != plain.key(), later


def test_the_default_is_held_against_its_bar_with_the_margin_met_or_missed_by():
    summary = {"none": {"object": {"UA": 0.0, "RM": 0.0, "IRA": 0.90, "CRA": 0.98, "AR": 0.05}},
               "default": {"object": {"UA": 0.96, "RM": 0.75, "IRA": 0.86, "CRA": 0.96, "AR": 0.20}}}
    test = {"default": {"judged_as": {"Squares": 7, "Circles": 2}, "RM": 0.0}}
    targets = {OBJECT: {"Circles": {"test": test, "rephrased_UA": {"default": 0.92}},
                        "Hearts": {"test": test, "rephrased_UA": {"default": 0.88}}}}
    data = {"summary": summary, "targets": targets, "artifact_judge": {}}
    assert default_against_bar(data).splitlines()[2] == ("| objects | 96.0 (met) | 75.0 (missed by 5.0) | 86.0 (missed "
                                                         "by 1.0) | 96.0 (met) | 20.0 (missed by 5.0) | 90.0 (missed by 1.0) |")
    assert judged_instead(data).splitlines()[2] == "| Circles (object) | Squares 7, Circles 2 (0.0 %) |"
    assert default_against_bar({k: v for k, v in data.items() if k != "artifact_judge"}) == ""


def test_the_artifact_judges_own_images_include_the_scenes_without_objects_at_seeds_of_their_own():
    from saemnesia_tools.toy.evaluation.protocol import LOOKS, quality_items
    from saemnesia_tools.toy.prompts import make_prompt

    fit, calibration = quality_items()
    for part in (fit, calibration):
        assert {make_prompt(None, s) for s in LOOKS} <= {i.prompt for i in part}
    seeds = [i.seed for i in fit + calibration]
    assert len(set(seeds)) == len(seeds)
