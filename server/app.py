"""Assemble and run the server: engine, gRPC (service, health, reflection), metrics, TLS.

Start-up order: engine and metrics, then the gRPC server (health NOT_SERVING), a warm-up
request through the engine (first compression and attention pay one-off costs such as
kernel compilation), then health SERVING and ``svdq_ready 1``. On stop: health
NOT_SERVING while calls are still served for ``drain_seconds`` (load balancers and probes
see it and stop routing here before the port closes), then no new calls, and in-flight
calls get ``grace_seconds`` to finish.

With a shared store (``--store redis://...``) health also follows the store: every
``store_check_seconds`` the server pings it, turns NOT_SERVING while it does not answer (calls
then fail with UNAVAILABLE anyway) and SERVING again when it does.

With ``--ttl-seconds``, one job drops expired sequences every :func:`expiry_interval` (an
access never serves an expired sequence by itself; the job makes the totals, GetServerInfo and
the metrics follow the TTL without traffic, and keeps those reads free of expiry work).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from svdq_proto.svdq.v1 import kvcache_pb2, kvcache_pb2_grpc

from svdq import __version__
from svdq.errors import UnavailableError
from svdq.quant import CPU_BFLOAT16_ENV, cpu_bfloat16_choice

from .auth import TokenAuthenticator
from .config import Settings, load_profiles
from .engine import Engine, EngineConfig, UploadHeader, resolve_device
from .interceptors import ServiceInterceptor
from .metrics import Metrics
from .servicer import KVCacheServicer
from .store import open_store

log = logging.getLogger(__name__)

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KVCache"].full_name
WARMUP_TENANT = "warmup"
#: the expiry job runs at least this often, however long the TTL
MAX_EXPIRY_INTERVAL_SECONDS = 10.0


# mallopt's parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: largest M_MMAP_THRESHOLD the mallopt(3) manual allows on 64-bit (HEAP_MAX_SIZE / 2): what older
#: glibc releases accept; glibc 2.36 (Debian 12) accepts larger ones, and the server logs what it set
_MMAP_THRESHOLD_MAX = 32 << 20


def tune_malloc(arenas: int, trim_bytes: int, mmap_bytes: int | None = None) -> dict[str, int]:
    """Set glibc malloc's arena limit (``arenas``) and how much freed memory it keeps for
    reuse before returning it to the system (``trim_bytes``); allocations up to ``mmap_bytes``
    (default ``trim_bytes``) then come from the heap instead of their own mapping, or up to
    32 MiB where glibc refuses more (older releases). 0 leaves either at glibc's default.
    Returns what was set. Threads that already have an arena keep it, so this runs before the
    server starts its threads. Elsewhere than glibc (musl, macOS) it sets nothing.

    Why: with glibc's defaults, threads get their own arenas, and memory freed at the top of
    an arena (or allocated as its own mapping, as most tensors of a layer are) goes back to
    the system, so the worker that compresses a layer faults in fresh zeroed pages for every
    tensor although another worker has just freed as much. Both settings keep that memory in
    use: they took the page faults of a 4-layer, 4,096-token upload from ~10,000 to ~0, and the
    server's CPU for it from ~1.5x to ~1.25x the compression alone (``bench/service.py --part
    uploads``; ``perf`` had ``clear_page_erms`` at 20% of the server's CPU before). A mapping
    threshold of 32 MiB still mapped every tensor of that size or more, such as a Llama-3-8B
    layer's float32 keys from 8k tokens on, and faulted its pages in on every call
    (``bench/malloc.py``)."""
    if platform.libc_ver()[0] != "glibc":
        return {}
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return {}
    done = {}
    if arenas > 0 and mallopt(_M_ARENA_MAX, arenas) == 1:
        done["arenas"] = arenas
    if trim_bytes > 0:
        if mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1:
            done["trim_bytes"] = trim_bytes
        mapped = trim_bytes if mmap_bytes is None else mmap_bytes
        for threshold in (mapped, min(mapped, _MMAP_THRESHOLD_MAX)):
            if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
                done["mmap_bytes"] = threshold
                break
    return done


def expiry_interval(ttl_seconds: float) -> float:
    """Seconds between two runs of the expiry job: a quarter of the TTL, at most
    :data:`MAX_EXPIRY_INTERVAL_SECONDS`, so the totals lag expiry by a small part of the TTL."""
    return min(MAX_EXPIRY_INTERVAL_SECONDS, ttl_seconds / 4)


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Server channel options."""
    def ms(seconds: float) -> int:
        # gRPC reads INT_MAX as "never"; the options' 0 means the same.
        return int(seconds * 1000) if seconds > 0 else 2**31 - 1

    return [
        # Uploads arrive in chunks (4 MiB by default); the limit bounds one message, not a sequence.
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Workers keep long-lived channels: ping idle connections so dead peers are noticed,
        # and accept client pings every 10 s without treating them as abuse.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Pings more often than that are strikes; two strikes close the connection (GOAWAY).
        ("grpc.http2.max_ping_strikes", 2),
        # One connection cannot open streams without bound, idle connections go, and every
        # connection is recycled after its age (calls in flight get the grace), so a call or
        # stream that never finishes cannot hold memory forever.
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", int(settings.connection_age_grace_seconds * 1000)),
        # gRPC shares ports by default; a second server on a taken port must fail, not split traffic.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings; mutual TLS when a client CA is configured."""
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class SvdqServer:
    """The running service. ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None) -> None:
        self.settings = settings
        environ = environ or {}
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if settings.cpu_bfloat16 != cpu_bfloat16_choice():
            # --cpu-bfloat16 on the command line: the library reads the variable it mirrors
            os.environ[CPU_BFLOAT16_ENV] = settings.cpu_bfloat16
        self.malloc = tune_malloc(settings.malloc_arenas, settings.malloc_trim_bytes)
        self.metrics = Metrics()
        self.authenticator = TokenAuthenticator.from_sources(settings.tokens_file, environ.get("SVDQ_TOKENS"))
        engine_config = replace(settings.engine_config(), tenant_quotas=self.authenticator.quotas)
        self.store = open_store_from(settings, engine_config, self.metrics)
        self.engine = Engine(engine_config, load_profiles(settings.profiles_file), metrics=self.metrics,
                             store=self.store)
        self.metrics.bind_engine(self.engine, __version__)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="svdq-engine")
        self.health = None
        self.server = None
        self.port = 0
        self.metrics_port = 0
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._store_watch: asyncio.Task | None = None
        self._expiry: asyncio.Task | None = None

    async def start(self) -> None:
        # grpc.aio objects bind to the running event loop, so they are made here.
        self._stopped = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(self.authenticator, self.metrics)],
            options=channel_options(self.settings),
        )
        kvcache_pb2_grpc.add_KVCacheServicer_to_server(
            KVCacheServicer(self.engine, self.executor, self.settings.max_message_bytes,
                            inline_attend_tokens=self.settings.inline_attend_tokens), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self._set_serving(False)
        await self.server.start()
        started = time.perf_counter()
        try:
            if self.settings.metrics_port:
                self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.host)
            await asyncio.get_running_loop().run_in_executor(self.executor, self._warm_up)
        except BaseException:
            await self.stop(grace=0, drain=0)
            raise
        store_up = await asyncio.get_running_loop().run_in_executor(self.executor, self._store_answers)
        await self._set_serving(store_up is None)
        if self.store.backend != "memory":
            if store_up is not None:
                log.warning(json.dumps({"event": "store down", "store": store_description(self.settings),
                                        "error": store_up}))
            self._store_watch = asyncio.create_task(self._watch_store(store_up is None))
        if self.store.policy.ttl_seconds:
            self._expiry = asyncio.create_task(self._expire_periodically(expiry_interval(self.store.policy.ttl_seconds)))
        log.info(json.dumps({
            "event": "serving", "address": f"{self.settings.host}:{self.port}", "device": str(self.engine.device),
            "store": store_description(self.settings),
            "tls": credentials is not None, "mutual_tls": bool(self.settings.tls_client_ca),
            "tenants": len(self.authenticator.tenants) if self.authenticator.enabled else "auth off",
            "metrics_port": self.metrics_port or "off", "torch_threads": torch.get_num_threads(),
            "malloc": self.malloc or "default", "warmup_ms": round(1e3 * (time.perf_counter() - started), 1),
            "profiles": [profile.name for profile in self.engine.list_profiles()],
        }))

    def _warm_up(self) -> None:
        """One small upload, attention and delete through the engine, off the books."""
        from svdq.api.types import Profile

        profile = Profile("warmup", 1, 1, 64)
        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(1, 96, 1, 64, generator=generator)
        header = UploadHeader("warmup", "warmup", "warmup", 96, "pre_rope", True, True)
        engine = Engine(self.engine.config.__class__(device=str(self.engine.device), store_bytes=1 << 24),
                        [profile])
        engine.upload(WARMUP_TENANT, header, keys, keys)
        engine.attend(WARMUP_TENANT, [("warmup", 0)], torch.randn(1, 1, 64, generator=generator).to(self.engine.device))

    def _store_answers(self) -> str | None:
        """None when the store answers, else what is wrong."""
        try:
            self.store.ping()
        except UnavailableError as exc:
            return str(exc)
        return None

    async def _watch_store(self, serving: bool) -> None:
        """Health follows the store backend: NOT_SERVING while it does not answer."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(self.settings.store_check_seconds)
            try:
                problem = await loop.run_in_executor(self.executor, self._store_answers)
            except RuntimeError:  # the executor shut down: the server is stopping
                return
            if (problem is None) != serving and not self._stopping:
                serving = problem is None
                await self._set_serving(serving)
                log.warning(json.dumps({"event": "store up" if serving else "store down", "store":
                                        store_description(self.settings), **({"error": problem} if problem else {})}))

    async def _expire_periodically(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(self.executor, self.store.expire)
            except UnavailableError as exc:  # the store watch reports it; the next run tries again
                log.debug("expiry skipped: %s", exc)
            except Exception:  # noqa: BLE001 - the job must outlive one failed run
                if self._stopping:
                    return  # the executor shut down under it
                log.exception("the expiry job failed; it runs again in %.1f s", interval)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result
        self.metrics.set_ready(serving)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Answer NOT_SERVING to health checks while still serving for ``drain`` seconds, then
        refuse new calls, let in-flight ones finish within ``grace`` seconds, and close."""
        if self.server is None or self._stopped.is_set() or self._stopping:
            return
        self._stopping = True  # a second SIGTERM during the drain must not start another stop
        grace = self.settings.grace_seconds if grace is None else grace
        drain = self.settings.drain_seconds if drain is None else drain
        log.info(json.dumps({"event": "stopping", "drain_seconds": drain, "grace_seconds": grace}))
        for task in (self._store_watch, self._expiry):
            if task is not None:
                task.cancel()
        await self._set_serving(False)
        if drain > 0:
            await asyncio.sleep(drain)
        await self.server.stop(grace)
        self.metrics.shutdown()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        self._stopped.set()
        log.info(json.dumps({"event": "stopped"}))

    async def wait(self) -> None:
        if self._stopped is not None:
            await self._stopped.wait()


def open_store_from(settings: Settings, engine_config: EngineConfig, metrics: Metrics):
    """The store backend the settings name, with the engine's limits and device."""
    options = {}
    if settings.store != "memory":
        from .store_redis import read_password

        options = {"password": read_password(settings.store_password_file), "tls_ca": settings.store_tls_ca,
                   "cache_bytes": settings.store_cache_bytes, "timeout": settings.store_timeout_seconds}
    return open_store(settings.store, engine_config.store_policy(), device=resolve_device(settings.device),
                      on_evict=metrics.evicted, observe=metrics.store_operation, **options)


def store_description(settings: Settings) -> str:
    """The store for logs: never a password (none is allowed in the URL)."""
    if settings.store == "memory":
        return "memory"
    from .store_redis import redacted

    return redacted(settings.store)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
