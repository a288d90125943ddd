"""`saemnesia eval`: the metric arithmetic on hand-made judge outputs, the (UA + IRA)/2 selection, the sequential
bookkeeping, the percentile scaling, and one tiny end-to-end run on smoke-size toy assets."""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy  # saemnesia_comfy.evaluate imports ComfyUI


@pytest.fixture(scope="module")
def ev(comfy):
    from saemnesia_comfy import evaluate

    return evaluate


def _judged(ev, answers):
    """Judged items from {(object, style): (judged object, judged style)}."""
    return [ev.Judged(ev.Item(o, s, 0), po, ps) for (o, s), (po, ps) in answers.items()]


def test_object_metrics_count_the_target_images_the_other_objects_and_the_styled_images(ev):
    answers = {
        ("Circles", "Dots"): ("Squares", "Dots"),       # target erased, style kept
        ("Circles", None): ("Circles", "Unstyled"),     # target still there
        ("Squares", "Dots"): ("Squares", "Stripes"),    # other object kept, style lost
        ("Squares", None): ("Stars", "Unstyled"),       # other object lost
        ("Stars", "Neon"): ("Stars", "Neon"),
    }
    m = ev.erasure_metrics(_judged(ev, answers), ev.OBJECT, {"Circles"})
    assert m["UA"] == pytest.approx(1 / 2)    # 1 of Circles' 2 images not judged Circles
    assert m["IRA"] == pytest.approx(2 / 3)   # Squares/Dots and Stars/Neon right, Squares/unstyled wrong
    assert m["CRA"] == pytest.approx(2 / 3)   # the 3 styled images (the target's included): 2 right


def test_style_metrics_leave_unstyled_images_out_of_ira_but_not_out_of_cra(ev):
    answers = {
        ("Circles", "Dots"): ("Circles", "Unstyled"),   # target style erased
        ("Squares", "Dots"): ("Stars", "Dots"),         # target style kept, object lost
        ("Circles", "Neon"): ("Circles", "Neon"),
        ("Stars", "Neon"): ("Stars", "Outline"),
        ("Squares", None): ("Squares", "Neon"),         # unstyled: not in IRA, in CRA
    }
    m = ev.erasure_metrics(_judged(ev, answers), ev.STYLE, {"Dots"})
    assert m["UA"] == pytest.approx(1 / 2)
    assert m["IRA"] == pytest.approx(1 / 2)   # the two Neon images only
    assert m["CRA"] == pytest.approx(4 / 5)   # object accuracy over all five images


def test_sequential_metrics_pool_the_erased_set_and_retain_the_rest(ev):
    answers = {("Circles", None): ("Squares", "Unstyled"), ("Squares", None): ("Squares", "Unstyled"),
               ("Stars", None): ("Stars", "Unstyled"), ("Hearts", None): ("Circles", "Unstyled")}
    judged = _judged(ev, answers)
    one = ev.erasure_metrics(judged, ev.OBJECT, ["Circles"])
    two = ev.erasure_metrics(judged, ev.OBJECT, ["Circles", "Squares"])
    assert (one["UA"], one["IRA"]) == (1.0, pytest.approx(2 / 3))
    assert (two["UA"], two["IRA"]) == (0.5, 0.5)
    everything = ev.erasure_metrics(judged, ev.OBJECT, ["Circles", "Squares", "Stars", "Hearts"])
    assert everything["UA"] == 0.5 and everything["IRA"] is None and everything["CRA"] is None  # no styled image


def test_selection_maximises_ua_plus_ira_ignores_cra_and_keeps_the_first_on_ties(ev):
    candidates = [{"gamma": g, "UA": ua, "IRA": ira, "CRA": cra}
                  for g, ua, ira, cra in ((-1, 0.2, 1.0, 1.0), (-5, 0.9, 0.7, 0.1), (-10, 0.7, 0.9, 0.9),
                                          (-15, 1.0, 0.2, 1.0))]
    for c in candidates:
        c["score"] = ev.selection_score(c)
    assert [c["score"] for c in candidates] == pytest.approx([0.6, 0.8, 0.8, 0.6])
    assert ev.best_candidate(candidates)["gamma"] == -5


@pytest.mark.parametrize("n", [2048, 20480, 4096])
def test_scaled_percentiles_keep_one_two_three_latents_like_the_papers_at_20480(ev, n):
    from saemnesia_core.concepts import select_saeuron

    scores = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    for kept in (1, 2, 3):
        selected = select_saeuron(scores, ev.scaled_percentile(n, kept))
        assert ((selected >= 0).sum(-1) == kept).all()
        if n == 20480:
            paper = select_saeuron(scores, ev.PAPER_PERCENTILES[kept])
            assert torch.equal(selected, paper)


