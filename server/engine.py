"""The svdq engine: profiles, stored sequences, compression and attention, without gRPC.

Every method is synchronous and thread-safe; the gRPC servicer runs them in a thread pool
so that requests on different sequences proceed in parallel (torch releases the GIL in its
kernels). Requests on one sequence are ordered by its write lock, and readers see one
immutable :class:`~svdq_server.store.SequenceState` at a time.

Failure leaves state as it was: every new state is built completely (validation,
compression, budget check) before it replaces the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field

import torch

from svdq import __version__
from svdq.api.types import (
    AttendResult,
    AttendStats,
    BlobStats,
    Profile,
    ProfileAssembler,
    SequenceInfo,
    ServerInfo,
    abbreviate,
    check_name,
)
from svdq.api.wire import all_finite
from svdq.attention import PRECISION_ENV, SparsityConfig, select_precision
from svdq.attention import attend as attend_compressed
from svdq.codec import (
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_WORK_BYTES,
    CodecConfig,
    CompressedKeys,
    CostLimits,
    check_cost,
    compress,
    decompress,
    relative_error,
)
from svdq.derived import DERIVED
from svdq.errors import ConflictError, InvalidInputError, NotFoundError, ResourceExhaustedError
from svdq.format import from_bytes, to_bytes
from svdq.kv import compress_kv
from svdq.quant import cpu_bfloat16_summary
from svdq.rope import RopeConfig
from svdq.values import CompressedValues, compress_values, decompress_values

from .store import SequenceState, SequenceStore, StoreBackend, StoredSequence, StorePolicy, fp16_bytes, fp16_sizes

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
#: entries of one Attend call
DEFAULT_MAX_BATCH = 4096
#: uploads open at once (all tenants)
DEFAULT_MAX_OPEN_UPLOADS = 64
#: an upload without a chunk for this long is dropped with its staged data
DEFAULT_UPLOAD_IDLE_SECONDS = 30.0
#: share of the staging budget (bytes and open uploads) one tenant may hold
DEFAULT_STAGING_TENANT_SHARE = 0.5
#: shared bases of one tenant profile, held in float32: a Llama-3-8B-sized profile's key and
#: value bases (2 x 32 layers x 1024^2 channels) take 268 MB
DEFAULT_MAX_PROFILE_BYTES = 1 << 30
#: largest attention scale: models use 1/sqrt(head_dim) or less; larger ones only overflow
MAX_ATTEND_SCALE = 16.0
#: owner of the profiles loaded at start (--profiles-file): every tenant sees them
OPERATOR = ""
#: longest cache_salt of a chunk request, characters
MAX_CACHE_SALT = 1024


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise InvalidInputError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was requested but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (the server's CLI fills them in).

    Attributes:
        device: ``auto``, ``cpu`` or ``cuda``.
        store_bytes: budget of stored compressed keys and values, bytes.
        eviction: ``lru`` or ``none``.
        ttl_seconds: idle sequences expire after this long; 0 = never.
        max_tokens: tokens one sequence may hold.
        max_batch: entries one Attend call may have.
        max_channels: ``kv_heads * head_dim`` of any keys the engine compresses or loads.
        max_work_bytes: estimated working memory of one layer's compression or
            reconstruction (:func:`svdq.codec.work_bytes`).
        max_profile_bytes: shared bases (held in float32) of all the profiles a tenant holds,
            registered and arriving on profile streams in progress.
        staging_bytes: raw data of every upload in progress together; ``None``: twice
            ``store_bytes`` (raw 16-bit keys are ~10x their compressed size).
        staging_tenant_share: fraction of ``staging_bytes`` and of ``max_open_uploads`` that
            one tenant may hold.
        max_open_uploads: uploads in progress at once.
        upload_idle_seconds: an upload without a chunk for this long is dropped.
        attention_cache_bytes: limit of :data:`svdq.derived.DERIVED`, the process-wide memory
            for tensors attention derives from stored keys; ``None`` leaves it as it is.
        attention_precision: operands of the torch attention path's key products,
            ``"float32"`` or ``"bfloat16"`` (:func:`svdq.attention.select_precision`); ``None``:
            ``$SVDQ_ATTENTION_PRECISION``, else bfloat16 where the CPU multiplies it natively.
            Decided once, when the engine starts (``Engine.attention_precision``, in its log line).
        tenant_quota_bytes: stored bytes a tenant may hold unless ``tenant_quotas`` names it;
            0 = no quota (see :class:`~svdq_server.store.SequenceStore` for shares and eviction).
        tenant_quotas: tenant -> its own quota (the tokens file's ``quota_bytes``).
        compress_threads: threads that compress the layers of uploads, shared by every
            upload: a layer whose last chunk arrived compresses while the next chunks are
            staged, and up to this many layers (of any uploads) at once. 0 compresses each
            layer in the call that staged its last chunk, one after another. At most this many
            compressions' working memory (:func:`svdq.codec.work_bytes` each, under
            ``max_work_bytes``) is held at once by the pool; a layer's raw chunks stay charged
            to the staging budget until it is compressed.
    """

    device: str = "auto"
    store_bytes: int = 4 << 30
    eviction: str = "lru"
    ttl_seconds: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_batch: int = DEFAULT_MAX_BATCH
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_work_bytes: int = DEFAULT_MAX_WORK_BYTES
    max_profile_bytes: int = DEFAULT_MAX_PROFILE_BYTES
    staging_bytes: int | None = None
    staging_tenant_share: float = DEFAULT_STAGING_TENANT_SHARE
    max_open_uploads: int = DEFAULT_MAX_OPEN_UPLOADS
    upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS
    attention_cache_bytes: int | None = None
    attention_precision: str | None = None
    tenant_quota_bytes: int = 0
    tenant_quotas: Mapping[str, int] | None = None
    compress_threads: int = 0

    def store_policy(self) -> StorePolicy:
        """The store's limits (budget, eviction, TTL, quotas): the one place they are built."""
        return StorePolicy(self.store_bytes, self.eviction, self.ttl_seconds, self.tenant_quotas or {},
                           self.tenant_quota_bytes or None)


@dataclass(frozen=True)
class UploadHeader:
    """What identifies an upload; every chunk of one upload carries the same header."""

    sequence_id: str
    profile: str
    upload_id: str
    total_tokens: int
    key_space: str
    replace: bool
    has_values: bool


@dataclass(frozen=True)
class UploadChunkData:
    """Tokens ``[token_start, token_start + n)`` of layers ``[layer_start, layer_start + L)``.

    Attributes:
        keys: [L, n, kv_heads, head_dim] float16/bfloat16/float32.
        values: same shape as keys, or None.
        positions: int64 [n] or None (token indices).
    """

    layer_start: int
    token_start: int
    keys: torch.Tensor
    values: torch.Tensor | None
    positions: torch.Tensor | None


@dataclass(frozen=True)
class FetchPiece:
    """Reconstructed tokens ``[token_start, token_start + n)`` of one layer.

    ``keys``/``values`` [n, kv_heads, head_dim] on the CPU (values None when not requested or
    not stored), ``positions`` int64 [n]."""

    layer: int
    token_start: int
    total_tokens: int
    keys: torch.Tensor
    values: torch.Tensor | None
    positions: torch.Tensor
    #: the stored version the piece comes from (``StoredSequence.version_tag``): what a resumed fetch names
    version: str = ""


@dataclass(frozen=True)
class ChunkPiece:
    """Reconstructed layers ``[layer_start, layer_start + n)`` of the ``index``-th requested chunk.

    ``keys``/``values`` [n, tokens, kv_heads, head_dim] on the CPU, keys in the space they
    came in; ``positions`` int64 [tokens]."""

    index: int
    layer_start: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


