"""The real ComfyUI server for end-to-end tests lives in scripts/comfy_server.py (the demo uses it too)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from comfy_server import REPO_ROOT, ComfyServer, error_message, free_port  # noqa: E402,F401
