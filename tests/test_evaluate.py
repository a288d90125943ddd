"""`saemnesia eval` end to end on smoke-size toy assets, through the real ComfyUI in-process: reports written, the
selection bookkeeping consistent, and a rerun served from the cache. The pure parts: test_eval_protocol.py."""

import json

import pytest

from saemnesia_tools.toy import assets
from saemnesia_tools.toy.evaluation.protocol import planned_images
from saemnesia_tools.toy.evaluation.report import default_against_bar, judged_instead

pytestmark = [pytest.mark.comfy, pytest.mark.one_host, pytest.mark.timeout(2400)]  # a smoke build, an eval of 11 methods


@pytest.fixture(scope="module")
def ev(comfy):
    from saemnesia_tools.comfyui.toy import evaluate

    return evaluate


@pytest.fixture(scope="module")
def smoke_assets(comfy, smoke_world):
    """The toy world at smoke size (conftest's smoke_world): the shipped names, in the smoke build's models folder."""
    from saemnesia_tools.comfyui.toy.eval_runner import DEFAULT_ASSETS

    return {name.replace("_", "-"): smoke_world / "models" / path.relative_to(assets.MODELS)
            for name, path in DEFAULT_ASSETS.items()}


@pytest.mark.slow
def test_a_tiny_eval_run_writes_json_markdown_and_plots_and_reruns_from_cache(ev, smoke_assets, tmp_path):
    from saemnesia_tools.cli import main

    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["eval", "--objects", "Circles,Squares", "--styles", "Dots", "--test-seeds", "1", "--select-others", "1",
            "--rephrase-seeds", "1", "--steps", "1", "--gammas=-1,-10", "--kept", "1,2", "--out", str(out),
            "--cache", str(cache), "--no-progress"] + [f"--{k}={v}" for k, v in smoke_assets.items()]
    assert main(argv) == 0
    for name in ("results.json", "report.md", "README_snippet.md", "per_concept.png", "sequential.png",
                 "examples.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    protocol = ev.protocol_from_args(ev.build_parser().parse_args(argv[1:]))
    assert data["cost"]["images_generated"] + data["cost"]["images_from_cache"] == planned_images(protocol)
    assert data["summary"]["saemnesia"]["configurations_searched"] == 2
    assert data["summary"]["saemnesia_paper"]["configurations_searched"] == 2
    assert data["summary"]["saeuron"]["configurations_searched"] == 4
    assert data["summary"]["text"]["configurations_searched"] == 2
    assert data["text_sae"] == {"hookpoint": assets.TEXT_HOOKPOINT, "num_latents": data["text_sae"]["num_latents"]}
    for concept, group in (("Circles", "object"), ("Squares", "object"), ("Dots", "style")):
        target = data["targets"][group][concept]
        assert len(target["selection"]["saemnesia"]) == 2 and len(target["selection"]["saeuron"]) == 4
        for method in ("saemnesia", "saemnesia_paper", "text"):  # each chooses its own γ
            best = max(c["score"] for c in target["selection"][method])
            chosen = next(c for c in target["selection"][method] if c["gamma"] == target["chosen"][method]["gamma"])
            assert chosen["score"] == best
        assert {"saemnesia_paper", "saemnesia_paper_gamma1", "saemnesia_uncalibrated", "saemnesia_multisite", "text",
                "text_gamma1"} <= set(target["test"])
        for m in target["test"].values():
            assert all(0 <= m[k] <= 1 for k in ("UA", "IRA", "CRA"))
            images = sum(m["judged_as"].values())  # what the judges saw in the target's images: UA's complement
            assert images == (9 if group == "object" else 8)
            assert m["UA"] == pytest.approx(1 - m["judged_as"].get(concept, 0) / images)
    rows = data["sequential"]["rows"]
    assert [r["erased"] for r in rows["saemnesia"]] == [["Circles"], ["Circles", "Squares"]]
    single = data["targets"]["object"]["Circles"]["test"]["saeuron"]
    assert rows["saeuron"][0] == {"erased": ["Circles"], **{k: single[k] for k in ("UA", "IRA", "CRA")}}
    for m in data["targets"]["object"]["Circles"]["test"].values():  # image quality, for every method
        assert 0 <= m["CE"] <= min(m["UA"], 1 - m["AR"]) and m["KID"] is not None and 0 <= m["RM"] <= 1
    assert "| SAEmnesia (γ tuned) | 2 |" in (out / "report.md").read_text()
    assert "| SAEmnesia, paper mode (γ = −1) | 1 |" in (out / "report.md").read_text()
    assert "| SAEmnesia, text encoder (γ = −1) | 1 |" in (out / "report.md").read_text()
    assert "| objects | text encoder, γ = −1 |" in (out / "report.md").read_text()
    assert "| SAEmnesia, multi-site (γ = −1) | 1 |" in (out / "report.md").read_text()
    assert "| styles | its own block and the 16x16 encoder level |" in (out / "report.md").read_text()
    assert default_against_bar(data) in (out / "README_snippet.md").read_text()
    assert "| Circles (object) | " in judged_instead(data) and judged_instead(data) in (out / "report.md").read_text()
    assert f"- text encoder: one SAE for objects and styles at `{assets.TEXT_HOOKPOINT}`" in \
        (out / "README_snippet.md").read_text()
    assert ("| target | exact, γ = −1: UA / IRA / CRA | exact uncalibrated, γ = −1: UA / IRA / CRA | paper, γ = −1: "
            "UA / IRA / CRA |") in (out / "report.md").read_text()
    assert {g: v["hookpoint"] for g, v in data["saeuron_selection"].items()} == {
        "object": "unet.up_blocks.1.attentions.1", "style": "unet.up_blocks.2.attentions.2"}

    # everything again: nothing is generated, the numbers are the same
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cost"]["images_generated"] == 0
    assert again["targets"] == data["targets"] and again["sequential"] == data["sequential"]
