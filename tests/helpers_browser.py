"""Module-scoped fixtures shared by the browser test modules (import them by name: `from helpers_browser import
page, server`): one live toy-world server and one page per module. The page helpers: saemnesia_comfy.browser."""

from __future__ import annotations

import pytest

from saemnesia_comfy.browser import comfy_page


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fixtures_server import start_toy_server

    s = start_toy_server(tmp_path_factory.mktemp("browser"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    with comfy_page(server) as p:
        yield p
