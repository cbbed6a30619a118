"""Decode-time attention straight from SVDq-compressed keys.

``attend`` answers a batch of decode queries, each over its own sequence's
:class:`~svdq.codec.CompressedKeys` and :class:`~svdq.values.CompressedValues`. Two backends
compute the same function:

* ``torch``: the reference in this module: the test oracle and the CPU serving path
  (vectorized over tokens; one small Python loop over the sequences of the batch).
* ``triton``: the kernels of :mod:`svdq.kernels.decode_attention` (GPU path, also runs on the
  CPU under ``TRITON_INTERPRET=1``).

How a score is computed: the quantized body tokens are unpacked, dequantized, reconstructed
(``latent @ basis.T + mean``), rotated to their positions with the model's RoPE and dotted
with the post-RoPE query. The full-precision sinks and tail are attended directly. The two
parts are combined exactly through their log-sum-exp (:func:`merge_attention`), the same
operation a caller uses to merge this result with attention over its own recent tokens.

Key sparsity (:class:`SparsityConfig`): the quantized body is cut into chunks of
``chunk_size`` tokens. Each chunk carries a summary: the minimum and maximum over its tokens
of ``score_channels`` latent channels (those with the widest quantization range: the
leading SVD channels for svdq), float16, computed once per compressed sequence. For a query
head, the query is rotated back to the chunk's centre position (RoPE^-1) and projected on
those channels' basis rows (``u``); the chunk's score is the upper bound
``q.mean + sum_j max(u_j * lo_j, u_j * hi_j)``, maximised over the query heads of a KV
head. Each KV head then attends to its best chunks up to ``keep_fraction`` of the sequence,
plus the sinks, the full-precision tail and every chunk that touches the ``num_recent``
latest tokens. The rotation to the chunk centre is the approximation: it is exact for the
slow RoPE frequencies that carry most of the latent energy and noisy for the fast ones.

Bytes read (``AttentionStats.key_bytes_read``) count, once each, the compressed bytes the
computation needs: basis and mean, the codes of every token attended by any head, the
scales and minimums of the groups those tokens fall in, the full-precision sinks and tail,
and for sparse calls the chunk summaries. The dense fp16 reference is ``2 * S * C``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .codec import CompressedKeys
from .errors import InvalidInputError
from .quant import unpack_codes
from .rope import apply_rope, undo_rope
from .values import CompressedValues, gather_values

BACKENDS = ("torch", "triton")
BACKEND_ENV = "SVDQ_BACKEND"


@dataclass(frozen=True)
class SparsityConfig:
    """Attend only to a budget of token chunks chosen by an approximate score.

    Attributes:
        keep_fraction: share of the sequence's tokens attended in total, sinks, tail and
            recent tokens included (they are always attended, even past the budget); (0, 1].
        chunk_size: tokens per selectable chunk, 1..1024.
        num_recent: the latest tokens that are always attended, >= 0.
        score_channels: latent channels whose per-chunk min/max make the summary, 1..64.
    """

    keep_fraction: float = 1 / 32
    chunk_size: int = 16
    num_recent: int = 64
    score_channels: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise InvalidInputError(f"sparsity keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if not (isinstance(self.chunk_size, int) and 1 <= self.chunk_size <= 1024):
            raise InvalidInputError(f"sparsity chunk_size must be an integer in 1..1024, got {self.chunk_size!r}")
        if not (isinstance(self.num_recent, int) and self.num_recent >= 0):
            raise InvalidInputError(f"sparsity num_recent must be an integer >= 0, got {self.num_recent!r}")
        if not (isinstance(self.score_channels, int) and 1 <= self.score_channels <= 64):
            raise InvalidInputError(f"sparsity score_channels must be an integer in 1..64, got {self.score_channels!r}")


@dataclass(frozen=True)
class AttentionStats:
    """What one sequence's attention read.

    Attributes:
        key_bytes_read: compressed key bytes the computation needed (see module docstring).
        dense_fp16_key_bytes: bytes of the same keys in fp16, ``2 * tokens * kv_heads * head_dim``.
        tokens_attended: tokens each KV head attended to.
        tokens_total: tokens in the sequence.
    """

    key_bytes_read: int
    dense_fp16_key_bytes: int
    tokens_attended: int
    tokens_total: int

    @property
    def key_read_reduction(self) -> float:
        """dense_fp16_key_bytes / key_bytes_read."""
        return self.dense_fp16_key_bytes / max(1, self.key_bytes_read)


@dataclass
class AttentionOutput:
    """``output`` float32 [B, Hq, D]; ``lse`` float32 [B, Hq], natural-log log-sum-exp of the
    scaled scores; ``stats`` one :class:`AttentionStats` per sequence."""

    output: torch.Tensor
    lse: torch.Tensor
    stats: list[AttentionStats]


@dataclass
class BodySelection:
    """Which quantized body tokens each KV head attends (body-relative indices).

    ``token_index`` int64 [Hkv, n] (``None`` = every body token, for all heads) and
    ``valid`` bool [Hkv, n] (False for padding that must not count); ``attended_union``
    number of distinct body tokens over heads, ``summary_bytes`` what choosing them read.
    """

    token_index: torch.Tensor | None
    valid: torch.Tensor | None
    per_head_count: int
    attended_union: int
    groups_touched: int
    summary_bytes: int


def select_backend(device: torch.device | str, override: str | None = None) -> str:
    """The backend for tensors on ``device``: ``override``, else ``$SVDQ_BACKEND``, else
    triton on CUDA and torch elsewhere."""
    choice = override or os.environ.get(BACKEND_ENV) or ("triton" if torch.device(device).type == "cuda" else "torch")
    if choice not in BACKENDS:
        source = "backend" if override else BACKEND_ENV
        raise InvalidInputError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidInputError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU"
        )
    return choice


def merge_attention(
    output_a: torch.Tensor, lse_a: torch.Tensor, output_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine attention over two disjoint token sets.

    Args:
        output_a, output_b: [..., D] attention outputs (softmax-weighted values) of each set.
        lse_a, lse_b: [...] natural-log log-sum-exp of each set's scaled scores; ``-inf``
            for an empty set (its output is then ignored).

    Returns:
        ``(output [..., D] float32, lse [...] float32)``: attention over the union.
    """
    if output_a.shape != output_b.shape or lse_a.shape != lse_b.shape or output_a.shape[:-1] != lse_a.shape:
        raise InvalidInputError(
            f"merge_attention needs outputs [..., D] and lse [...] of matching shapes, got outputs "
            f"{tuple(output_a.shape)}, {tuple(output_b.shape)} and lse {tuple(lse_a.shape)}, {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    # Both empty: keep -inf and a zero output instead of NaN from (-inf) - (-inf).
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a = torch.exp(lse_a - safe_top)
    weight_b = torch.exp(lse_b - safe_top)
    total = weight_a + weight_b
    lse = safe_top + torch.log(total)
    denom = torch.where(total > 0, total, torch.ones_like(total))[..., None]
    output = (output_a.float() * weight_a[..., None] + output_b.float() * weight_b[..., None]) / denom
    return output, torch.where(total > 0, lse, torch.full_like(lse, -math.inf))


# ---------------------------------------------------------------------------------------------
# Pieces shared by both backends: layout, cached derived tensors, selection, byte accounting.


def rotates(keys: CompressedKeys) -> bool:
    """Whether stored keys need RoPE at attention (stored pre-RoPE with a RoPE description)."""
    return keys.stored_space == "pre_rope" and keys.rope is not None


def body_range(keys: CompressedKeys) -> tuple[int, int]:
    """(first sequence index, count) of the quantized body tokens."""
    return keys.sinks.shape[0], keys.num_groups * keys.group_size


def code_widths(keys: CompressedKeys) -> tuple[int, int]:
    """(kept channels r, code bits per body token), cached: reading them from a CUDA tensor
    would synchronise the device on every call."""
    cached = keys._cache.get("code_widths")
    if cached is None:
        widths = keys.kept_bits
        cached = (widths.numel(), int(widths.sum()))
        keys._cache["code_widths"] = cached
    return cached


def latent_codes(keys: CompressedKeys) -> torch.Tensor:
    """uint8 [n_body, r] unpacked codes, cached on ``keys`` (r bytes per body token: the
    general bit unpack is the slow step of the CPU path, so it runs once per sequence)."""
    cached = keys._cache.get("latent_codes")
    if cached is None:
        codes = unpack_codes(keys.codes, keys.kept_bits.to(keys.codes.device), keys.group_size)
        cached = codes.reshape(-1, keys.kept_bits.numel())
        keys._cache["latent_codes"] = cached
    return cached


def _dequantized(keys: CompressedKeys, body_index: torch.Tensor | None, channels: torch.Tensor | None = None) -> torch.Tensor:
    """float32 latent [..., r'] of body tokens ``body_index`` [...] (all when None), for the
    kept channels ``channels`` (all when None)."""
    codes = latent_codes(keys)
    scales, mins = keys.scales, keys.mins
    if channels is not None:
        codes, scales, mins = codes[:, channels], scales[:, channels], mins[:, channels]
    if body_index is None:
        group = torch.arange(codes.shape[0], device=codes.device) // keys.group_size
        return codes.float() * scales.float()[group] + mins.float()[group]
    group = body_index // keys.group_size
    return codes[body_index].float() * scales[group].float() + mins[group].float()


def _score_channels(keys: CompressedKeys, count: int) -> torch.Tensor:
    """int64 [k] kept-channel indices with the widest mean quantization range."""
    key = ("score_channels", count)
    cached = keys._cache.get(key)
    if cached is None:
        levels = (2 ** keys.kept_bits.to(keys.scales.device).float() - 1)
        spread = (keys.scales.float() * levels).pow(2).mean(dim=0)
        cached = torch.argsort(spread, descending=True)[: min(count, spread.numel())]
        keys._cache[key] = cached
    return cached


def chunk_summary(keys: CompressedKeys, chunk_size: int, score_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-chunk latent bounds, cached on ``keys``.

    Returns ``channels`` int64 [k] (kept-channel indices), ``low`` and ``high`` float16
    [n_chunks, k]: min and max over each chunk's body tokens of those latent channels
    (float16 rounded outward so they stay bounds).
    """
    key = ("chunk_summary", chunk_size, score_channels)
    cached = keys._cache.get(key)
    if cached is None:
        channels = _score_channels(keys, score_channels)
        latent = _dequantized(keys, None, channels)
        n_body, k = latent.shape
        n_chunks = -(-n_body // chunk_size)
        padded_len = n_chunks * chunk_size
        low = torch.full((padded_len, k), math.inf, device=latent.device)
        high = torch.full((padded_len, k), -math.inf, device=latent.device)
        low[:n_body], high[:n_body] = latent, latent
        low = low.reshape(n_chunks, chunk_size, k).amin(dim=1)
        high = high.reshape(n_chunks, chunk_size, k).amax(dim=1)
        low16 = low.to(torch.float16)
        high16 = high.to(torch.float16)
        low16 = torch.where(low16.float() > low, torch.nextafter(low16, torch.full_like(low16, -math.inf)), low16)
        high16 = torch.where(high16.float() < high, torch.nextafter(high16, torch.full_like(high16, math.inf)), high16)
        cached = (channels, low16, high16)
        keys._cache[key] = cached
    return cached


def select_body_tokens(query: torch.Tensor, keys: CompressedKeys, sparsity: SparsityConfig | None) -> BodySelection:
    """Choose the quantized body tokens each KV head attends, for one query [Hq, D] (float32,
    post-RoPE); ``sparsity=None`` means dense. See :func:`select_body_tokens_many`."""
    return select_body_tokens_many(query[None], keys, sparsity)[0]


def select_body_tokens_many(queries: torch.Tensor, keys: CompressedKeys, sparsity: SparsityConfig | None) -> list[BodySelection]:
    """Choose the quantized body tokens each KV head attends, for several queries of one sequence.

    Args:
        queries: float32 [n, Hq, D] post-RoPE queries over ``keys`` (scored together).
        sparsity: ``None`` for dense attention.

    Returns:
        n selections; for sparse ones ``token_index`` is [Hkv, m] with the same m for all.
    """
    count = queries.shape[0]
    start, n_body = body_range(keys)
    groups = keys.num_groups
    dense = [BodySelection(None, None, n_body, n_body, groups, 0) for _ in range(count)]
    if sparsity is None or n_body == 0:
        return dense
    total = keys.num_tokens
    kv_heads, head_dim = keys.kv_heads, keys.head_dim
    chunk = sparsity.chunk_size
    n_chunks = -(-n_body // chunk)
    # Chunks touching the recent window are always attended.
    recent_from = max(0, total - sparsity.num_recent - start)
    first_forced = min(n_chunks, recent_from // chunk)
    forced_tokens = n_body - first_forced * chunk
    full_precision = total - n_body
    budget = math.ceil(sparsity.keep_fraction * total)
    picks = max(0, (budget - full_precision - forced_tokens) // chunk)
    candidates = first_forced
    if picks >= candidates:
        return dense
    device = keys.codes.device
    forced = torch.arange(first_forced * chunk, n_body, device=device)
    summary_bytes = 0
    if picks > 0:
        channels, low, high = chunk_summary(keys, chunk, sparsity.score_channels)
        low, high = low[:candidates].float(), high[:candidates].float()
        summary_bytes = 4 * candidates * channels.numel()
        body_positions = keys.token_positions()[start:start + n_body]
        centre = body_positions[torch.arange(candidates, device=device) * chunk + (chunk - 1) // 2]
        q_heads = queries.shape[1]
        ratio = q_heads // kv_heads
        flat_q = queries.float().reshape(1, count * q_heads, head_dim)
        if rotates(keys):
            # RoPE^-1 at the chunk centre: q . R_t k ~= (R_c^T q) . k for t near c.
            rotated = undo_rope(flat_q.expand(candidates, -1, -1), centre, keys.rope)
        else:
            rotated = flat_q.expand(candidates, -1, -1)
        rotated = rotated.reshape(candidates, count, kv_heads, ratio, head_dim)
        basis = keys.basis.float().reshape(kv_heads, head_dim, -1)[:, :, channels]
        mean = keys.mean.float().reshape(kv_heads, head_dim)
        projected = torch.einsum("cnhgd,hdj->cnhgj", rotated, basis)
        bound = torch.maximum(projected * low[:, None, None, None, :], projected * high[:, None, None, None, :]).sum(-1)
        bound = bound + torch.einsum("cnhgd,hd->cnhg", rotated, mean)
        # Best chunks per (query, KV head), by the bound maximised over the head's query heads.
        best = bound.amax(dim=3).permute(1, 2, 0).topk(picks, dim=-1).indices.sort(dim=-1).values
        chosen = (best[..., None] * chunk + torch.arange(chunk, device=device)).reshape(count, kv_heads, -1)
        token_index = torch.cat([chosen, forced.expand(count, kv_heads, -1)], dim=-1)
    else:
        token_index = forced.expand(count, kv_heads, -1).contiguous()
    valid = token_index < n_body
    token_index = torch.where(valid, token_index, torch.zeros_like(token_index))
    per_head = int(valid[0, 0].sum())
    selections = []
    for item, item_valid in zip(token_index, valid, strict=True):
        union = torch.unique(item[item_valid])
        groups_touched = torch.unique(union // keys.group_size).numel()
        selections.append(BodySelection(item, item_valid, per_head, union.numel(), groups_touched, summary_bytes))
    return selections


def key_bytes_read(keys: CompressedKeys, selection: BodySelection) -> int:
    """Compressed key bytes one attention call needs (each counted once)."""
    channels = keys.channels
    kept, code_bits = code_widths(keys)
    start, n_body = body_range(keys)
    full_precision = (keys.num_tokens - n_body) * channels * keys.sinks.element_size()
    if n_body == 0:
        return full_precision
    basis = 2 * channels * kept + 4 * channels if keys.method == "svdq" else 0
    codes = -(-selection.attended_union * code_bits // 8)
    group_meta = 4 * kept * selection.groups_touched
    return full_precision + basis + codes + group_meta + selection.summary_bytes


# ---------------------------------------------------------------------------------------------
# Torch reference.


def full_precision_keys(keys: CompressedKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """The sinks and tail ready to dot with a post-RoPE query.

    Returns ``(keys [F, Hkv, D] float32, sequence_index [F] int64)``.
    """
    start, n_body = body_range(keys)
    flat = torch.cat([keys.sinks.float(), keys.tail.float()])
    index = torch.cat([
        torch.arange(start, device=flat.device),
        torch.arange(start + n_body, keys.num_tokens, device=flat.device),
    ])
    rows = flat.reshape(-1, keys.kv_heads, keys.head_dim)
    if rotates(keys) and rows.shape[0]:
        rows = apply_rope(rows, keys.token_positions()[index], keys.rope)
    return rows, index


def body_keys(keys: CompressedKeys, selection: BodySelection) -> torch.Tensor:
    """Post-RoPE reconstructed body keys float32 [..., Hkv, n, D] of the selected tokens
    (``selection.token_index`` [..., Hkv, n]; every body token, [Hkv, n_body, D], when None)."""
    start, n_body = body_range(keys)
    kv_heads, head_dim = keys.kv_heads, keys.head_dim
    positions = keys.token_positions()[start:start + n_body]
    mean = keys.mean.float()
    if selection.token_index is None:
        flat = _dequantized(keys, None) @ keys.basis.float().T + mean
        rows = flat.reshape(n_body, kv_heads, head_dim)
        if rotates(keys):
            rows = apply_rope(rows, positions, keys.rope)
        return rows.transpose(0, 1)
    index = selection.token_index
    latent = _dequantized(keys, index)  # [..., Hkv, n, r]
    basis = keys.basis.float().reshape(kv_heads, head_dim, -1)
    rows = torch.einsum("...hnr,hdr->...hnd", latent, basis) + mean.reshape(kv_heads, 1, head_dim)
    if rotates(keys):
        flat = rows.reshape(-1, 1, head_dim)
        rows = apply_rope(flat, positions[index].reshape(-1), keys.rope).reshape(rows.shape)
    return rows


def partial_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of grouped queries over one token set.

    Args:
        query: float32 [..., Hkv, ratio, D]; keys, values: float32 [..., Hkv, n, D] (leading
            dimensions broadcast); valid: bool [..., Hkv, n] or None (all valid).

    Returns:
        ``(output [..., Hkv, ratio, D], lse [..., Hkv, ratio])`` float32; lse is -inf for no tokens.
    """
    scores = torch.einsum("...hgd,...hnd->...hgn", query, keys) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[..., None, :], -math.inf)
    if scores.shape[-1] == 0:
        return query.new_zeros(query.shape), query.new_full(query.shape[:-1], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(scores - safe[..., None])
    return torch.einsum("...hgn,...hnd->...hgd", weights, values), lse


def _attend_torch_group(
    queries: torch.Tensor, keys: CompressedKeys, values: CompressedValues, scale: float,
    selections: Sequence[BodySelection],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [n, Hq, D] over one sequence -> (output [n, Hq, D], lse [n, Hq]).

    Dense queries (e.g. every position of a scored continuation) share one reconstruction of
    the keys; sparse ones reconstruct their own selections in one batched computation.
    """
    count, q_heads, head_dim = queries.shape
    kv_heads = keys.kv_heads
    ratio = q_heads // kv_heads
    fp_keys, fp_index = full_precision_keys(keys)
    fp_values = gather_values(values, fp_index.expand(kv_heads, -1))
    start, n_body = body_range(keys)
    if selections[0].token_index is None:
        # [Hkv, n * ratio, D]: the query heads of a KV head, for every query.
        grouped = queries.float().reshape(count, kv_heads, ratio, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
        output, lse = partial_attention(grouped, fp_keys.transpose(0, 1), fp_values, scale)
        if n_body:
            body_values = gather_values(values)[:, start:start + n_body]
            out_body, lse_body = partial_attention(grouped, body_keys(keys, selections[0]), body_values, scale)
            output, lse = merge_attention(output, lse, out_body, lse_body)
        output = output.reshape(kv_heads, count, ratio, head_dim).transpose(0, 1)
        return output.reshape(count, q_heads, head_dim), lse.reshape(kv_heads, count, ratio).transpose(0, 1).reshape(count, q_heads)
    grouped = queries.float().reshape(count, kv_heads, ratio, head_dim)
    output, lse = partial_attention(grouped, fp_keys.transpose(0, 1), fp_values, scale)
    stacked = BodySelection(torch.stack([s.token_index for s in selections]), torch.stack([s.valid for s in selections]),
                            0, 0, 0, 0)
    body_values = gather_values(values, stacked.token_index + start)
    out_body, lse_body = partial_attention(grouped, body_keys(keys, stacked), body_values, scale, stacked.valid)
    output, lse = merge_attention(output, lse, out_body, lse_body)
    return output.reshape(count, q_heads, head_dim), lse.reshape(count, q_heads)


def _attend_torch(queries: torch.Tensor, keys: Sequence[CompressedKeys], values: Sequence[CompressedValues],
                  scale: float, selections: Sequence[BodySelection]) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference over a batch: entries over the same sequence run together."""
    output = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    lse = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for members in _same_sequence_groups(keys, values):
        index = torch.tensor(members, device=queries.device)
        first = members[0]
        out, lse_group = _attend_torch_group(queries[index], keys[first], values[first], scale,
                                             [selections[b] for b in members])
        output[index], lse[index] = out, lse_group
    return output, lse


def _same_sequence_groups(keys: Sequence[CompressedKeys], values: Sequence[CompressedValues]) -> list[list[int]]:
    """Batch indices grouped by identical (keys, values) objects, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (key, value) in enumerate(zip(keys, values, strict=True)):
        groups.setdefault((id(key), id(value)), []).append(b)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Public entry point.


def _validate(queries: torch.Tensor, keys: Sequence[CompressedKeys], values: Sequence[CompressedValues],
              scale: float | None, sparsity: SparsityConfig | None) -> float:
    if not isinstance(queries, torch.Tensor):
        raise InvalidInputError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    if queries.dim() != 3:
        raise InvalidInputError(f"queries must have shape [batch, q_heads, head_dim], got {tuple(queries.shape)}")
    if queries.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidInputError(f"queries dtype must be float16, bfloat16 or float32, got {queries.dtype}")
    if not torch.isfinite(queries).all():
        raise InvalidInputError("queries contain NaN or Inf")
    batch, q_heads, head_dim = queries.shape
    if len(keys) != batch or len(values) != batch:
        raise InvalidInputError(f"keys and values need one entry per query (batch {batch}), got {len(keys)} keys "
                                f"and {len(values)} values")
    for b, (key, value) in enumerate(zip(keys, values, strict=True)):
        if not isinstance(key, CompressedKeys):
            raise InvalidInputError(f"keys[{b}] must be CompressedKeys, got {type(key).__name__}")
        if not isinstance(value, CompressedValues):
            raise InvalidInputError(f"values[{b}] must be CompressedValues, got {type(value).__name__}")
        if key.head_dim != head_dim:
            raise InvalidInputError(f"keys[{b}] head_dim {key.head_dim} does not match the queries' {head_dim}")
        if q_heads % key.kv_heads:
            raise InvalidInputError(f"q_heads {q_heads} must be a multiple of keys[{b}] kv_heads {key.kv_heads}")
        if (value.heads, value.head_dim) != (key.kv_heads, key.head_dim):
            raise InvalidInputError(f"values[{b}] have heads={value.heads}, head_dim={value.head_dim}; keys have "
                                    f"kv_heads={key.kv_heads}, head_dim={key.head_dim}")
        if value.num_tokens != key.num_tokens:
            raise InvalidInputError(f"values[{b}] hold {value.num_tokens} tokens but keys[{b}] hold {key.num_tokens}")
        if key.codes.device != queries.device or value.device != queries.device:
            raise InvalidInputError(f"keys[{b}]/values[{b}] are on {key.codes.device}/{value.device}, queries on "
                                    f"{queries.device}; move them with .to(device)")
    if sparsity is not None and not isinstance(sparsity, SparsityConfig):
        raise InvalidInputError(f"sparsity must be a SparsityConfig or None, got {type(sparsity).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def attend(
    queries: torch.Tensor,
    keys: Sequence[CompressedKeys],
    values: Sequence[CompressedValues],
    *,
    scale: float | None = None,
    sparsity: SparsityConfig | None = None,
    backend: str | None = None,
) -> AttentionOutput:
    """Decode attention over compressed keys and values.

    Args:
        queries: [B, Hq, D] float16/bfloat16/float32 post-RoPE decode queries; Hq a multiple
            of the keys' kv_heads (query head ``i`` uses KV head ``i // (Hq / Hkv)``).
        keys: B compressed key caches (any method: svdq, kivi, fp16) on the queries' device.
        values: B value caches with the same token count and heads as ``keys``.
        scale: softmax scale; default ``1 / sqrt(D)``.
        sparsity: attend only to chosen chunks (see the module docstring); None = dense.
        backend: ``"torch"`` or ``"triton"``; default from :func:`select_backend`.

    Returns:
        :class:`AttentionOutput`: ``output`` float32 [B, Hq, D], ``lse`` float32 [B, Hq].
    """
    softmax_scale = _validate(queries, keys, values, scale, sparsity)
    chosen = select_backend(queries.device, backend)
    batch, q_heads, head_dim = queries.shape
    selections: list[BodySelection] = [None] * batch  # type: ignore[list-item]
    for members in _same_sequence_groups(keys, values):
        index = torch.tensor(members, device=queries.device)
        for b, selection in zip(members, select_body_tokens_many(queries[index].float(), keys[members[0]], sparsity),
                                strict=True):
            selections[b] = selection
    if chosen == "triton":
        from .kernels.decode_attention import attend_triton

        output, lse = attend_triton(queries, keys, values, softmax_scale, selections)
    else:
        output, lse = _attend_torch(queries, keys, values, softmax_scale, selections)
    stats = []
    for key, selection in zip(keys, selections, strict=True):
        start, n_body = body_range(key)
        stats.append(AttentionStats(
            key_bytes_read=key_bytes_read(key, selection),
            dense_fp16_key_bytes=2 * key.num_tokens * key.channels,
            tokens_attended=key.num_tokens - n_body + selection.per_head_count,
            tokens_total=key.num_tokens,
        ))
    return AttentionOutput(output, lse, stats)


__all__ = [
    "AttentionOutput",
    "AttentionStats",
    "SparsityConfig",
    "attend",
    "merge_attention",
    "select_backend",
]
