"""Shared fixtures: where the real ComfyUI host is, and loading it in-process (CPU, PyTorch attention)."""

import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    """The ComfyUI the tests run against: $COMFYUI_PATH, else the host scripts/bootstrap.sh provisioned."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    recorded = REPO_ROOT / ".comfyui" / "comfyui_path"
    if recorded.exists():
        return Path(recorded.read_text().strip())
    return REPO_ROOT / ".comfyui" / "ComfyUI"


def import_comfy_in_process() -> Path:
    """Put ComfyUI on sys.path and import it for CPU use; idempotent."""
    root = comfyui_path()
    if not (root / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {root}: run scripts/bootstrap.sh or set COMFYUI_PATH")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (must come after the args above)

    return root


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, imported in-process (no server)."""
    return import_comfy_in_process()


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's `nodes` module with the built-in extra nodes and this pack loaded, as the server loads them."""
    import nodes

    if "SAEmnesiaEraseConcepts" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT)))
        assert ok, "the pack failed to load into ComfyUI (see the log above)"
    return nodes