def test_selection_sets_cover_the_target_and_use_other_seeds_than_the_test_set(ev):
    quick = ev.QUICK
    test_seeds = {i.seed for i in ev.test_items(5)}
    for group, concept, own in ((ev.OBJECT, "Hearts", 9), (ev.STYLE, "Neon", 8)):
        items = ev.selection_items(group, concept, quick)
        assert sum(i.concept(group) == concept for i in items) == own
        others = [i.concept(group) for i in items if i.concept(group) != concept]
        assert len(others) == 7 and None not in others          # one image of each other concept
        assert not test_seeds & {i.seed for i in items}
        rephrased = ev.rephrase_items(group, concept, 1)
        assert {i.concept(group) for i in rephrased} == {concept} and all(i.template is not None for i in rephrased)
    assert len(ev.test_items(1)) == 72 and len({i.seed for i in ev.test_items(2)}) == 144


def test_the_eval_command_is_registered_without_importing_comfyui():
    import subprocess
    import sys

    code = ("import sys; from saemnesia_core.cli import build_parser; "
            "a = build_parser().parse_args(['eval', '--full', '--out', 'x']); "
            "assert a.argv == ['--full', '--out', 'x'], a; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_paths_inside_the_repository_are_relative(ev):
    assert ev.shown_path(ev.DEFAULT_ASSETS["saemnesia_styles"]) == "models/saemnesia/toy_saemnesia_styles.safetensors"
    assert ev.shown_path(Path("/elsewhere/x.safetensors")) == "/elsewhere/x.safetensors"


@pytest.fixture(scope="module")
def smoke_assets(comfy, tmp_path_factory):
    """The toy world at smoke size (meaningless quality, every file in place)."""
    from saemnesia_comfy.toy_build import Recipe, build

    root = tmp_path_factory.mktemp("toy_smoke")
    build(root / "models", root / "work", Recipe.smoke())
    models = root / "models"
    return {"model": models / "toy" / "toy_world.safetensors", "judges": models / "toy" / "toy_judges.safetensors",
            "saemnesia": models / "saemnesia" / "toy_saemnesia.safetensors",
            "saeuron": models / "saemnesia" / "toy_saeuron.safetensors",
            "saemnesia-styles": models / "saemnesia" / "toy_saemnesia_styles.safetensors",
            "saeuron-styles": models / "saemnesia" / "toy_saeuron_styles.safetensors"}


@pytest.mark.slow
def test_a_tiny_eval_run_writes_json_markdown_and_plots_and_reruns_from_cache(ev, smoke_assets, tmp_path):
    from saemnesia_core.cli import main

    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["eval", "--objects", "Circles,Squares", "--styles", "Dots", "--test-seeds", "1", "--select-others", "1",
            "--rephrase-seeds", "1", "--steps", "2", "--gammas=-1,-10", "--kept", "1,2", "--out", str(out),
            "--cache", str(cache), "--no-progress"] + [f"--{k}={v}" for k, v in smoke_assets.items()]
    assert main(argv) == 0
    for name in ("results.json", "report.md", "README_snippet.md", "per_concept.png", "sequential.png",
                 "examples.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    protocol = ev.protocol_from_args(ev.build_parser().parse_args(argv[1:]))
    assert data["cost"]["images_generated"] + data["cost"]["images_from_cache"] == ev.planned_images(protocol)
    assert data["summary"]["saemnesia"]["configurations_searched"] == 2
    assert data["summary"]["saeuron"]["configurations_searched"] == 4
    for concept, group in (("Circles", "object"), ("Squares", "object"), ("Dots", "style")):
        target = data["targets"][group][concept]
        assert len(target["selection"]["saemnesia"]) == 2 and len(target["selection"]["saeuron"]) == 4
        best = max(c["score"] for c in target["selection"]["saemnesia"])
        chosen = next(c for c in target["selection"]["saemnesia"] if c["gamma"] == target["chosen"]["saemnesia"]["gamma"])
        assert chosen["score"] == best
        for m in target["test"].values():
            assert all(0 <= m[k] <= 1 for k in ("UA", "IRA", "CRA"))
    rows = data["sequential"]["rows"]
    assert [r["erased"] for r in rows["saemnesia"]] == [["Circles"], ["Circles", "Squares"]]
    assert rows["saeuron"][0] == {"erased": ["Circles"], **data["targets"]["object"]["Circles"]["test"]["saeuron"]}
    assert "| SAEmnesia (γ tuned) | 2 |" in (out / "report.md").read_text()
    assert {g: v["hookpoint"] for g, v in data["saeuron_selection"].items()} == {
        "object": "unet.up_blocks.1.attentions.1", "style": "unet.up_blocks.2.attentions.2"}

    # everything again: nothing is generated, the numbers are the same
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cost"]["images_generated"] == 0
    assert again["targets"] == data["targets"] and again["sequential"] == data["sequential"]
