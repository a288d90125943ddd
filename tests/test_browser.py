"""The concept checklist in the real ComfyUI page (headless Chromium, Playwright): filled from the SAE, ticks and
strengths written into the `concepts` string, queued from the UI, kept in the saved workflow and restored
when it is loaded again. Every test runs with the host's own frontend and with the newest one, classic canvas and
Vue node renderer (helpers_browser.BROWSER_SETUPS). Writes output/screenshots/checklist_<set-up>.png (the Erase
Concepts node with its list)."""

import io
import json
from urllib.parse import quote

import pytest
import requests
from PIL import Image

from fixtures_server import execution_error, pixels
from helpers_browser import browser_setup, page, server  # noqa: F401 (fixtures)
from saemnesia_tools.comfyui.browser import load_workflow, wait_for_checklists
from conftest import REPO_ROOT
from saemnesia_tools.toy import assets

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(3600)]

ERASE = 6  # the Erase Concepts / Concept Probe node in every example workflow
ERASE_ONE, PROBE = "Erase an object with the same seed", "Probe where each concept fires"  # example workflows
SCREENSHOTS = REPO_ROOT / "output" / "screenshots"


@pytest.fixture(autouse=True)
def no_page_errors(page):
    page.errors.clear()
    yield
    assert page.errors == []


def example(server, name: str, concepts: str | None = None) -> dict:
    """An example workflow as ComfyUI serves it to the template browser (optionally with other concepts)."""
    r = requests.get(f"{server.url}/api/workflow_templates/saemnesia/{quote(name)}.json", timeout=30)
    r.raise_for_status()
    workflow = r.json()
    if concepts is not None:
        node(workflow, ERASE)["widgets_values"][0] = concepts
    return workflow


def node(workflow: dict, node_id: int) -> dict:
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def open_workflow(page, workflow: dict) -> None:
    load_workflow(page, workflow)
    page.evaluate("""(id) => {  // bring the node to the top left of the canvas, at zoom 1
        const c = window.app.canvas, n = window.app.graph.getNodeById(id);
        c.ds.scale = 1;
        c.ds.offset = [120 - n.pos[0], 120 - n.pos[1]];
        c.setDirty(true, true);
    }""", ERASE)
    page.wait_for_timeout(500)
    wait_for_checklists(page)


def checklist(page):
    lists = page.locator(".saem-checklist")
    assert lists.count() == 1
    return lists.first


def row(page, label: str):
    return checklist(page).locator(f'.saem-row[data-label="{label}"]')


def shown(page) -> list[str]:
    return checklist(page).locator(".saem-row").evaluate_all("(rows) => rows.map((r) => r.dataset.label)")


def ticked(page) -> list[str]:
    return checklist(page).locator(".saem-row:has(input[type=checkbox]:checked)").evaluate_all(
        "(rows) => rows.map((r) => r.dataset.label)")


def concepts_string(page) -> str:
    return page.evaluate("(id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'concepts').value",
                         ERASE)


def status(page) -> str:
    return checklist(page).locator(".saem-status").inner_text()


def screenshot_node(page, node_id: int, path) -> None:
    box = page.evaluate("""(id) => {
        const n = window.app.graph.getNodeById(id), title = window.LiteGraph.NODE_TITLE_HEIGHT;
        const [x, y] = window.app.canvasPosToClientPos([n.pos[0], n.pos[1] - title]);
        const s = window.app.canvas.ds.scale;
        return { x: x - 10, y: y - 10, width: n.size[0] * s + 20, height: (n.size[1] + title) * s + 20 };
    }""", node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip=box)


def shipped_concepts() -> tuple[list[str], list[str]]:
    """Labels and groups of the object SAE the example workflows load, in the file's order."""
    from saemnesia_core.sae_file import read_header

    concepts = read_header(assets.path(assets.SITES["object"].saemnesia)).concepts
    return [c.label for c in concepts], [c.group for c in concepts]


def in_file_order(chosen) -> list[str]:
    return [label for label in shipped_concepts()[0] if label in chosen]


def test_the_page_runs_the_chosen_frontend_and_renderer_with_the_checklist_inside_the_node(server, page,
                                                                                          browser_setup):
    from importlib.metadata import version

    from saemnesia_tools.comfyui.browser import newest_frontend

    frontend, vue = browser_setup
    expected = newest_frontend()[1] if frontend == "newest" else version("comfyui-frontend-package")
    assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == expected
    open_workflow(page, example(server, ERASE_ONE))
    assert (page.locator("[data-node-id]").count() > 0) == vue  # Vue nodes are elements; canvas nodes are not
    if vue:
        assert page.locator(f'[data-node-id="{ERASE}"] .saem-checklist').count() == 1
        assert page.locator(f'[data-node-id="{ERASE}"]').get_by_text("concepts", exact=True).count() == 0  # hidden


