#!/usr/bin/env bash
# The GPU check of issue 12 on a lent GPU, in under 8 minutes on one H200, as one table:
#   1. the gpu-marked kernel tests (Triton vs the torch reference, on the device), whose
#      summary line heads the table;
#   2. bench/gpu_check.py: decode attention at 32k tokens, Llama-3-8B shapes, batch 1 and 16
#      (SDPA fp16 vs attend svdq dense and sparse 1/32) and compress throughput in bytes of
#      fp16 keys read against the device's copy bandwidth, each row beside its target.
# Writes $RESULTS/gpu_check.md (plus gpu_env.txt and gpu_tests.txt); RESULTS is the first
# argument, else $OUT, else bench/results.
#
#   bench/gpu_check.sh [RESULTS]            on the GPU machine
#   bench/gpu_check.sh --dry-run [RESULTS]  the same steps on the CPU at toy sizes (tests under
#                                           the Triton interpreter, 512 tokens), to check the script
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
RESULTS="${1:-${OUT:-bench/results}}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python}"
# Works from a plain checkout too (no editable install needed for svdq itself).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if (( DRY_RUN )); then
  export TRITON_INTERPRET=1
  TEST_SELECTION=(tests/test_kernels.py -k "token_scores or kernel_score")
  CHECK_ARGS=(--device cpu --tokens 512 --batches 1 2 --repeats 1)
else
  unset TRITON_INTERPRET
  TEST_SELECTION=(-m gpu tests/test_kernels.py)
  CHECK_ARGS=(--device cuda --tokens 32768 --batches 1 16 --repeats 20)
fi

"$PYTHON" - <<'PY' | tee "$RESULTS/gpu_env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

status=0
timeout 200 "$PYTHON" -m pytest -q -rs "${TEST_SELECTION[@]}" -p no:cacheprovider -o addopts="" \
  > "$RESULTS/gpu_tests.txt" 2>&1 || status=$?
summary="$(tail -n 1 "$RESULTS/gpu_tests.txt")"
echo "tests: $summary"
timeout 240 "$PYTHON" bench/gpu_check.py "${CHECK_ARGS[@]}" --tests "$summary" --out "$RESULTS/gpu_check.md" \
  || status=$?
exit "$status"
