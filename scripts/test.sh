#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (venv, real ComfyUI host, Chromium for the browser
# tests), then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k eraser -x
#
# Where a second host is at hand (SAEMNESIA_SECOND_HOST, default ../shared/hosts/comfyui-0.33.0 beside the
# checkout), the suite runs again on a copy of it, in a venv of its own (scripts/bootstrap.sh). Both summaries
# are printed; the exit status is non-zero when either run fails.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
second=${SAEMNESIA_SECOND_HOST-$root/../shared/hosts/comfyui-0.33.0}
"$root/scripts/bootstrap.sh" || exit 1
"$root/scripts/ensure_chromium.sh" || exit 1
cd "$root"

echo "=== the suite on the bundled host (ComfyUI 0.3.75)"
"$root/.venv/bin/python" -m pytest "$@"
first=$?
[ -n "$second" ] && [ -f "$second/main.py" ] || exit $first

name=$(basename "$(cd "$second" && pwd)")
echo "=== the suite on the second host ($name)"
SAEMNESIA_HOST_SOURCE="$second" "$root/scripts/bootstrap.sh" || exit 1
"$root/.venv-$name/bin/python" -m pytest "$@"
status=$?
echo "=== bundled host: exit $first; $name: exit $status"
[ $first -eq 0 ] && [ $status -eq 0 ]
