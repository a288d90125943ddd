"""The ComfyUI frontend in headless Chromium, for the browser tests and the example-workflow builder
(scripts/build_example_workflows.py): Debian's /usr/bin/chromium driven by Python Playwright (Playwright's own
browser download is never used), plus the few page-side calls they share. The nodes never import this module."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import requests

from .host import REPO_ROOT
from .server import ComfyServer

CHROMIUM = os.environ.get("SAEMNESIA_CHROMIUM", "/usr/bin/chromium")
# Playwright adds --headless and a fresh temporary --user-data-dir itself
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
# a returning user: no template browser on first start, no "try Nodes 2.0" banner over the canvas
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False}


NEWEST_FRONTEND = REPO_ROOT / ".frontends" / "newest"
"""The newest comfyui-frontend-package, which scripts/bootstrap.sh installs here (apart from any host's own)."""


def newest_frontend() -> tuple[Path, str]:
    """(the newest frontend's static folder, for `--front-end-root`; its version)."""
    static = NEWEST_FRONTEND / "comfyui_frontend_package" / "static"
    infos = sorted(NEWEST_FRONTEND.glob("comfyui_frontend_package-*.dist-info"))
    if not static.is_dir() or len(infos) != 1:
        raise FileNotFoundError(f"no frontend package at {NEWEST_FRONTEND}: run scripts/bootstrap.sh")
    return static, infos[0].name.removeprefix("comfyui_frontend_package-").removesuffix(".dist-info")


@contextmanager
def comfy_page(server: ComfyServer, viewport=(1600, 1000), vue_nodes: bool = False):
    """A page with the ComfyUI frontend loaded and this pack's nodes registered, drawn by the classic canvas or,
    with `vue_nodes`, by the Vue node renderer ("Nodes 2.0", frontends 1.2x on). page.errors collects uncaught
    page errors."""
    from playwright.sync_api import sync_playwright

    settings = {**SETTINGS, "Comfy.VueNodes.Enabled": vue_nodes}
    requests.post(f"{server.url}/settings", json=settings, timeout=30).raise_for_status()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(120_000)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page.goto(server.url, timeout=300_000)
            page.wait_for_function("!!(window.app?.graph && window.LiteGraph?.registered_node_types?.SAEmnesiaEraseConcepts)",
                                   timeout=300_000)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict) -> None:
    """Load a UI-format workflow as the app does when a file is opened, at zoom 1 (DOM widgets show)."""
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1; c.setDirty(true, true); }")


def wait_for_checklists(page, timeout_ms: int = 300_000) -> None:
    """Until every checklist on the page has its concept list (or shows an error)."""
    page.wait_for_function("""() => [...document.querySelectorAll('.saem-status')].every(
        (s) => !s.textContent.startsWith('Loading'))""", timeout=timeout_ms)


def queue_from_page(page) -> str:
    """Queue the current graph through the frontend's own graph -> API prompt conversion; the prompt id."""
    return page.evaluate("""async () => {
        const { output, workflow } = await window.app.graphToPrompt();
        const r = await window.comfyAPI.api.api.queuePrompt(0, { output, workflow });
        return r.prompt_id;
    }""")


def api_prompt(page) -> dict:
    """The current graph as the frontend converts it for /prompt (graphToPrompt's output, JSON round-tripped)."""
    return json.loads(page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)"))


def exported_workflow(page) -> dict:
    """The current graph as the app's Export writes it (graphToPrompt's workflow, JSON round-tripped)."""
    return json.loads(page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)"))
