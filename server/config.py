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
from svdq_client.types import Profile

from svdq.codec import Basis
from svdq.errors import InvalidInputError

from .engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, DEVICES, EngineConfig
from .store import EVICTION_POLICIES

ENV_PREFIX = "SVDQ_"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


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
    max_message_bytes: int = 64 << 20
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_batch: int = DEFAULT_MAX_BATCH
    grace_seconds: float = 30.0
    torch_threads: int = 0
    attention_cache_bytes: int = 1 << 30

    def engine_config(self) -> EngineConfig:
        return EngineConfig(device=self.device, store_bytes=self.store_bytes, eviction=self.eviction,
                            ttl_seconds=self.ttl_seconds, max_tokens=self.max_tokens, max_batch=self.max_batch,
                            attention_cache_bytes=self.attention_cache_bytes)


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
    ("max-message-bytes", parse_bytes, "largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED", {}),
    ("max-tokens", int, "most tokens one sequence may hold", {}),
    ("max-batch", int, "most entries one Attend call may have", {}),
    ("grace-seconds", float, "on SIGTERM, how long in-flight calls may take to finish", {}),
    ("torch-threads", int, "intra-op threads of each torch computation; 0 keeps torch's default (all cores). "
     "On CPUs shared with other work, 1 avoids threads waiting for each other at every parallel region", {}),
    ("attention-cache-bytes", parse_bytes, "memory for tensors attention derives from stored keys and keeps between "
     "calls (unpacked codes, score latents, kernel layouts), least recently used first out; on top of --store-bytes. "
     "0 keeps only the layer last served", {}),
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
    if settings.workers < 1 or settings.max_tokens < 1 or settings.max_batch < 1:
        problems.append("--workers, --max-tokens and --max-batch must be >= 1")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("--tls-cert and --tls-key must be given together")
    if settings.tls_client_ca and not settings.tls_cert:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
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
