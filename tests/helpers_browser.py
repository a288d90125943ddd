"""Module-scoped fixtures shared by the browser test modules (import them by name: `from helpers_browser import
browser_setup, page, server`): each module runs once per browser set-up, on one live toy-world server per
frontend (conftest's `toy_servers`) and one page.
The set-ups run: all three, or those SAEMNESIA_BROWSER_SETUPS names (comma-separated ids). The page helpers: saemnesia_tools.comfyui.browser."""

from __future__ import annotations

import os

import pytest

from saemnesia_tools.comfyui.browser import comfy_page

BROWSER_SETUPS = {  # id: (frontend, Vue node renderer)
    "host-frontend": ("host", False),           # the frontend the host pins, classic canvas
    "newest-frontend": ("newest", False),       # the newest comfyui-frontend-package, classic canvas
    "newest-frontend-vue": ("newest", True),    # the same with "Nodes 2.0", the Vue node renderer
}
# scripts/test.sh runs the newest frontend on the first host only: SAEMNESIA_BROWSER_SETUPS=host-frontend on the second
if os.environ.get("SAEMNESIA_BROWSER_SETUPS"):
    BROWSER_SETUPS = {k: BROWSER_SETUPS[k] for k in os.environ["SAEMNESIA_BROWSER_SETUPS"].split(",")}


@pytest.fixture(scope="module", params=list(BROWSER_SETUPS))
def browser_setup(request) -> tuple[str, bool]:
    return BROWSER_SETUPS[request.param]


@pytest.fixture(scope="module")
def server(toy_servers, browser_setup):
    return toy_servers(browser_setup[0])


@pytest.fixture(scope="module")
def page(server, browser_setup):
    with comfy_page(server, vue_nodes=browser_setup[1]) as p:
        yield p
