#!/usr/bin/env bash
# Debian's Chromium for the browser tests (a test tool's own browser download fails on our machines).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "[ensure_chromium] installing Debian's chromium" >&2
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null