@dataclass(eq=False)
class _Staging:
    """Chunks of an upload in progress, per layer, in token order.

    A layer is compressed as soon as its last chunk arrives (``compressed``), and its raw
    chunks are let go: a client that sends layer after layer has the server compress one
    layer while the next is on the wire. ``sampled_layer`` is the layer whose reconstruction
    error the metrics sample, measured when that layer is compressed (``sampled_error``).

    ``charged`` bytes of the staging budget are held for it: the declared size in 16-bit at
    the start, more when chunks arrive in float32 (``received_bytes``, their real size).
    ``owner`` is the stream writing it (a retried stream takes over); ``closed`` is set when
    it is dropped, after which no chunk is staged or charged. Both change under the engine's
    uploads lock; ``lock`` orders the chunks.
    """

    header: UploadHeader
    tenant: str
    profile: Profile
    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    received: list[int]
    positions: torch.Tensor  # int64 [total_tokens], -1 where no chunk has arrived yet
    charged: int
    owner: object = None
    sampled_layer: int = 0
    #: (keys, values or None) of each compressed layer, None until its last chunk arrived
    compressed: list[tuple[CompressedKeys, CompressedValues | None] | None] = field(default_factory=list)
    sampled_error: float | None = None
    compress_seconds: float = 0.0
    received_bytes: int = 0
    closed: bool = False
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: layer -> its compression in the engine's pool (``compress_threads``), until it is reported
    pending: dict[int, Future] = field(default_factory=dict)


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """One layer's staged chunks as one tensor (no copy when a single chunk carried it)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class Engine:
    """Profiles, the sequence store and every operation of the service.

    Args:
        config: :class:`EngineConfig`.
        profiles: profiles known from the start (config file).
        metrics: optional observer with the methods of :class:`svdq_server.metrics.Metrics`.
    """

    def __init__(self, config: EngineConfig | None = None, profiles: Sequence[Profile] = (), metrics=None,
                 store: StoreBackend | None = None) -> None:
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        if self.config.attention_cache_bytes is not None:
            if self.config.attention_cache_bytes < 0:
                raise InvalidInputError(f"attention_cache_bytes must be >= 0, got {self.config.attention_cache_bytes}")
            DERIVED.limit_bytes = self.config.attention_cache_bytes
        #: the torch attention path's operand precision, decided once: it is a property of the device (and
        #: of $SVDQ_ATTENTION_PRECISION as it was at start); a bad choice fails here, not per call
        self.attention_precision = select_precision(self.device, self.config.attention_precision)
        #: whether the CPU codec and attention use bfloat16 products, and why (measured once; a
        #: bad $SVDQ_CPU_BFLOAT16 fails here)
        self.cpu_bfloat16 = cpu_bfloat16_summary()
        self.metrics = metrics
        # The store backend (server/store.py) also holds the profiles, so a shared one shares them.
        self.store = store if store is not None else SequenceStore(
            self.config.store_policy(), on_evict=metrics.evicted if metrics is not None else None,
            observe=metrics.store_operation if metrics is not None else None)
        self._profiles = self.store.profiles()
        self._profiles_lock = threading.Lock()
        self._streamed_bases: dict[str, int] = {}  # tenant -> bases its profile streams declared, under _profiles_lock
        self.limits = CostLimits(self.config.max_tokens, self.config.max_channels, self.config.max_work_bytes)
        self.staging_bytes = self.config.staging_bytes if self.config.staging_bytes is not None \
            else 2 * self.config.store_bytes
        if not 0 < self.config.staging_tenant_share <= 1:
            raise InvalidInputError(f"staging_tenant_share must be in (0, 1], got {self.config.staging_tenant_share}")
        self._uploads: dict[tuple[str, str], _Staging] = {}
        self._uploads_lock = threading.Lock()
        self._staged_bytes: dict[str, int] = {}  # tenant -> charged staging bytes, under _uploads_lock
        self._sample_layer = itertools.count()
        if not (isinstance(self.config.compress_threads, int) and 0 <= self.config.compress_threads <= 64):
            raise InvalidInputError(f"compress_threads must be an integer in 0..64 (0 = compress in the chunk's call), "
                                    f"got {self.config.compress_threads!r}")
        self._compressor = ThreadPoolExecutor(self.config.compress_threads, thread_name_prefix="svdq-compress") \
            if self.config.compress_threads else None
        for profile in profiles:
            self.register_profile(profile)
        log.info("engine on %s: store budget %d bytes, eviction %s, ttl %s, attention precision %s (%s); %s",
                 self.device, self.config.store_bytes, self.config.eviction,
                 f"{self.config.ttl_seconds}s" if self.config.ttl_seconds else "off", self.attention_precision,
                 "configured" if self.config.attention_precision else
                 "$SVDQ_ATTENTION_PRECISION" if os.environ.get(PRECISION_ENV) else "auto for the device",
                 self.cpu_bfloat16)

    # -- profiles ------------------------------------------------------------------------
    #
    # Profiles of the operator (``--profiles-file``, owner OPERATOR) are seen by every tenant
    # and belong to no tenant; a profile registered by RPC belongs to the tenant that registered
    # it, so one tenant can neither see nor change another tenant's profiles. A tenant's own
    # profile may not take an operator profile's name (lookups would become ambiguous).

    def register_profile(self, profile: Profile, replace: bool = False, tenant: str = OPERATOR,
                         streamed_bytes: int = 0) -> Profile:
        """Add a profile for ``tenant`` (OPERATOR: visible to all tenants); re-registering an
        identical one is a no-op, a different one with the same name needs ``replace``
        (ConflictError otherwise). Its geometry must be within the cost limits, and a tenant's
        shared bases, all its profiles together, within ``max_profile_bytes`` (the operator's
        own profiles are not bounded). ``streamed_bytes``: the part of the tenant's profile
        streams in progress that is this profile's own (:meth:`profile_stream`)."""
        check_cost(1, profile.kv_heads, profile.head_dim, self.limits, what=f"profile {profile.name!r}")
        with self._profiles_lock:
            if tenant != OPERATOR:
                self._check_tenant_bases(tenant, profile.name, profile.bases_bytes, streamed_bytes)
                operator = self._profiles.get((OPERATOR, profile.name))
                if operator is not None:
                    if operator.same_as(profile):
                        return operator
                    raise ConflictError(
                        f"profile {profile.name!r} is set by the server's operator (--profiles-file) with different "
                        "settings and cannot be replaced over RPC; register yours under another name"
                    )
            existing = self._profiles.get((tenant, profile.name))
            if existing is not None and not replace and not existing.same_as(profile):
                raise ConflictError(
                    f"profile {profile.name!r} already exists with different settings; pass replace=true to change it"
                )
            self._profiles[(tenant, profile.name)] = profile
        return profile

    def _check_tenant_bases(self, tenant: str, name: str, nbytes: int, streamed_bytes: int = 0) -> None:
        """ResourceExhaustedError unless ``nbytes`` more bytes of bases for profile ``name`` fit
        ``tenant``'s ``max_profile_bytes`` beside its other profiles (one of the same name is
        replaced, so it does not count) and its profile streams in progress. Under _profiles_lock."""
        held = sum(other.bases_bytes for (owner, other_name), other in self._profiles.items()
                   if owner == tenant and other_name != name)
        arriving = self._streamed_bases.get(tenant, 0) - streamed_bytes
        limit = self.config.max_profile_bytes
        if held + arriving + nbytes > limit:
            raise ResourceExhaustedError(
                f"profile {name!r} has {nbytes} bytes of shared bases held in memory (float32); this tenant's other "
                f"profiles hold {held} and its profile streams in progress {arriving}, and the server holds at most "
                f"{limit} bytes of bases per tenant (--max-profile-bytes): register fewer bases (keys only, or no "
                "value bases), replace a profile instead of adding one, or ask the operator for a larger limit"
            )

    @contextlib.contextmanager
    def profile_stream(self, tenant: str = OPERATOR) -> Iterator[ProfileAssembler]:
        """A :class:`ProfileAssembler` for one profile stream of ``tenant``. The bases its first
        message declares are checked against ``max_profile_bytes`` before any arrives and count
        against it until the stream ends, so streams in parallel cannot pass the limit together;
        register the result with ``streamed_bytes=assembler.declared_bytes`` inside the block."""
        reserved = 0

        def reserve(profile: Profile, nbytes: int) -> None:
            nonlocal reserved
            if tenant == OPERATOR:
                return
            with self._profiles_lock:
                self._check_tenant_bases(tenant, profile.name, nbytes)
                self._streamed_bases[tenant] = self._streamed_bases.get(tenant, 0) + nbytes
            reserved = nbytes

        try:
            yield ProfileAssembler(reserve)
        finally:
            if reserved:
                with self._profiles_lock:
                    left = self._streamed_bases.pop(tenant) - reserved
                    if left:
                        self._streamed_bases[tenant] = left

    def get_profile(self, name: str, tenant: str = OPERATOR) -> Profile:
        """The profile ``name`` as ``tenant`` sees it: its own, else the operator's."""
        with self._profiles_lock:
            profile = self._profiles.get((tenant, name)) or self._profiles.get((OPERATOR, name))
        if profile is None:
            known = sorted(profile.name for profile in self.list_profiles(tenant))
            raise NotFoundError(f"profile {name!r} not found; known profiles: {known}")
        return profile

    def list_profiles(self, tenant: str = OPERATOR) -> list[Profile]:
        """The operator's profiles and ``tenant``'s own, by name."""
        with self._profiles_lock:
            visible = {name: profile for (owner, name), profile in self._profiles.items() if owner in (OPERATOR, tenant)}
        return [visible[name] for name in sorted(visible)]

    # -- stateless codec -------------------------------------------------------------------

    def compress_keys(self, keys: torch.Tensor, *, tenant: str = OPERATOR, profile_name: str = "", layer: int = 0,
                      codec: CodecConfig | None = None, rope: RopeConfig | None = None,
                      positions: torch.Tensor | None = None, key_space: str = "pre_rope") -> tuple[bytes, BlobStats]:
        """Compress one layer's keys [tokens, kv_heads, head_dim] to an svdq.format blob.

        With ``profile_name`` (as ``tenant`` sees it) the codec, RoPE and shared basis of that
        profile's ``layer`` are used (``codec`` still overrides the codec); without it, ``codec``
        and ``rope``.
        """
        basis = None
        if profile_name:
            profile = self.get_profile(profile_name, tenant)
            self._check_layer(profile, layer, "layer")
            self._check_geometry(profile, keys, "keys", dims=3)
            rope = profile.rope
            if codec is None:
                codec = profile.codec
                basis = profile.bases[layer] if profile.bases is not None else None
        if keys.dim() == 3:
            check_cost(*keys.shape, self.limits)  # before the copy to the device
        if key_space == "post_rope" and positions is None:
            raise InvalidInputError("post-RoPE keys need their positions (int64 [tokens]) to undo RoPE; for keys at "
                                    "positions 0..tokens-1 send positions = arange(tokens)")
        compressed = compress(keys.to(self.device), codec, positions=positions, rope=rope,
                              key_space=key_space, basis=basis, limits=self.limits)
        blob = to_bytes(compressed)
        error = _sampled_relative_error(keys, decompress(compressed, dtype=torch.float32).cpu())
        stats = BlobStats(compressed.num_tokens, len(blob), 2 * keys.numel(), compressed.bits_per_element,
                          compressed.compression_ratio, error)
        if self.metrics is not None:
            self.metrics.compressed(profile_name, stats.compression_ratio, stats.bits_per_element, error)
        return blob, stats

    def decompress_keys(self, blob: bytes, *, tenant: str = OPERATOR, profile_name: str = "", layer: int = 0,
                        key_space: str | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        """Keys [tokens, kv_heads, head_dim] (CPU) of a blob from :meth:`compress_keys`."""
        basis = None
        if profile_name:
            profile = self.get_profile(profile_name, tenant)
            self._check_layer(profile, layer, "layer")
            basis = profile.bases[layer] if profile.bases is not None else None
        compressed = from_bytes(blob, basis=basis, limits=self.limits)
        return decompress(compressed, key_space=key_space, dtype=dtype)

    # -- uploads -----------------------------------------------------------------------------

    def begin_upload(self, tenant: str, header: UploadHeader, owner: object = None) -> SequenceInfo | None:
        """Open (or resume) an upload for the stream ``owner``. Returns the stored sequence's
        info when this upload already completed (a retried stream), else ``None`` and chunks
        may follow. The declared size is reserved in the staging budget up front
        (RESOURCE_EXHAUSTED when it cannot fit)."""
        check_name(header.sequence_id, "sequence_id")
        check_name(header.upload_id, "upload_id")
        profile = self.get_profile(header.profile, tenant)
        if not 1 <= header.total_tokens <= self.config.max_tokens:
            raise InvalidInputError(
                f"total_tokens must be in 1..{self.config.max_tokens} (--max-tokens), got {header.total_tokens}"
            )
        if header.key_space == "post_rope" and profile.rope is None:
            raise InvalidInputError(f"key_space POST_ROPE needs a rope description, and profile {profile.name!r} has none")
        check_cost(header.total_tokens, profile.kv_heads, profile.head_dim, self.limits, what="upload")
        existing = self.store.peek(tenant, header.sequence_id)
        if existing is not None:
            if existing.upload_id == header.upload_id:
                return self.describe(tenant, header.sequence_id)
            if not header.replace:
                raise ConflictError(
                    f"sequence {header.sequence_id!r} already exists; delete it, append to it, or upload with replace=true"
                )
        # Raw chunks wait here until the upload completes: the declared size in 16-bit is
        # reserved now, so that open uploads can never hold more than the staging budget.
        reserve = 2 * header.total_tokens * profile.num_layers * profile.channels * (2 if header.has_values else 1)
        key = (tenant, header.sequence_id)
        with self._uploads_lock:
            self._drop_idle_uploads_locked()
            staging = self._uploads.get(key)
            if staging is not None and staging.header == header:
                staging.touched, staging.owner = time.monotonic(), owner  # a retried stream takes over
                return None
            if staging is not None:  # a new upload id (or different header) supersedes an abandoned attempt
                self._close_staging_locked(key, staging)
            self._reserve_staging_locked(tenant, header, reserve)
            layers = profile.num_layers
            self._uploads[key] = _Staging(header, tenant, profile, [[] for _ in range(layers)],
                                          [[] for _ in range(layers)], [0] * layers,
                                          torch.full((header.total_tokens,), -1, dtype=torch.int64), reserve, owner,
                                          sampled_layer=next(self._sample_layer) % layers,
                                          compressed=[None] * layers)
        return None

    def abort_upload(self, tenant: str, header: UploadHeader, owner: object = None) -> None:
        """Drop an unfinished upload and free its staged data (its stream failed, was
        cancelled or its client went away); a no-op when another stream has taken it over."""
        key = (tenant, header.sequence_id)
        with self._uploads_lock:
            staging = self._uploads.get(key)
            if staging is not None and staging.header == header and staging.owner is owner:
                self._close_staging_locked(key, staging)

    def staging_totals(self, tenant: str | None = None) -> tuple[int, int]:
        """(charged staging bytes, open uploads) of ``tenant``, or of everyone."""
        with self._uploads_lock:
            if tenant is None:
                return sum(self._staged_bytes.values()), len(self._uploads)
            return self._staged_bytes.get(tenant, 0), self._open_uploads_locked(tenant)

    def _open_uploads_locked(self, tenant: str) -> int:
        return sum(1 for holder, _ in self._uploads if holder == tenant)

    def _staging_room_locked(self, tenant: str, extra: int) -> tuple[bool, int, int, int]:
        """Whether ``extra`` bytes fit the staging budget and ``tenant``'s share of it, with
        what is held in all, by the tenant, and the tenant's share."""
        tenant_bytes = int(self.config.staging_tenant_share * self.staging_bytes)
        staged = sum(self._staged_bytes.values())
        mine = self._staged_bytes.get(tenant, 0)
        return staged + extra <= self.staging_bytes and mine + extra <= tenant_bytes, staged, mine, tenant_bytes

    def _reserve_staging_locked(self, tenant: str, header: UploadHeader, reserve: int) -> None:
        share = self.config.staging_tenant_share
        tenant_uploads = max(1, int(share * self.config.max_open_uploads))
        open_uploads = self._open_uploads_locked(tenant)
        if len(self._uploads) >= self.config.max_open_uploads or open_uploads >= tenant_uploads:
            raise ResourceExhaustedError(
                f"too many uploads in progress: {len(self._uploads)} open ({open_uploads} of this tenant); at most "
                f"{self.config.max_open_uploads} (--max-open-uploads), {tenant_uploads} per tenant "
                "(--staging-tenant-share); finish or cancel one first"
            )
        fits, staged, mine, tenant_bytes = self._staging_room_locked(tenant, reserve)
        if reserve > tenant_bytes:
            raise ResourceExhaustedError(
                f"upload of {header.total_tokens} tokens needs {reserve} bytes of staging (16-bit keys"
                f"{' and values' if header.has_values else ''}), more than one tenant's share of the staging budget, "
                f"{tenant_bytes} bytes (--staging-bytes {self.staging_bytes} x --staging-tenant-share {share}); "
                "upload fewer tokens"
            )
        if not fits:
            raise ResourceExhaustedError(
                f"upload of {header.total_tokens} tokens needs {reserve} bytes of staging, but uploads in progress "
                f"hold {staged} of the {self.staging_bytes}-byte budget (--staging-bytes), {mine} of this tenant's "
                f"{tenant_bytes}; retry when they finish"
            )
        self._staged_bytes[tenant] = mine + reserve

    def _close_staging_locked(self, key: tuple[str, str], staging: _Staging) -> None:
        """Forget an upload and free what it was charged (once)."""
        if self._uploads.get(key) is staging:
            del self._uploads[key]
        if not staging.closed:
            staging.closed = True
            for future in staging.pending.values():
                future.cancel()  # one queued behind others does not start; a running one finishes
            left = self._staged_bytes.get(staging.tenant, 0) - staging.charged
            if left > 0:
                self._staged_bytes[staging.tenant] = left
            else:
                self._staged_bytes.pop(staging.tenant, None)

    def _charge_chunk(self, staging: _Staging, chunk: UploadChunkData) -> None:
        """Charge a chunk's real size beyond the upload's reservation (float32 chunks cost twice
        the 16-bit reservation); RESOURCE_EXHAUSTED past the budget, and nothing is staged."""
        size = chunk.keys.numel() * chunk.keys.element_size()
        if chunk.values is not None:
            size += chunk.values.numel() * chunk.values.element_size()
        with self._uploads_lock:
            if staging.closed:
                raise ConflictError(f"upload {staging.header.upload_id!r} of sequence {staging.header.sequence_id!r} "
                                    "was dropped (cancelled, failed or idle); send it again from the start")
            extra = staging.received_bytes + size - staging.charged
            if extra > 0:
                fits, staged, mine, tenant_bytes = self._staging_room_locked(staging.tenant, extra)
                if not fits:
                    raise ResourceExhaustedError(
                        f"upload chunk of {size} bytes ({chunk.keys.dtype}) does not fit the staging budget: uploads "
                        f"in progress hold {staged} of {self.staging_bytes} bytes (--staging-bytes), this tenant "
                        f"{mine} of {tenant_bytes}; send 16-bit chunks (the reservation assumes them) or fewer tokens"
                    )
                self._staged_bytes[staging.tenant] = mine + extra
                staging.charged += extra
            staging.received_bytes += size

    def add_chunk(self, tenant: str, header: UploadHeader, chunk: UploadChunkData) -> None:
        """Stage one chunk, and compress every layer it completes. A resent chunk (its tokens
        were already received for every layer it covers) is skipped; a gap or a partial
        overlap is a ConflictError. Nothing is staged when the chunk is invalid."""
        staging = self._staging(tenant, header)
        profile = staging.profile
        layers, tokens = self._check_chunk(profile, header, chunk)
        with staging.lock:
            staging.touched = time.monotonic()
            self._raise_failed_locked(staging)
            span = range(chunk.layer_start, chunk.layer_start + layers)
            end = chunk.token_start + tokens
            if all(staging.received[layer] >= end for layer in span):
                return  # a retry of a chunk that already arrived
            for layer in span:
                if staging.received[layer] != chunk.token_start:
                    raise ConflictError(
                        f"out-of-order upload chunk: layer {layer} has received tokens [0, {staging.received[layer]}) "
                        f"but the chunk starts at token {chunk.token_start}; send chunks in token order per layer"
                    )
            positions = chunk.positions
            if positions is None:
                positions = torch.arange(chunk.token_start, end, dtype=torch.int64)
            known = staging.positions[chunk.token_start:end]
            arrived = known >= 0
            if not torch.equal(known[arrived], positions[arrived]):
                raise InvalidInputError(
                    f"positions of tokens [{chunk.token_start}, {end}) differ from those an earlier chunk gave them"
                )
            self._charge_chunk(staging, chunk)
            for offset, layer in enumerate(span):
                staging.keys[layer].append(chunk.keys[offset])
                if chunk.values is not None:
                    staging.values[layer].append(chunk.values[offset])
                staging.received[layer] = end
            staging.positions[chunk.token_start:end] = positions
            if end == header.total_tokens:
                # every token of these layers has arrived, so every position is known; later
                # chunks of other layers only rewrite the same values
                device_positions = staging.positions.to(self.device, copy=True)
                for layer in span:
                    if self._compressor is None:
                        self._compress_layer(staging, layer, device_positions)
                    else:
                        staging.pending[layer] = self._compressor.submit(self._compress_pooled, staging, layer,
                                                                         device_positions)

    def _compress_layer(self, staging: _Staging, layer: int, positions: torch.Tensor) -> None:
        """Compress one layer whose tokens have all arrived (``positions`` on the device) and let
        go of its raw chunks once that succeeded (under ``staging.lock``): a layer whose
        compression failed keeps them, and :meth:`finish_upload` compresses it again."""
        self._commit_layer(staging, layer, *self._layer_work(staging, layer, positions))

    def _compress_pooled(self, staging: _Staging, layer: int, positions: torch.Tensor) -> None:
        """:meth:`_compress_layer` in the engine's pool: the compression runs outside
        ``staging.lock`` (the next chunks are staged meanwhile), its result is committed
        under it. Nothing is done for an upload dropped before its turn came."""
        with staging.lock:
            if staging.closed:
                return
        work = self._layer_work(staging, layer, positions)
        with staging.lock:
            self._commit_layer(staging, layer, *work)

    def _layer_work(self, staging: _Staging, layer: int,
                    positions: torch.Tensor) -> tuple[tuple[CompressedKeys, CompressedValues | None],
                                                      float | None, float]:
        """(compressed layer, its error sample or None, seconds) of a layer whose tokens have
        all arrived; its raw chunks are only read (no chunk joins a complete layer)."""
        started = time.perf_counter()
        profile, header = staging.profile, staging.header
        layer_keys = _joined(staging.keys[layer])
        layer_values = _joined(staging.values[layer]) if header.has_values else None
        compressed = self._compress_one(profile, header.key_space, layer, layer_keys, layer_values, positions)
        sampled = self._error_sample(layer_keys, compressed[0]) if layer == staging.sampled_layer else None
        return compressed, sampled, time.perf_counter() - started

    @staticmethod
    def _commit_layer(staging: _Staging, layer: int, compressed: tuple[CompressedKeys, CompressedValues | None],
                      sampled: float | None, seconds: float) -> None:
        """Keep a compressed layer and let go of its raw chunks (under ``staging.lock``)."""
        staging.compressed[layer] = compressed
        staging.keys[layer], staging.values[layer] = [], []
        if layer == staging.sampled_layer:
            staging.sampled_error = sampled
        staging.compress_seconds += seconds

    @staticmethod
    def _raise_failed_locked(staging: _Staging) -> None:
        """Raise the error of a pooled layer compression of this upload that failed (once;
        :meth:`finish_upload` compresses that layer again), as the chunk call that compressed
        it inline would have; forget those that succeeded (under ``staging.lock``)."""
        for layer, future in list(staging.pending.items()):
            if future.done():
                del staging.pending[layer]
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()

    def _compress_one(self, profile: Profile, key_space: str, layer: int, layer_keys: torch.Tensor,
                      layer_values: torch.Tensor | None,
                      positions: torch.Tensor) -> tuple[CompressedKeys, CompressedValues | None]:
        """One layer's keys (and values) as ``profile`` stores them (``positions`` on the device)."""
        basis = profile.bases[layer] if profile.bases is not None else None
        value_basis = profile.value_bases[layer] if profile.value_bases is not None else None
        budget = profile.layer_cache_budget(layer) if layer_values is not None else None
        if budget is not None:
            cache = compress_kv(layer_keys.to(self.device), layer_values.to(self.device), budget, positions=positions,
                                rope=profile.rope, key_space=key_space, key_basis=basis, value_basis=value_basis)
            return cache.keys, cache.values
        keys = compress(layer_keys.to(self.device), profile.codec, positions=positions, rope=profile.rope,
                        key_space=key_space, basis=basis, limits=self.limits)
        values = None
        if layer_values is not None:
            values = compress_values(layer_values.to(self.device), profile.value_config, basis=value_basis)
        return keys, values

    def _error_sample(self, layer_keys: torch.Tensor, compressed: CompressedKeys) -> float | None:
        """The metrics' relative reconstruction error of one layer (None without metrics),
        reconstructed in the keys' own dtype, what a fetch returns."""
        if self.metrics is None:
            return None
        return _sampled_relative_error(layer_keys, decompress(compressed).cpu())

    def finish_upload(self, tenant: str, header: UploadHeader) -> SequenceInfo:
        """Store the upload's compressed layers atomically. Missing tokens are a
        ConflictError (the stream that ends here then drops the upload: send it again)."""
        staging = self._staging(tenant, header)
        profile = staging.profile
        with staging.lock:
            pending = list(staging.pending.values())
        wait_all(pending)  # outside the lock: each commits its layer under it
        with staging.lock:
            staging.pending.clear()  # a layer that failed there is compressed again below, as an inline one
            missing = [(layer, got) for layer, got in enumerate(staging.received) if got != header.total_tokens]
            if missing:
                layer, got = missing[0]
                raise ConflictError(
                    f"upload incomplete: layer {layer} has {got} of {header.total_tokens} tokens "
                    f"({len(missing)} layers incomplete); send the whole upload again with the same upload_id"
                )
            failed = [layer for layer, done in enumerate(staging.compressed) if done is None]
            if failed:  # their compression raised when their last chunk came (and that chunk's call failed)
                positions = staging.positions.to(self.device, copy=True)
                for layer in failed:
                    self._compress_layer(staging, layer, positions)
            compressed = list(staging.compressed)
        with self._uploads_lock:
            # The upload is consumed whatever happens next: a failure below is about the data.
            # Its staging bytes stay charged until compression has let go of the raw tensors.
            if self._uploads.get((tenant, header.sequence_id)) is staging:
                del self._uploads[(tenant, header.sequence_id)]
        try:
            return self._store_new(tenant, header, profile, compressed, staging.sampled_error,
                                   staging.compress_seconds)
        finally:
            with self._uploads_lock:
                self._close_staging_locked((tenant, header.sequence_id), staging)

    def upload(self, tenant: str, header: UploadHeader, keys: torch.Tensor, values: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> SequenceInfo:
        """Library shortcut: upload keys/values [layers, tokens, kv_heads, head_dim] in one chunk."""
        owner = object()
        done = self.begin_upload(tenant, header, owner)
        if done is not None:
            return done
        try:
            self.add_chunk(tenant, header, UploadChunkData(0, 0, keys, values, positions))
            return self.finish_upload(tenant, header)
        finally:
            self.abort_upload(tenant, header, owner)

    def _staging(self, tenant: str, header: UploadHeader) -> _Staging:
        with self._uploads_lock:
            staging = self._uploads.get((tenant, header.sequence_id))
        if staging is None or staging.header != header:
            raise ConflictError(
                f"no upload {header.upload_id!r} in progress for sequence {header.sequence_id!r}; "
                "every chunk of one upload must repeat the same header fields"
            )
        return staging

    def _drop_idle_uploads_locked(self) -> None:
        # Streams close their own idle uploads (the servicer's timeout); this catches library use.
        idle = self.config.upload_idle_seconds
        deadline = time.monotonic() - idle
        for key, staging in [(key, staging) for key, staging in self._uploads.items() if staging.touched < deadline]:
            log.info("dropping upload %r of sequence %r: idle for %ss", staging.header.upload_id, key[1], idle)
            self._close_staging_locked(key, staging)

    def _check_chunk(self, profile: Profile, header: UploadHeader, chunk: UploadChunkData) -> tuple[int, int]:
        self._check_geometry(profile, chunk.keys, "keys", dims=4)
        layers, tokens = chunk.keys.shape[0], chunk.keys.shape[1]
        if layers == 0 or tokens == 0:
            raise InvalidInputError(f"keys of a chunk must hold at least one layer and one token, got shape "
                                    f"{list(chunk.keys.shape)}")
        if chunk.layer_start + layers > profile.num_layers:
            raise InvalidInputError(
                f"layer_start {chunk.layer_start} + {layers} layers exceeds the profile's {profile.num_layers} layers"
            )
        if chunk.token_start + tokens > header.total_tokens:
            raise InvalidInputError(
                f"token_start {chunk.token_start} + {tokens} tokens exceeds total_tokens {header.total_tokens}"
            )
        if header.has_values != (chunk.values is not None):
            raise InvalidInputError("values must be present in every chunk exactly when has_values is true")
        if chunk.values is not None and chunk.values.shape != chunk.keys.shape:
            raise InvalidInputError(f"values must have the shape of keys {list(chunk.keys.shape)}, "
                                    f"got {list(chunk.values.shape)}")
        if chunk.positions is not None:
            self._check_positions(chunk.positions, tokens)
        return layers, tokens

    def _store_new(self, tenant: str, header: UploadHeader, profile: Profile,
                   compressed: list[tuple[CompressedKeys, CompressedValues | None]], sampled_error: float | None,
                   compress_seconds: float) -> SequenceInfo:
        """Store compressed layers as a new sequence (atomically) and record its metrics."""
        keys = [layer_keys for layer_keys, _ in compressed]
        values = [layer_values for _, layer_values in compressed] if header.has_values else None
        state = SequenceState(tuple(keys), None if values is None else tuple(values))
        entry = StoredSequence(tenant, header.sequence_id, profile, header.key_space, header.upload_id, state)
        existing = self.store.peek(tenant, header.sequence_id)
        if existing is not None and not header.replace and existing.upload_id != header.upload_id:
            raise ConflictError(f"sequence {header.sequence_id!r} was created meanwhile by another upload")
        self.store.insert(entry, replace=True)
        if self.metrics is not None:
            fp16 = fp16_bytes(profile, state.num_tokens)
            ratio = fp16 / state.key_bytes
            self.metrics.compressed(profile.name, ratio, 16.0 / ratio, sampled_error)
            if state.values is not None:
                self.metrics.compressed_cache(profile.name, fp16 / state.value_bytes,
                                              2 * fp16 / (state.key_bytes + state.value_bytes))
        log.info("stored sequence %r (tenant %r): %d tokens x %d layers, %d key bytes, compressed in %.1f ms",
                 header.sequence_id, tenant, state.num_tokens, profile.num_layers, state.key_bytes,
                 1e3 * compress_seconds)
        return self._info(entry)

    # -- appends -----------------------------------------------------------------------------

    def append(self, tenant: str, sequence_id: str, keys: torch.Tensor, values: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, expected_tokens: int | None = None) -> SequenceInfo:
        """Append decode-step keys (and values) [num_layers, new_tokens, kv_heads, head_dim]
        to every layer; returns the sequence as this append left it.

        ``expected_tokens`` is the count the caller believes the sequence has; when the
        sequence already has ``expected_tokens + new_tokens`` tokens because this very append
        (same bytes) landed before, it is not applied again.
        """
        entry = self.store.get(tenant, sequence_id)
        profile = entry.profile
        self._check_geometry(profile, keys, "keys", dims=4)
        if keys.shape[0] != profile.num_layers:
            raise InvalidInputError(f"keys must cover every layer: shape [{profile.num_layers}, new_tokens, "
                                    f"{profile.kv_heads}, {profile.head_dim}], got {list(keys.shape)}")
        new_tokens = keys.shape[1]
        if new_tokens == 0:
            raise InvalidInputError("keys must hold at least one new token, got 0")
        has_values = entry.state.values is not None
        if has_values != (values is not None):
            raise InvalidInputError(
                f"sequence {sequence_id!r} {'stores' if has_values else 'does not store'} values: "
                f"values must be {'given' if has_values else 'omitted'} in appends"
            )
        if values is not None and values.shape != keys.shape:
            raise InvalidInputError(f"values must have the shape of keys {list(keys.shape)}, got {list(values.shape)}")
        if positions is not None:
            self._check_positions(positions, new_tokens)
        digest = _digest(keys, values, positions)
        with entry.write_lock:
            state = entry.state
            current = state.num_tokens
            if expected_tokens is not None and expected_tokens != current:
                if state.last_append == (expected_tokens, new_tokens, digest):
                    return self._info(entry)  # a retry of an append that already landed
                raise ConflictError(
                    f"out-of-order append to sequence {sequence_id!r}: it has {current} tokens but the request "
                    f"expects {expected_tokens}"
                )
            if current + new_tokens > self.config.max_tokens:
                raise ResourceExhaustedError(
                    f"sequence {sequence_id!r} would hold {current + new_tokens} tokens, more than --max-tokens "
                    f"{self.config.max_tokens}"
                )
            self.store.update(entry, state.appended(keys, values, positions, (current, new_tokens, digest),
                                                    limits=self.limits))
            return self._info(entry)  # under the write lock: the state this append committed

    # -- attention ---------------------------------------------------------------------------

    def attend(self, tenant: str, entries: Sequence[tuple[str, int]], queries: torch.Tensor, *,
               sparsity: SparsityConfig | None = None, scale: float | None = None,
               softcap: float | None = None) -> AttendResult:
        """Attention of ``queries`` [B, q_heads, head_dim] (post-RoPE), row b over the keys
        and values of ``entries[b] = (sequence_id, layer)``.

        Returns output float32 [B, q_heads, head_dim] and lse float32 [B, q_heads] on the CPU.
        ``sparsity`` None is dense attention; ``softcap`` (Gemma 2's attention logit
        softcapping) is checked and applied by :func:`svdq.attention.attend` (either backend).
        """
        if not entries:
            raise InvalidInputError("entries must name at least one (sequence_id, layer)")
        if len(entries) > self.config.max_batch:
            raise InvalidInputError(f"at most {self.config.max_batch} entries per Attend call, got {len(entries)}")
        if queries.dim() != 3 or queries.shape[0] != len(entries):
            raise InvalidInputError(f"queries must have shape [{len(entries)}, q_heads, head_dim] (one row per "
                                    f"entry), got {list(queries.shape)}")
        if scale is not None and not 0 < scale <= MAX_ATTEND_SCALE:
            raise InvalidInputError(f"scale must be in (0, {MAX_ATTEND_SCALE:g}] (unset: 1/sqrt(head_dim)), got {scale}")
        keys: list[CompressedKeys] = []
        values: list[CompressedValues] = []
        # One store lookup per sequence: a shared store answers each with a round trip.
        looked_up: dict[str, StoredSequence] = {}
        for index, (sequence_id, layer) in enumerate(entries):
            stored = looked_up.get(sequence_id)
            if stored is None:
                stored = looked_up[sequence_id] = self.store.get(tenant, sequence_id)
            profile = stored.profile
            self._check_layer(profile, layer, f"entries[{index}].layer")
            if queries.shape[2] != profile.head_dim or queries.shape[1] % profile.kv_heads:
                raise InvalidInputError(
                    f"queries must have head_dim {profile.head_dim} and a multiple of {profile.kv_heads} heads for "
                    f"entries[{index}] (sequence {sequence_id!r}), got {list(queries.shape[1:])}"
                )
            state = stored.state  # one consistent version per entry
            if state.values is None:
                raise ConflictError(f"sequence {sequence_id!r} stores no values; attention needs them")
            keys.append(state.keys[layer])
            values.append(state.values[layer])
        result = attend_compressed(queries.to(self.device), keys, values, scale=scale, sparsity=sparsity,
                                   softcap=softcap, precision=self.attention_precision)
        if not (all_finite(result.output) and all_finite(result.lse)):
            # Finite keys, queries and scale can still overflow float32 scores (|q.k| ~ 1e38).
            raise InvalidInputError("attention overflowed: the scores scale * q.k of these queries exceed float32's "
                                    "range, so the output would hold Inf or NaN; use queries of smaller magnitude")
        stats = [AttendStats(s.key_bytes_read, s.dense_fp16_key_bytes, s.tokens_attended, s.tokens_total)
                 for s in result.stats]
        if self.metrics is not None:
            self.metrics.attended(len(entries), "sparse" if sparsity is not None else "dense",
                                  sum(s.key_bytes_read for s in stats), sum(s.dense_fp16_key_bytes for s in stats))
        return AttendResult(result.output.float().cpu(), result.lse.float().cpu(), stats)

    def attend_tokens_in_memory(self, tenant: str, sequence_ids: Iterable[str]) -> int | None:
        """Tokens an Attend whose entries name ``sequence_ids`` (one per entry, repeats
        included: each entry is attended) reads, counted without I/O and without marking the
        sequences used (absent ones count 0: their Attend fails at once), or None when the
        store is not in this process, whose lookups may wait on the network: what the
        servicer needs to decide whether a small Attend may run on its event loop."""
        if self.store.backend != "memory":
            return None
        tokens: dict[str, int] = {}
        total = 0
        for sequence_id in sequence_ids:
            if sequence_id not in tokens:
                stored = self.store.peek(tenant, sequence_id)
                tokens[sequence_id] = 0 if stored is None else stored.state.num_tokens
            total += tokens[sequence_id]
        return total

    # -- reading back ------------------------------------------------------------------------

    def fetch(self, tenant: str, sequence_id: str, *, layers: Sequence[int] | None = None,
              key_space: str | None = None, dtype: torch.dtype | None = None, include_values: bool = True,
              max_chunk_bytes: int = 4 << 20, resume_version: str = "", resume_layer: int = 0,
              resume_token: int = 0) -> Iterator[FetchPiece]:
        """Reconstructed keys (and values) of some layers, in pieces of at most about
        ``max_chunk_bytes``; the pieces come from one consistent version of the sequence.

        A fetch that was cut off resumes at token ``resume_token`` of layer ``resume_layer``
        (one of ``layers``; the layers before it in that order are skipped) when
        ``resume_version`` names the version its pieces came from; ConflictError when the
        sequence changed since."""
        stored = self.store.get(tenant, sequence_id)
        profile = stored.profile
        selected = list(range(profile.num_layers)) if not layers else list(layers)
        for index, layer in enumerate(selected):
            self._check_layer(profile, layer, f"layers[{index}]")
        if key_space == "post_rope" and profile.rope is None and stored.key_space != "post_rope":
            raise InvalidInputError(f"profile {profile.name!r} has no rope description; cannot return POST_ROPE keys")
        if max_chunk_bytes < 1:
            raise InvalidInputError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        state = stored.state
        version = stored.version_tag
        start = self._resume_point(sequence_id, state, version, selected, resume_version, resume_layer, resume_token)
        return self._fetch_pieces(state, profile, selected, key_space, dtype, include_values, max_chunk_bytes,
                                  version, start)

    @staticmethod
    def _resume_point(sequence_id: str, state: SequenceState, version: str, layers: list[int], resume_version: str,
                      resume_layer: int, resume_token: int) -> tuple[int, int]:
        """(index in ``layers``, token) where a fetch starts: (0, 0) unless it resumes."""
        if not resume_version:
            if resume_layer or resume_token:
                raise InvalidInputError("resume_layer and resume_token need resume_version (the version of the "
                                        "FetchChunks already received); leave all three unset to fetch from the start")
            return 0, 0
        if resume_version != version:
            raise ConflictError(f"sequence {sequence_id!r} changed since the interrupted Fetch (version "
                                f"{abbreviate(resume_version)}, now {version}); fetch it again from the start")
        if resume_layer not in layers:
            raise InvalidInputError(f"resume_layer must be one of the requested layers {abbreviate(layers)}, "
                                    f"got {resume_layer}")
        if not 0 <= resume_token <= state.num_tokens:
            raise InvalidInputError(f"resume_token must be in 0..{state.num_tokens} (the sequence's tokens), "
                                    f"got {resume_token}")
        return layers.index(resume_layer), resume_token

    def _fetch_pieces(self, state: SequenceState, profile: Profile, layers: list[int], key_space: str | None,
                      dtype: torch.dtype | None, include_values: bool, max_chunk_bytes: int, version: str,
                      start: tuple[int, int]) -> Iterator[FetchPiece]:
        total = state.num_tokens
        positions = state.keys[0].token_positions().cpu()
        token_bytes = 4 * profile.channels * (2 if include_values and state.values is not None else 1)
        step = max(1, max_chunk_bytes // token_bytes)
        first_index, first_token = start
        for index, layer in enumerate(layers[first_index:], first_index):
            begin = first_token if index == first_index else 0
            if begin >= total:
                continue
            keys = decompress(state.keys[layer], key_space=key_space, dtype=dtype).cpu()
            values = None
            if include_values and state.values is not None:
                values = decompress_values(state.values[layer], dtype=dtype).cpu()
            for piece_start in range(begin, total, step):
                stop = min(total, piece_start + step)
                yield FetchPiece(layer, piece_start, total, keys[piece_start:stop],
                                 None if values is None else values[piece_start:stop], positions[piece_start:stop],
                                 version)

    # -- content-addressed chunks (KV connectors) --------------------------------------------
    #
    # A chunk is stored as an ordinary sequence of the tenant (so it counts against the store
    # budget, is evicted and expires like one) under an id derived from everything that must
    # match for a hit: a different tenant, profile or cache_salt never finds it.

    def chunk_sequence_id(self, tenant: str, profile_name: str, cache_salt: str, content_key: str) -> str:
        """The sequence id a chunk is stored under."""
        identity = repr((tenant, profile_name, cache_salt, content_key)).encode()
        return "chunk/" + hashlib.sha256(identity).hexdigest()[:48]

    def store_chunk(self, tenant: str, profile_name: str, content_key: str, cache_salt: str, keys: torch.Tensor,
                    values: torch.Tensor, positions: torch.Tensor | None = None,
                    key_space: str = "post_rope") -> tuple[SequenceInfo, bool]:
        """Store keys and values [num_layers, tokens, kv_heads, head_dim] of one chunk under its
        content key. Returns the chunk's info and whether it was created (a chunk stored
        already is kept, and counts as used)."""
        profile = self.get_profile(profile_name, tenant)
        sequence_id = self._chunk_id(tenant, profile, cache_salt, content_key)
        self._check_geometry(profile, keys, "keys", dims=4)
        if keys.shape[0] != profile.num_layers:
            raise InvalidInputError(f"keys must cover every layer: shape [{profile.num_layers}, tokens, "
                                    f"{profile.kv_heads}, {profile.head_dim}], got {list(keys.shape)}")
        tokens = keys.shape[1]
        if not 1 <= tokens <= self.config.max_tokens:
            raise InvalidInputError(f"a chunk must hold 1..{self.config.max_tokens} tokens (--max-tokens), got {tokens}")
        self._check_geometry(profile, values, "values", dims=4)
        if values.shape != keys.shape:
            raise InvalidInputError(f"values must have the shape of keys {list(keys.shape)}, got {list(values.shape)}")
        if positions is None:
            positions = torch.arange(tokens, dtype=torch.int64)
        self._check_positions(positions, tokens)
        if key_space == "post_rope" and profile.rope is None:
            raise InvalidInputError(f"key_space POST_ROPE needs a rope description, and profile {profile.name!r} has none")
        existing = self.store.peek(tenant, sequence_id)
        if existing is not None:
            if existing.state.num_tokens != tokens:
                raise ConflictError(f"chunk {content_key!r} is stored with {existing.state.num_tokens} tokens, not "
                                    f"{tokens}: a content key must name one token range")
            return self.describe(tenant, sequence_id), False
        # Sinks are the sequence's first tokens; a chunk further in has none, and keeping four
        # 16-bit tokens at the start of every chunk would cost more than its quantized body.
        chunk_profile = profile
        if int(positions[0]) != 0 and profile.codec.num_sinks:
            chunk_profile = dataclasses.replace(profile, codec=dataclasses.replace(profile.codec, num_sinks=0))
        header = UploadHeader(sequence_id, profile.name, sequence_id.replace("/", "-"), tokens, key_space,
                              replace=False, has_values=True)
        started = time.perf_counter()
        device_positions = positions.to(self.device)
        compressed = [self._compress_one(chunk_profile, key_space, layer, keys[layer], values[layer], device_positions)
                      for layer in range(profile.num_layers)]
        sampled = next(self._sample_layer) % profile.num_layers
        error = self._error_sample(keys[sampled], compressed[sampled][0])
        info = self._store_new(tenant, header, chunk_profile, compressed, error, time.perf_counter() - started)
        return info, True

    def lookup_chunks(self, tenant: str, profile_name: str, cache_salt: str, content_keys: Sequence[str]) -> int:
        """How many of ``content_keys`` (a chain in token order), from the first on, are stored."""
        profile = self.get_profile(profile_name, tenant)
        ids = self._chunk_ids(tenant, profile, cache_salt, content_keys)
        for leading, sequence_id in enumerate(ids):
            if self.store.peek(tenant, sequence_id) is None:
                return leading
        return len(ids)

    def fetch_chunks(self, tenant: str, profile_name: str, cache_salt: str, content_keys: Sequence[str], *,
                     dtype: torch.dtype | None = None, max_chunk_bytes: int = 4 << 20) -> Iterator[ChunkPiece]:
        """Reconstructed keys and values of stored chunks, in pieces of whole layers of about
        ``max_chunk_bytes`` at most (one layer when a layer alone is larger). NotFoundError,
        before anything is produced, when any chunk is not stored."""
        profile = self.get_profile(profile_name, tenant)
        ids = self._chunk_ids(tenant, profile, cache_salt, content_keys)
        if not ids:
            raise InvalidInputError("content_keys must name at least one chunk")
        if max_chunk_bytes < 1:
            raise InvalidInputError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        states = []
        for index, sequence_id in enumerate(ids):
            try:
                states.append(self.store.get(tenant, sequence_id).state)
            except NotFoundError:
                raise NotFoundError(f"chunk content_keys[{index}] {content_keys[index]!r} is not stored") from None
        return self._chunk_pieces(states, profile, dtype, max_chunk_bytes)

    def _chunk_pieces(self, states: list[SequenceState], profile: Profile, dtype: torch.dtype | None,
                      max_chunk_bytes: int) -> Iterator[ChunkPiece]:
        for index, state in enumerate(states):
            layer_bytes = 2 * 4 * state.num_tokens * profile.channels
            step = max(1, max_chunk_bytes // layer_bytes)
            positions = state.keys[0].token_positions().cpu()
            for start in range(0, profile.num_layers, step):
                layers = range(start, min(profile.num_layers, start + step))
                keys = torch.stack([decompress(state.keys[layer], dtype=dtype).cpu() for layer in layers])
                values = torch.stack([decompress_values(state.values[layer], dtype=dtype).cpu() for layer in layers])
                yield ChunkPiece(index, start, keys, values, positions)

    def _chunk_ids(self, tenant: str, profile: Profile, cache_salt: str, content_keys: Sequence[str]) -> list[str]:
        if len(content_keys) > self.config.max_batch:
            raise InvalidInputError(f"at most {self.config.max_batch} content_keys per call, got {len(content_keys)}")
        return [self._chunk_id(tenant, profile, cache_salt, key, f"content_keys[{index}]")
                for index, key in enumerate(content_keys)]

    def _chunk_id(self, tenant: str, profile: Profile, cache_salt: str, content_key: str,
                  field_name: str = "content_key") -> str:
        check_name(content_key, field_name)
        if not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT:
            raise InvalidInputError(f"cache_salt must be a string of at most {MAX_CACHE_SALT} characters, "
                                    f"got {len(cache_salt)}")
        return self.chunk_sequence_id(tenant, profile.name, cache_salt, content_key)

    def delete(self, tenant: str, sequence_id: str) -> None:
        """Remove a stored sequence (and any upload of it in progress); NotFoundError when absent."""
        with self._uploads_lock:
            staging = self._uploads.get((tenant, sequence_id))
            if staging is not None:
                self._close_staging_locked((tenant, sequence_id), staging)
        self.store.delete(tenant, sequence_id)

    def describe(self, tenant: str, sequence_id: str) -> SequenceInfo:
        """Tokens, layers, serialized bytes and compression of one stored sequence."""
        return self._info(self.store.get(tenant, sequence_id))

    def server_info(self, tenant: str) -> ServerInfo:
        """Device and budget of the server, and the occupancy, evictions and quota of
        ``tenant`` alone: one tenant learns nothing about the others (operators read global
        figures from the metrics)."""
        own = self.store.tenant_totals(tenant)
        policy = self.store.policy
        return ServerInfo(
            version=__version__, device=str(self.device), store_budget_bytes=policy.budget_bytes,
            stored_bytes=own["bytes"], stored_fp16_bytes=own["fp16_bytes"], sequences=own["sequences"],
            tenant_sequences=own["sequences"], evictions=own["evictions"], eviction=policy.eviction,
            ttl_seconds=policy.ttl_seconds, profiles=tuple(profile.name for profile in self.list_profiles(tenant)),
            tenant_quota_bytes=policy.quota_for(tenant) or 0,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _info(self, entry: StoredSequence) -> SequenceInfo:
        state, profile = entry.state, entry.profile
        fp16_keys, fp16_values = fp16_sizes(profile, state)
        key_bytes, value_bytes = state.key_bytes, state.value_bytes
        return SequenceInfo(
            sequence_id=entry.sequence_id, profile=profile.name, num_tokens=state.num_tokens,
            num_layers=profile.num_layers, key_bytes=key_bytes, value_bytes=value_bytes, fp16_key_bytes=fp16_keys,
            fp16_value_bytes=fp16_values, key_compression_ratio=fp16_keys / key_bytes,
            key_bits_per_element=8.0 * key_bytes / (state.num_tokens * profile.num_layers * profile.channels),
            compression_ratio=(fp16_keys + fp16_values) / (key_bytes + value_bytes), key_space=entry.key_space,
            has_values=state.values is not None,
        )

    @staticmethod
    def _check_layer(profile: Profile, layer: int, field_name: str) -> None:
        if not 0 <= layer < profile.num_layers:
            raise InvalidInputError(f"{field_name} must be in 0..{profile.num_layers - 1} for profile "
                                    f"{profile.name!r}, got {layer}")

    @staticmethod
    def _check_geometry(profile: Profile, tensor: torch.Tensor, field_name: str, dims: int) -> None:
        if tensor.dim() != dims or tuple(tensor.shape[-2:]) != (profile.kv_heads, profile.head_dim):
            lead = "[tokens, " if dims == 3 else "[layers, tokens, "
            raise InvalidInputError(
                f"{field_name} must have shape {lead}{profile.kv_heads}, {profile.head_dim}] for profile "
                f"{profile.name!r}, got {list(tensor.shape)}"
            )
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidInputError(f"{field_name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if not all_finite(tensor):
            raise InvalidInputError(f"{field_name} contains NaN or Inf; only finite values are allowed")

    @staticmethod
    def _check_positions(positions: torch.Tensor, tokens: int) -> None:
        if positions.dim() != 1 or positions.shape[0] != tokens or positions.dtype != torch.int64:
            raise InvalidInputError(f"positions must be int64 [{tokens}], got {positions.dtype} {list(positions.shape)}")
        if tokens and int(positions.min()) < 0:
            raise InvalidInputError("positions must be >= 0")


def _sampled_relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """:func:`svdq.codec.relative_error` for the metrics' histogram and the Compress RPC's
    reported error, in float32: the float64
    norms cost ~13 ms per 4096 x 192 layer on a CPU without a fast float16-to-float64 path (this
    AVX2 EPYC; 1 ms in float32), about a tenth of that layer's compression, and a histogram
    sample or a reported ratio needs no more than float32's digits. Keys large enough to overflow float32's squares
    fall back to the float64 one."""
    reference = reference.float()
    error = float(torch.linalg.vector_norm(approximation.float() - reference)
                  / torch.linalg.vector_norm(reference).clamp(min=1e-30))
    return error if math.isfinite(error) else relative_error(reference, approximation)


def _digest(*tensors: torch.Tensor | None) -> bytes:
    """Content hash of an append's tensors, to recognise its retry."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        if tensor is None:
            digest.update(b"-")
            continue
        host = tensor.detach().cpu().contiguous()
        digest.update(str((host.dtype, tuple(host.shape))).encode())
        digest.update((host.view(torch.int16) if host.dtype == torch.bfloat16 else host).numpy().tobytes())
    return digest.digest()
