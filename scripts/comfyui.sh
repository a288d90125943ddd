#!/usr/bin/env bash
# ComfyUI with the SAEmnesia pack and the toy world on http://127.0.0.1:8188 (Ctrl-C stops it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" -m saemnesia_tools.comfyui.server "$@"
