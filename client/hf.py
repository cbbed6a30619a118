"""Hugging Face transformers integration: generate with the long prefix of the KV cache offloaded.

A worker enables it in a few lines::

    from svdq_client.hf import LocalOffload, RemoteOffload, SvdqOffloadCache, enable_offload

    enable_offload(model)                                   # checks the model, switches its attention
    cache = SvdqOffloadCache(model, RemoteOffload(client), tokenizer=tokenizer)  # or LocalOffload(codec=...)
    output_ids = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=32,
                                do_sample=False, stopping_criteria=[StopFinishedRows(cache, eos_ids)])
    cache.close()                                           # frees the server-side sequences

How it works, per forward pass of the model:

* :class:`SvdqOffloadCache` is a transformers ``Cache``. Its full-attention layers keep only
  the recent tokens locally (post-RoPE keys and values, exactly as the model produced them);
  sliding-window layers of hybrid models (Gemma 2/3, Qwen2 with ``max_window_layers``) are
  ordinary sliding-window layers that keep their window and are never offloaded. ``update``
  hands the attention function a reference to its layer through the ``kwargs`` dict that the
  model passes both to ``cache.update`` and to the attention function.
* ``svdq_offload_attention`` (registered in transformers' ``AttentionInterface`` as
  ``"svdq_offload"``, with the SDPA mask builder) runs transformers' own SDPA attention while
  nothing is offloaded (the prefill) and on sliding layers. Once a prefix is offloaded it runs
  the fused CPU flash kernel, which also returns the log-sum-exp, over the local tokens, asks
  the backend for attention over each row's offloaded prefix in one call per layer, and merges
  the two by log-sum-exp in float32. With attention logit softcapping (Gemma 2), which no
  fused kernel does, the local part is an exact blocked softmax of the capped scores (as the
  model's eager attention computes them) and the backend caps the offloaded part's scores alike.
* Before the backend opens, svdq keys (and SVDq latent values) without shared bases get them:
  fitted once per model on shipped calibration text, never the prompt
  (:func:`default_calibrated_bases`; ``calibration_tokens=0`` keeps a basis per sequence).
  With ``calibrate_split=True``, a whole-cache budget without ``cache_key_shares`` also gets
  each layer's key/value split, measured once on the same text with those bases
  (:func:`default_calibrated_key_shares`); by default the split is measured on every upload.
* After the last layer's attention, tokens beyond the local window move to the backend: the
  whole prefill prefix at the first forward pass (one upload of every offloaded layer per
  row), then blocks of ``spill_block`` tokens as decode steps fill the window.

Batches: every row is its own backend sequence; left padding is honoured through the model's
attention mask (padding tokens are masked locally and never offloaded); rows that
:class:`StopFinishedRows` saw finish are no longer attended or stored. Beam search and
``num_return_sequences`` > 1 raise (the offloaded prefixes cannot be reordered).

Supported model families: :data:`SUPPORTED_MODEL_TYPES`; anything else, RoPE types other than
default/linear/llama3 and layer types other than full and sliding attention raise
:class:`svdq.errors.InvalidInputError` naming what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import AttentionInterface, StoppingCriteria
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from svdq.attention import SparsityConfig, attend, merge_attention
from svdq.codec import Basis, CodecConfig, CompressedKeys, append, compress, fit_layer_basis
from svdq.derived import DEFAULT_LIMIT_BYTES, DERIVED
from svdq.errors import InvalidInputError
from svdq.kv import DEFAULT_CACHE_KEY_CODEC, DEFAULT_TOTAL_BITS, CacheBudget, compress_kv, measure_key_shares
from svdq.rope import RopeConfig, layer_ropes
from svdq.values import DEFAULT_VALUE_CODEC, CompressedValues, ValueConfig, append_values, compress_values

from .evaluation import DEFAULT_CALIBRATION_TOKENS, MAX_CALIBRATION_TOKENS, calibration_tokens, prefill

LOGGER = logging.getLogger(__name__)

#: Name under which the attention function is registered in transformers' AttentionInterface.
ATTENTION_NAME = "svdq_offload"

#: ``config.model_type`` values whose attention follows the pattern this integration relies on
#: (RoPE applied in the attention module, post-RoPE keys passed to ``cache.update(...,
#: kwargs=kwargs)``, the same ``kwargs`` passed to the attention function).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")

#: Layer types of ``config.layer_types``: full-attention layers are offloaded, sliding ones stay local.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

DEFAULT_WINDOW = 128
DEFAULT_SPILL_BLOCK = 64
# Query rows per block of the exact log-sum-exp off the CPU (bounds [B, Hq, block, n] scores).
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
        rope: the RoPE of the offloaded (full-attention) layers, read with
            :meth:`svdq.rope.RopeConfig.from_hf_config` for their layer type; sliding layers
            of Gemma 3 use another one, which only the model itself needs.
        layer_types: per layer ``"full_attention"`` (offloaded) or ``"sliding_attention"``
            (kept locally, its window only).
        sliding_window: tokens a sliding layer attends to (``None`` without sliding layers).
    """

    model_type: str
    num_layers: int
    num_query_heads: int
    kv_heads: int
    head_dim: int
    rope: RopeConfig
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None

    @property
    def offloaded_layers(self) -> tuple[int, ...]:
        """Model layer indices whose prefix goes to the backend, in order; the backend's
        layer ``i`` is model layer ``offloaded_layers[i]``."""
        types = self.layer_types or (FULL_ATTENTION,) * self.num_layers
        return tuple(index for index, kind in enumerate(types) if kind == FULL_ATTENTION)

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
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        unknown = sorted(set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise InvalidInputError(
                f"{model_type} layer types {unknown} are not supported; only {FULL_ATTENTION!r} (offloaded) and "
                f"{SLIDING_ATTENTION!r} (kept locally) are"
            )
        windows = {kwargs["sliding_window"] for kwargs in layer_kwargs if "sliding_window" in kwargs}
        query_heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or query_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // query_heads)
        if query_heads % kv_heads:
            raise InvalidInputError(
                f"num_attention_heads ({query_heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        ropes = layer_ropes(config)
        offloaded = {ropes[index] for index, kind in enumerate(layer_types) if kind == FULL_ATTENTION}
        if len(offloaded) > 1:
            # One profile describes every offloaded layer; no supported family varies RoPE among them.
            raise InvalidInputError(f"{model_type} full-attention layers use different RoPEs {sorted(map(str, offloaded))}; "
                                    "the svdq profile holds one for all offloaded layers")
        return cls(
            model_type=model_type,
            num_layers=int(config.num_hidden_layers),
            num_query_heads=query_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rope=next(iter(offloaded)) if offloaded else ropes[0],
            layer_types=tuple(layer_types),
            sliding_window=int(max(windows)) if windows else None,
        )


@dataclass
class OffloadStats:
    """Running totals of the offloaded sequences of one cache (all rows, all offloaded layers).

    Attributes:
        tokens_offloaded: tokens stored in the backend per layer, summed over the rows.
        key_bytes_stored / value_bytes_stored: serialized bytes held by the backend.
        fp16_key_bytes_stored: the same keys in float16.
        attend_calls: attention requests (one per offloaded layer per forward pass once a prefix exists).
        attend_entries: query tokens those requests carried, summed (a decode step of B rows is B per layer).
        key_bytes_read / dense_fp16_key_bytes_read: key bytes the backend read to answer them,
            and what dense float16 attention over the same tokens would have read.
        backend_seconds: wall time spent inside backend calls (RPCs for :class:`RemoteOffload`).
        store_seconds: the part of ``backend_seconds`` spent storing (uploads and appends).
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
    store_seconds: float = 0.0

    @property
    def key_bits_per_element(self) -> float:
        """Serialized key bits per key element (16 for float16 storage)."""
        return 16.0 * self.key_bytes_stored / max(1, self.fp16_key_bytes_stored)

    @property
    def key_compression_ratio(self) -> float:
        """float16 key bytes over serialized key bytes."""
        return self.fp16_key_bytes_stored / max(1, self.key_bytes_stored)

    def set_stored(self, per_row: dict[int, tuple[int, int, int, int]]) -> None:
        """Totals from each row's (tokens, key bytes, value bytes, fp16 key bytes)."""
        self.tokens_offloaded, self.key_bytes_stored, self.value_bytes_stored, self.fp16_key_bytes_stored = (
            sum(column) for column in zip(*per_row.values(), strict=True)
        )


@runtime_checkable
class OffloadBackend(Protocol):
    """Where the offloaded prefixes of one cache's rows live and where attention over them runs.

    Tensors are per row (one backend sequence each), all offloaded layers at once (the
    service's unit): ``keys`` and ``values`` [layers, tokens, kv_heads, head_dim] in the
    model's dtype, keys post-RoPE; ``positions`` int64 [tokens], absolute positions.
    ``layer`` counts offloaded layers only (:attr:`ModelShape.offloaded_layers`).
    """

    stats: OffloadStats

    def open(self, shape: ModelShape) -> None:
        """Prepare for sequences of a model of this shape (called once by the cache)."""

    def store(self, row: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Offload tokens of batch row ``row``: its first call creates the row's sequence,
        later calls append to it."""

    def attend(self, layer: int, queries: torch.Tensor, rows: Sequence[int],
               scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of post-RoPE ``queries`` float32 [len(rows), q, num_query_heads, head_dim],
        row ``i`` over every offloaded token of ``rows[i]`` in ``layer``, in one request; returns
        ``output`` float32 of the queries' shape and ``lse`` float32 [len(rows), q,
        num_query_heads] (natural log, ``scale`` and ``softcap`` included). ``softcap``: the
        model's attention logit softcapping (Gemma 2), ``None`` for none."""

    def close(self) -> None:
        """Release the stored sequences; idempotent."""


class _SharedBasesMixin:
    """What :class:`SvdqOffloadCache` asks a backend before opening it: which shared bases it
    lacks (svdq keys, SVDq latent values), and then hands them over."""

    bases: tuple[Basis, ...] | None
    value_bases: tuple[Basis, ...] | None

    def _key_codec(self) -> CodecConfig:
        raise NotImplementedError

    def _latent_value_codec(self) -> CodecConfig | None:
        raise NotImplementedError

    def check(self, shape: ModelShape) -> None:
        """Refuse settings that do not fit a model of this shape, before anything runs."""
        raise NotImplementedError

    def missing_bases(self) -> tuple[bool, bool]:
        """``(keys, values)``: whether svdq keys have no shared bases, and latent values none."""
        return (self.bases is None and self._key_codec().method == "svdq",
                self.value_bases is None and self._latent_value_codec() is not None)

    def use_bases(self, key_bases: Sequence[Basis] | None, value_bases: Sequence[Basis] | None) -> None:
        """Take calibrated bases for what :meth:`missing_bases` named (``None`` leaves a kind as it is)."""
        if key_bases is not None:
            self.bases = tuple(key_bases)
        if value_bases is not None:
            self.value_bases = tuple(value_bases)

    def unsplit_budget(self) -> CacheBudget | None:
        """The whole-cache budget whose per-layer key/value split is not given
        (``cache_key_shares`` None, so every upload would measure it), else None."""
        raise NotImplementedError

    def use_key_shares(self, shares: Sequence[float]) -> None:
        """Take the calibrated split of :meth:`unsplit_budget`, one key share per offloaded layer."""
        self.cache_key_shares = tuple(shares)


def _check_key_shares(shares: tuple[float, ...] | None, budgeted: bool, budget_name: str, shape: ModelShape) -> None:
    """InvalidInputError unless ``shares`` is None or one share per offloaded layer of a backend
    with a whole-cache budget (``budget_name``, the backend's argument for it)."""
    if shares is not None and (not budgeted or len(shares) != len(shape.offloaded_layers)):
        raise InvalidInputError(f"cache_key_shares need {budget_name} and one share per offloaded layer "
                                f"({len(shape.offloaded_layers)}), got {len(shares)}")


def _count_attend_stats(stats: OffloadStats, attend_stats: Sequence[Any]) -> None:
    stats.attend_calls += 1
    stats.attend_entries += len(attend_stats)
    for entry in attend_stats:
        stats.key_bytes_read += int(entry.key_bytes_read)
        stats.dense_fp16_key_bytes_read += int(entry.dense_fp16_key_bytes)


class LocalOffload(_SharedBasesMixin):
    """In-process backend: the svdq library directly (codec, values, attention), no gRPC.

    Args:
        codec: how keys are compressed (default: the whole cache, see below; ``CodecConfig()``
            is svdq at 1.5 true bits per element, values 16-bit); ``CodecConfig(method="fp16")``
            is the passthrough.
        values: how values are stored (default: their 16-bit dtype).
        sparsity: key sparsity of the attention over the prefix (``None``: dense).
        backend: ``"torch"`` or ``"triton"`` for :func:`svdq.attention.attend` (default: its own choice).
        bases: shared key bases, one per offloaded layer (:func:`calibrate_bases`; svdq only);
            ``None``: :class:`SvdqOffloadCache` fits them on shipped calibration text (its
            ``calibration_tokens``); with ``calibration_tokens=0`` each layer fits its own
            basis on the offloaded keys and stores it with them.
        value_bases: shared value bases, one per offloaded layer (:func:`calibrate_cache_bases`),
            for SVDq latent values (``values=ValueConfig(codec=...)`` or ``cache_budget``);
            ``None``: calibrated by the cache like ``bases``.
        cache_budget: one budget for keys and latent values (:func:`svdq.kv.compress_kv`, as a
            profile's ``cache_bits_per_element``); ``codec`` and ``values`` then do not apply.
        cache_key_shares: each layer's split of ``cache_budget`` (:func:`calibrate_key_shares`);
            ``None`` measures it for every stored row (or :class:`SvdqOffloadCache` calibrates
            it on shipped text, with its ``calibrate_split=True``).
        attention_cache_bytes: limit, set by :meth:`open`, of :data:`svdq.derived.DERIVED`, the
            process-wide memory for tensors attention derives from the stored keys and values and
            keeps between calls (unpacked codes, kept rotated keys), as ``svdq-server
            --attention-cache-bytes`` sets it (default 1 GiB). Without a limit that memory grows
            with the stored cache, and the tensors kept only while a budget has room (the kept
            float32/float16 keys of later decode calls) are never kept. ``None`` leaves the
            process's limit as it is.

    With none of ``codec``, ``values`` and ``cache_budget`` given, the whole cache is stored
    under ``CacheBudget()``: 2.0 true bits per KV element, 8x smaller than fp16
    (:data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC` keys, :data:`svdq.values.DEFAULT_VALUE_CODEC`
    latent values). Keys only, values 16-bit: ``LocalOffload(codec=CodecConfig())``.

    ``keys[row][layer]`` / ``values[row][layer]`` hold what each row stored.
    """

    def __init__(
        self,
        codec: CodecConfig | None = None,
        values: ValueConfig | None = None,
        sparsity: SparsityConfig | None = None,
        backend: str | None = None,
        bases: Sequence[Basis] | None = None,
        value_bases: Sequence[Basis] | None = None,
        cache_budget: CacheBudget | None = None,
        cache_key_shares: Sequence[float] | None = None,
        attention_cache_bytes: int | None = DEFAULT_LIMIT_BYTES,
    ) -> None:
        if attention_cache_bytes is not None and (isinstance(attention_cache_bytes, bool)
                                                  or not isinstance(attention_cache_bytes, int)
                                                  or attention_cache_bytes < 0):
            raise InvalidInputError(f"attention_cache_bytes must be a whole number of bytes >= 0 or None (no "
                                    f"change to the process's limit), got {attention_cache_bytes!r}")
        if codec is None and values is None and cache_budget is None:
            cache_budget = CacheBudget()
        self.attention_cache_bytes = attention_cache_bytes
        self.codec = codec or CodecConfig()
        self.value_config = values or ValueConfig()
        self.value_bases = tuple(value_bases) if value_bases is not None else None
        self.cache_budget = cache_budget
        self.cache_key_shares = tuple(cache_key_shares) if cache_key_shares is not None else None
        self.sparsity = sparsity
        self.backend = backend
        self.bases = tuple(bases) if bases is not None else None
        self.stats = OffloadStats()
        self.shape: ModelShape | None = None
        self.keys: dict[int, list[CompressedKeys]] = {}
        self.values: dict[int, list[CompressedValues]] = {}

    def open(self, shape: ModelShape) -> None:
        self.check(shape)
        self.shape = shape
        if self.attention_cache_bytes is not None:
            DERIVED.limit_bytes = self.attention_cache_bytes

    def check(self, shape: ModelShape) -> None:
        _check_bases(self.bases, shape, self._key_codec())
        value_codec = self._latent_value_codec()
        if self.value_bases is not None and value_codec is None:
            raise InvalidInputError("value_bases apply to SVDq latent values (values=ValueConfig(codec=...) or "
                                    "cache_budget)")
        if self.value_bases is not None:
            _check_bases(self.value_bases, shape, value_codec)
        _check_key_shares(self.cache_key_shares, self.cache_budget is not None, "cache_budget", shape)

    def _key_codec(self) -> CodecConfig:
        return self.cache_budget.key_codec if self.cache_budget else self.codec

    def unsplit_budget(self) -> CacheBudget | None:
        return self.cache_budget if self.cache_key_shares is None else None

    def _latent_value_codec(self) -> CodecConfig | None:
        return self.cache_budget.value_codec if self.cache_budget else self.value_config.codec

    def _layer_basis(self, bases: tuple[Basis, ...] | None, layer: int) -> Basis | None:
        return bases[layer] if bases is not None else None

    def store(self, row: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        started = time.perf_counter()
        shape = _require_open(self.shape)
        layers = range(keys.shape[0])
        if row not in self.keys and self.cache_budget is not None:
            caches = [
                compress_kv(keys[layer], values[layer],
                            self.cache_budget.with_share(self.cache_key_shares[layer] if self.cache_key_shares else None),
                            positions=positions, rope=shape.rope, key_space="post_rope",
                            key_basis=self._layer_basis(self.bases, layer),
                            value_basis=self._layer_basis(self.value_bases, layer))
                for layer in layers
            ]
            self.keys[row] = [cache.keys for cache in caches]
            self.values[row] = [cache.values for cache in caches]
        elif row not in self.keys:
            self.keys[row] = [
                compress(keys[layer], self.codec, positions=positions, rope=shape.rope, key_space="post_rope",
                         basis=self._layer_basis(self.bases, layer))
                for layer in layers
            ]
            self.values[row] = [compress_values(values[layer], self.value_config,
                                                basis=self._layer_basis(self.value_bases, layer))
                                for layer in layers]
        else:
            self.keys[row] = [append(self.keys[row][layer], keys[layer], positions) for layer in layers]
            self.values[row] = [append_values(self.values[row][layer], values[layer]) for layer in layers]
        self.stats.set_stored({
            index: (stored[0].num_tokens, sum(item.nbytes for item in stored),
                    sum(item.nbytes for item in self.values[index]),
                    2 * stored[0].num_tokens * shape.kv_heads * shape.head_dim * len(stored))
            for index, stored in self.keys.items()
        })
        elapsed = time.perf_counter() - started
        self.stats.backend_seconds += elapsed
        self.stats.store_seconds += elapsed

    def attend(self, layer: int, queries: torch.Tensor, rows: Sequence[int],
               scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        count = queries.shape[1]
        result = attend(
            queries.flatten(0, 1),
            [self.keys[row][layer] for row in rows for _ in range(count)],
            [self.values[row][layer] for row in rows for _ in range(count)],
            scale=scale,
            sparsity=self.sparsity,
            backend=self.backend,
            softcap=softcap,
        )
        _count_attend_stats(self.stats, result.stats)
        self.stats.backend_seconds += time.perf_counter() - started
        return result.output.unflatten(0, queries.shape[:2]), result.lse.unflatten(0, queries.shape[:2])

    def close(self) -> None:
        self.keys, self.values = {}, {}


class RemoteOffload(_SharedBasesMixin):
    """Backend on an svdq server, through :class:`svdq_client.KVCacheClient`.

    Args:
        client: a connected ``KVCacheClient`` (the caller owns and closes it).
        codec: key codec of the sequences' profile (default: the whole cache, see below; with
            ``cache_bits_per_element`` :data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC`; ``CodecConfig()``
            is svdq at 1.5 true bits).
        value_bits: ``None`` keeps values 16-bit on the server; 2 or 4 quantizes them.
        sparsity: key sparsity of the server's attention (``None``: dense).
        profile_name: name of the profile registered for the model (default: derived from
            the model shape, codec and bases, so different settings never collide).
        sequence_id: id of batch row 0's stored sequence (default: a fresh random one); row
            ``r`` > 0 uses ``f"{sequence_id}-{r}"`` (:meth:`sequence_id_of`).
        bases: shared key bases, one per offloaded layer (:func:`calibrate_bases`; svdq only),
            sent once with the profile; the stored blobs then carry only their fingerprints.
            ``None``: :class:`SvdqOffloadCache` fits them on shipped calibration text (its
            ``calibration_tokens``; 0: a basis per sequence, stored with it).
        value_codec: store values as an SVDq latent with this codec (e.g.
            :data:`svdq.values.DEFAULT_VALUE_CODEC`); ``value_bits`` must then be None.
        value_bases: shared value bases, one per offloaded layer (:func:`calibrate_cache_bases`);
            ``None``: calibrated by the cache like ``bases``.
        cache_bits_per_element: one budget in true bits per KV element for keys and latent
            values, split per layer on the server (:func:`svdq.kv.compress_kv`); needs
            ``value_codec``.
        cache_key_shares: each layer's split of that budget, measured once
            (:func:`calibrate_key_shares`); ``None``: the server measures it on every upload (or
            :class:`SvdqOffloadCache` calibrates it on shipped text, with its
            ``calibrate_split=True``).

    With none of ``codec``, ``value_bits``, ``value_codec`` and ``cache_bits_per_element``
    given, the profile stores the whole cache at 2.0 true bits per KV element (keys
    :data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC`, values :data:`svdq.values.DEFAULT_VALUE_CODEC`),
    8x smaller than fp16. Keys only, values 16-bit: ``RemoteOffload(client, CodecConfig())``.
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
        cache_key_shares: Sequence[float] | None = None,
    ) -> None:
        self.client = client
        if codec is None and value_bits is None and value_codec is None and cache_bits_per_element is None:
            value_codec, cache_bits_per_element = DEFAULT_VALUE_CODEC, DEFAULT_TOTAL_BITS
        if codec is None and cache_bits_per_element is not None:
            codec = DEFAULT_CACHE_KEY_CODEC  # a budget's own key default (svdq.kv.CacheBudget), as LocalOffload's
        self.cache_key_shares = tuple(cache_key_shares) if cache_key_shares is not None else None
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
        self._stored: dict[int, tuple[int, int, int, int]] = {}

    def _key_codec(self) -> CodecConfig:
        return self.codec

    def _latent_value_codec(self) -> CodecConfig | None:
        return self.value_codec

    def unsplit_budget(self) -> CacheBudget | None:
        if self.cache_bits_per_element is None or self.cache_key_shares is not None:
            return None
        # The budget the server builds from the profile (svdq.api.Profile.cache_budget).
        return CacheBudget(self.cache_bits_per_element, key_codec=self.codec, value_codec=self.value_codec)

    def check(self, shape: ModelShape) -> None:
        _check_bases(self.bases, shape, self.codec)
        _check_key_shares(self.cache_key_shares, self.cache_bits_per_element is not None, "cache_bits_per_element",
                          shape)

    def sequence_id_of(self, row: int) -> str:
        """Server-side sequence id of batch row ``row``."""
        return self.sequence_id if row == 0 else f"{self.sequence_id}-{row}"

    def open(self, shape: ModelShape) -> None:
        from svdq_client import Profile

        self.check(shape)
        self.shape = shape
        if self.profile_name is None:
            value_settings = (self.value_bits, self.value_codec, self.cache_bits_per_element, self.cache_key_shares)
            self.profile_name = _profile_name(shape, self.codec, value_settings,
                                              (self.bases or ()) + (self.value_bases or ()) or None)
        profile = Profile(
            name=self.profile_name,
            num_layers=len(shape.offloaded_layers),
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            rope=shape.rope,
            codec=self.codec,
            value_bits=self.value_bits,
            bases=self.bases,
            value_codec=self.value_codec,
            value_bases=self.value_bases,
            cache_bits_per_element=self.cache_bits_per_element,
            cache_key_shares=self.cache_key_shares,
        )
        started = time.perf_counter()
        # Registering an identical profile again is accepted; a different one under the same
        # name is a ConflictError rather than a silent change under other workers' sequences.
        self.client.register_profile(profile)
        self.stats.backend_seconds += time.perf_counter() - started

    def store(self, row: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        started = time.perf_counter()
        _require_open(self.shape)
        sequence_id = self.sequence_id_of(row)
        if row not in self._stored:
            info = self.client.upload(
                sequence_id, self.profile_name, keys, values, positions=positions, key_space="post_rope"
            )
        else:
            self.client.append(sequence_id, keys, values, positions=positions)
            # the Append reply carries the sequence's sizes; only an older server needs a Describe
            info = self.client.last_info(sequence_id) or self.client.describe(sequence_id)
        self._stored[row] = (int(info.num_tokens), int(info.key_bytes), int(info.value_bytes),
                             int(info.fp16_key_bytes))
        self.stats.set_stored(self._stored)
        elapsed = time.perf_counter() - started
        self.stats.backend_seconds += elapsed
        self.stats.store_seconds += elapsed

    def attend(self, layer: int, queries: torch.Tensor, rows: Sequence[int],
               scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        count = queries.shape[1]
        entries = [(self.sequence_id_of(row), layer) for row in rows for _ in range(count)]
        result = self.client.attend(queries.flatten(0, 1), entries, sparsity=self.sparsity, scale=scale,
                                    softcap=softcap)
        _count_attend_stats(self.stats, result.stats)
        self.stats.backend_seconds += time.perf_counter() - started
        return result.output.unflatten(0, queries.shape[:2]), result.lse.unflatten(0, queries.shape[:2])

    def close(self) -> None:
        rows, self._stored = sorted(self._stored), {}
        for row in rows:
            self.client.delete(self.sequence_id_of(row))


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
    layers = len(shape.offloaded_layers)
    if len(bases) != layers or any(basis.channels != channels for basis in bases):
        raise InvalidInputError(
            f"bases must hold one basis of kv_heads*head_dim = {channels} channels per offloaded layer ({layers}) "
            f"of this {shape.model_type} model; got {len(bases)} with channels {sorted({b.channels for b in bases})}: "
            "fit them on this model with calibrate_bases"
        )


@torch.no_grad()
def calibrate_bases(model: Any, input_ids: torch.Tensor) -> tuple[Basis, ...]:
    """Shared SVDq key bases, one per offloaded layer, fitted on the model's own keys for ``input_ids``.

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
    """Shared key bases (as :func:`calibrate_bases`) and value bases, one per offloaded layer each, from
    one run of ``input_ids``: ``(key_bases, value_bases)``. Value bases serve SVDq latent
    values (``ValueConfig(codec=...)``, :func:`svdq.values.compress_values` ``basis=``);
    values carry no RoPE, so they are fitted as they are cached."""
    shape = ModelShape.from_config(model.config)
    channels = shape.kv_heads * shape.head_dim
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < channels:
        raise InvalidInputError(
            f"calibration input_ids must have shape [1, tokens] with tokens >= kv_heads*head_dim = {channels}, "
            f"got {list(input_ids.shape)}"
        )
    calibration = _calibration_prefill(model, input_ids)
    key_bases = tuple(fit_layer_basis(calibration.keys[layer].cpu(), positions=calibration.positions, rope=shape.rope)
                      for layer in shape.offloaded_layers)
    return key_bases, tuple(fit_layer_basis(calibration.values[layer].cpu()) for layer in shape.offloaded_layers)


# model -> {(tokens, sha256 of the calibration ids): (key_bases, value_bases)}; weak, so the bases
# go with the model.
_CALIBRATED: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], tuple[tuple[Basis, ...], tuple[Basis, ...]]]] = (
    weakref.WeakKeyDictionary())
# One calibration at a time: two caches opened at once on one model would otherwise both run it.
_CALIBRATION_LOCK = threading.Lock()


def default_calibrated_bases(model: Any, tokenizer: Any, tokens: int = DEFAULT_CALIBRATION_TOKENS,
                             ) -> tuple[tuple[Basis, ...], tuple[Basis, ...]]:
    """Shared key and value bases of ``model`` (:func:`calibrate_cache_bases`) fitted on the shipped
    calibration text: the last ``tokens`` tokens of the Python documentation's prose
    (:func:`svdq_client.evaluation.calibration_tokens`, tokenized with ``tokenizer``), never a
    served prompt. What :class:`SvdqOffloadCache`, ``svdq-demo`` and the vLLM connector's
    ``register-profile`` calibrate on by default.

    Computed once per model object and calibration token ids in this process (one prefill of
    ``tokens`` tokens; README "Short prompts" has its time on SmolLM2); later calls return the
    same tuples. The model's weights must not change while it is in use.

    Raises:
        InvalidInputError: ``tokens`` not an integer in ``kv_heads * head_dim`` ..
            :data:`MAX_CALIBRATION_TOKENS` or above the text's length, or a tokenizer whose ids
            do not fit the model's vocabulary.
    """
    input_ids, key = _default_calibration_ids(model, tokenizer, tokens)
    return _once_per_model(_CALIBRATED, model, key, lambda: calibrate_cache_bases(model, input_ids),
                           f"shared bases on {tokens} tokens of shipped text")


def _once_per_model(store: weakref.WeakKeyDictionary, model: Any, key: tuple, compute: Callable[[], Any],
                    what: str) -> Any:
    """``store[model][key]``, computed by ``compute`` the first time (under the calibration
    lock, so that concurrent caches wait for one run) and logged with its duration."""
    with _CALIBRATION_LOCK:
        per_model = store.setdefault(model, {})
        if key not in per_model:
            started = time.perf_counter()
            per_model[key] = compute()
            LOGGER.info("calibrated %s in %.1f s", what, time.perf_counter() - started)
        return per_model[key]


# model -> {(tokens, sha256 of the calibration ids, budget, basis fingerprints): key shares}
_CALIBRATED_SHARES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[float, ...]]] = (
    weakref.WeakKeyDictionary())


