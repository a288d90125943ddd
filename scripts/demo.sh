#!/usr/bin/env bash
# The demo: set-up (venv, real ComfyUI host), then the real ComfyUI, headless, erases concepts from toy-world
# images with the same seeds, and writes the images and a before/after grid under output/demo/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
