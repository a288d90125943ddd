"""Every example workflow is served as a template with its thumbnail, is listed with it in the templates dialog,
opens with every node in view, loads in the real frontend unchanged, and runs in the real ComfyUI after the
frontend's own graph -> API prompt conversion, showing its images enlarged. Each server runs an example once: a
later set-up on the same server (the newest frontend's Vue renderer after its classic canvas) is held to that run
when its conversion gives the same API prompt, and runs it anew when not."""

import io
import json
from urllib.parse import quote

import pytest
import requests
from PIL import Image

from fixtures_server import EXAMPLES, execution_error
from helpers_browser import browser_setup, page, server  # noqa: F401 (fixtures)
from saemnesia_tools.comfyui.browser import (api_prompt, exported_workflow, load_workflow, queue_from_page,
                                             wait_for_checklists)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(3600)]

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
RAN = {}  # (server url, example) -> (the API prompt a set-up's frontend made, its finished history entry)


def test_the_six_examples_are_listed_as_templates_with_human_titles_and_thumbnails(server, page):
    assert NAMES == ["Erase a concept in the text encoder", "Erase an object and a style at once",
                     "Erase an object with the same seed", "Erase only inside a mask", "Probe where each concept fires",
                     "Teach a concept, then erase it"]
    assert sorted(server.get("/workflow_templates").json()["saemnesia"]) == NAMES
    for name in NAMES:
        r = requests.get(f"{server.url}/api/workflow_templates/saemnesia/{quote(name)}.jpg", timeout=30)
        assert r.ok and r.headers["Content-Type"] == "image/jpeg"
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text("saemnesia", exact=True).first.click()
    page.wait_for_function("""() => [...document.querySelectorAll('[role=dialog] img')].filter(
        (i) => !i.src.includes('default-template') && i.complete && i.naturalWidth > 0).length === 6""")
    cards = page.evaluate("() => [...document.querySelectorAll('[role=dialog] img')].map((i) => i.alt)")
    assert sorted(cards) == NAMES
    page.reload()  # a fresh page, without the dialog, for the tests that follow
    page.wait_for_function("!!(window.app?.graph && window.LiteGraph?.registered_node_types?.SAEmnesiaEraseConcepts)")


@pytest.mark.parametrize("name", NAMES)
def test_an_example_opens_with_every_node_in_a_laptop_sized_view(server, page, name):
    workflow = requests.get(f"{server.url}/api/workflow_templates/saemnesia/{quote(name)}.json", timeout=30).json()
    page.set_viewport_size({"width": 1280 + 60, "height": 720 + 120})  # the canvas, plus the app's side bar and menu
    try:
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        outside = page.evaluate("""() => {
            const canvas = window.app.canvas.canvas.getBoundingClientRect(), title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const s = window.app.canvas.ds.scale;
            return window.app.graph._nodes.filter((n) => {
                const [x, y] = window.app.canvasPosToClientPos([n.pos[0], n.pos[1] - title]);
                return x < canvas.left || y < canvas.top || x + n.size[0] * s > canvas.left + 1280
                    || y + (n.size[1] + title) * s > canvas.top + 720;
            }).map((n) => n.title);
        }""")
        assert outside == []
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})


@pytest.mark.parametrize("name", NAMES)
def test_an_example_loads_unchanged_and_runs(server, page, name):
    workflow = requests.get(f"{server.url}/api/workflow_templates/saemnesia/{quote(name)}.json", timeout=30).json()
    assert workflow == json.loads((EXAMPLES / f"{name}.json").read_text())
    ours = [n for n in workflow["nodes"] if n["type"].startswith("SAEmnesia")]
    assert ours and all(n["properties"]["cnr_id"] == "saemnesia" for n in ours)

    page.errors.clear()
    load_workflow(page, workflow)
    wait_for_checklists(page)
    assert page.locator(".saem-status.saem-error").count() == 0
    listed = dict(page.evaluate("""() => window.app.graph._nodes.filter((n) => n.saemnesiaChecklist)
        .map((n) => [n.id, n.saemnesiaChecklist.concepts.map((c) => c.label)])"""))
    for n in ours:  # every chosen concept is one the checklist lists (a taught one before it has run)
        if n["id"] in listed:
            assert set(json.loads(n["widgets_values"][0])) <= set(listed[n["id"]]), (n["type"], listed[n["id"]])
    reloaded = {n["id"]: n for n in exported_workflow(page)["nodes"]}
    for n in workflow["nodes"]:
        assert reloaded[n["id"]]["type"] == n["type"]
        assert (reloaded[n["id"]].get("widgets_values") or []) == (n.get("widgets_values") or []), n["type"]

    prompt, ran = api_prompt(page), RAN.get((server.url, name))
    if ran and ran[0] == prompt:  # the same API prompt already ran on this server: the same execution
        entry = ran[1]
    else:
        entry = server.wait(queue_from_page(page), timeout=1800)
        RAN[server.url, name] = prompt, entry
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = [n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    for node_id in images:
        assert entry["outputs"][str(node_id)]["images"], f"{name}: node {node_id} has no image"
        (png, *_) = server.images(entry, str(node_id))
        assert Image.open(io.BytesIO(png)).size == (256, 256)  # the toy's 32×32, enlarged ×8 for display
    assert page.errors == []
