# syntax=docker/dockerfile:1
# svdq server image.
#
# GPU nodes (default): CUDA runtime base, the CUDA build of torch (PyPI's Linux wheels of
# torch 2.13 are built for CUDA 13 and bring their CUDA libraries) and Triton.
#   docker build -t svdq:gpu .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 svdq:gpu
# CPU variant (laptops, CI, CPU-only nodes): a plain Ubuntu base and the CPU build of torch.
#   docker build -t svdq:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg EXTRAS=redis .
#   docker run -p 50051:50051 -p 9464:9464 -e SVDQ_DEVICE=cpu svdq:cpu
# Both variants use the same Ubuntu release, so the virtual environment built in the first
# stage runs unchanged on the second.

ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The base image tag pins the Ubuntu release; Ubuntu removes superseded package versions
# from its archive, so exact version pins here would break every rebuild after an update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python-base AS builder
# PyPI's torch 2.13.0 Linux wheel is the CUDA 13 build, matching the default base; the CPU
# variant points this at https://download.pytorch.org/whl/cpu.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# The version the project is tested with.
ARG TORCH_VERSION=2.13.0
# pyproject extras to install: "gpu" brings the Triton kernels, "redis" the Redis store client
# (--store redis://...); "redis" alone for the CPU variant.
ARG EXTRAS="gpu redis"
# Offline or proxied builds only (scripts/build_image.sh): a CA bundle and a local wheel
# directory, both bind-mounted into the build; empty by default, and ARGs never reach the image.
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependency layers first: they change far less often than the source below.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml /src/pyproject.toml
COPY deploy/docker/pyproject_requirements.py /tmp/pyproject_requirements.py
# EXTRAS is a space-separated list: left unquoted so that it splits into arguments.
RUN python /tmp/pyproject_requirements.py /src/pyproject.toml ${EXTRAS} > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md /src/README.md
COPY svdq /src/svdq
COPY server /src/server
COPY client /src/client
COPY proto /src/proto
# --no-deps: every dependency is already installed above, so this layer holds only svdq.
RUN pip install --no-deps /src

FROM python-base AS runtime
# A numeric UID so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --home-dir /home/svdq --create-home --shell /usr/sbin/nologin svdq
COPY --from=builder /opt/venv /opt/venv
# Triton compiles kernels on first use; its cache lives in the writable home.
ENV PATH=/opt/venv/bin:$PATH \
    TRITON_CACHE_DIR=/home/svdq/.triton \
    SVDQ_HOST=0.0.0.0 \
    SVDQ_PORT=50051 \
    SVDQ_METRICS_PORT=9464 \
    SVDQ_LOG_FORMAT=json
# Build-time smoke test: both console scripts import and parse their options.
RUN svdq-server --help > /dev/null && svdq-health --help > /dev/null

USER 10001:10001
WORKDIR /home/svdq
# 50051: gRPC API (svdq.v1.KVCache, health, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# Warm-up (device probing, first kernels) can take a while on a cold GPU; start-period
# keeps those seconds from counting as failures. With TLS on, override this with
# `svdq-health --tls-ca CA --server-name NAME` (see docs/operations.md).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["svdq-health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["svdq-server"]
