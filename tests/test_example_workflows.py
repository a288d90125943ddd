"""Every example workflow is served as a template, loads in the real frontend unchanged, and runs in the real
ComfyUI after the frontend's own graph -> API prompt conversion."""

import json

import pytest
import requests

from fixtures_server import EXAMPLES, execution_error
from helpers_browser import page, server  # noqa: F401 (fixtures)
from saemnesia_comfy.browser import exported_workflow, load_workflow, queue_from_page, wait_for_checklists

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(3600)]

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))


def test_the_three_examples_exist_and_are_listed_as_templates(server):
    assert NAMES == ["erase_one_concept", "erase_several_concepts", "probe_concepts"]
    assert sorted(server.get("/workflow_templates").json()["saemnesia"]) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_an_example_loads_unchanged_and_runs(server, page, name):
    workflow = requests.get(f"{server.url}/api/workflow_templates/saemnesia/{name}.json", timeout=30).json()
    assert workflow == json.loads((EXAMPLES / f"{name}.json").read_text())
    ours = [n for n in workflow["nodes"] if n["type"].startswith("SAEmnesia")]
    assert ours and all(n["properties"]["cnr_id"] == "saemnesia" for n in ours)

    page.errors.clear()
    load_workflow(page, workflow)
    wait_for_checklists(page)
    assert page.locator(".saem-status.saem-error").count() == 0
    reloaded = {n["id"]: n for n in exported_workflow(page)["nodes"]}
    for n in workflow["nodes"]:
        assert reloaded[n["id"]]["type"] == n["type"]
        assert (reloaded[n["id"]].get("widgets_values") or []) == (n.get("widgets_values") or []), n["type"]

    entry = server.wait(queue_from_page(page), timeout=1800)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = [n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    for node_id in images:
        assert entry["outputs"][str(node_id)]["images"], f"{name}: node {node_id} has no image"
    assert page.errors == []
