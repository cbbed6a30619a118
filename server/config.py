"""Server settings: one typed object, filled from the command line and ``SVDQ_*`` variables.

Every option ``--some-option`` has the environment equivalent ``SVDQ_SOME_OPTION``; a
command-line value wins over the environment, which wins over the default. Settings are
read when the server starts (:func:`parse_settings`), never at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from svdq.api.types import Profile
from svdq.attention import PRECISIONS
from svdq.codec import DEFAULT_MAX_CHANNELS, DEFAULT_MAX_TOKENS, DEFAULT_MAX_WORK_BYTES, Basis
from svdq.derived import DEFAULT_LIMIT_BYTES
from svdq.errors import InvalidInputError
from svdq.quant import CPU_BFLOAT16_CHOICES, normalized_cpu_bfloat16

from .engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_OPEN_UPLOADS,
    DEFAULT_MAX_PROFILE_BYTES,
    DEFAULT_STAGING_TENANT_SHARE,
    DEFAULT_UPLOAD_IDLE_SECONDS,
    DEVICES,
    EngineConfig,
)
from .store import EVICTION_POLICIES

ENV_PREFIX = "SVDQ_"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def _boolean(text: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case) -> bool."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512MB"``, ``"1000000"`` -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected a byte size such as 4GiB, 512MB or 1000000, got {text!r}")
    unit = (match.group(2) or "").upper().rstrip("B")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start (see ``svdq-server --help``)."""

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464
    device: str = "auto"
    store_bytes: int = 4 << 30
    eviction: str = "lru"
    ttl_seconds: float = 0.0
    profiles_file: str | None = None
    tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    workers: int = 8
    inline_attend_tokens: int = 16384
    compress_threads: int = 2
    max_message_bytes: int = 64 << 20
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_batch: int = DEFAULT_MAX_BATCH
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_work_bytes: int = DEFAULT_MAX_WORK_BYTES
    max_profile_bytes: int = DEFAULT_MAX_PROFILE_BYTES
    staging_bytes: int = 0
    staging_tenant_share: float = DEFAULT_STAGING_TENANT_SHARE
    max_open_uploads: int = DEFAULT_MAX_OPEN_UPLOADS
    upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS
    max_concurrent_streams: int = 100
    max_connection_idle_seconds: float = 300.0
    max_connection_age_seconds: float = 3600.0
    connection_age_grace_seconds: float = 120.0
    grace_seconds: float = 30.0
    torch_threads: int = 0
    malloc_arenas: int = 1
    malloc_trim_bytes: int = 256 << 20
    attention_cache_bytes: int = DEFAULT_LIMIT_BYTES
    attention_precision: str = "auto"
    cpu_bfloat16: str = "auto"
    tenant_quota_bytes: int = 0
    reflection: bool = True
    drain_seconds: float = 5.0
    store: str = "memory"
    store_password_file: str | None = None
    store_tls_ca: str | None = None
    store_cache_bytes: int = 1 << 30
    store_timeout_seconds: float = 10.0
    store_check_seconds: float = 2.0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(device=self.device, store_bytes=self.store_bytes, eviction=self.eviction,
                            ttl_seconds=self.ttl_seconds, max_tokens=self.max_tokens, max_batch=self.max_batch,
                            max_channels=self.max_channels, max_work_bytes=self.max_work_bytes,
                            max_profile_bytes=self.max_profile_bytes,
                            staging_bytes=self.staging_bytes or None, staging_tenant_share=self.staging_tenant_share,
                            max_open_uploads=self.max_open_uploads, upload_idle_seconds=self.upload_idle_seconds,
                            attention_cache_bytes=self.attention_cache_bytes,
                            attention_precision=None if self.attention_precision == "auto" else self.attention_precision,
                            tenant_quota_bytes=self.tenant_quota_bytes, compress_threads=self.compress_threads)