def default_calibrated_key_shares(model: Any, tokenizer: Any, budget: CacheBudget,
                                  key_bases: Sequence[Basis] | None = None,
                                  value_bases: Sequence[Basis] | None = None,
                                  tokens: int = DEFAULT_CALIBRATION_TOKENS) -> tuple[float, ...]:
    """Each offloaded layer's split of ``budget`` (:func:`calibrate_key_shares`) measured on the
    same shipped calibration text as :func:`default_calibrated_bases`, with the bases the
    profile will hold. What :class:`SvdqOffloadCache` gives a whole-cache backend without
    ``cache_key_shares`` with ``calibrate_split=True``: uploads then compress each layer once
    instead of once per candidate share (``svdq.kv.DEFAULT_KEY_SHARES``).

    Computed once per model object, text, budget and bases in this process; raises as
    :func:`default_calibrated_bases`.
    """
    input_ids, text_key = _default_calibration_ids(model, tokenizer, tokens)
    fingerprints = tuple(tuple(basis.fingerprint for basis in bases) if bases is not None else None
                         for bases in (key_bases, value_bases))
    key = (*text_key, repr(budget), fingerprints)
    return _once_per_model(_CALIBRATED_SHARES, model, key,
                           lambda: calibrate_key_shares(model, input_ids, budget, key_bases, value_bases),
                           f"the key/value split on {tokens} tokens of shipped text")


