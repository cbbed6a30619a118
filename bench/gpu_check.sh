#!/usr/bin/env bash
# Attention part on a lent GPU, in well under 8 minutes on one H200:
#   1. the gpu-marked kernel tests (Triton vs the torch reference, on the device);
#   2. the speed table of bench/attention.py (SDPA fp16/fp32 vs attend dense and sparse,
#      4k..32k tokens, Llama-3-8B-like shapes), batch 1 and batch 8.
# Results go to $1 (default: $OUT when set, else bench/results): gpu_tests.txt,
# attention_gpu_b1.md, attention_gpu_b8.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-bench/results}}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python}"
# Works from a plain checkout too (no editable install needed for svdq itself).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

"$PYTHON" - <<'PY' | tee "$RESULTS/gpu_env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

status=0
timeout 200 "$PYTHON" -m pytest -q -rs -m gpu tests/test_kernels.py -p no:cacheprovider -o addopts="" \
  2>&1 | tee "$RESULTS/gpu_tests.txt" || status=$?
timeout 150 "$PYTHON" bench/attention.py --part speed --device cuda --tokens 4096 8192 16384 32768 \
  --repeats 30 --batch 1 --out "$RESULTS/attention_gpu_b1.md" || status=$?
timeout 120 "$PYTHON" bench/attention.py --part speed --device cuda --tokens 8192 32768 \
  --repeats 30 --batch 8 --out "$RESULTS/attention_gpu_b8.md" || status=$?
exit "$status"
