#!/usr/bin/env bash
# The README "run" command: set up the environment, then run the demo. SmolLM2 answers a
# needle-in-a-haystack question over a ~4k-token context whose KV cache lives, compressed, in
# an svdq server. Without --address the demo starts a CPU server on a free loopback port and
# stops it at the end; with --address HOST:PORT (plus --token, --tls-ca, --tls-cert/--tls-key)
# it uses a running server. Every other option: scripts/demo.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m svdq_client.demo "$@"