def _default_calibration_ids(model: Any, tokenizer: Any, tokens: int) -> tuple[torch.Tensor, tuple[int, str]]:
    """The shipped calibration text's ids for ``model`` (checked) and their cache key."""
    shape = ModelShape.from_config(model.config)
    channels = shape.kv_heads * shape.head_dim
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not channels <= tokens <= MAX_CALIBRATION_TOKENS:
        raise InvalidInputError(f"calibration_tokens must be an integer in {channels}..{MAX_CALIBRATION_TOKENS} "
                                f"(at least kv_heads*head_dim of this model; 0 at the cache for per-sequence "
                                f"bases), got {tokens!r}")
    try:
        input_ids = calibration_tokens(tokenizer, tokens)
    except ValueError as error:
        raise InvalidInputError(f"calibration_tokens {tokens}: {error}") from None
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(input_ids.max()) >= vocab:
        raise InvalidInputError(f"the tokenizer gives token id {int(input_ids.max())}, beyond this model's "
                                f"vocabulary of {vocab}: pass the model's own tokenizer")
    return input_ids, (tokens, hashlib.sha256(input_ids.numpy().tobytes()).hexdigest())


def _calibration_prefill(model: Any, input_ids: torch.Tensor) -> Any:
    """The model's plain cache for calibration ``input_ids`` (:func:`svdq_client.evaluation.prefill`)."""
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:  # the offload attention needs an SvdqOffloadCache; this is a plain run
        disable_offload(model)
    try:
        return prefill(model, input_ids.to(model.device))
    finally:
        if previous == ATTENTION_NAME:
            model.set_attn_implementation(previous)


