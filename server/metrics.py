"""Prometheus metrics of the server (names and labels are a contract: docs/CONTRACTS.md).

Everything lives in one registry per :class:`Metrics` so that tests can run several servers
in one process. No label value is ever chosen by a tenant: the metrics port needs no token,
and a label per tenant-registered profile would let any tenant grow every scrape without
bound. Only the operator's profiles (``--profiles-file``) appear by name; every profile a
tenant registered over RPC is counted under :data:`TENANT_PROFILE_LABEL`. Store occupancy and device memory are read when Prometheus scrapes, from
the store itself, so the gauges can never drift from the truth.
"""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from svdq.derived import DERIVED
from svdq.errors import UnavailableError

log = logging.getLogger(__name__)

RATIO_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32, 64)
BITS_BUCKETS = (0.5, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 32)
ERROR_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
#: ``profile`` label of every profile registered over RPC
TENANT_PROFILE_LABEL = "tenant"
#: ``profile`` label of Compress calls without a profile
NO_PROFILE_LABEL = "none"
#: ``operation`` labels of the store metrics
STORE_OPERATIONS = ("get", "peek", "insert", "update", "delete")


class _StoreCollector:
    """Scrape-time gauges read from the engine's store and the device."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        store = self.engine.store
        # Replicas of one shared store all report its figures: dashboards join on this to
        # count each store once (max by store), not once per replica.
        info = GaugeMetricFamily("svdq_store_info", "The store this server uses (always 1): backend and store, "
                                 "the same for every replica sharing it.", labels=["backend", "store"])
        info.add_metric([store.backend, store.store_id], 1)
        yield info
        try:
            totals = store.totals()
        except UnavailableError:
            # A shared backend that is down: the scrape still reports that, and the process.
            backend = GaugeMetricFamily("svdq_store_backend_up", "1 while the store backend answers (memory: "
                                        "always).", labels=["backend"])
            backend.add_metric([store.backend], 0)
            yield backend
            return
        stored = GaugeMetricFamily("svdq_stored_bytes", "Serialized bytes of stored compressed sequences.",
                                   labels=["kind"])
        stored.add_metric(["keys"], totals["keys"])
        stored.add_metric(["values"], totals["values"])
        yield stored
        fp16 = GaugeMetricFamily("svdq_stored_fp16_bytes", "Bytes the stored keys and values would take in float16.",
                                 labels=["kind"])
        fp16.add_metric(["keys"], totals["fp16_keys"])
        fp16.add_metric(["values"], totals["fp16_values"])
        yield fp16
        yield GaugeMetricFamily("svdq_store_budget_bytes", "Store byte budget (--store-bytes).", value=store.policy.budget_bytes)
        yield GaugeMetricFamily("svdq_sequences", "Sequences stored, all tenants.", value=totals["sequences"])
        memory = GaugeMetricFamily("svdq_device_memory_bytes",
                                   "Device memory: CUDA allocated/reserved, or bytes of the store's tensors on the CPU.",
                                   labels=["device", "kind"])
        device = self.engine.device
        if device.type == "cuda":
            memory.add_metric([str(device), "allocated"], torch.cuda.memory_allocated(device))
            memory.add_metric([str(device), "reserved"], torch.cuda.memory_reserved(device))
        else:
            memory.add_metric([str(device), "store_tensors"], store.tensor_bytes())
        yield memory
        yield GaugeMetricFamily("svdq_attention_cache_bytes", "Bytes of tensors attention derived from stored keys "
                                "and keeps between calls (process-wide, on top of the store).", value=DERIVED.nbytes)
        limit = DERIVED.limit_bytes
        yield GaugeMetricFamily("svdq_attention_cache_limit_bytes", "Limit of the attention cache "
                                "(--attention-cache-bytes; -1: none).", value=-1 if limit is None else limit)
        try:
            used = store.backend_memory_bytes()
        except UnavailableError:
            used = None
        backend = GaugeMetricFamily("svdq_store_backend_up", "1 while the store backend answers (memory: always).",
                                    labels=["backend"])
        backend.add_metric([store.backend], 0 if used is None else 1)
        yield backend
        if used is not None:
            memory = GaugeMetricFamily("svdq_store_backend_memory_bytes", "Memory the store backend uses: Redis "
                                       "used_memory (all replicas' data), or this process's stored tensors.",
                                       labels=["backend"])
            memory.add_metric([store.backend], used)
            yield memory


class Metrics:
    """The server's metrics, in their own registry.

    The engine calls :meth:`compressed`, :meth:`attended` and :meth:`evicted`; the RPC
    interceptor calls :meth:`rpc_finished`; the server sets :meth:`set_ready`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        registry = self.registry
        self.compression_ratio = Histogram("svdq_compression_ratio", "Compression ratio (fp16 bytes over "
                                           "serialized bytes, everything included) per upload or compress call, "
                                           "by kind: keys, values, total (keys and values of an upload).",
                                           ["profile", "kind"], buckets=RATIO_BUCKETS, registry=registry)
        self.bits_per_element = Histogram("svdq_bits_per_element", "True bits per key element (serialized size) per "
                                          "upload or compress call.", ["profile"], buckets=BITS_BUCKETS,
                                          registry=registry)
        self.reconstruction_error = Histogram("svdq_reconstruction_relative_error", "Relative L2 error of "
                                              "reconstructed keys on a sampled layer of each upload.", ["profile"],
                                              buckets=ERROR_BUCKETS, registry=registry)
        self.evictions = Counter("svdq_evictions", "Sequences evicted from the store.", ["reason"], registry=registry)
        self.rpc_duration = Histogram("svdq_rpc_duration_seconds", "Server-side RPC latency.", ["method"],
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.rpc_total = Counter("svdq_rpc", "RPCs finished, by method and status code.", ["method", "code"],
                                 registry=registry)
        self.attention_batch = Histogram("svdq_attention_batch_size", "Entries per Attend call.",
                                         buckets=BATCH_BUCKETS, registry=registry)
        self.key_bytes_read = Counter("svdq_attention_key_bytes_read", "Compressed key bytes attention read.",
                                      ["mode"], registry=registry)
        self.dense_key_bytes = Counter("svdq_attention_dense_fp16_key_bytes", "Bytes the same attention would read "
                                       "from dense fp16 keys.", ["mode"], registry=registry)
        self.build_info = Gauge("svdq_build_info", "Version and device of this server (always 1).",
                                ["version", "device"], registry=registry)
        self.ready = Gauge("svdq_ready", "1 while the server accepts requests.", registry=registry)
        self.store_duration = Histogram("svdq_store_operation_duration_seconds", "Latency of store backend "
                                        "operations (get, peek, insert, update, delete).", ["operation"],
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.store_errors = Counter("svdq_store_errors", "Store operations that failed because the backend was "
                                    "unreachable or refused.", ["operation"], registry=registry)
        for operation in STORE_OPERATIONS:
            self.store_duration.labels(operation)
            self.store_errors.labels(operation)
        for reason in ("lru", "ttl"):
            self.evictions.labels(reason)
        for mode in ("dense", "sparse"):
            self.key_bytes_read.labels(mode)
            self.dense_key_bytes.labels(mode)
        self._http = None
        self._operator_profiles: frozenset[str] = frozenset()

    def bind_engine(self, engine, version: str) -> None:
        """Export the engine's store and device gauges and the build info; the profiles the
        engine holds now (the operator's, loaded at start) are the ones labelled by name."""
        self.registry.register(_StoreCollector(engine))
        self.build_info.labels(version, str(engine.device)).set(1)
        self._operator_profiles = frozenset(profile.name for profile in engine.list_profiles())

    def profile_label(self, profile: str) -> str:
        """The ``profile`` label value of a profile name (``""``: no profile)."""
        if not profile:
            return NO_PROFILE_LABEL
        return profile if profile in self._operator_profiles else TENANT_PROFILE_LABEL

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (``port=0`` is not used
        here: the CLI treats 0 as off)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- events ----------------------------------------------------------------------------

    def compressed(self, profile: str, ratio: float, bits_per_element: float, relative_error: float) -> None:
        """Keys of an upload or Compress call with profile name ``profile`` (``""`` for none)."""
        label = self.profile_label(profile)
        self.compression_ratio.labels(label, "keys").observe(ratio)
        self.bits_per_element.labels(label).observe(bits_per_element)
        self.reconstruction_error.labels(label).observe(relative_error)

    def compressed_cache(self, profile: str, value_ratio: float, total_ratio: float) -> None:
        """Values, and keys with values, of an upload that stores values."""
        label = self.profile_label(profile)
        self.compression_ratio.labels(label, "values").observe(value_ratio)
        self.compression_ratio.labels(label, "total").observe(total_ratio)

    def attended(self, batch: int, mode: str, key_bytes_read: int, dense_fp16_key_bytes: int) -> None:
        self.attention_batch.observe(batch)
        self.key_bytes_read.labels(mode).inc(key_bytes_read)
        self.dense_key_bytes.labels(mode).inc(dense_fp16_key_bytes)

    def evicted(self, reason: str) -> None:
        self.evictions.labels(reason).inc()

    def store_operation(self, operation: str, seconds: float, failed: bool) -> None:
        self.store_duration.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self.rpc_duration.labels(method).observe(seconds)
        self.rpc_total.labels(method, code).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)
