#!/usr/bin/env bash
# Build the CPU variant of the svdq image without a Docker engine, then start svdq-server
# from it and make one round trip (health, upload, attention).
#
#   scripts/build_image.sh [--no-smoke] [TAG]        # TAG defaults to localhost/svdq:cpu
#
# Needs root and Debian's `buildah` and `debootstrap` (apt-get install -y buildah debootstrap).
# No registry image can be pulled on the development machines, so the base is a Debian
# bookworm minbase made locally with debootstrap (once; kept as localhost/svdq-base:bookworm).
# The production Dockerfile is used unchanged: the CA bundle and the local wheel directory
# that this machine's pip is configured with (`pip config`: cert, find-links) are
# bind-mounted into the build and passed as the PIP_CERT / PIP_FIND_LINKS build arguments,
# so the CPU torch wheel comes from local disk. The build and the run use chroot isolation:
# `podman run` cannot set rlimits here, `buildah run --isolation chroot` can run the image.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=1
if [ "${1:-}" = "--no-smoke" ]; then smoke=0; shift; fi
tag=${1:-localhost/svdq:cpu}
base=localhost/svdq-base:bookworm
port=${SVDQ_IMAGE_SMOKE_PORT:-50651}

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_image.sh: $tool is missing (apt-get install -y buildah debootstrap)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "build_image.sh: needs root (buildah storage, debootstrap)" >&2; exit 2; }

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  root=$(mktemp -d /var/tmp/svdq-base.XXXXXX)
  echo "making $base with debootstrap (bookworm minbase) in $root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  container=$(buildah from scratch)
  buildah copy "$container" "$root" / >/dev/null
  buildah commit --rm "$container" "$base" >/dev/null
  rm -rf "$root"
fi

build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "EXTRAS=redis")
pip_setting() { python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*$1='\(.*\)'$/\1/p" | head -n 1; }
cert=$(pip_setting cert)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build_args+=(--volume "$cert:/run/svdq-build/ca.pem:ro" --build-arg PIP_CERT=/run/svdq-build/ca.pem)
fi
wheels=$(pip_setting find-links)
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  build_args+=(--volume "$wheels:/run/svdq-build/wheels:ro" --build-arg PIP_FIND_LINKS=/run/svdq-build/wheels)
fi

echo "building $tag"
buildah bud --isolation chroot --format docker --layers "${build_args[@]}" -t "$tag" . > >(tail -n 40 >&2)
echo "built $tag"
[ "$smoke" = 1 ] || exit 0

container=$(buildah from "$tag")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  buildah rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
log=$(mktemp /tmp/svdq-image-smoke.XXXXXX.log)
buildah run --isolation chroot "$container" -- \
  svdq-server --device cpu --host 127.0.0.1 --port "$port" --metrics-port 0 --store-bytes 64MiB >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  if buildah run --isolation chroot "$container" -- svdq-health --address "127.0.0.1:$port" >/dev/null 2>&1; then
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || { echo "svdq-server exited:" >&2; cat "$log" >&2; exit 1; }
  sleep 1
done
buildah run --isolation chroot "$container" -- svdq-health --address "127.0.0.1:$port"
# One round trip with the client the image ships, against the server it runs.
buildah run --isolation chroot "$container" -- python -c "
import torch
from svdq_client import KVCacheClient, Profile
with KVCacheClient('127.0.0.1:$port') as client:
    client.register_profile(Profile('smoke', 1, 2, 64))
    keys = torch.randn(1, 256, 2, 64)
    info = client.upload('smoke', 'smoke', keys, torch.randn(1, 256, 2, 64))
    result = client.attend(torch.randn(1, 2, 64), [('smoke', 0)])
    assert result.output.shape == (1, 2, 64) and bool(torch.isfinite(result.output).all())
    print(f'round trip: {info.num_tokens} tokens stored, key ratio {info.key_compression_ratio:.2f}x, attention ok')
"
echo "image smoke test passed: $tag"