@torch.no_grad()
def calibrate_key_shares(model: Any, input_ids: torch.Tensor, budget: CacheBudget,
                         key_bases: Sequence[Basis] | None = None,
                         value_bases: Sequence[Basis] | None = None) -> tuple[float, ...]:
    """Each offloaded layer's split of ``budget`` between keys and values, measured once on the
    model's cache for ``input_ids`` (text like the traffic, not the served documents) with the
    shared bases the profile will hold (:func:`svdq.kv.measure_key_shares`). Pass the result
    as ``cache_key_shares``: uploads then compress each layer once instead of once per
    candidate share."""
    shape = ModelShape.from_config(model.config)
    calibration = _calibration_prefill(model, input_ids)
    layers = shape.offloaded_layers
    return measure_key_shares([calibration.keys[layer].cpu() for layer in layers],
                              [calibration.values[layer].cpu() for layer in layers], budget,
                              positions=calibration.positions, rope=shape.rope, key_space="post_rope",
                              key_bases=key_bases, value_bases=value_bases)


def _require_open(shape: ModelShape | None) -> ModelShape:
    if shape is None:
        raise InvalidInputError("the offload backend was not opened: pass it to SvdqOffloadCache first")
    return shape


class SvdqOffloadLayer(CacheLayerMixin):
    """One full-attention layer's local part of an offloaded cache: the most recent tokens only.

    ``keys`` / ``values``: [batch, kv_heads, local_tokens, head_dim] in the model's dtype, keys
    post-RoPE; ``positions``: int64 [batch, local_tokens] absolute positions of the local
    tokens; ``valid``: bool [batch, local_tokens], False for padding (never offloaded).
    ``offload_index`` is the layer's index in the backend.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: SvdqOffloadCache, layer_idx: int, offload_index: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.offload_index = offload_index
        self.positions = torch.zeros(0, 0, dtype=torch.int64)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch = key_states.shape[0]
        self.keys = key_states.new_zeros((batch, key_states.shape[1], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((batch, value_states.shape[1], 0, value_states.shape[3]))
        self.positions = torch.zeros(batch, 0, dtype=torch.int64, device=self.device)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, kwargs: dict | None = None, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new post-RoPE ``key_states`` / ``value_states`` [batch, kv_heads, new, head_dim]
        and return the local keys and values [batch, kv_heads, local_tokens, head_dim]."""
        if kwargs is None:
            raise InvalidInputError(
                "this model's attention does not pass its kwargs to cache.update; its family is not supported "
                f"by the svdq offload integration (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.cache.check_batch(key_states.shape[0])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, new_tokens = key_states.shape[0], key_states.shape[2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            new_positions = (torch.arange(new_tokens, device=self.device) + self.get_seq_length()).expand(batch, -1)
        else:
            new_positions = position_ids.reshape(-1, position_ids.shape[-1]).to(self.device, torch.int64)
            new_positions = new_positions.expand(batch, -1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        # Padding is known only from the attention mask, which the attention function sees.
        self.valid = torch.cat([self.valid, torch.ones(batch, new_tokens, dtype=torch.bool, device=self.device)], dim=1)
        kwargs[_LAYER_KWARG] = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Token slots seen (offloaded plus local; padding included, as in the attention mask)."""
        return self.cache.offloaded_tokens + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Local keys start after the offloaded slots (sliding-window-like semantics).
        local = self.keys.shape[-2] if self.is_initialized else 0
        return local + query_length, self.cache.offloaded_tokens

    def get_max_length(self) -> int:
        return -1

    def take_oldest(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the ``count`` oldest local slots; returns their keys and values
        [batch, count, kv_heads, head_dim], positions int64 [batch, count] and valid bool [batch, count]."""
        taken = (self.keys[:, :, :count].transpose(1, 2), self.values[:, :, :count].transpose(1, 2),
                 self.positions[:, :count], self.valid[:, :count])
        self.keys = self.keys[:, :, count:]
        self.values = self.values[:, :, count:]
        self.positions = self.positions[:, count:]
        self.valid = self.valid[:, count:]
        return taken

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidInputError("beam search is not supported with the svdq offload cache (offloaded prefixes "
                                "cannot be reordered); use greedy or sampled decoding")


class SvdqSlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of a hybrid model: transformers' own sliding-window cache layer,
    kept locally in full (it needs only its window); it tells the attention function its cache."""

    def __init__(self, cache: SvdqOffloadCache, layer_idx: int, sliding_window: int) -> None:
        super().__init__(sliding_window=sliding_window)
        self.cache = cache
        self.layer_idx = layer_idx

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, kwargs: dict | None = None, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.check_batch(key_states.shape[0])
        if kwargs is not None:
            kwargs[_LAYER_KWARG] = self
        return super().update(key_states, value_states)


class SvdqOffloadCache(Cache):
    """A transformers ``Cache`` that keeps ``window`` recent tokens per full-attention layer
    locally and the rest of each batch row in an :class:`OffloadBackend` sequence.

    Args:
        model: a transformers causal LM (or its config) of a supported family.
        backend: :class:`LocalOffload` or :class:`RemoteOffload` (one sequence per batch row).
        window: local tokens kept after each forward pass (>= 1).
        spill_block: once the local part exceeds ``window`` by this many tokens, they move to
            the backend in one append (>= 1); a larger block means fewer, larger appends.
        tokenizer: the model's tokenizer, for the shipped calibration text (below).
        calibration_tokens: when ``backend`` (:class:`LocalOffload` or :class:`RemoteOffload`)
            stores svdq keys or SVDq latent values without shared bases, fit them first on this
            many tokens of shipped text (:func:`default_calibrated_bases`, once per model in the
            process; ``calibration_seconds`` says how long this cache waited for it). Short
            sequences keep their answers with shared bases (README, "Short prompts"). ``0``: a
            basis per sequence, stored with it (the fixed cost of the basis and mean then
            weighs on short sequences), and no calibrated split (below).
        calibrate_split: ``True``: when ``backend`` stores the whole cache under one budget
            without ``cache_key_shares``, measure each layer's key/value split once on the same
            calibration text with the backend's bases (:func:`default_calibrated_key_shares`,
            once per model in the process, counted in ``calibration_seconds``) and give it to
            the backend, so that every upload compresses each layer once instead of once per
            candidate share: faster uploads, but on SmolLM2 at 2.0 bits it found 11/12
            needles at 4,096 tokens where the per-upload split finds 12/12 (docs/quality.md,
            round 6), so it is not the default. ``False`` (default): the split is measured on
            every upload and follows each sequence.

    Sliding-window layers (:attr:`ModelShape.layer_types`) keep their window locally and never
    reach the backend; a model with only sliding layers offloads nothing.
    """

    def __init__(
        self,
        model: Any,
        backend: OffloadBackend,
        window: int = DEFAULT_WINDOW,
        spill_block: int = DEFAULT_SPILL_BLOCK,
        *,
        tokenizer: Any = None,
        calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
        calibrate_split: bool = False,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise InvalidInputError(f"window must be an integer >= 1, got {window!r}")
        if not isinstance(spill_block, int) or spill_block < 1:
            raise InvalidInputError(f"spill_block must be an integer >= 1, got {spill_block!r}")
        if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 0:
            raise InvalidInputError(f"calibration_tokens must be an integer >= 0 (0: per-sequence bases), "
                                    f"got {calibration_tokens!r}")
        if not isinstance(calibrate_split, bool):
            raise InvalidInputError(f"calibrate_split must be True or False, got {calibrate_split!r}")
        if calibrate_split and not calibration_tokens:
            raise InvalidInputError("calibrate_split=True measures the split on the shipped calibration text: it needs "
                                    "calibration_tokens > 0 (or pass the backend cache_key_shares=)")
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
        self.rows: int | None = None
        #: Batch rows with a backend sequence, and rows :class:`StopFinishedRows` saw finish.
        self.stored_rows: set[int] = set()
        self.finished_rows: set[int] = set()
        offload_index = {layer: index for index, layer in enumerate(self.shape.offloaded_layers)}
        layers: list[CacheLayerMixin] = [
            SvdqOffloadLayer(self, index, offload_index[index]) if index in offload_index
            else SvdqSlidingLayer(self, index, self.shape.sliding_window)
            for index in range(self.shape.num_layers)
        ]
        super().__init__(layers=layers)
        self.offload_layers = [layer for layer in layers if isinstance(layer, SvdqOffloadLayer)]
        self.calibration_seconds = 0.0
        if self.offload_layers:
            self._calibrate(model, tokenizer, calibration_tokens, calibrate_split)
            backend.open(self.shape)

    def _calibrate(self, model: Any, tokenizer: Any, tokens: int, split: bool) -> None:
        """Give the backend the default calibrated bases it lacks, then the calibrated split of
        its budget when it has none (see ``calibration_tokens`` and ``calibrate_split``)."""
        backend = self.backend
        if not isinstance(backend, _SharedBasesMixin):
            return  # another OffloadBackend: its bases are its own business
        backend.check(self.shape)  # wrong settings fail before a calibration run
        keys, values = backend.missing_bases()
        budget = backend.unsplit_budget() if split else None
        if not tokens or not (keys or values or budget):
            return
        if tokenizer is None or not hasattr(model, "config"):
            missing = " and ".join(name for name, needed in (("shared bases", keys or values),
                                                             ("the key/value split", budget)) if needed)
            raise InvalidInputError(
                f"the svdq offload cache calibrates {missing} on shipped calibration text "
                f"(calibration_tokens={tokens}) and needs the model itself and its tokenizer for it: pass "
                "SvdqOffloadCache(model, backend, tokenizer=tokenizer), give the backend bases= (calibrate_bases)"
                + (" and cache_key_shares= (calibrate_key_shares), or leave calibrate_split False to measure the "
                   "split on every upload" if budget else "")
                + ", or calibration_tokens=0 for a basis per sequence")
        started = time.perf_counter()
        if keys or values:
            key_bases, value_bases = default_calibrated_bases(model, tokenizer, tokens)
            backend.use_bases(key_bases if keys else None, value_bases if values else None)
        if budget is not None:
            backend.use_key_shares(default_calibrated_key_shares(model, tokenizer, budget, backend.bases,
                                                                 backend.value_bases, tokens))
        self.calibration_seconds = time.perf_counter() - started

    @property
    def stats(self) -> OffloadStats:
        return self.backend.stats

    def check_batch(self, batch: int) -> None:
        """The batch size is fixed by the first forward pass (beams would change it)."""
        if self.rows is None:
            self.rows = batch
        elif batch != self.rows:
            raise InvalidInputError(
                f"this svdq offload cache holds {self.rows} rows, got a forward pass of {batch}: "
                "use one cache per batch"
            )

    def offload_prefix(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Seed an empty cache (batch size 1) with a prefix the worker already computed (for
        example a shared document prefilled once): everything beyond ``window`` goes to the
        backend at once.

        Args:
            keys: per model layer [tokens, kv_heads, head_dim] post-RoPE keys at positions
                0..tokens-1 (sliding layers keep their window of them).
            values: per model layer [tokens, kv_heads, head_dim].
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
        if layer_idx != self.shape.num_layers - 1 or not self.offload_layers:
            return
        local = self.offload_layers[0].keys.shape[-2]
        overflow = local - self.window
        # The first spill moves the whole prefill prefix; later ones wait for a full block.
        if overflow <= 0 or (self.offloaded_tokens and overflow < self.spill_block):
            return
        taken = [layer.take_oldest(overflow) for layer in self.offload_layers]
        keys = torch.stack([item[0] for item in taken])  # [layers, batch, overflow, kv_heads, head_dim]
        values = torch.stack([item[1] for item in taken])
        positions, valid = taken[0][2].cpu(), taken[0][3].cpu()
        for row in range(keys.shape[1]):
            # Padding never reaches the backend; finished rows stop costing.
            if row in self.finished_rows or not valid[row].any():
                continue
            keep = valid[row].to(keys.device)
            self.backend.store(row, keys[:, row, keep], values[:, row, keep], positions[row][valid[row]])
            self.stored_rows.add(row)
        self.offloaded_tokens += overflow
        LOGGER.debug("offloaded %d token slots (total %d)", overflow, self.offloaded_tokens)

    def finish_rows(self, rows: Sequence[int]) -> None:
        """Stop attending to and storing for these batch rows (their sequences stay until close)."""
        self.finished_rows.update(int(row) for row in rows)

    def close(self) -> None:
        """Release the backend's stored sequences."""
        self.backend.close()

    def crop(self, tokens_to_remove: int) -> None:
        raise InvalidInputError("cropping is not supported with the svdq offload cache (the prefix is offloaded)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise InvalidInputError(
                f"the svdq offload cache keeps one sequence per prompt; num_return_sequences / beams of {repeats} "
                "are not supported (use greedy or sampled decoding, one row per prompt)"
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise InvalidInputError("selecting batch rows is not supported with the svdq offload cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidInputError("beam search is not supported with the svdq offload cache (offloaded prefixes "
                                "cannot be reordered); use greedy or sampled decoding")

    def reset(self) -> None:
        raise InvalidInputError("reset is not supported with the svdq offload cache: create a new cache")


class StopFinishedRows(StoppingCriteria):
    """Stopping criterion for ``model.generate`` that tells an :class:`SvdqOffloadCache` which
    rows have produced one of ``stop_token_ids``: those rows stop costing attention requests
    and uploads while the others go on (generate keeps feeding them padding).

    Pass it as ``stopping_criteria=[StopFinishedRows(cache, eos_ids)]``; it also stops the
    rows itself, as generate's own end-of-sequence check does.
    """

    def __init__(self, cache: SvdqOffloadCache, stop_token_ids: int | Sequence[int]) -> None:
        ids = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
        if not ids:
            raise InvalidInputError("StopFinishedRows needs at least one stop token id")
        self.cache = cache
        self.stop_token_ids = torch.tensor(ids, dtype=torch.int64)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.isin(input_ids[:, -1], self.stop_token_ids.to(input_ids.device))
        self.cache.finish_rows(done.nonzero().flatten().tolist())
        return done


def _visible(mask: torch.Tensor | None, query_count: int, key_count: int, device: torch.device) -> torch.Tensor:
    """bool [batch or 1, 1, q, n]: which local keys each query may see. ``None`` from the mask
    builder means plain causal attention; the queries are the last ``q`` of the ``n`` keys."""
    if mask is None:
        rows = torch.arange(query_count, device=device)[:, None] + (key_count - query_count)
        return (torch.arange(key_count, device=device)[None, :] <= rows)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask (eager style)


def _local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                     scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the local tokens with its log-sum-exp, for merging with the offloaded part.

    Args:
        query: [B, Hq, q, D]; key, value: [B, Hkv, n, D] post-RoPE; visible: bool [B or 1, 1, q, n];
        softcap: the model's attention logit softcapping, or ``None``.
    Returns:
        output float32 [B, q, Hq, D] and lse float32 [B, q, Hq] (natural log, scale included).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if softcap is not None:
        output, lse = _softcapped_attention(query, key, value, visible, scale, softcap)
    elif query.device.type == "cpu":
        output, lse = _fused_cpu_attention(query, key, value, visible, scale)
    else:
        output, lse = _sdpa_attention_with_lse(query, key, value, visible, scale)
    return output.transpose(1, 2).float(), lse.transpose(1, 2).float()


def _softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                          scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with logit softcapping, as Gemma 2's eager attention computes it (scores
    ``softcap * tanh(scores / softcap)``, then the mask, a float32 softmax): no fused kernel
    softcaps. Scores in query blocks bound the [B, H, block, n] memory. Shapes as
    :func:`_fused_cpu_attention` (output in float32); a query that sees no key gets output 0
    and lse -inf."""
    outputs, lses = [], []
    key_t, value = key.float().transpose(2, 3), value.float()  # once, not per query block
    for start in range(0, query.shape[2], _QUERY_BLOCK):
        scores = torch.matmul(query[:, :, start : start + _QUERY_BLOCK].float(), key_t) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[:, :, start : start + _QUERY_BLOCK], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        outputs.append(torch.matmul(weights, value))
        lses.append(lse)
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=-1)


def _fused_cpu_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU flash kernel returns the log-sum-exp with the output ([B, H, q, D] and
    [B, H, q]); it takes an additive mask in the query's dtype."""
    additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    additive.masked_fill_(~visible, float("-inf"))
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=additive, scale=scale)[:2]
    return output, lse


def _sdpa_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Off the CPU no public fused op returns the log-sum-exp: SDPA gives the output, the exact
    log-sum-exp comes from the scores in query blocks (few local keys once a prefix is offloaded)."""
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale)
    blocks = []
    for start in range(0, query.shape[2], _QUERY_BLOCK):
        scores = torch.matmul(query[:, :, start : start + _QUERY_BLOCK].float(), key.float().transpose(2, 3)) * scale
        blocks.append(torch.logsumexp(scores.masked_fill(~visible[:, :, start : start + _QUERY_BLOCK], float("-inf")),
                                      dim=-1))
    return output, torch.cat(blocks, dim=-1)


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
        query: [B, Hq, q, D] post-RoPE queries.
        key, value: [B, Hkv, n, D] the local keys and values the cache returned.
        attention_mask: the SDPA mask the model built over those local keys (causality,
            left padding, sliding windows), or ``None`` for plain causal attention.
        scaling: softmax scale (default ``D ** -0.5``).
        kwargs: must carry the cache layer put there by the cache's ``update``.
    Returns:
        ``(output [B, q, Hq, D] in the query dtype, None)``.
    """
    layer = kwargs.pop(_LAYER_KWARG, None)
    if layer is None:
        raise InvalidInputError(
            f"attention {ATTENTION_NAME!r} needs an SvdqOffloadCache: call model.generate(..., cache=SvdqOffloadCache(...))"
        )
    if dropout:
        raise InvalidInputError("the svdq offload attention is for inference: dropout must be 0 (call model.eval())")
    cache = layer.cache
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Gemma 2 passes its attention logit softcapping (None for the other families).
    softcap = kwargs.pop("softcap", None)
    rows = sorted(cache.stored_rows - cache.finished_rows) if isinstance(layer, SvdqOffloadLayer) else []
    query_count = query.shape[2]
    if isinstance(layer, SvdqOffloadLayer) and attention_mask is not None:
        # A query that cannot see itself is padding: keep it out of the backend.
        queries = torch.arange(query_count, device=query.device)
        own = _visible(attention_mask, query_count, key.shape[2], query.device)[
            :, 0, queries, queries + (key.shape[2] - query_count)]
        layer.valid[:, -query_count:] &= own.expand(layer.valid.shape[0], -1)
    if not rows and softcap is None:
        # Nothing offloaded for any live row (the prefill, or a sliding layer): the model's own SDPA.
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale,
                                           **kwargs)
        cache.after_attention(layer.layer_idx)
        return output, None
    visible = _visible(attention_mask, query_count, key.shape[2], query.device)
    output, lse = _local_attention(query, key, value, visible, scale, softcap)
    if not rows:  # softcapped, nothing offloaded: the local part is all there is
        cache.after_attention(layer.layer_idx)
        return output.to(query.dtype), None
    index = torch.tensor(rows, device=query.device)
    remote_output, remote_lse = cache.backend.attend(layer.offload_index, query[index].transpose(1, 2).float().cpu(),
                                                     rows, scale, softcap)
    merged, _ = merge_attention(output[index], lse[index], remote_output.to(output.device),
                                remote_lse.to(output.device))
    output[index] = merged
    cache.after_attention(layer.layer_idx)
    return output.to(query.dtype), None


