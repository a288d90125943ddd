"""Shared fixtures: the real ComfyUI host imported in-process (CPU, PyTorch attention), with this pack loaded.

Tests that need no ComfyUI (the core, the ComfyUI-free tools) never touch these fixtures, so they run without a host.
Test modules that import ComfyUI or the runtime at their top find the host because this file looks for it first.
"""

import asyncio
from pathlib import Path

import pytest

from saemnesia_tools.comfyui.host import import_comfy

try:
    import_comfy(cpu=True)
except RuntimeError:  # no host set up: only the tests that need one fail, at their own imports
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]

HOST_FIXTURES = {"comfy", "comfy_nodes", "toy_servers"}
HOST_MARKERS = ("comfy", "server", "browser")


def pytest_collection_modifyitems(config, items):
    """Mark `host` what depends on the ComfyUI host (a host fixture or marker, and not `one_host`): the second host
    of scripts/test.sh runs only these; everything else (the core, training, importers, the eval's pure parts) runs
    once."""
    for item in items:
        if item.get_closest_marker("one_host"):
            continue
        if HOST_FIXTURES & set(item.fixturenames) or any(item.get_closest_marker(m) for m in HOST_MARKERS):
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, imported in-process on the CPU (no server); its folder."""
    root = import_comfy(cpu=True)
    import comfy.model_management  # noqa: F401  (reads the settings import_comfy chose)

    return root


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's `nodes` module with the built-in extra nodes and this pack loaded, as the server loads them."""
    import nodes

    if "SAEmnesiaEraseConcepts" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT)))
        assert ok, "the pack failed to load into ComfyUI (see the log above)"
    return nodes


@pytest.fixture(scope="session")
def toy_servers(tmp_path_factory):
    """toy_servers(frontend) -> a live toy-world server (fixtures_server) serving the host's own frontend ("host")
    or the newest one ("newest", saemnesia_tools.comfyui.browser.newest_frontend); each started once, on first use."""
    from fixtures_server import start_toy_server
    from saemnesia_tools.comfyui.browser import newest_frontend

    started = {}

    def get(frontend: str):
        if frontend not in started:
            root = newest_frontend()[0] if frontend == "newest" else None
            started[frontend] = start_toy_server(tmp_path_factory.mktemp(f"browser-{frontend}"), root)
        return started[frontend]

    yield get
    for server in started.values():
        server.stop()


def smoke_build(out: Path, work: Path) -> None:
    """The toy world's regeneration command at smoke size (meaningless quality, every file in place); resumes what
    `out` and `work` already hold."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "saemnesia_tools.comfyui.toy.build", "--smoke", "--out", str(out),
                             "--work", str(work)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory) -> Path:
    """One smoke build per run, shared (read-only) by the tests of the build and of the eval: <root>/models, work."""
    root = tmp_path_factory.mktemp("toy_smoke")
    smoke_build(root / "models", root / "work")
    return root
