"""Where the ComfyUI host is, and importing it in-process: the one place tools, tests, scripts and benchmarks
find ComfyUI when they run outside a ComfyUI server (inside one, ComfyUI is already imported)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST_RECORD = REPO_ROOT / ".comfyui" / "comfyui_path"
"""scripts/bootstrap.sh writes the host it set up (or $COMFYUI_PATH) here, and into each venv it builds."""


def comfyui_path() -> Path:
    """$COMFYUI_PATH, else the host scripts/bootstrap.sh recorded for the running venv (a second host has a venv
    of its own), else the one it recorded for this checkout."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    for record in (Path(sys.prefix) / "comfyui_path", HOST_RECORD):
        if record.exists():
            return Path(record.read_text().strip())
    return REPO_ROOT / ".comfyui" / "ComfyUI"


def import_comfy(cpu: bool | None = None) -> Path:
    """Make ComfyUI importable and choose its settings before anything reads them: PyTorch attention (about 2.5x
    faster than ComfyUI's default on a CPU), and the CPU when `cpu` is True or when there is no GPU (`cpu=None`).
    Only `comfy.cli_args` is imported here (cheap: no device is touched); `comfy.model_management` reads the
    settings when a module first imports it. Inside a running ComfyUI this does nothing. Returns the host's folder."""
    if "comfy.model_management" in sys.modules:  # ComfyUI is running (or was imported): nothing to choose
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parents[1]
    root = comfyui_path()
    if not (root / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI not found at {root}: run scripts/bootstrap.sh or set COMFYUI_PATH")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import torch
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu if cpu is not None else not torch.cuda.is_available()
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return root
