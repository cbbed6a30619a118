"""Hugging Face transformers integration: generate with the long prefix of the KV cache offloaded.

A worker enables it in a few lines::

    from svdq_client.hf import LocalOffload, RemoteOffload, SvdqOffloadCache, enable_offload

    enable_offload(model)                                   # checks the model, switches its attention
    cache = SvdqOffloadCache(model, RemoteOffload(client))  # or LocalOffload(codec=...)
    output_ids = model.generate(input_ids, cache=cache, max_new_tokens=32, do_sample=False)
    cache.close()                                           # frees the server-side sequence

How it works, per forward pass of the model:

* :class:`SvdqOffloadCache` is a transformers ``Cache``. Its layers keep only the recent tokens
  locally (post-RoPE keys and values, exactly as the model produced them). ``update`` appends
  the new tokens and hands the attention function a reference to the cache through the
  ``kwargs`` dict that the model passes both to ``cache.update`` and to the attention function.
* ``svdq_offload_attention`` (registered in transformers' ``AttentionInterface`` as
  ``"svdq_offload"``) computes causal attention over the local tokens, asks the offload
  backend for attention over the offloaded prefix (keys compressed with SVDq, RoPE re-applied
  inside), and merges the two by log-sum-exp in float32.
* After the last layer's attention, tokens beyond the local window move to the backend: the
  whole prefill prefix at the first forward pass (one upload of every layer), then blocks of
  ``spill_block`` tokens as decode steps fill the window (one append of every layer).

The prefill itself attends over the exact local keys (the worker has them in hand); the
offloaded, compressed keys serve every later step.

Supported model families: those whose attention module applies RoPE itself, passes post-RoPE
keys to ``cache.update(..., kwargs=kwargs)`` and has plain causal full attention on every
layer: ``llama`` (tested end to end with SmolLM2), ``mistral``, ``qwen2`` and ``qwen3`` (tested
with small random models) without sliding windows. Anything else raises
:class:`svdq.errors.InvalidInputError` instead of generating wrong text. Batch size 1 only;
greedy or sampled decoding both work, beam search does not (the offloaded prefix cannot be
reordered).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from svdq.attention import SparsityConfig, attend, merge_attention
from svdq.codec import Basis, CodecConfig, CompressedKeys, append, compress, fit_layer_basis
from svdq.errors import InvalidInputError
from svdq.rope import RopeConfig
from svdq.values import CompressedValues, ValueConfig, append_values, compress_values

LOGGER = logging.getLogger(__name__)

#: Name under which the attention function is registered in transformers' AttentionInterface.
ATTENTION_NAME = "svdq_offload"

#: ``config.model_type`` values whose attention follows the pattern this integration relies on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

DEFAULT_WINDOW = 128
DEFAULT_SPILL_BLOCK = 64
_QUERY_BLOCK = 512

# The model passes the same dict to cache.update(kwargs=...) and, unpacked, to the attention
# function; this key carries the cache layer from one to the other.
_LAYER_KWARG = "svdq_offload_layer"


@dataclass(frozen=True)
class ModelShape:
    """What the offloaded cache needs to know about a model, read from its config.

    Attributes:
        model_type: ``config.model_type``, one of :data:`SUPPORTED_MODEL_TYPES`.
        num_layers: decoder layers, each with its own KV cache.
        num_query_heads: attention heads of the queries.
        kv_heads: key/value heads (``num_query_heads`` is a multiple of it: GQA).
        head_dim: channels per head.
        rope: the model's rotary embedding, read with :meth:`svdq.rope.RopeConfig.from_hf_config`.
    """

    model_type: str
    num_layers: int
    num_query_heads: int
    kv_heads: int
    head_dim: int
    rope: RopeConfig

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape of a transformers model config; unsupported models raise
        :class:`InvalidInputError` naming what is not supported."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidInputError(
                f"model_type {model_type!r} is not supported by the svdq offload integration; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", window is not None)
        layer_types = getattr(config, "layer_types", None) or []
        if (window is not None and uses_window) or any(kind != "full_attention" for kind in layer_types):
            raise InvalidInputError(
                f"{model_type} model with sliding-window attention (sliding_window={window}, "
                f"layer_types={sorted(set(layer_types))}) is not supported; only full causal attention is"
            )
        query_heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or query_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // query_heads)
        if query_heads % kv_heads:
            raise InvalidInputError(
                f"num_attention_heads ({query_heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        return cls(
            model_type=model_type,
            num_layers=int(config.num_hidden_layers),
            num_query_heads=query_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf_config(config),
        )


@dataclass
class OffloadStats:
    """Running totals of one offloaded sequence (all layers).

    Attributes:
        tokens_offloaded: tokens stored in the backend (per layer).
        key_bytes_stored / value_bytes_stored: serialized bytes held by the backend, all layers.
        fp16_key_bytes_stored: the same keys in float16, all layers.
        attend_calls: attention requests (one per layer per forward pass once a prefix exists).
        attend_entries: query tokens those requests carried, summed (a decode step is one per layer).
        key_bytes_read / dense_fp16_key_bytes_read: key bytes the backend read to answer them,
            and what dense float16 attention over the same tokens would have read.
        backend_seconds: wall time spent inside backend calls (RPCs for :class:`RemoteOffload`).
    """

    tokens_offloaded: int = 0
    key_bytes_stored: int = 0
    value_bytes_stored: int = 0
    fp16_key_bytes_stored: int = 0
    attend_calls: int = 0
    attend_entries: int = 0
    key_bytes_read: int = 0
    dense_fp16_key_bytes_read: int = 0
    backend_seconds: float = 0.0

    @property
    def key_bits_per_element(self) -> float:
        """Serialized key bits per key element (16 for float16 storage)."""
        return 16.0 * self.key_bytes_stored / max(1, self.fp16_key_bytes_stored)

    @property
    def key_compression_ratio(self) -> float:
        """float16 key bytes over serialized key bytes."""
        return self.fp16_key_bytes_stored / max(1, self.key_bytes_stored)


@runtime_checkable
class OffloadBackend(Protocol):
    """Where the offloaded prefix of one sequence lives and where attention over it runs.

    Tensors are per sequence, all layers at once (the service's unit): ``keys`` and ``values``
    [num_layers, tokens, kv_heads, head_dim] in the model's dtype, keys post-RoPE;
    ``positions`` int64 [tokens], absolute positions of those tokens.
    """

    stats: OffloadStats

    def open(self, shape: ModelShape) -> None:
        """Prepare for one sequence of a model of this shape (called once by the cache)."""

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Offload tokens: the first call creates the sequence, later calls append to it."""

    def attend(self, layer: int, queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of post-RoPE ``queries`` float32 [q, num_query_heads, head_dim] over every
        offloaded token of ``layer``; returns ``output`` float32 [q, num_query_heads, head_dim]
        and ``lse`` float32 [q, num_query_heads] (natural log, ``scale`` included)."""

    def close(self) -> None:
        """Release the stored sequence; idempotent."""


def _count_attend_stats(stats: OffloadStats, attend_stats: Sequence[Any]) -> None:
    stats.attend_calls += 1
    stats.attend_entries += len(attend_stats)
    for entry in attend_stats:
        stats.key_bytes_read += int(entry.key_bytes_read)
        stats.dense_fp16_key_bytes_read += int(entry.dense_fp16_key_bytes)


class LocalOffload:
    """In-process backend: the svdq library directly (codec, values, attention), no gRPC.

    Args:
        codec: how keys are compressed (default: svdq at 1.5 true bits per element);
            ``CodecConfig(method="fp16")`` is the passthrough.
        values: how values are stored (default: their 16-bit dtype).
        sparsity: key sparsity of the attention over the prefix (``None``: dense).
        backend: ``"torch"`` or ``"triton"`` for :func:`svdq.attention.attend` (default: its own choice).
        bases: shared key bases, one per layer (:func:`calibrate_bases`; svdq only); ``None``:
            each layer fits its own basis on the offloaded keys and stores it with them.
    """

    def __init__(
        self,
        codec: CodecConfig | None = None,
        values: ValueConfig | None = None,
        sparsity: SparsityConfig | None = None,
        backend: str | None = None,
        bases: Sequence[Basis] | None = None,
    ) -> None:
        self.codec = codec or CodecConfig()
        self.value_config = values or ValueConfig()
        self.sparsity = sparsity
        self.backend = backend
        self.bases = tuple(bases) if bases is not None else None
        self.stats = OffloadStats()
        self.shape: ModelShape | None = None
        self.keys: list[CompressedKeys] = []
        self.values: list[CompressedValues] = []

    def open(self, shape: ModelShape) -> None:
        _check_bases(self.bases, shape, self.codec)
        self.shape = shape

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        started = time.perf_counter()
        shape = _require_open(self.shape)
        if not self.keys:
            self.keys = [
                compress(keys[layer], self.codec, positions=positions, rope=shape.rope, key_space="post_rope",
                         basis=self.bases[layer] if self.bases is not None else None)
                for layer in range(shape.num_layers)
            ]
            self.values = [compress_values(values[layer], self.value_config) for layer in range(shape.num_layers)]
        else:
            self.keys = [append(self.keys[layer], keys[layer], positions) for layer in range(shape.num_layers)]
            self.values = [append_values(self.values[layer], values[layer]) for layer in range(shape.num_layers)]
        stats = self.stats
        stats.tokens_offloaded = self.keys[0].num_tokens
        stats.key_bytes_stored = sum(item.nbytes for item in self.keys)
        stats.value_bytes_stored = sum(item.nbytes for item in self.values)
        stats.fp16_key_bytes_stored = 2 * stats.tokens_offloaded * shape.kv_heads * shape.head_dim * shape.num_layers
        stats.backend_seconds += time.perf_counter() - started

    def attend(self, layer: int, queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        count = queries.shape[0]
        result = attend(
            queries,
            [self.keys[layer]] * count,
            [self.values[layer]] * count,
            scale=scale,
            sparsity=self.sparsity,
            backend=self.backend,
        )
        _count_attend_stats(self.stats, result.stats)
        self.stats.backend_seconds += time.perf_counter() - started
        return result.output, result.lse

    def close(self) -> None:
        self.keys, self.values = [], []


class RemoteOffload:
    """Backend on an svdq server, through :class:`svdq_client.KVCacheClient`.

    Args:
        client: a connected ``KVCacheClient`` (the caller owns and closes it).
        codec: key codec of the sequence's profile (default: svdq at 1.5 true bits).
        value_bits: ``None`` keeps values 16-bit on the server; 2 or 4 quantizes them.
        sparsity: key sparsity of the server's attention (``None``: dense).
        profile_name: name of the profile registered for the model (default: derived from
            the model shape, codec and bases, so different settings never collide).
        sequence_id: id of the stored sequence (default: a fresh random one).
        bases: shared key bases, one per layer (:func:`calibrate_bases`; svdq only), sent once
            with the profile; the stored blobs then carry only their fingerprints.
        value_codec: store values as an SVDq latent with this codec (e.g.
            :data:`svdq.values.DEFAULT_VALUE_CODEC`); ``value_bits`` must then be None.
        value_bases: shared value bases, one per layer (:func:`calibrate_cache_bases`).
        cache_bits_per_element: one budget in true bits per KV element for keys and latent
            values, split per layer on the server (:func:`svdq.kv.compress_kv`); needs
            ``value_codec``.
    """

    def __init__(
        self,
        client: Any,
        codec: CodecConfig | None = None,
        value_bits: int | None = None,
        sparsity: SparsityConfig | None = None,
        profile_name: str | None = None,
        sequence_id: str | None = None,
        bases: Sequence[Basis] | None = None,
        value_codec: CodecConfig | None = None,
        value_bases: Sequence[Basis] | None = None,
        cache_bits_per_element: float | None = None,
    ) -> None:
        self.client = client
        self.codec = codec or CodecConfig()
        self.value_bits = value_bits
        self.value_codec = value_codec
        self.value_bases = tuple(value_bases) if value_bases is not None else None
        self.cache_bits_per_element = cache_bits_per_element
        self.sparsity = sparsity
        self.bases = tuple(bases) if bases is not None else None
        self.profile_name = profile_name
        self.sequence_id = sequence_id or f"hf-{uuid.uuid4().hex}"
        self.stats = OffloadStats()
        self.shape: ModelShape | None = None
        self._created = False

    def open(self, shape: ModelShape) -> None:
        from svdq_client import Profile

        _check_bases(self.bases, shape, self.codec)
        self.shape = shape
        if self.profile_name is None:
            value_settings = (self.value_bits, self.value_codec, self.cache_bits_per_element)
            self.profile_name = _profile_name(shape, self.codec, value_settings,
                                              (self.bases or ()) + (self.value_bases or ()) or None)
        profile = Profile(
            name=self.profile_name,
            num_layers=shape.num_layers,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            rope=shape.rope,
            codec=self.codec,
            value_bits=self.value_bits,
            bases=self.bases,
            value_codec=self.value_codec,
            value_bases=self.value_bases,
            cache_bits_per_element=self.cache_bits_per_element,
        )
        started = time.perf_counter()
        # Registering an identical profile again is accepted; a different one under the same
        # name is a ConflictError rather than a silent change under other workers' sequences.
        self.client.register_profile(profile)
        self.stats.backend_seconds += time.perf_counter() - started

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        started = time.perf_counter()
        _require_open(self.shape)
        if not self._created:
            info = self.client.upload(
                self.sequence_id, self.profile_name, keys, values, positions=positions, key_space="post_rope"
            )
            self._created = True
        else:
            self.client.append(self.sequence_id, keys, values, positions=positions)
            info = self.client.describe(self.sequence_id)
        stats = self.stats
        stats.tokens_offloaded = int(info.num_tokens)
        stats.key_bytes_stored = int(info.key_bytes)
        stats.value_bytes_stored = int(info.value_bytes)
        stats.fp16_key_bytes_stored = int(info.fp16_key_bytes)
        stats.backend_seconds += time.perf_counter() - started

    def attend(self, layer: int, queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        entries = [(self.sequence_id, layer)] * queries.shape[0]
        result = self.client.attend(queries, entries, sparsity=self.sparsity, scale=scale)
        _count_attend_stats(self.stats, result.stats)
        self.stats.backend_seconds += time.perf_counter() - started
        return result.output, result.lse

    def close(self) -> None:
        if self._created:
            self._created = False
            self.client.delete(self.sequence_id)


def _profile_name(shape: ModelShape, codec: CodecConfig, value_settings: Any,
                  bases: Sequence[Basis] | None) -> str:
    fingerprints = None if bases is None else tuple(basis.fingerprint for basis in bases)
    settings = repr((shape, codec, value_settings, fingerprints)).encode()
    return f"hf-{shape.model_type}-{shape.num_layers}x{shape.kv_heads}x{shape.head_dim}-{hashlib.sha256(settings).hexdigest()[:12]}"


def _check_bases(bases: Sequence[Basis] | None, shape: ModelShape, codec: CodecConfig) -> None:
    if bases is None:
        return
    if codec.method != "svdq":
        raise InvalidInputError(f"shared bases apply to codec method 'svdq', not {codec.method!r}")
    channels = shape.kv_heads * shape.head_dim
    if len(bases) != shape.num_layers or any(basis.channels != channels for basis in bases):
        raise InvalidInputError(
            f"bases must hold one basis of kv_heads*head_dim = {channels} channels per layer ({shape.num_layers}) "
            f"of this {shape.model_type} model; got {len(bases)} with channels {sorted({b.channels for b in bases})}: "
            "fit them on this model with calibrate_bases"
        )


@torch.no_grad()
def calibrate_bases(model: Any, input_ids: torch.Tensor) -> tuple[Basis, ...]:
    """Shared SVDq key bases, one per layer, fitted on the model's own keys for ``input_ids``.

    The model runs ``input_ids`` (int64 [1, tokens], text like the traffic it will serve, not the
    served documents themselves) once with its standard attention; each layer's post-RoPE keys
    are un-rotated and fitted with :func:`svdq.codec.fit_layer_basis`. Pass the result to
    :class:`RemoteOffload` or :class:`LocalOffload` as ``bases``: stored keys then carry a
    64-bit fingerprint instead of their own basis, whose bytes go to the codes instead, and the
    basis is fitted on more text than one sequence offers (measured on SmolLM2 at 1.5 bits,
    ``bench/quality.py``: dNLL +0.004 with a shared basis vs +0.013 with per-sequence ones).
    Needs at least ``kv_heads * head_dim`` tokens; a few thousand is better.
    """
    return calibrate_cache_bases(model, input_ids)[0]


def calibrate_cache_bases(model: Any, input_ids: torch.Tensor) -> tuple[tuple[Basis, ...], tuple[Basis, ...]]:
    """Shared key bases (as :func:`calibrate_bases`) and value bases, one per layer each, from
    one run of ``input_ids``: ``(key_bases, value_bases)``. Value bases serve SVDq latent
    values (``ValueConfig(codec=...)``, :func:`svdq.values.compress_values` ``basis=``);
    values carry no RoPE, so they are fitted as they are cached."""
    from .evaluation import prefill

    shape = ModelShape.from_config(model.config)
    channels = shape.kv_heads * shape.head_dim
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < channels:
        raise InvalidInputError(
            f"calibration input_ids must have shape [1, tokens] with tokens >= kv_heads*head_dim = {channels}, "
            f"got {list(input_ids.shape)}"
        )
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:  # the offload attention needs an SvdqOffloadCache; this is a plain run
        model.set_attn_implementation("sdpa")
    try:
        calibration = prefill(model, input_ids.to(model.device))
    finally:
        if previous == ATTENTION_NAME:
            model.set_attn_implementation(previous)
    key_bases = tuple(fit_layer_basis(keys.cpu(), positions=calibration.positions, rope=shape.rope)
                      for keys in calibration.keys)
    return key_bases, tuple(fit_layer_basis(values.cpu()) for values in calibration.values)


def _require_open(shape: ModelShape | None) -> ModelShape:
    if shape is None:
        raise InvalidInputError("the offload backend was not opened: pass it to SvdqOffloadCache first")
    return shape


class SvdqOffloadLayer(CacheLayerMixin):
    """One decoder layer's local part of an offloaded cache: the most recent tokens only.

    ``keys`` / ``values``: [1, kv_heads, local_tokens, head_dim] in the model's dtype, keys
    post-RoPE; ``positions``: int64 [local_tokens] absolute positions of the local tokens.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: SvdqOffloadCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.positions = torch.zeros(0, dtype=torch.int64)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states.new_zeros((1, key_states.shape[1], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((1, value_states.shape[1], 0, value_states.shape[3]))
        self.positions = self.positions.to(self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, kwargs: dict | None = None, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new post-RoPE ``key_states`` / ``value_states`` [1, kv_heads, new, head_dim] and
        return the local keys and values [1, kv_heads, local_tokens, head_dim]."""
        if kwargs is None:
            raise InvalidInputError(
                "this model's attention does not pass its kwargs to cache.update; its family is not supported "
                f"by the svdq offload integration (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if key_states.shape[0] != 1:
            raise InvalidInputError(f"the svdq offload cache supports batch size 1, got {key_states.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            new_positions = torch.arange(new_tokens, device=self.device) + self.get_seq_length()
        else:
            new_positions = position_ids.reshape(-1, position_ids.shape[-1])[0].to(self.device, torch.int64)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions])
        kwargs[_LAYER_KWARG] = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen: offloaded plus local."""
        return self.cache.offloaded_tokens + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Local keys start after the offloaded prefix (sliding-window-like semantics).
        local = self.keys.shape[-2] if self.is_initialized else 0
        return local + query_length, self.cache.offloaded_tokens

    def get_max_length(self) -> int:
        return -1

    def take_oldest(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the ``count`` oldest local tokens; returns their keys and values
        [count, kv_heads, head_dim] and positions int64 [count]."""
        keys = self.keys[0, :, :count].transpose(0, 1)
        values = self.values[0, :, :count].transpose(0, 1)
        positions = self.positions[:count]
        self.keys = self.keys[:, :, count:]
        self.values = self.values[:, :, count:]
        self.positions = self.positions[count:]
        return keys, values, positions

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidInputError("beam search is not supported with the svdq offload cache (batch size 1 only)")


class SvdqOffloadCache(Cache):
    """A transformers ``Cache`` that keeps ``window`` recent tokens per layer locally and the
    rest in an :class:`OffloadBackend`.

    Args:
        model: a transformers causal LM (or its config) of a supported family.
        backend: :class:`LocalOffload` or :class:`RemoteOffload` (one sequence per cache).
        window: local tokens kept after each forward pass (>= 1).
        spill_block: once the local part exceeds ``window`` by this many tokens, they move to
            the backend in one append (>= 1); a larger block means fewer, larger appends.
    """

    def __init__(
        self,
        model: Any,
        backend: OffloadBackend,
        window: int = DEFAULT_WINDOW,
        spill_block: int = DEFAULT_SPILL_BLOCK,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise InvalidInputError(f"window must be an integer >= 1, got {window!r}")
        if not isinstance(spill_block, int) or spill_block < 1:
            raise InvalidInputError(f"spill_block must be an integer >= 1, got {spill_block!r}")
        if not isinstance(backend, OffloadBackend):
            raise InvalidInputError(
                f"backend must implement OffloadBackend (LocalOffload or RemoteOffload), got {type(backend).__name__}"
            )
        config = getattr(model, "config", model)
        self.shape = ModelShape.from_config(config)
        self.backend = backend
        self.window = window
        self.spill_block = spill_block
        self.offloaded_tokens = 0
        super().__init__(layers=[SvdqOffloadLayer(self, index) for index in range(self.shape.num_layers)])
        backend.open(self.shape)

    @property
    def stats(self) -> OffloadStats:
        return self.backend.stats

    def offload_prefix(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Seed an empty cache with a prefix the worker already computed (for example a shared
        document prefilled once): everything beyond ``window`` goes to the backend at once.

        Args:
            keys: per layer [tokens, kv_heads, head_dim] post-RoPE keys at positions 0..tokens-1.
            values: per layer [tokens, kv_heads, head_dim].
        Generation then continues with ``model.generate(prompt_ids, cache=cache)`` where the
        prompt starts with those ``tokens`` tokens.
        """
        if self.get_seq_length():
            raise InvalidInputError("offload_prefix needs an empty cache; this one already holds tokens")
        if len(keys) != self.shape.num_layers or len(values) != self.shape.num_layers:
            raise InvalidInputError(
                f"offload_prefix needs keys and values for all {self.shape.num_layers} layers, "
                f"got {len(keys)} and {len(values)}"
            )
        expected = (keys[0].shape[0], self.shape.kv_heads, self.shape.head_dim)
        for layer_keys, layer_values in zip(keys, values, strict=True):
            if tuple(layer_keys.shape) != expected or tuple(layer_values.shape) != expected:
                raise InvalidInputError(
                    f"offload_prefix keys and values must all be [tokens, kv_heads, head_dim] = {expected}, "
                    f"got {tuple(layer_keys.shape)} and {tuple(layer_values.shape)}"
                )
        positions = torch.arange(expected[0])
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            layer_kwargs = {"position_ids": positions[None]}
            layer.update(layer_keys.transpose(0, 1)[None], layer_values.transpose(0, 1)[None], kwargs=layer_kwargs)
        self.after_attention(self.shape.num_layers - 1)

    def after_attention(self, layer_idx: int) -> None:
        """Called by the attention function; after the last layer, spill what exceeds the window."""
        if layer_idx != self.shape.num_layers - 1:
            return
        local = self.layers[0].keys.shape[-2]
        overflow = local - self.window
        # The first spill moves the whole prefill prefix; later ones wait for a full block.
        if overflow <= 0 or (self.offloaded_tokens and overflow < self.spill_block):
            return
        taken = [layer.take_oldest(overflow) for layer in self.layers]
        keys = torch.stack([item[0] for item in taken])
        values = torch.stack([item[1] for item in taken])
        positions = taken[0][2].cpu()
        self.backend.store(keys, values, positions)
        self.offloaded_tokens += overflow
        LOGGER.debug("offloaded %d tokens (total %d)", overflow, self.offloaded_tokens)

    def close(self) -> None:
        """Release the backend's stored sequence."""
        self.backend.close()

    def crop(self, tokens_to_remove: int) -> None:
        raise InvalidInputError("cropping is not supported with the svdq offload cache (the prefix is offloaded)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise InvalidInputError(
                f"the svdq offload cache supports one sequence; num_return_sequences / beams of {repeats} are not"
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1:
            raise InvalidInputError("the svdq offload cache supports batch size 1")

    def reset(self) -> None:
        raise InvalidInputError("reset is not supported with the svdq offload cache: create a new cache")


def _local_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the local tokens, in float32.

    Args:
        queries: [q, Hq, D] post-RoPE queries.
        keys, values: [Hkv, n, D] local post-RoPE keys and values.
        query_positions: int64 [q]; key_positions: int64 [n]; key j is visible to query i
            when ``key_positions[j] <= query_positions[i]``.
    Returns:
        output float32 [q, Hq, D] and lse float32 [q, Hq].
    """
    query_count, query_heads, head_dim = queries.shape
    kv_heads = keys.shape[0]
    keys, values = keys.float(), values.float()
    outputs, lses = [], []
    # Blocks of queries bound the score matrix of a long prefill ([Hkv, group, block, n] float32).
    for start in range(0, query_count, _QUERY_BLOCK):
        block = queries[start : start + _QUERY_BLOCK].float()
        count = block.shape[0]
        grouped = block.reshape(count, kv_heads, query_heads // kv_heads, head_dim)
        scores = torch.einsum("qhgd,hnd->hgqn", grouped, keys) * scale
        visible = key_positions[None, :] <= query_positions[start : start + count, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[..., None])
        outputs.append(torch.einsum("hgqn,hnd->qhgd", weights, values).reshape(count, query_heads, head_dim))
        lses.append(lse.permute(2, 0, 1).reshape(count, query_heads))
    return torch.cat(outputs), torch.cat(lses)


def svdq_offload_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over an :class:`SvdqOffloadCache`.

    Args:
        module: the model's attention module (``layer_idx`` names its layer).
        query: [1, Hq, q, D] post-RoPE queries.
        key, value: [1, Hkv, n, D] the local keys and values the cache returned.
        attention_mask: ignored: causality comes from the token positions (batch size 1, no
            padding), since the offloaded part has no mask columns.
        scaling: softmax scale (default ``D ** -0.5``).
        kwargs: must carry the cache layer put there by :meth:`SvdqOffloadLayer.update`.
    Returns:
        ``(output [1, q, Hq, D] in the query dtype, None)``.
    """
    layer = kwargs.get(_LAYER_KWARG)
    if layer is None:
        raise InvalidInputError(
            f"attention {ATTENTION_NAME!r} needs an SvdqOffloadCache: call model.generate(..., cache=SvdqOffloadCache(...))"
        )
    if dropout:
        raise InvalidInputError("the svdq offload attention is for inference: dropout must be 0 (call model.eval())")
    cache = layer.cache
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5
    queries = query[0].transpose(0, 1)  # [q, Hq, D]
    query_count = queries.shape[0]
    query_positions = layer.positions[-query_count:]
    output, lse = _local_attention(queries, key[0], value[0], query_positions, layer.positions, scale)
    if cache.offloaded_tokens:
        remote_output, remote_lse = cache.backend.attend(layer.layer_idx, queries.float().cpu(), scale)
        output, lse = merge_attention(output, lse, remote_output.to(output.device), remote_lse.to(output.device))
    cache.after_attention(layer.layer_idx)
    return output.to(query.dtype)[None], None


def enable_offload(model: Any) -> Any:
    """Check that ``model`` is supported and switch its attention to :func:`svdq_offload_attention`.

    Generation then needs an :class:`SvdqOffloadCache` (``model.generate(..., cache=cache)``).
    Returns the model. Raises :class:`InvalidInputError` for unsupported model families.
    """
    ModelShape.from_config(model.config)
    AttentionInterface.register(ATTENTION_NAME, svdq_offload_attention)
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def disable_offload(model: Any, attention: str = "sdpa") -> Any:
    """Switch ``model`` back to a standard attention implementation (default ``"sdpa"``)."""
    model.set_attn_implementation(attention)
    return model


__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "LocalOffload",
    "ModelShape",
    "OffloadBackend",
    "OffloadStats",
    "RemoteOffload",
    "SvdqOffloadCache",
    "SvdqOffloadLayer",
    "calibrate_bases",
    "calibrate_cache_bases",
    "disable_offload",
    "enable_offload",
    "svdq_offload_attention",
]
