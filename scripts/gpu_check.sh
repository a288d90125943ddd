#!/usr/bin/env bash
# The GPU path, on a machine with CUDA: the device/dtype tests (tests/test_gpu.py: fp16 and bf16 on cuda, Erase
# Concepts sampled on the GPU), the edit benchmark in fp16 (an fp16 SAE, and an fp32 one whose weights are cast
# once), the sampling benchmark at SD1.5 shape and 512 px in fp16, and Erase Concepts under ComfyUI's dynamic VRAM
# (benchmarks/bench_dynamic_vram.py: ModelPatcherDynamic with comfy-aimdo, ComfyUI 0.33+); results in
# benchmarks/results/gpu_*.{md,json}. Without CUDA it says so and exits 0 (CI runs that path).
# About 4 minutes on one H200 after start-up.
#
#   SAEMNESIA_PYTHON=python3   the interpreter (default: the project's .venv); it needs torch with CUDA
#   COMFYUI_PATH=...           the ComfyUI host (default: the one scripts/bootstrap.sh set up)
#   SAEMNESIA_DYNAMIC_HOST=... a ComfyUI 0.33+ host for the dynamic-VRAM run, with comfy-aimdo installed for the
#                              interpreter (default: the second host scripts/bootstrap.sh set up, run by its venv)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${SAEMNESIA_PYTHON:-$root/.venv/bin/python}
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine; nothing to check (the CPU suite covers the rest)"
  exit 0
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
"$python" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), 'torch', torch.__version__)"

log=$(mktemp)
status=0
"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$log" 2>&1 || status=$?
{
  echo "# GPU tests: tests/test_gpu.py on $("$python" -c 'import torch; print(torch.cuda.get_device_name())'), ComfyUI $(
    "$python" -c 'import saemnesia_tools.comfyui, comfyui_version; print(comfyui_version.__version__)' 2>/dev/null)"
  echo
  echo '```'
  cat "$log"
  echo '```'
} >"$results/gpu_tests.md"
rm -f "$log"
cat "$results/gpu_tests.md"
"$python" benchmarks/bench_edit.py --device cuda --dtype float16 --repeats 50 --warmup 5 --out-name gpu_edit
"$python" benchmarks/bench_sampling.py --models sd15 --sd-size 512 --sd-steps 20 --sd-dtype float16 --repeats 10 \
  --warmup 2 --out-name gpu_sampling
dynamic_host=${SAEMNESIA_DYNAMIC_HOST:-$root/.comfyui/comfyui-0.33.0/ComfyUI}
dynamic_python=${SAEMNESIA_PYTHON:-$root/.venv-comfyui-0.33.0/bin/python}
if [ -d "$dynamic_host/comfy" ]; then
  COMFYUI_PATH=$dynamic_host "$dynamic_python" benchmarks/bench_dynamic_vram.py --out-name gpu_dynamic_vram || status=$?
else
  echo "gpu_check: no ComfyUI 0.33+ host at $dynamic_host: the dynamic-VRAM run is skipped" \
    "(SAEMNESIA_HOST_SOURCE=<its source> scripts/bootstrap.sh sets one up)"
fi
echo "gpu_check: wrote $results/gpu_tests.md, gpu_edit.{json,md}, gpu_sampling.{json,md}, gpu_dynamic_vram.{json,md}"
exit $status
