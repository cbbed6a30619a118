#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set up the environments (.venv, and .venv-vllm
# for tests/test_vllm.py), install the real servers the tests talk to (Prometheus, from
# Debian's packages), then pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k codec`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "note: prometheus/promtool not installed and no root apt-get; the Prometheus tests will fail" >&2
  fi
fi

# redis-server backs the Redis store's tests (tests/test_store_redis*.py, tests/test_replicas*.py).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: redis-server not installed and no root apt-get; the Redis store tests are skipped" >&2
  fi
fi

# buildah and debootstrap build and run the CPU image for tests/test_image.py (scripts/build_image.sh).
if ! command -v buildah >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null
  else
    echo "note: buildah/debootstrap not installed and no root apt-get; the image test is skipped" >&2
  fi
fi

# Triton kernels run on the CPU under the interpreter where no GPU is present.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# tests/test_vllm.py needs vLLM, whose transformers pin differs from .venv's: it runs in its own
# environment (scripts/setup_vllm.sh) in a second invocation, after the main suite passed.
.venv/bin/python -m pytest -q -ra --ignore=tests/test_vllm.py "$@"
scripts/setup_vllm.sh >/dev/null
# Exit status 5 means the extra arguments (e.g. -k codec) selected none of its tests.
status=0
.venv-vllm/bin/python -m pytest -q -ra tests/test_vllm.py "$@" || status=$?
[ "$status" = 5 ] && status=0
exit "$status"
