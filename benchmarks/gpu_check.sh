#!/usr/bin/env bash
# One step for GPU owners (`make gpu-check`): install the GPU extras, build TensorRT engines for
# this GPU from the demo bundle, run the gpu-marked tests and a short GPU benchmark, and write
# the results under benchmarks/results/gpu-<date>-<gpu>/. Stops with a clear message (exit 3)
# where no CUDA GPU is visible.
#
#   PYTHON=.venv/bin/python   the interpreter of the project's venv (made by `make install`)
#   GPU_WHEELS=DIR            install the GPU extras from wheels in DIR (offline machines)
#   GPU_INSTALL=skip          install nothing (the venv already has the GPU extras)
#   TRT_FLAVOUR=auto|standard|rtx   which TensorRT builds the engines (auto: standard if installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
BUNDLE=${BUNDLE:-runs/demo/etth1/bundle}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU or driver here (nvidia-smi failed); nothing to check. The CPU path is 'make test'." >&2
  exit 3
fi
if [ "${GPU_INSTALL:-}" = skip ]; then
  echo "gpu-check: GPU_INSTALL=skip: using the venv as it is" >&2
elif [ -n "${GPU_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$GPU_WHEELS" onnxruntime-gpu tensorrt-rtx nvidia-cuda-runtime || true
else
  "$PY" -m pip install -q -e '.[test,gpu]'
fi
"$PY" - <<'PY'
import sys
from timecma.runtime.engines import cuda
if cuda.device_count() == 0:
    sys.exit("gpu-check: nvidia-smi sees a GPU but the CUDA runtime does not (libcudart missing or driver too old)")
print(f"gpu-check: CUDA device sm{cuda.CudaRuntime().capability()}")
PY
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '--' | tr -cd 'A-Za-z0-9-')
OUT=benchmarks/results/gpu-$(date +%Y%m%d)-$GPU
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt"
[ -f "$BUNDLE/manifest.json" ] || make demo
"$BIN/timecma-engines" build "$BUNDLE" --precision fp16,fp32 --trt-flavour "${TRT_FLAVOUR:-auto}" 2>&1 \
  | tee "$OUT/engines-build.log" || echo "gpu-check: an engine failed to build or was refused by its accuracy gate" \
       "(see $OUT/engines-build.log); going on with the engines that were added, and ORT CUDA"
"$BIN/timecma-engines" verify "$BUNDLE" | tee "$OUT/verify.txt"
"$PY" -m pytest -q -ra -m gpu | tee "$OUT/pytest-gpu.txt"
BACKENDS=torch,ort-cpu,ort-cuda
grep -q "backend tensorrt: can run here" "$OUT/verify.txt" && BACKENDS=$BACKENDS,tensorrt:fp32,tensorrt:fp16
"$BIN/timecma-bench" --bundle "$BUNDLE" --data "${DATA:-timecma/datasets/ETTh1.csv}" --backends "$BACKENDS" --hit-iters 200 --miss-iters 20 --sweep-iters 5 \
  --out "$OUT"
echo "gpu-check: results in $OUT"
