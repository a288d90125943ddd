#!/usr/bin/env bash
# The GPU path, on a machine with CUDA: the device/dtype tests (tests/test_gpu.py: fp16 and bf16 on cuda, Erase
# Concepts sampled on the GPU), the edit benchmark in fp16 and the sampling benchmark at SD1.5 shape and 512 px in
# fp16; results in benchmarks/results/gpu_*.{md,json}. Without CUDA it says so and exits 0 (CI runs that path).
# About 3 minutes on one H100 after start-up.
#
#   SAEMNESIA_PYTHON=python3   the interpreter (default: the project's .venv); it needs torch with CUDA
#   COMFYUI_PATH=...           the ComfyUI host (default: the one scripts/bootstrap.sh set up)
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
  echo "# GPU tests: tests/test_gpu.py on $("$python" -c 'import torch; print(torch.cuda.get_device_name())')"
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
echo "gpu_check: wrote $results/gpu_tests.md, gpu_edit.{json,md}, gpu_sampling.{json,md}"
exit $status
