#!/usr/bin/env bash
# The GPU path, on a machine with CUDA, in one pass of about 6 minutes: the device/dtype tests (tests/test_gpu.py:
# fp16 and bf16 on cuda, Erase Concepts sampled on the GPU), the edit benchmark in fp16 (an fp16 SAE, and an fp32 one
# whose weights are cast once; kernels per call), the sampling benchmark at SD1.5 shape and 512 px in fp16, and Erase
# Concepts under ComfyUI's dynamic VRAM (benchmarks/bench_dynamic_vram.py: ModelPatcherDynamic with comfy-aimdo,
# ComfyUI 0.33+). Results in benchmarks/results/gpu_*.{md,json}; what each part did, and how long it took, in
# benchmarks/results/gpu_check.json. Every part has a time budget (seconds, below): a part that runs out gets SIGINT,
# writes what it measured so far (marked partial), and the next part starts. Without CUDA it says so and exits 0
# (CI runs that path).
#
#   SAEMNESIA_PYTHON=python3   the interpreter (default: the project's .venv); it needs torch with CUDA
#   COMFYUI_PATH=...           the ComfyUI host (default: the one scripts/bootstrap.sh set up)
#   SAEMNESIA_DYNAMIC_HOST=... a ComfyUI 0.33+ host for the dynamic-VRAM run, with comfy-aimdo installed for the
#                              interpreter (default: the second host scripts/bootstrap.sh set up, run by its venv)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${SAEMNESIA_PYTHON:-$root/.venv/bin/python}
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine; nothing to check (the CPU suite covers the rest)"
  exit 0
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
device=$("$python" -c "import torch; print(torch.cuda.get_device_name())")
echo "gpu_check on $device, torch $("$python" -c 'import torch; print(torch.__version__)')"
parts=()
status=0

# part NAME BUDGET COMMAND…: run COMMAND with SIGINT after BUDGET seconds (SIGKILL 20 s later), and note the outcome.
part() {
  local name=$1 budget=$2 start rc outcome
  shift 2
  echo "=== $name (budget ${budget} s)"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$budget" "$@"
  rc=$?
  case $rc in
    0) outcome=done ;;
    124|130|137) outcome=out-of-time ;;
    *) outcome=failed; status=1 ;;
  esac
  parts+=("{\"part\": \"$name\", \"budget_s\": $budget, \"seconds\": $(( $(date +%s) - start )), \"outcome\": \"$outcome\", \"exit\": $rc}")
}

tests() {
  local log rc
  log=$(mktemp)
  "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$log" 2>&1
  rc=$?
  {
    echo "# GPU tests: tests/test_gpu.py on $device, ComfyUI $(
      "$python" -c 'import saemnesia_tools.comfyui, comfyui_version; print(comfyui_version.__version__)' 2>/dev/null)"
    echo
    echo '```'
    cat "$log"
    echo '```'
  } >"$results/gpu_tests.md"
  rm -f "$log"
  tail -3 "$results/gpu_tests.md"
  return $rc
}

export python device results
part tests 90 bash -c "$(declare -f tests); tests"  # timeout runs programs, not shell functions
part edit 60 "$python" benchmarks/bench_edit.py --device cuda --dtype float16 --repeats 50 --warmup 5 \
  --out-name gpu_edit
part sampling 150 "$python" benchmarks/bench_sampling.py --models sd15 --sd-size 512 --sd-steps 20 \
  --sd-dtype float16 --repeats 10 --warmup 2 --out-name gpu_sampling
dynamic_host=${SAEMNESIA_DYNAMIC_HOST:-$root/.comfyui/comfyui-0.33.0/ComfyUI}
dynamic_python=${SAEMNESIA_PYTHON:-$root/.venv-comfyui-0.33.0/bin/python}
if [ -d "$dynamic_host/comfy" ]; then
  COMFYUI_PATH=$dynamic_host part dynamic-vram 120 "$dynamic_python" benchmarks/bench_dynamic_vram.py \
    --out-name gpu_dynamic_vram
else
  echo "gpu_check: no ComfyUI 0.33+ host at $dynamic_host: the dynamic-VRAM run is skipped" \
    "(SAEMNESIA_HOST_SOURCE=<its source> scripts/bootstrap.sh sets one up)"
fi
{
  printf '{"device": "%s", "date": "%s", "parts": [' "$device" "$(date -u +%Y-%m-%dT%H:%MZ)"
  (IFS=,; printf '%s' "${parts[*]}")
  printf ']}\n'
} >"$results/gpu_check.json"
cat "$results/gpu_check.json"
echo "gpu_check: wrote $results/gpu_tests.md, gpu_edit.{json,md}, gpu_sampling.{json,md}, gpu_dynamic_vram.{json,md}," \
  "gpu_check.json"
exit $status