def test_the_checklist_lists_the_sae_concepts_under_their_group_headers(server, page):
    open_workflow(page, example(server, ERASE_ONE))
    labels, groups = shipped_concepts()
    headers = checklist(page).locator(".saem-group-header").evaluate_all("(hs) => hs.map((h) => h.textContent)")
    assert headers == ["object", "style"] == list(dict.fromkeys(groups))
    assert shown(page) == labels
    assert ticked(page) == ["Hearts"]
    assert status(page).startswith("1 of 16 concepts ticked")
    assert page.evaluate("(id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'concepts').hidden",
                         ERASE)


def test_a_tick_and_a_strength_reach_the_queued_prompt_the_saved_image_and_a_reload(server, page, browser_setup):
    open_workflow(page, example(server, ERASE_ONE))
    row(page, "Neon").locator("input[type=checkbox]").click()
    row(page, "Neon").locator(".saem-strength").fill("-2.5")
    row(page, "Neon").locator(".saem-strength").press("Tab")
    selection = {"Hearts": None, "Neon": -2.5}
    assert json.loads(concepts_string(page)) == selection
    frontend, vue = browser_setup
    screenshot_node(page, ERASE, SCREENSHOTS / f"checklist_{frontend}_frontend{'_vue' if vue else ''}.png")

    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as response:
        page.locator('[data-testid="queue-button"]').first.click()
    prompt_id = response.value.json()["prompt_id"]
    entry = server.wait(prompt_id, timeout=1800)
    assert entry["status"]["status_str"] == "success", execution_error(entry)

    api_prompt, extra = entry["prompt"][2], entry["prompt"][3]
    assert json.loads(api_prompt[str(ERASE)]["inputs"]["concepts"]) == selection
    assert json.loads(node(extra["extra_pnginfo"]["workflow"], ERASE)["widgets_values"][0]) == selection
    (erased_png,) = server.images(entry, "12")
    (original_png,) = server.images(entry, "11")
    assert (pixels(erased_png) != pixels(original_png)).any()
    saved = json.loads(Image.open(io.BytesIO(erased_png)).info["workflow"])
    assert json.loads(node(saved, ERASE)["widgets_values"][0]) == selection

    page.reload()
    page.wait_for_function("!!window.app?.graph?.nodes")
    open_workflow(page, saved)
    assert ticked(page) == ["Hearts", "Neon"]
    assert row(page, "Neon").locator(".saem-strength").input_value() == "-2.5"
    assert row(page, "Hearts").locator(".saem-strength").input_value() == ""
    assert json.loads(concepts_string(page)) == selection


def test_concepts_the_sae_does_not_know_stay_visible_selected_and_first_in_the_error_colour(server, page):
    open_workflow(page, example(server, ERASE_ONE, concepts='["Hearts", "Dogs"]'))
    assert row(page, "Dogs").get_attribute("class").split() == ["saem-row", "saem-unknown"]
    assert shown(page)[0] == "Dogs" and "Dogs" in ticked(page)
    assert "1 unknown to this SAE (listed first)" in status(page)
    assert "saem-error" in checklist(page).locator(".saem-status").get_attribute("class").split()
    row(page, "Circles").locator("input[type=checkbox]").click()
    assert json.loads(concepts_string(page)) == ["Circles", "Hearts", "Dogs"]


def test_the_filter_limits_the_list_and_all_or_none_apply_to_what_it_shows(server, page):
    open_workflow(page, example(server, ERASE_ONE))
    labels, _ = shipped_concepts()
    checklist(page).locator(".saem-filter").fill("st")  # labels only: not every style through the group's name
    assert shown(page) == in_file_order({label for label in labels if "st" in label.lower()}) != []
    checklist(page).locator(".saem-filter").fill("style")
    assert shown(page) == []
    checklist(page).locator(".saem-filter").fill("RI")
    assert shown(page) == in_file_order({"Triangles", "Rings", "Stripes"})
    checklist(page).get_by_role("button", name="all").click()
    assert json.loads(concepts_string(page)) == in_file_order({"Triangles", "Hearts", "Rings", "Stripes"})
    checklist(page).locator(".saem-filter").fill("")
    checklist(page).get_by_role("button", name="none").click()
    assert json.loads(concepts_string(page)) == []


def test_the_list_follows_the_load_sae_node_and_shows_fetch_errors(server, page):
    open_workflow(page, example(server, ERASE_ONE))
    pick = """(name) => { const w = window.app.graph.getNodeById(2).widgets[0]; w.value = name; w.callback?.(name); }"""
    page.evaluate(pick, "corrupt.safetensors")
    page.wait_for_function("() => document.querySelector('.saem-status').classList.contains('saem-error')")
    assert "Could not list the concepts of corrupt.safetensors" in status(page)
    assert ticked(page) == ["Hearts"]  # the selection is kept while the list cannot be read
    assert json.loads(concepts_string(page)) == ["Hearts"]

    page.evaluate(pick, assets.SITES["object"].saemnesia)
    wait_for_checklists(page)
    assert status(page).startswith("1 of 16")

    page.evaluate("(id) => { const n = window.app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('sae')); }",
                  ERASE)
    page.wait_for_function("() => document.querySelector('.saem-status').textContent.startsWith('Connect')")
    assert ticked(page) == ["Hearts"]


