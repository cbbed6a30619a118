#!/usr/bin/env bash
# The GPU check of issues 12 and 14 on a lent GPU, in under 8 minutes on one H200, as one table:
#   1. the gpu-marked kernel tests (Triton vs the torch reference, on the device), one pytest
#      process per test function, all at once: compiling the kernel variants is most of their
#      time and runs on one core per process; their summed counts head the table;
#   2. bench/gpu_check.py: decode attention at 32k tokens, Llama-3-8B shapes, batch 1 and 16
#      (SDPA fp16 vs attend svdq dense and sparse 1/32, with 16-bit values, latent values and
#      the compress_kv whole cache at 2.0 bits) and compress throughput (keys; keys + values
#      with compress_kv) against the device's copy bandwidth, each row beside its target.
# Writes $RESULTS/gpu_check.md (plus gpu_env.txt and gpu_tests/<test>.txt); RESULTS is the
# first argument, else $OUT, else bench/results.
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
  TESTS=(test_token_scores_kernel_matches_the_torch_reference
         test_sparse_selection_with_the_kernel_score_picks_the_reference_chunks)
  MARK=()
  CHECK_ARGS=(--device cpu --tokens 512 --batches 1 2 --repeats 1)
else
  unset TRITON_INTERPRET
  # every test function with gpu-marked cases (the cuda parametrizations)
  mapfile -t TESTS < <("$PYTHON" -m pytest --collect-only -q -m gpu tests/test_kernels.py -p no:cacheprovider \
                       -o addopts="" | grep '::' | sed -e 's/^.*:://' -e 's/\[.*//' | sort -u)
  MARK=(-m gpu)
  CHECK_ARGS=(--device cuda --tokens 32768 --batches 1 16 --repeats 20)
fi

"$PYTHON" - <<'PY' | tee "$RESULTS/gpu_env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

status=0
mkdir -p "$RESULTS/gpu_tests"
pids=()
for test in "${TESTS[@]}"; do
  timeout 200 "$PYTHON" -m pytest -q -rs "${MARK[@]}" "tests/test_kernels.py::$test" -p no:cacheprovider \
    -o addopts="" > "$RESULTS/gpu_tests/$test.txt" 2>&1 &
  pids+=("$!")
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
summary="$("$PYTHON" - "$RESULTS/gpu_tests" "${#TESTS[@]}" <<'PY'
import collections, pathlib, re, sys
counts = collections.Counter()
for report in sorted(pathlib.Path(sys.argv[1]).glob("*.txt")):
    lines = report.read_text().strip().splitlines() or ["(no output)"]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])
    counts.update({kind: int(n) for n, kind in found} if found else {f"unfinished ({report.stem})": 1})
print(", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" in {sys.argv[2]} parallel pytest runs")
PY
)"
echo "tests: $summary"
timeout 240 "$PYTHON" bench/gpu_check.py "${CHECK_ARGS[@]}" --tests "$summary" --out "$RESULTS/gpu_check.md" \
  || status=$?
exit "$status"
