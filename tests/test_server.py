"""The pack in a live ComfyUI server (`main.py --cpu`): its nodes in /object_info, API-format prompts on the toy
model with and without erasure, and the concept route with its refusals."""

import json
from pathlib import Path

import pytest

from fixtures_server import SAE_NAME, execution_error, saved_pixels, toy_labels, toy_prompt
from helpers_comfy import NODE_IDS
from saemnesia_tools.toy import assets

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def server(toy_servers):
    return toy_servers("host")


def run_ok(server, prompt) -> dict:
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry


def test_object_info_lists_every_node_with_a_tooltip_on_each_input_and_output(server):
    info = server.get("/object_info").json()
    for node_id in NODE_IDS:
        node = info[node_id]
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for name, (_, options) in inputs.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node["output_tooltips"] and all(node["output_tooltips"]), node_id
    assert SAE_NAME in info["SAEmnesiaLoadSAE"]["input"]["required"]["sae_name"][1]["options"]


def test_selecting_nothing_gives_the_same_pixels_and_erasing_a_concept_changes_them(server):
    plain = saved_pixels(server, run_ok(server, toy_prompt(seed=7, prefix="plain")))
    nothing = saved_pixels(server, run_ok(server, toy_prompt(seed=7, concepts=[], prefix="nothing")))
    erased = saved_pixels(server, run_ok(server, toy_prompt(seed=7, concepts=["Hearts"], prefix="erased")))
    assert plain.shape == (32, 32, 3)
    assert (nothing == plain).all()
    assert (erased != plain).any()


def test_per_concept_strengths_change_the_image(server):
    node = saved_pixels(server, run_ok(server, toy_prompt(seed=3, concepts={"Hearts": None}, prefix="s_node")))
    own = saved_pixels(server, run_ok(server, toy_prompt(seed=3, concepts={"Hearts": -5.0}, prefix="s_own")))
    assert (own != node).any()