# (option, type, help); defaults come from Settings.
_OPTIONS: tuple[tuple[str, object, str, dict], ...] = (
    ("host", str, "address to listen on (gRPC and metrics)", {}),
    ("port", int, "gRPC port", {}),
    ("metrics-port", int, "Prometheus /metrics HTTP port; 0 turns metrics off", {}),
    ("device", str, "where compressed sequences live and attention runs: auto = CUDA if present, else CPU",
     {"choices": DEVICES}),
    ("store-bytes", parse_bytes, "byte budget of stored compressed keys and values (e.g. 4GiB)", {}),
    ("eviction", str, "when the budget is full: evict least recently used sequences, or refuse "
     "with RESOURCE_EXHAUSTED", {"choices": EVICTION_POLICIES}),
    ("ttl-seconds", float, "sequences idle this long are dropped; 0 = never", {}),
    ("profiles-file", str, "YAML/JSON file of model profiles registered at start", {}),
    ("tokens-file", str, "YAML/JSON file 'tenants: {name: [tokens]}'; with it (or SVDQ_TOKENS="
     "'tenant=token,...') every call needs 'authorization: Bearer <token>'", {}),
    ("tls-cert", str, "PEM server certificate (chain); enables TLS together with --tls-key", {}),
    ("tls-key", str, "PEM private key of --tls-cert", {}),
    ("tls-client-ca", str, "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)", {}),
    ("log-format", str, "log line format", {"choices": ("text", "json")}),
    ("log-level", str.upper, "logging level (any case)", {"choices": ("DEBUG", "INFO", "WARNING", "ERROR")}),
    ("workers", int, "threads running engine work (compression, attention) in parallel", {}),
    ("inline-attend-tokens", int, "an Attend whose entries hold at most this many tokens together runs on the "
     "event loop itself instead of a worker thread when it is the only call in flight and the store is 'memory': "
     "it saves the hop to a worker and back (the Attend RPC's batch-1 p50 was 0.3-1.1 ms lower on a 2-core CPU, "
     "docs/service.md Round 11), "
     "and blocks other calls for at most that small call's time; 0 sends every Attend to the workers (under many "
     "concurrent clients 0 served up to 1.5x the calls per second here)", {}),
    ("compress-threads", int, "threads that compress uploaded layers, shared by all uploads: a layer compresses "
     "while the upload's next chunks arrive, and up to this many layers at once (each holding its compression's "
     "working memory, at most --max-work-bytes); 0 compresses each layer in the call that received its last chunk, "
     "one after another. On 2 cores with one torch thread two layers at once took 0.79x the time of one after "
     "another; with torch's own 2 threads it measured even with 0 (docs/quality.md, Round 7)", {}),
    ("max-message-bytes", parse_bytes, "largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED", {}),
    ("max-tokens", int, "most tokens one sequence may hold", {}),
    ("max-batch", int, "most entries one Attend call may have", {}),
    ("max-channels", int, "most kv_heads * head_dim of any keys compressed, loaded or described by a profile "
     "(fitting a basis costs O(channels^3) whatever the token count)", {}),
    ("max-work-bytes", parse_bytes, "most estimated working memory of compressing or reconstructing one layer; "
     "larger requests get RESOURCE_EXHAUSTED before any work", {}),
    ("max-profile-bytes", parse_bytes, "most bytes of shared bases the profiles one tenant registers over RPC may "
     "hold in memory together, counting profile streams in progress (float32; a Llama-3-8B-sized profile's key "
     "bases take ~134 MB); a profile past it gets RESOURCE_EXHAUSTED before its bases arrive. Profiles travel one "
     "layer's basis per message, so this, not --max-message-bytes, bounds them", {}),
    ("staging-bytes", parse_bytes, "raw data all uploads in progress may stage together (16-bit size reserved "
     "at the start, float32 chunks charged at their real size); 0 = twice --store-bytes", {}),
    ("staging-tenant-share", float, "fraction of --staging-bytes and of --max-open-uploads one tenant may hold", {}),
    ("max-open-uploads", int, "most uploads in progress at once", {}),
    ("upload-idle-seconds", float, "an upload stream without a chunk for this long is closed "
     "(DEADLINE_EXCEEDED) and its staged data dropped", {}),
    ("max-concurrent-streams", int, "most calls in flight on one client connection (HTTP/2 streams)", {}),
    ("max-connection-idle-seconds", float, "connections without a call for this long are closed (GOAWAY); "
     "0 = never", {}),
    ("max-connection-age-seconds", float, "connections are asked to reconnect (GOAWAY) after this long, "
     "so that no call or stalled stream lives forever; 0 = never", {}),
    ("connection-age-grace-seconds", float, "calls in flight on a connection past its age get this long "
     "before it is closed", {}),
    ("grace-seconds", float, "on SIGTERM, how long in-flight calls may take to finish", {}),
    ("torch-threads", int, "intra-op threads of each torch computation; 0 keeps torch's default (all cores). "
     "On CPUs shared with other work, 1 avoids threads waiting for each other at every parallel region", {}),
    ("malloc-arenas", int, "glibc malloc arenas of the server process (M_ARENA_MAX); 0 keeps glibc's default (one "
     "per thread, up to 8 per core). With 1 the engine's workers reuse the memory each other freed", {}),
    ("malloc-trim-bytes", parse_bytes, "freed memory glibc malloc keeps for reuse before returning it to the system "
     "(M_TRIM_THRESHOLD; allocations up to this size then come from the heap, not their own mapping: "
     "M_MMAP_THRESHOLD, at most 32 MiB where glibc accepts no more); 0 keeps glibc's adaptive default. Returned "
     "memory is faulted in again, zeroed page by page, by the next compression: with glibc's defaults ~10,000 page "
     "faults per 4-layer, 4,096-token upload, a quarter of the compression's own CPU time. Long contexts may want "
     "more: a Llama-3-8B layer's float32 keys take 128 MiB at 32k tokens (bench/malloc.py)",
     {}),
    ("attention-cache-bytes", parse_bytes, "memory for tensors attention derives from stored keys and keeps between "
     "calls (unpacked codes, score latents, kernel layouts), least recently used first out; on top of --store-bytes. "
     "0 keeps only the layer last served", {}),
    ("attention-precision", str, "operands of the torch (CPU) attention path's key products: bfloat16 (float32 "
     "accumulation; about 2x faster, adds ~1-2%% of the compression's own error), float32 (exact), float16 "
     "(float32 products, the keys a sequence keeps rounded to float16: twice as many sequences keep them under "
     "--attention-cache-bytes, adds ~0.7%% of the compression's error; docs/attention.md Round 11), or auto = "
     "bfloat16 where --cpu-bfloat16 uses bfloat16 products, else float32; the Triton (GPU) kernels do not use it",
     {"choices": ("auto",) + PRECISIONS}),
    ("cpu-bfloat16", normalized_cpu_bfloat16, "bfloat16 products on the CPU (the codec's covariance, allocation sample and narrow "
     "channels' projection; attention's auto precision): auto = where oneDNN multiplies bfloat16 natively and one "
     "product measured at start runs >= 1.25x the float32 rate (logged; an AVX512-BF16 Xeon without AMX ran them "
     "at 0.5x), on = wherever native, off = never (pins blob bits across servers; sizes and quality do not depend "
     "on it). The library reads the same variable", {"choices": CPU_BFLOAT16_CHOICES}),
    ("tenant-quota-bytes", parse_bytes, "stored bytes (serialized keys and values) each tenant may hold unless the "
     "tokens file gives it its own quota_bytes; at its quota a tenant gets RESOURCE_EXHAUSTED. 0 = no quota: the "
     "store budget bounds it, and LRU eviction takes only from tenants over an equal share of the budget", {}),
    ("reflection", _boolean, "serve gRPC server reflection (grpcurl, grpcui list and describe the API without the "
     ".proto); 'false' hides the API description from anyone who can connect", {}),
    ("drain-seconds", float, "on SIGTERM, how long health answers NOT_SERVING while calls are still served, so "
     "load balancers and probes stop sending new ones before the listener closes; then --grace-seconds", {}),
    ("store", str, "where sequences and tenant profiles are stored: 'memory' (this process; lost when it stops) "
     "or redis://host:port/db (rediss:// with TLS): shared by every replica that names it, acknowledged writes "
     "survive restarts (with Redis AOF persistence). No password in it: see --store-password-file", {}),
    ("store-password-file", str, "file holding the Redis password (a Kubernetes/Docker secret)", {}),
    ("store-tls-ca", str, "PEM CA bundle that signed the Redis server certificate (rediss://); default: system roots",
     {}),
    ("store-cache-bytes", parse_bytes, "with a Redis store: serialized bytes of decoded sequences this replica keeps "
     "in memory (least recently used out; a sequence not kept is loaded from Redis when next served)", {}),
    ("store-timeout-seconds", float, "with a Redis store: longest wait for one Redis command before the call "
     "answers UNAVAILABLE", {}),
    ("store-check-seconds", float, "with a Redis store: how often health checks that Redis answers (NOT_SERVING "
     "while it does not)", {}),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``svdq-server`` argument parser; every option documents its env variable and default."""
    parser = argparse.ArgumentParser(
        prog="svdq-server",
        description="gRPC service that stores LLM key/value caches compressed with SVDq and serves attention "
                    "over them. Every option can also be set by the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Settings()
    for option, kind, text, extra in _OPTIONS:
        attribute = option.replace("-", "_")
        env = ENV_PREFIX + attribute.upper()
        parser.add_argument(f"--{option}", type=kind, default=getattr(defaults, attribute),
                            help=f"{text} [env {env}]", **extra)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` over ``environ`` (``SVDQ_*``) over defaults; invalid values exit
    with a usage message naming the option."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    env_args: list[str] = []
    for option, _, _, _ in _OPTIONS:
        value = environ.get(ENV_PREFIX + option.replace("-", "_").upper())
        if value not in (None, ""):
            env_args += [f"--{option}", value]
    namespace = parser.parse_args(env_args + list(sys.argv[1:] if argv is None else argv))
    settings = Settings(**vars(namespace))
    problems = []
    if not 0 < settings.port < 65536:
        problems.append(f"--port must be in 1..65535, got {settings.port}")
    if not 0 <= settings.metrics_port < 65536:
        problems.append(f"--metrics-port must be in 0..65535, got {settings.metrics_port}")
    if settings.store_bytes <= 0:
        problems.append(f"--store-bytes must be > 0, got {settings.store_bytes}")
    if settings.ttl_seconds < 0:
        problems.append(f"--ttl-seconds must be >= 0, got {settings.ttl_seconds}")
    if settings.torch_threads < 0:
        problems.append(f"--torch-threads must be >= 0 (0 = torch's default), got {settings.torch_threads}")
    if not 0 <= settings.compress_threads <= 64:
        problems.append(f"--compress-threads must be in 0..64 (0 = compress in the receiving call), got "
                        f"{settings.compress_threads}")
    if settings.malloc_arenas < 0:
        problems.append(f"--malloc-arenas must be >= 0 (0 = glibc's default), got {settings.malloc_arenas}")
    if not 0 <= settings.malloc_trim_bytes < 1 << 31:
        problems.append(f"--malloc-trim-bytes must be in 0..2GiB-1 (0 = glibc's default), got "
                        f"{settings.malloc_trim_bytes}")
    if settings.inline_attend_tokens < 0:
        problems.append(f"--inline-attend-tokens must be >= 0 (0 = every Attend on a worker thread), got "
                        f"{settings.inline_attend_tokens}")
    if settings.drain_seconds < 0 or settings.tenant_quota_bytes < 0:
        problems.append("--drain-seconds and --tenant-quota-bytes must be >= 0")
    if min(settings.workers, settings.max_tokens, settings.max_batch, settings.max_channels, settings.max_work_bytes,
           settings.max_open_uploads, settings.max_concurrent_streams) < 1:
        problems.append("--workers, --max-tokens, --max-batch, --max-channels, --max-work-bytes, --max-open-uploads "
                        "and --max-concurrent-streams must be >= 1")
    if settings.staging_bytes < 0:
        problems.append(f"--staging-bytes must be >= 0 (0 = twice --store-bytes), got {settings.staging_bytes}")
    if not 0 < settings.staging_tenant_share <= 1:
        problems.append(f"--staging-tenant-share must be in (0, 1], got {settings.staging_tenant_share}")
    if settings.upload_idle_seconds <= 0:
        problems.append(f"--upload-idle-seconds must be > 0, got {settings.upload_idle_seconds}")
    if min(settings.max_connection_idle_seconds, settings.max_connection_age_seconds,
           settings.connection_age_grace_seconds) < 0:
        problems.append("--max-connection-idle-seconds, --max-connection-age-seconds and "
                        "--connection-age-grace-seconds must be >= 0")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("--tls-cert and --tls-key must be given together")
    if settings.tls_client_ca and not settings.tls_cert:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if settings.store_timeout_seconds <= 0 or settings.store_check_seconds <= 0 or settings.store_cache_bytes < 0:
        problems.append("--store-timeout-seconds and --store-check-seconds must be > 0, --store-cache-bytes >= 0")
    if problems:
        parser.error("; ".join(problems))
    return settings


def read_config_file(path: str | Path, option: str) -> object:
    """Parse a configuration file given by ``option``: JSON when it ends in .json, else YAML."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {option} {path}: {exc}") from None
    return json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)


