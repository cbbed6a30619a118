#!/usr/bin/env bash
# The GPU check of issues 12 and 14 on a lent GPU, in under 8 minutes on one H200, as one table:
#   1. the gpu-marked kernel tests (Triton vs the torch reference, on the device), one pytest
#      process per test case, as many at once as there are cores: compiling the kernel
#      variants (about 70 of them) is most of their time and runs on one core per process;
#      their summed counts head the table;
#   2. bench/gpu_check.py: decode attention at 32k tokens, Llama-3-8B shapes, batch 1 and 16
#      (SDPA fp16 vs attend svdq dense and sparse 1/32, with 16-bit values, latent values and
#      the compress_kv whole cache at 2.0 bits) and compress throughput (keys; keys + values
#      with compress_kv) against the device's copy bandwidth, each row beside its target.
# Writes $RESULTS/gpu_check.md (plus gpu_env.txt and gpu_tests/NNN.txt, one per test case,
# its node id on the first line); RESULTS is the first argument, else $OUT, else bench/results.
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
  SELECT=(-k "token_scores or kernel_score")
  JOBS=(tests/test_kernels.py)  # one run: a process per case would spend the dry run importing torch
  CHECK_ARGS=(--device cpu --tokens 512 --batches 1 2 --repeats 1)
else
  unset TRITON_INTERPRET
  SELECT=(-m gpu)
  JOBS=()  # the gpu-marked cases, collected below
  CHECK_ARGS=(--device cuda --tokens 32768 --batches 1 16 --repeats 20)
fi

"$PYTHON" - <<'PY' | tee "$RESULTS/gpu_env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

status=0
mkdir -p "$RESULTS/gpu_tests"
if (( ${#JOBS[@]} == 0 )); then
  mapfile -t JOBS < <("$PYTHON" -m pytest --collect-only -q "${SELECT[@]}" tests/test_kernels.py -p no:cacheprovider \
                      -o addopts="" | grep '::')
fi
PARALLEL="${PARALLEL:-$(nproc)}"
for index in "${!JOBS[@]}"; do
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || status=$?; done
  job="${JOBS[$index]}"
  { echo "$job"; timeout 200 "$PYTHON" -m pytest -q -rs "${SELECT[@]}" "$job" -p no:cacheprovider -o addopts=""; } \
    > "$RESULTS/gpu_tests/$(printf %03d "$index").txt" 2>&1 &
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || status=$?; done
summary="$("$PYTHON" - "$RESULTS/gpu_tests" "$PARALLEL" <<'PY'
import collections, pathlib, re, sys
counts, runs = collections.Counter(), 0
for report in sorted(pathlib.Path(sys.argv[1]).glob("*.txt")):
    runs += 1
    lines = report.read_text().strip().splitlines()
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]) if len(lines) > 1 else []
    counts.update({kind: int(n) for n, kind in found} if found else {f"unfinished ({lines[0]})": 1})
print(", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" in {runs} pytest run(s), {sys.argv[2]} at a time")
PY
)"
echo "tests: $summary"
timeout 240 "$PYTHON" bench/gpu_check.py "${CHECK_ARGS[@]}" --tests "$summary" --out "$RESULTS/gpu_check.md" \
  || status=$?
exit "$status"