@pytest.mark.parametrize("concepts, message", [
    ('{"Hearts": -1e300}', "from -100 to 100"),                 # once an all-black image, no error
    ('{"Hearts": -1, "Hearts": -5}', "a label twice"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_hostile_concepts_strings_fail_the_prompt_with_a_clear_message(server, concepts, message):
    entry = server.run(toy_prompt(concepts=concepts, prefix="hostile"))
    assert entry["status"]["status_str"] == "error"
    assert message in execution_error(entry)


def test_an_unknown_concept_fails_with_a_message_listing_the_known_ones(server):
    entry = server.run(toy_prompt(concepts=["Dogs"], prefix="unknown"))
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry)
    assert "Dogs" in message
    assert all(label in message for label in toy_labels()[0])


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_the_concept_route_lists_the_concepts_from_the_file_header(server, prefix):
    from dataclasses import asdict

    from saemnesia_core.sae_file import read_header

    r = server.get(f"{prefix}/saemnesia/concepts", params={"name": SAE_NAME})
    assert r.status_code == 200, r.text
    body = r.json()
    header = read_header(server.base / "models" / "saemnesia" / SAE_NAME)
    assert body["concepts"] == [asdict(c) for c in header.concepts]
    assert all(c["erasure"] is None for c in body["concepts"])  # a synthetic SAE carries no measured erasure
    labels, groups = toy_labels()
    assert [c["label"] for c in body["concepts"]] == labels
    assert [c["group"] for c in body["concepts"]] == groups
    assert (body["hookpoint"], body["d_in"], body["model_family"]) == ("unet.up_blocks.1.attentions.1", 128, "toy")


@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize("name,status", [
    ("..", 400),
    ("../models/saemnesia/" + SAE_NAME, 400),
    ("/etc/passwd", 400),
    ("", 400),
    ("no_such_sae.safetensors", 404),
    ("corrupt.safetensors", 422),
])
def test_the_concept_route_refuses_names_outside_the_sae_folders_and_broken_files(server, prefix, name, status):
    r = server.get(f"{prefix}/saemnesia/concepts", params={"name": name})
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_the_concept_route_refuses_an_absolute_path_even_to_a_real_sae_file(server):
    path = server.base / "models" / "saemnesia" / SAE_NAME
    r = server.get("/saemnesia/concepts", params={"name": str(path)})
    assert r.status_code == 400, r.text


def test_the_toy_loader_lists_the_toy_world_models_and_not_the_judges_beside_them(server):
    info = server.get("/object_info/SAEmnesiaToyModelLoader").json()["SAEmnesiaToyModelLoader"]
    assert info["input"]["required"]["model_name"][1]["options"] == [Path(assets.MODEL).name]


def test_errors_name_the_entry_the_user_chose_not_where_the_server_keeps_it(server):
    folder = server.base / "models" / "saemnesia"
    (folder / "notes.safetensors").write_text("These are my notes, not an SAE.\n" * 10)
    for name, says in (("corrupt.safetensors", "not valid JSON"), ("notes.safetensors", "not a safetensors file")):
        entry = server.run(toy_prompt(concepts=["Hearts"], sae=name, prefix="broken"))
        assert entry["status"]["status_str"] == "error"
        message = execution_error(entry)
        route = server.get("/saemnesia/concepts", params={"name": name}).json()["error"]
        for text in (message, route):
            assert name in text and says in text and str(folder) not in text, text


def test_erasing_only_the_uncond_branch_at_cfg_1_logs_a_one_line_warning(server):
    run_ok(server, toy_prompt(cfg=1.0, concepts=["Hearts"], branches="uncond", prefix="uncond_cfg1"))
    assert "Erase Concepts (branches = uncond) erased nothing" in server.log_text()
    before = server.log_text().count("erased nothing")
    run_ok(server, toy_prompt(cfg=5.0, seed=1, concepts=["Hearts"], branches="uncond", prefix="uncond_cfg5"))
    assert server.log_text().count("erased nothing") == before  # with an unconditional pass, no warning


def text_erase_prompt(text: str, concepts, seed: int, prefix: str, model_concepts=None) -> dict:
    """The toy workflow with Erase Concepts (text) between the CLIP and both prompt encoders (the shipped text
    SAE); with `model_concepts`, Erase Concepts on the model too."""
    prompt = toy_prompt(text, seed=seed, prefix=prefix, concepts=model_concepts)
    prompt["10"] = {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": assets.TEXT_SAE}}
    prompt["11"] = {"class_type": "SAEmnesiaEraseConceptsText", "inputs": {
        "clip": ["1", 1], "sae": ["10", 0], "concepts": json.dumps(concepts), "strength": -1.0, "mode": "exact"}}
    for encoder in ("2", "3"):
        prompt[encoder]["inputs"]["clip"] = ["11", 0]
    return prompt


def test_erase_concepts_text_through_prompt_is_exact_when_nothing_is_chosen_and_composes(server):
    hearts = "An image of Hearts in Neon style."
    plain = saved_pixels(server, run_ok(server, toy_prompt(hearts, seed=5, prefix="t_plain")))
    nothing = saved_pixels(server, run_ok(server, text_erase_prompt(hearts, [], 5, "t_nothing")))
    erased = saved_pixels(server, run_ok(server, text_erase_prompt(hearts, ["Hearts"], 5, "t_erased")))
    assert (nothing == plain).all()
    assert (erased != plain).any()
    # with Erase Concepts on the model as well, both edits reach the image
    model_only = saved_pixels(server, run_ok(server, toy_prompt(hearts, seed=5, concepts=["Hearts"], prefix="t_m")))
    both = saved_pixels(server, run_ok(server, text_erase_prompt(hearts, ["Hearts"], 5, "t_both", ["Hearts"])))
    assert (both != model_only).any() and (both != erased).any()


def test_erase_concepts_text_fails_clearly_with_a_unet_sae(server):
    prompt = text_erase_prompt("An image of Hearts in Neon style.", ["Hearts"], 0, "t_wrong")
    prompt["10"]["inputs"]["sae_name"] = SAE_NAME  # an SAE of a UNet block
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    assert "is not a layer of this text encoder" in execution_error(entry)


def test_erasing_through_prompt_removes_the_object_and_keeps_the_style_as_the_judges_see_it(server):
    """The shipped SAEmnesia file erases Hearts through the server at the node's defaults (DEFAULT_EDIT): the toy
    judges see Hearts in the plain images, not in the erased ones, and Neon in both (regression thresholds, as in
    test_toy_world's in-process test)."""
    import numpy as np
    import torch

    from fixtures_server import pixels
    from saemnesia_core.concepts import DEFAULT_EDIT as D
    from saemnesia_tools.toy.judges import Judges

    judges = Judges.load(assets.path(assets.JUDGES))

    def judged(concepts, prefix):
        prompt = toy_prompt(seed=900, steps=25, concepts=concepts, sae=assets.SITES["object"].saemnesia,
                            prefix=prefix, strength=D.strength, branches=D.branches, mode=D.mode)
        prompt["4"]["inputs"]["batch_size"] = 8
        images = np.stack([pixels(png) for png in server.images(run_ok(server, prompt), "9")])
        return judges.predict(torch.from_numpy(images).float() / 255)

    plain_objects, plain_styles = judged(None, "judged_plain")
    objects, styles = judged(["Hearts"], "judged_erased")
    assert plain_objects.count("Hearts") >= 6 and plain_styles.count("Neon") >= 6
    assert objects.count("Hearts") <= 2
    assert styles.count("Neon") >= 6


def test_stopping_the_launcher_as_a_process_manager_would_stops_comfyui_too(tmp_path):
    """SIGTERM to `python -m saemnesia_tools.comfyui.server` (scripts/comfyui.sh) stops its ComfyUI child and frees
    the port: no server outlives the wrapper."""
    import signal
    import subprocess
    import sys
    import time

    import requests

    from saemnesia_tools.testing import free_port

    port = free_port()
    wrapper = subprocess.Popen([sys.executable, "-m", "saemnesia_tools.comfyui.server", "--port", str(port),
                                "--base", str(tmp_path)], cwd=assets.REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "ComfyUI with SAEmnesia" in wrapper.stdout.readline()  # printed once the server answers
        children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
        assert len(children) == 1
        child = int(children[0])
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(60) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert not Path(f"/proc/{child}").exists(), "ComfyUI outlived its launcher"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        wrapper.kill()
        wrapper.wait()