def load_profiles(path: str | None) -> list[Profile]:
    """Profiles from a YAML/JSON file: ``profiles: [{name, num_layers, kv_heads, head_dim,
    rope: {...}, codec: {...}, value_bits, value_group_size, value_codec: {...},
    cache_bits_per_element, basis_file}]`` (see :meth:`svdq_client.types.Profile.from_dict`).

    ``basis_file`` (relative to the profiles file) is a ``torch.save`` of a list with one
    ``{"mean", "components", "singular_values"}`` dict of float32 tensors per layer.
    """
    if not path:
        return []
    file = Path(path)
    loaded = read_config_file(file, "--profiles-file")
    entries = loaded.get("profiles") if isinstance(loaded, dict) else loaded
    if not isinstance(entries, list):
        raise InvalidInputError(f"--profiles-file {path} must hold a list 'profiles: [...]'")
    profiles = []
    for index, fields in enumerate(entries):
        if not isinstance(fields, dict):
            raise InvalidInputError(f"--profiles-file {path}: profiles[{index}] must be a mapping")
        bases = None
        if fields.get("basis_file"):
            bases = _load_bases(file.parent / fields["basis_file"])
        profiles.append(Profile.from_dict(fields, bases=bases))
    return profiles


def _load_bases(path: Path) -> tuple[Basis, ...]:
    try:
        layers = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise InvalidInputError(f"cannot load basis_file {path}: {exc}") from None
    try:
        return tuple(Basis(layer["mean"].float(), layer["components"].float(), layer["singular_values"].float())
                     for layer in layers)
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidInputError(f"basis_file {path} must be a list of {{mean, components, singular_values}} "
                                f"tensors per layer: {exc}") from None