def test_load_sae_nodes_chained_through_also_are_listed_together_and_queued_as_a_chain(server, page):
    object_sae, style_sae = assets.SITES["object"].saemnesia, assets.SITES["style"].saemnesia
    open_workflow(page, example(server, ERASE_ONE))
    extra = page.evaluate("""(name) => {  // a second Load SAE (the style block's SAE) into the first one's `also`
        const g = window.app.graph, loader = g.getNodeById(2), extra = window.LiteGraph.createNode("SAEmnesiaLoadSAE");
        extra.pos = [loader.pos[0], loader.pos[1] + 160];
        g.add(extra);
        const w = extra.widgets.find((w) => w.name === "sae_name");
        w.value = name;
        w.callback?.(name);
        extra.connect(0, loader, loader.findInputSlot("also"));
        return extra.id;
    }""", style_sae)
    title = "() => document.querySelector('.saem-status').title"
    page.wait_for_function(f"(t) => ({title})() === t", arg=f"{style_sae} + {object_sae}")
    wait_for_checklists(page)
    assert status(page).startswith("1 of 16") and ticked(page) == ["Hearts"]
    output = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert output["2"]["inputs"]["also"] == [str(extra), 0] and output[str(extra)]["inputs"]["sae_name"] == style_sae

    page.evaluate("() => { const n = window.app.graph.getNodeById(2); n.disconnectInput(n.findInputSlot('also')); }")
    page.wait_for_function(f"(t) => ({title})() === t", arg=object_sae)


def test_the_probe_checklist_has_no_strengths(server, page):
    open_workflow(page, example(server, PROBE))
    assert ticked(page) == in_file_order({"Stars", "Hearts", "Neon"})
    assert checklist(page).locator(".saem-strength").count() == 0


def test_an_empty_strength_box_shows_the_value_it_inherits_and_a_typed_one_stays_in_the_nodes_range(server, page):
    workflow = example(server, ERASE_ONE)
    node(workflow, ERASE)["widgets_values"][1] = -5  # the node's strength, not its default
    open_workflow(page, workflow)
    box = row(page, "Neon").locator(".saem-strength")
    assert box.get_attribute("placeholder") == "node -5"
    assert (box.get_attribute("min"), box.get_attribute("max")) == ("-100", "100")
    row(page, "Neon").locator("input[type=checkbox]").click()
    box.fill("-500")
    box.press("Tab")
    assert json.loads(concepts_string(page)) == {"Hearts": None, "Neon": -100}


# a stored value (the frontend's saved workflow) that is new since `before` and holds the tick
STORED_WITH_CIRCLES = "(before) => Object.values(localStorage).some(v => v.includes('Circles') && !before.includes(v))"


def test_a_tick_followed_by_a_reload_is_kept(server, page):
    """A real click, then nothing else but a reload, as soon as the frontend has stored the workflow: at once in
    the bundled frontend; the newer one (1.49 with ComfyUI 0.33) stores it 0.5 s after the change tracker reports
    a change (debounced, for every edit, not only ours), so a reload within that half second loses any edit."""
    open_workflow(page, example(server, ERASE_ONE))
    before = page.evaluate("() => Object.values(localStorage)")
    row(page, "Circles").locator("input[type=checkbox]").click()
    page.wait_for_function(STORED_WITH_CIRCLES, arg=before, timeout=5000)  # only if the widget told the tracker
    page.reload()
    page.wait_for_function("!!(window.app?.graph && window.LiteGraph?.registered_node_types?.SAEmnesiaEraseConcepts)")
    page.wait_for_function("(id) => !!window.app.graph.getNodeById(id)", arg=ERASE)
    wait_for_checklists(page)
    assert json.loads(concepts_string(page)) == in_file_order({"Circles", "Hearts"})
    assert ticked(page) == in_file_order({"Circles", "Hearts"})


def test_each_concept_shows_how_well_this_sae_erased_it_and_those_it_does_not_erase_are_greyed(server, page):
    from saemnesia_core.sae_file import read_header

    open_workflow(page, example(server, ERASE_ONE))
    concepts = read_header(assets.path(assets.SITES["object"].saemnesia)).concepts
    assert all(c.erasure for c in concepts)  # the build measured every concept
    weak = {}
    for c in concepts:
        e = c.erasure
        assert row(page, c.label).locator(".saem-badge").inner_text() == f"{e['gone']}/{e['images']}"
        weak[c.label] = "saem-weak" in row(page, c.label).get_attribute("class").split()
        assert weak[c.label] == (e["gone"] <= e["images"] - e["seen_without"])
    assert not all(weak.values()) and any(weak.values())  # regression threshold: it acts on some, not on others
