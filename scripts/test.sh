#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (venv, real ComfyUI host, Chromium for the browser
# tests), then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k eraser -x
#
# Where a second host is at hand (SAEMNESIA_SECOND_HOST, default ../shared/hosts/comfyui-0.33.0 beside the
# checkout), the tests that depend on the host (marker `host`, set in tests/conftest.py) run again on a copy of
# it, in a venv of its own (scripts/bootstrap.sh), with the host's own frontend only. Both summaries are
# printed; the exit status is non-zero when either run fails.
#
#   scripts/test.sh --quick     # the inner loop: one host, no server, no browser, nothing slow (a few minutes)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
second=${SAEMNESIA_SECOND_HOST-$root/../shared/hosts/comfyui-0.33.0}
"$root/scripts/bootstrap.sh" || exit 1
cd "$root"

if [ "${1-}" = "--quick" ]; then
    shift
    exec "$root/.venv/bin/python" -m pytest -m "not server and not browser and not slow" "$@"
fi

"$root/scripts/ensure_chromium.sh" || exit 1
started=$SECONDS
echo "=== the suite on the bundled host (ComfyUI 0.3.75)"
"$root/.venv/bin/python" -m pytest "$@"
first=$?
[ -n "$second" ] && [ -f "$second/main.py" ] || exit $first

name=$(basename "$(cd "$second" && pwd)")
echo "=== the host-dependent tests on the second host ($name)"
SAEMNESIA_HOST_SOURCE="$second" "$root/scripts/bootstrap.sh" || exit 1
SAEMNESIA_BROWSER_SETUPS=host-frontend "$root/.venv-$name/bin/python" -m pytest -m host "$@"
status=$?
echo "=== bundled host: exit $first; $name: exit $status; both: $((SECONDS - started)) s"
[ $first -eq 0 ] && [ $status -eq 0 ]