def enable_offload(model: Any) -> Any:
    """Check that ``model`` is supported and switch its attention to :func:`svdq_offload_attention`.

    Generation then needs an :class:`SvdqOffloadCache` (``model.generate(..., cache=cache)``).
    Returns the model. Raises :class:`InvalidInputError` for unsupported model families.
    """
    ModelShape.from_config(model.config)
    AttentionInterface.register(ATTENTION_NAME, svdq_offload_attention)
    # The model builds SDPA masks (causal, padding, sliding windows) over the local keys.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model._svdq_plain_attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def disable_offload(model: Any, attention: str | None = None) -> Any:
    """Switch ``model`` back to a standard attention implementation: ``attention``, or the one
    it had before :func:`enable_offload` (``"sdpa"`` if unknown; Gemma 2 has ``"eager"``)."""
    model.set_attn_implementation(attention or getattr(model, "_svdq_plain_attention", None) or "sdpa")
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
    "StopFinishedRows",
    "SvdqOffloadLayer",
    "SvdqSlidingLayer",
    "calibrate_bases",
    "calibrate_cache_bases",
    "calibrate_key_shares",
    "default_calibrated_bases",
    "default_calibrated_key_shares",
    "disable_offload",
    "enable_offload",
    "svdq_offload_attention",
]
