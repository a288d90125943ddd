#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (venv, real ComfyUI host, Chromium for the browser
# tests), then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k eraser -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
"$root/scripts/ensure_chromium.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
