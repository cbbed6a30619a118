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
``chunk_size`` tokens. Every token gets a cheap approximate score from the low-rank keys of
the ``score_channels`` leading latent channels (svdq keeps its latent in SVD order, so these
carry most of the key energy): ``k_t ~= mean + sum_j l_tj b_j`` rotated to the token's
position and dotted with the post-RoPE query, computed without rotating the query per token
(:func:`token_scores`). A chunk scores the maximum of its tokens, a KV head the maximum of
its query heads. Each KV head attends ``keep_fraction * S`` tokens (rounded up to whole
chunks) selected by score from the body, in addition to the always-attended sinks, the
full-precision tail and every chunk that touches the ``num_recent`` latest tokens.

Bytes read (``AttentionStats.key_bytes_read``) count, once each, the compressed bytes the
computation needs: basis and mean, the codes of every token attended by any head, the
scales and minimums of the groups those tokens fall in, the full-precision sinks and tail,
and for sparse calls what the score read (:func:`selection_bytes`). The dense fp16 reference
is ``2 * S * C``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .codec import CompressedKeys
from .derived import DERIVED
from .errors import InvalidInputError
from .quant import cpu_bfloat16_is_fast, cpu_bfloat16_is_native, dequantize_by_channel, unpack_codes
from .rope import apply_rope, rope_cos_sin
from .values import CompressedValues, gather_values

BACKENDS = ("torch", "triton")
BACKEND_ENV = "SVDQ_BACKEND"
#: Operand precision of the torch path's key products (the selection score stays float32):
#: "float32" exact, "bfloat16" bfloat16 reconstruction operands and float16-rounded keys,
#: "float16" float32 reconstruction and float16-rounded keys (:func:`select_precision`).
PRECISIONS = ("float32", "bfloat16", "float16")
PRECISION_ENV = "SVDQ_ATTENTION_PRECISION"
# Low-rank keys (float32 elements) the selection score builds and rotates at a time.
SCORE_BLOCK_ELEMENTS = 1 << 18
# Reconstructed keys (float32 elements, whole token groups) the dense path builds at a time.
RECONSTRUCT_BLOCK_ELEMENTS = 1 << 18
#: Leading latent channels that precision "bfloat16" still multiplies in float32 (reconstruct).
FLOAT32_LEAD_CHANNELS = 32
#: largest attention logit softcap: models cap at tens (Gemma 2: 50); far above the scores a
#: cap changes nothing, so a larger one is taken for a mistake
MAX_SOFTCAP = 1e4


@dataclass(frozen=True)
class SparsityConfig:
    """Attend only to a budget of token chunks chosen by an approximate score.

    Each KV head attends the sinks, the full-precision tail and the chunks touching the
    ``num_recent`` latest tokens (always, they are not scored), plus the best-scoring
    ``ceil(ceil(keep_fraction * S) / chunk_size)`` chunks of the other body tokens, S being
    the sequence's token count. So ``keep_fraction`` is the share of the sequence *selected*
    by score, not a cap on everything attended; ``AttentionStats.tokens_attended`` and
    ``key_bytes_read`` report what was really attended and read, the forced tokens and the
    score's own reads included. Sequences where the selection would cover every candidate
    chunk are attended densely.

    Attributes:
        keep_fraction: share of the sequence's tokens selected by score; (0, 1].
        chunk_size: tokens per selectable chunk (1 = token-level selection), 1..1024.
        num_recent: the latest tokens that are always attended, >= 0.
        score_channels: leading latent channels of the low-rank score, 1..64.
    """

    keep_fraction: float = 1 / 32
    chunk_size: int = 8
    num_recent: int = 64
    score_channels: int = 32

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
    number of distinct body tokens over heads, ``summary_bytes`` what scoring them read.
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


def select_precision(device: torch.device | str, override: str | None = None) -> str:
    """Operand precision of the torch path's key products: ``override``, else
    ``$SVDQ_ATTENTION_PRECISION``, else ``bfloat16`` on CPUs where bfloat16 products run
    faster than float32 ones (:func:`svdq.quant.cpu_bfloat16_is_fast`: native, and measured
    so unless ``$SVDQ_CPU_BFLOAT16`` says ``on`` or ``off``) and ``float32`` elsewhere.

    ``bfloat16`` rounds the operands of the big product, the reconstruction ``latent @
    basis.T + mean`` past the leading latent channels, to bfloat16 (8 bits of mantissa) and
    accumulates in float32; the selection score, rotation, dot products with the queries,
    softmax and value sums stay float32. Its extra error in the attention output is a small fraction
    of what the compression itself costs (``docs/attention.md``, Precision). ``float32`` is
    the exact path the reference tests compare with float64. ``float16`` reconstructs as
    ``float32`` does and rounds the reconstructed post-RoPE body keys to float16 before they
    are dotted (exact tokens keep their own float32 rows), so that the keys a sequence keeps
    between calls weigh ``2 C`` bytes per token instead of ``4 C``: twice the sequences'
    keys fit an attention-cache budget, for CPUs without native bfloat16 (``docs/attention.md``,
    round 11). The triton kernels ignore it (they use float16 operands with float32
    accumulation).
    """
    choice = override or os.environ.get(PRECISION_ENV) or (
        "bfloat16" if torch.device(device).type == "cpu" and _bfloat16_fast() else "float32")
    if choice not in PRECISIONS:
        source = "precision" if override else PRECISION_ENV
        raise InvalidInputError(f"{source} must be one of {PRECISIONS}, got {choice!r}")
    return choice


def _bfloat16_fast() -> bool:
    """:data:`_BF16_FAST`, else :func:`svdq.quant.cpu_bfloat16_is_fast`."""
    return cpu_bfloat16_is_fast() if _BF16_FAST is None else _BF16_FAST


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
    weight_a, weight_b, total, lse = _merge_weights(lse_a, lse_b)
    denom = torch.where(total > 0, total, torch.ones_like(total))[..., None]
    output = (output_a.float() * weight_a[..., None] + output_b.float() * weight_b[..., None]) / denom
    return output, lse


def _merge_weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(weight_a, weight_b, total, lse)`` of merging two token sets' softmaxes: each set's
    mass ``exp(lse - top)`` relative to the larger, their sum, and the union's lse (-inf when
    both are empty)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    # Both empty: keep -inf and a zero output instead of NaN from (-inf) - (-inf).
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a = torch.exp(lse_a - safe_top)
    weight_b = torch.exp(lse_b - safe_top)
    total = weight_a + weight_b
    lse = torch.where(total > 0, safe_top + torch.log(total), torch.full_like(total, -math.inf))
    return weight_a, weight_b, total, lse


def _merge_shares(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(share_a, share_b, lse)``: what each set's softmax weights are scaled by to become
    weights of one softmax over the union (:func:`merge_attention`'s merge, done on the
    weights before the value sum), and the union's lse."""
    weight_a, weight_b, total, lse = _merge_weights(lse_a, lse_b)
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return weight_a / denom, weight_b / denom, lse


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
    """uint8 [n_body, r] unpacked codes, kept in :data:`svdq.derived.DERIVED` (r bytes per body
    token: the general bit unpack is the slow step of the CPU path, so it runs once per
    sequence while the budget allows)."""
    cached = DERIVED.get(keys, "latent_codes")
    if cached is None:
        codes = unpack_codes(keys.codes, keys.kept_bits.to(keys.codes.device), keys.group_size)
        # Explicit row count: with every channel dropped (r = 0) a -1 would be ambiguous.
        rows = keys.num_groups * keys.group_size
        cached = DERIVED.put(keys, "latent_codes", codes.reshape(rows, keys.kept_bits.numel()))
    return cached


def _dequantized(keys: CompressedKeys, body_index: torch.Tensor | None, channels: torch.Tensor | None = None) -> torch.Tensor:
    """float32 latent [..., r'] of body tokens ``body_index`` [...] (all when None), for the
    kept channels ``channels`` (all when None).

    Rows are taken with ``index_select`` from float32 scales and minimums: gathering the
    float16 ones elementwise and converting the gathered copies was 8x slower.
    """
    codes = latent_codes(keys)
    scales, mins = keys.scales.float(), keys.mins.float()
    if channels is not None:
        codes, scales, mins = codes[:, channels], scales[:, channels], mins[:, channels]
    n_body = codes.shape[0]
    if body_index is None or (channels is None and body_index.numel() > n_body):
        # Every body token, or more rows than the body has (the selections of many queries):
        # dequantize the body once, whole groups without gathers, and take the rows from it.
        # Explicit group count: with every channel dropped (r = 0) a -1 would be ambiguous.
        shape = (keys.num_groups, keys.group_size, codes.shape[1])
        whole = torch.empty(n_body, codes.shape[1], device=codes.device)
        torch.addcmul(mins[:, None], codes.view(shape), scales[:, None], out=whole.view(shape))
        if body_index is None:
            return whole
        return whole.index_select(0, body_index.reshape(-1)).view(*body_index.shape, codes.shape[1])
    flat = body_index.reshape(-1)
    group = flat // keys.group_size
    # addcmul, as the whole-group dequantization: a row's latent has the same bits whichever way
    # it was dequantized (a separate multiply and add rounds twice).
    latent = torch.addcmul(mins.index_select(0, group), codes.index_select(0, flat).float(), scales.index_select(0, group))
    # Explicit width: with every channel dropped (r = 0) a -1 would be ambiguous.
    return latent.view(*body_index.shape, codes.shape[1])


def _score_channels(keys: CompressedKeys, count: int) -> torch.Tensor:
    """int64 [m] kept-channel indices the selection score uses.

    svdq keeps its latent channels in SVD order, so the leading ones carry the most key
    energy. The kivi baseline's channels are raw key channels in no particular order, so it
    takes those with the widest mean quantization range instead.
    """
    key = ("score_channels", count)
    cached = keys._cache.get(key)
    if cached is None:
        kept = keys.kept_bits.numel()
        device = keys.scales.device
        if keys.method == "svdq":
            cached = torch.arange(min(count, kept), device=device)
        else:
            levels = 2 ** keys.kept_bits.to(device).float() - 1
            spread = (keys.scales.float() * levels).pow(2).mean(dim=0)
            cached = torch.argsort(spread, descending=True)[: min(count, kept)]
        keys._cache[key] = cached
    return cached


def score_latent(keys: CompressedKeys, score_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank view of the body keys the selection scores, kept in :data:`svdq.derived.DERIVED`.

    Returns ``channels`` int64 [m] (kept-channel indices, see :func:`_score_channels`) and
    ``latent`` float32 [n_body, m + 1]: the dequantized latent of those channels for every
    body token, with a last column of ones that carries the mean.
    """
    key = ("score_latent", score_channels)
    cached = DERIVED.get(keys, key)
    if cached is None:
        channels = _score_channels(keys, score_channels)
        latent = _dequantized(keys, None, channels)
        ones = torch.ones(latent.shape[0], 1, device=latent.device)
        cached = DERIVED.put(keys, key, (channels, torch.cat([latent, ones], dim=1)))
    return cached


def _score_columns(keys: CompressedKeys, channels: torch.Tensor) -> torch.Tensor:
    """float32 [C, m + 1]: the basis columns of the score channels and the mean."""
    return torch.cat([keys.basis.float()[:, channels], keys.mean.float()[:, None]], dim=1)


def _score_product_columns(keys: CompressedKeys, channels: torch.Tensor) -> torch.Tensor:
    """:func:`_score_columns`, each head's channels in pair order for keys that rotate
    (:func:`_pair_order`), kept under the budget (``4 (m + 1) C`` bytes: rebuilding them on
    every call cost a few percent of a 4k-token sparse call)."""
    key = ("score_columns", channels.numel())
    cached = DERIVED.get(keys, key)
    if cached is None:
        columns = _score_columns(keys, channels)
        if rotates(keys):
            columns = _in_pair_order(keys, columns)
        cached = DERIVED.put(keys, key, columns.contiguous())
    return cached


def token_scores(queries: torch.Tensor, keys: CompressedKeys, score_channels: int, tokens: int) -> torch.Tensor:
    """Approximate ``q . RoPE_t(k_t)`` of the first ``tokens`` body tokens, from the low-rank
    keys ``k_t ~= mean + sum_j l_tj b_j`` over the score channels.

    The low-rank keys are built with one ``[tokens, m + 1] @ [m + 1, D]`` product per KV head,
    rotated to their positions with the block's cos/sin (for pre-RoPE keys: with ``x1, x2``
    the two channels of RoPE pair ``p``, ``x1 cos - x2 sin`` and ``x2 cos + x1 sin``, built in
    pair order and rotated in place, :func:`_rotate_pairs`), and dotted with every query head. That is ``tokens * (C * (m + 1) + n * Hq * D)`` multiply-adds:
    the low-rank keys do not depend on the queries, so a chunk of ``n`` queries (a scored
    continuation, a prompt over an offloaded prefix) builds them once. The reads are the same
    as for any evaluation of the score: ``m`` channels' codes per token, basis columns, mean.

    Args:
        queries: float32 [n, Hq, D] post-RoPE queries.
        tokens: body tokens to score (the candidates, a prefix of the body).

    Returns:
        float32 [tokens, n, Hq] approximate scores (unscaled).
    """
    dots = _head_score_dots(queries, keys, score_channels, tokens)  # [Hkv, n, g, tokens]
    return dots.permute(3, 1, 0, 2).reshape(tokens, queries.shape[0], queries.shape[1])


def _head_score_dots(queries: torch.Tensor, keys: CompressedKeys, score_channels: int, tokens: int) -> torch.Tensor:
    """:func:`token_scores` as float32 [Hkv, n, g, tokens] (g query heads per KV head)."""
    count, q_heads, head_dim = queries.shape
    kv_heads = keys.kv_heads
    channels, latent = score_latent(keys, score_channels)
    # [C, m + 1]: the score channels' basis columns, then the mean (the latent's column of ones).
    columns = _score_product_columns(keys, channels)
    # [Hkv, m + 1, D]: each head's columns as a product's right operand, so that a block's
    # low-rank keys come out head-major (the kept keys' layout and the dots' operand) with no
    # transposed copy.
    by_head = columns.view(kv_heads, head_dim, columns.shape[1]).transpose(1, 2).contiguous()
    queries = queries.float()
    angles = None
    if rotates(keys):
        angles = _rotation_table(keys)
        queries = queries[..., _pair_order(keys)]
    # [Hkv, n * g, D]: each KV head's query rows, for one matmul per head and block.
    grouped = queries.reshape(count, kv_heads, q_heads // kv_heads, head_dim).transpose(0, 1).reshape(
        kv_heads, -1, head_dim)
    rows = grouped.shape[1]
    # Blocks of tokens whose low-rank keys stay in cache while they are rotated (and, with many
    # query rows, dotted): the rotation is a handful of elementwise passes, memory-bound over
    # all tokens at once.
    block = max(64, SCORE_BLOCK_ELEMENTS // keys.channels)

    def low_rank_block(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """The rotated low-rank keys of body tokens ``start:stop``, head-major [Hkv, stop - start, D], in ``out``."""
        # One [stop - start, m + 1] @ [m + 1, D] product per head (the latent rows shared, not copied). The
        # token-major [m, C] product of round 8 (oneDNN's linear) needed a transposed copy or a
        # strided dot afterwards; this form took 0.83x its time for the cold 32k score.
        low_rank = torch.bmm(latent[start:stop].expand(kv_heads, -1, -1), by_head, out=out)
        if angles is not None:
            _rotate_pairs(low_rank, _rotation(keys, range(start, stop), angles)[None])
        return low_rank

    # The rotated low-rank keys do not depend on the queries: kept head-major [Hkv, n_body, D]
    # (while the budget has room, from the first or second call by size: DerivedCache.admits),
    # later calls only dot them (building and rotating them was two thirds of the score). Either
    # way the product sees the same operands in the same spans of tokens, so the scores are the
    # same bits.
    name = (SCORE_KEYS, score_channels)
    kept = DERIVED.get(keys, name)
    n_body = latent.shape[0]
    if kept is None and DERIVED.admits(keys, name, 4 * n_body * keys.channels):
        kept = torch.empty(kv_heads, n_body, head_dim, device=latent.device)
        built = torch.empty(kv_heads, min(block, n_body), head_dim, device=latent.device)
        for start in range(0, n_body, block):
            stop = min(n_body, start + block)
            kept[:, start:stop] = low_rank_block(start, stop, built[:, :stop - start])
        DERIVED.put(keys, name, kept, optional=True)
    if rows <= SCORE_TOKEN_ROWS:
        # Few query rows per head (decode: one query, g heads): tokens as the product's rows,
        # the queries' [g, D] as its transposed right operand, over spans of SCORE_TOKEN_SPAN
        # tokens. With the g rows on the left oneDNN/MKL ran a matrix-vector-like kernel 1.4-1.6x
        # slower (4 rows, 4k tokens, one thread; docs/attention.md, round 8).
        dots = torch.empty(kv_heads, tokens, rows, device=latent.device)
        right = grouped.transpose(1, 2)
        if kept is not None:
            for first in range(0, tokens, SCORE_TOKEN_SPAN):
                last = min(tokens, first + SCORE_TOKEN_SPAN)
                torch.bmm(kept[:, first:last], right, out=dots[:, first:last])
        else:
            # Cold: each block built head-major in a small buffer (still in cache) and dotted
            # there. Copying the blocks into a head-major span first wrote and read again 4 C
            # bytes per token (128 MiB at 32k tokens; docs/attention.md, round 9, helper D). The
            # product gives each token the same bits from a block or from a span of the kept
            # keys (tests/test_attention_fast.py checks kept against cold scores).
            built = torch.empty(kv_heads, min(block, tokens), head_dim, device=latent.device)
            for start in range(0, tokens, block):
                stop = min(tokens, start + block)
                torch.bmm(low_rank_block(start, stop, built[:, :stop - start]), right, out=dots[:, start:stop])
        return dots.view(kv_heads, tokens, count, q_heads // kv_heads).permute(0, 2, 3, 1)
    dots = torch.empty(kv_heads, rows, tokens, device=latent.device)
    built = None if kept is not None else torch.empty(kv_heads, min(block, tokens), head_dim, device=latent.device)
    for start in range(0, tokens, block):
        stop = min(tokens, start + block)
        # Built into a head-major block: the same operand layout as the kept keys'.
        low_rank = kept[:, start:stop] if kept is not None else low_rank_block(start, stop, built[:, :stop - start])
        # Many query rows (a chunk of queries over one sequence): the queries on the left, the
        # block's tokens as the columns.
        torch.bmm(grouped, low_rank.transpose(1, 2), out=dots[:, :, start:stop])
    return dots.view(kv_heads, count, q_heads // kv_heads, tokens)


#: Query rows per KV head (queries x query heads per KV head) up to which the score takes the
#: tokens as its product's rows (:func:`_head_score_dots`), and the tokens per such product. A
#: rule on the shapes alone, so kept and cold calls run the same products. At Llama-3-8B shapes
#: (4 query heads per KV head, 4k tokens, kept, one thread) the selection took 0.67-0.77x the
#: baseline's time with one query and 1.06x / 1.21x / 1.38x with 2 / 4 / 16 queries over one
#: sequence (queries-as-rows: 1.11x / 1.15x / 1.02x): one or two queries per sequence (decode).
SCORE_TOKEN_ROWS = 8
SCORE_TOKEN_SPAN = 4096


#: Name of the selection score's rotated low-rank body keys, float32 [Hkv, n_body, D] (pair
#: order for keys that rotate), per score-channel count, that sparse calls keep while the budget
#: has room (from the first call up to ``FIRST_ASK_BYTES``, else the second;
#: :meth:`svdq.derived.DerivedCache.admits`), ``4 C`` bytes per token: the same values the
#: score builds otherwise.
SCORE_KEYS = "score_keys"


def selection_bytes(keys: CompressedKeys, channels: torch.Tensor, tokens: int) -> int:
    """Bytes the score of ``tokens`` candidate body tokens reads: the codes of the score
    ``channels`` of those tokens and the fp16 scales and minimums of those channels in the
    groups they fall in. The basis columns and mean it uses are part of the basis every
    svdq call already counts once (:func:`key_bytes_read`), so they are not counted twice."""
    if tokens == 0:
        return 0
    key = ("score_code_bits", channels.numel())
    bits = keys._cache.get(key)
    if bits is None:
        # Cached: summing on a CUDA tensor would synchronise the device on every call.
        bits = int(keys.kept_bits[channels.to(keys.kept_bits.device)].sum())
        keys._cache[key] = bits
    groups = -(-tokens // keys.group_size)
    return -(-tokens * bits // 8) + 4 * channels.numel() * groups


def select_body_tokens(query: torch.Tensor, keys: CompressedKeys, sparsity: SparsityConfig | None) -> BodySelection:
    """Choose the quantized body tokens each KV head attends, for one query [Hq, D] (float32,
    post-RoPE); ``sparsity=None`` means dense. See :func:`select_body_tokens_many`."""
    return select_body_tokens_many(query[None], keys, sparsity)[0]


def select_body_tokens_many(queries: torch.Tensor, keys: CompressedKeys, sparsity: SparsityConfig | None,
                            backend: str = "torch") -> list[BodySelection]:
    """Choose the quantized body tokens each KV head attends, for several queries of one sequence.

    Chunks touching the ``num_recent`` latest tokens are always attended; of the others
    (the candidates) each KV head takes the ``ceil(ceil(keep_fraction * S) / chunk_size)``
    chunks with the highest score (:func:`token_scores`, maximised over the chunk's tokens
    and the KV head's query heads).

    Args:
        queries: float32 [n, Hq, D] post-RoPE queries over ``keys`` (scored together).
        sparsity: ``None`` for dense attention.
        backend: ``"triton"`` scores with :func:`svdq.kernels.token_scores.token_scores_triton`.

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
    kv_heads = keys.kv_heads
    chunk = sparsity.chunk_size
    n_chunks = -(-n_body // chunk)
    recent_from = max(0, total - sparsity.num_recent - start)
    first_forced = min(n_chunks, recent_from // chunk)
    picks = -(-math.ceil(sparsity.keep_fraction * total) // chunk)
    candidates = first_forced
    if picks >= candidates:
        return dense
    device = keys.codes.device
    forced = torch.arange(first_forced * chunk, n_body, device=device)
    candidate_tokens = min(candidates * chunk, n_body)
    channels = _score_channels(keys, sparsity.score_channels)
    if backend == "triton":
        from .kernels.token_scores import token_scores_triton

        scores = token_scores_triton(queries, keys, sparsity.score_channels, candidate_tokens)
        head_scores = scores.reshape(candidate_tokens, count, kv_heads, -1).amax(dim=-1).permute(2, 1, 0)
    else:
        # [Hkv, n, g, tokens], a view in the score's own memory order (reduced below in place,
        # not over a strided copy of every score).
        head_scores = _head_score_dots(queries, keys, sparsity.score_channels, candidate_tokens)
    if head_scores.dim() == 4 and head_scores.stride(-1) != 1 and candidate_tokens == candidates * chunk:
        # Tokens-as-rows scores, whole chunks (always, as the candidates end where the recent
        # chunks begin): the maximum over the KV head's query heads and the chunk's tokens in one
        # reduction, in the score's own memory order (a maximum is exact: the same values as the
        # two passes below, which are faster over the queries-as-rows layout).
        chunk_scores = head_scores.unflatten(-1, (candidates, chunk)).amax(dim=(2, 4)).transpose(0, 1)
    else:
        if head_scores.dim() == 4:
            head_scores = head_scores.amax(dim=2)
        # [Hkv, n, candidate tokens] -> chunk scores [n, Hkv, candidates]
        padded = head_scores.new_full((kv_heads, count, candidates * chunk), -math.inf)
        padded[..., :candidate_tokens] = head_scores
        chunk_scores = padded.view(kv_heads, count, candidates, chunk).amax(dim=-1).transpose(0, 1)
    best = chunk_scores.topk(picks, dim=-1).indices.sort(dim=-1).values
    chosen = (best[..., None] * chunk + torch.arange(chunk, device=device)).reshape(count, kv_heads, -1)
    token_index = torch.cat([chosen, forced.expand(count, kv_heads, -1)], dim=-1)
    valid = token_index < n_body
    token_index = torch.where(valid, token_index, torch.zeros_like(token_index))
    per_head = int(valid[0, 0].sum())
    score_bytes = selection_bytes(keys, channels, candidate_tokens)
    # Distinct tokens and groups each query attends over its heads, for the byte accounting:
    # marked in one [n, n_body] table for all queries (a sort per query cost more than the
    # attention over its selection in batches of queries over one sequence).
    # Padding is marked in a last column that is not counted.
    marked = torch.zeros(count, n_body + 1, dtype=torch.bool, device=device)
    marked.scatter_(1, torch.where(valid, token_index, n_body).reshape(count, -1), True)
    attended = marked[:, :n_body]
    unions = attended.sum(dim=1).tolist()
    groups_touched = attended.reshape(count, groups, keys.group_size).any(dim=2).sum(dim=1).tolist()
    return [BodySelection(item, item_valid, per_head, union, touched, score_bytes)
            for item, item_valid, union, touched in zip(token_index, valid, unions, groups_touched, strict=True)]


def key_bytes_read(keys: CompressedKeys, selection: BodySelection) -> int:
    """Compressed key bytes one attention call needs (each counted once)."""
    channels = keys.channels
    kept, code_bits = code_widths(keys)
    start, n_body = body_range(keys)
    full_precision = (keys.num_tokens - n_body + keys.num_exact) * channels * keys.sinks.element_size()
    full_precision += 4 * keys.num_exact
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

    Returns ``(keys [F, Hkv, D] float32, sequence_index [F] int64)``, kept under the budget
    (``4 F C`` bytes, a function of the keys alone): converting and rotating them (RoPE's
    frequencies, cos and sin included) on every call was about a quarter of a kept SmolLM2
    decode call (600 tokens, docs/attention.md, round 7).
    """
    cached = DERIVED.get(keys, "full_precision_keys")
    if cached is not None:
        return cached
    start, n_body = body_range(keys)
    flat = torch.cat([keys.sinks.float(), keys.tail.float()])
    index = torch.cat([
        torch.arange(start, device=flat.device),
        torch.arange(start + n_body, keys.num_tokens, device=flat.device),
    ])
    rows = flat.reshape(-1, keys.kv_heads, keys.head_dim)
    if rotates(keys) and rows.shape[0]:
        rows = apply_rope(rows, keys.token_positions()[index], keys.rope)
    return DERIVED.put(keys, "full_precision_keys", (rows, index))


def _onednn_linear():
    """oneDNN's float32 ``input @ weight.T + bias`` on dense CPU tensors, or None.

    On the CPUs we serve from it runs the reconstruction matmul about 2x faster than
    ``torch.addmm`` (MKL's sgemm), with float32 accuracy (``tests/test_attention.py``
    checks it against float64). It is the op PyTorch's own CPU compiler emits for linear
    layers, so it is looked up, not assumed.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_CPU_LINEAR = _onednn_linear()
#: whether oneDNN multiplies bfloat16 here (a bfloat16 linear raises where it does not)
_BF16_NATIVE = cpu_bfloat16_is_native()
#: whether precision "auto" picks bfloat16 on the CPU: None decides by
#: :func:`svdq.quant.cpu_bfloat16_is_fast` (``$SVDQ_CPU_BFLOAT16``, else measured); True or
#: False forces it (tests)
_BF16_FAST: bool | None = None


def reconstruct(latent: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor,
                rest: torch.Tensor | None = None) -> torch.Tensor:
    """``latent @ basis.T + mean``: float32 latent [n, r], basis [C, r], mean [C] -> float32 [n, C].

    With ``rest`` (precision ``"bfloat16"``, :func:`select_precision`), ``basis`` [C, k] holds
    the first ``k`` latent channels' columns in float32 and ``rest`` [C, r - k] the others' in
    bfloat16: the leading channels, which carry most of the key energy, are multiplied in
    float32 and the others with bfloat16 operands (float32 accumulation, result rounded to
    bfloat16 and widened as it is added), about 2x faster than float32 on CPUs with native
    bfloat16 and, the error being relative to the small tail, 5-10x more accurate than
    bfloat16 for all channels (``docs/attention.md``, Precision).
    """
    lead = basis.shape[1]
    rows = _linear(latent[:, :lead] if rest is not None else latent, basis, mean)
    if rest is not None and rest.shape[1]:
        rows.add_(_linear(latent[:, lead:].to(rest.dtype), rest, None))
    return rows


def _linear(latent: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``latent @ basis.T (+ bias)`` with oneDNN on the CPU (:func:`_onednn_linear`), else addmm."""
    # bfloat16 operands only where oneDNN multiplies them natively: elsewhere (AVX2 CPUs) it has
    # no bfloat16 inner product and raises, so an explicit precision="bfloat16" there takes
    # torch's own (emulated, slower) product instead of failing.
    if (_CPU_LINEAR is not None and latent.device.type == "cpu" and latent.shape[0] and latent.shape[1]
            and (_BF16_NATIVE or latent.dtype != torch.bfloat16)):
        if latent.shape[0] == 1:
            # One row takes oneDNN's matrix-vector kernel, which sums in another order than the
            # matrix kernel every longer block takes: two rows keep a token's reconstruction the
            # same bits however many tokens are reconstructed with it (kept keys vs a selection).
            return _linear(latent.expand(2, -1), basis, bias)[:1]
        return _CPU_LINEAR(latent.contiguous(), basis.contiguous(), None if bias is None else bias.contiguous(),
                           "none", [], "")
    if bias is None:
        return latent @ basis.T
    return torch.addmm(bias, latent, basis.T)


class _AngleTable:
    """Holder of one RoPE's cos/sin table in :data:`svdq.derived.DERIVED` (its ``_cache``)."""

    def __init__(self) -> None:
        self._cache: dict = {}


#: One table per (RoPE, head_dim, device), shared by every sequence and layer that uses it.
_ANGLE_TABLES: dict[tuple, _AngleTable] = {}
# Positions a shared table covers at most (8 * P bytes each: 64 MiB for head_dim 128).
MAX_TABLE_POSITIONS = 1 << 17


def _rotation_table(keys: CompressedKeys) -> tuple[torch.Tensor | None, torch.Tensor, int | None]:
    """``(table complex64 [n, P] or None, body positions int64 [n_body], first)`` for rotating
    the body tokens of ``keys`` (:func:`_rotation`).

    The cos/sin of a position depend only on the RoPE and head_dim, so one table ``cos + i
    sin`` over positions ``0..n`` (:func:`svdq.rope.rope_cos_sin` of ``arange(n)``, so the
    values are identical) serves every sequence and layer, under the attention-cache budget,
    instead of recomputing ``2 * P`` sines and cosines per token per call (about 5% of a
    dense call). Positions outside ``0..MAX_TABLE_POSITIONS`` give no table: the caller then
    computes the angles itself. ``first`` is the body's first position when its positions
    are consecutive (blocks then slice the table instead of gathering from it), else None."""
    start, n_body = body_range(keys)
    positions = keys.token_positions()[start:start + n_body]
    if keys.positions is None:
        low, high = keys.position_offset + start, keys.position_offset + start + n_body - 1
        first = low
    else:
        span = keys._cache.get("body_position_span")
        if span is None:
            # Cached: reading a CUDA tensor's values would synchronise the device on every call.
            steps = positions[1:] - positions[:-1]
            first = int(positions[0]) if n_body and bool((steps == 1).all()) else None
            low, high = (int(positions.min()), int(positions.max())) if n_body else (0, 0)
            span = keys._cache["body_position_span"] = (first, low, high)
        first, low, high = span
    if low < 0 or high >= MAX_TABLE_POSITIONS:
        return None, positions, None
    owner = _ANGLE_TABLES.setdefault((keys.rope, keys.head_dim, positions.device), _AngleTable())
    table = DERIVED.get(owner, "rotation")
    if table is None or table.shape[0] <= high:
        size = min(MAX_TABLE_POSITIONS, max(1024, 1 << high.bit_length()))
        cos, sin = rope_cos_sin(keys.rope, torch.arange(size, device=positions.device), keys.head_dim)
        table = DERIVED.put(owner, "rotation", torch.complex(cos, sin))
    return table, positions, first


def _rotation(keys: CompressedKeys, body: range | torch.Tensor, angles: tuple | None = None) -> torch.Tensor:
    """complex64 [..., P]: ``cos + i sin`` of body tokens ``body`` (a ``range``, or int64
    [...]), from ``angles`` (:func:`_rotation_table`, looked up when None)."""
    table, positions, consecutive_from = angles or _rotation_table(keys)
    if isinstance(body, range):
        if table is not None and consecutive_from is not None:
            return table[consecutive_from + body.start:consecutive_from + body.stop]
        body_positions = positions[body.start:body.stop]
    else:
        body_positions = positions[body]
    if table is None:
        cos, sin = rope_cos_sin(keys.rope, body_positions.reshape(-1), keys.head_dim)
        return torch.complex(cos, sin).view(*body_positions.shape, cos.shape[-1])
    return table[body_positions]


def _pair_order(keys: CompressedKeys) -> torch.Tensor:
    """int64 [D]: a head's channels reordered so that the two channels of each RoPE pair are
    neighbours (``x1, x2``), the channels RoPE leaves alone after them. In that order a block
    of keys rotates as one in-place complex product (:func:`_rotate_pairs`), about 3x faster
    than the four strided multiply-adds of the stored order; dot products do not change when
    keys and queries are reordered alike."""
    cached = keys._cache.get("pair_order")
    if cached is None:
        head_dim = keys.head_dim
        rotary = keys.rope.dims(head_dim)
        half = torch.arange(rotary // 2)
        if keys.rope.style == "half":
            pairs = torch.stack([half, half + rotary // 2], dim=1).reshape(-1)
        else:
            pairs = torch.arange(rotary)
        cached = torch.cat([pairs, torch.arange(rotary, head_dim)]).to(keys.codes.device)
        keys._cache["pair_order"] = cached
    return cached


def _rotate_pairs(rows: torch.Tensor, rotation: torch.Tensor) -> None:
    """Rotate keys in pair order (:func:`_pair_order`), float32 [..., D], in place by
    ``rotation`` complex64 [..., P] (broadcast to the rows): ``(x1 + i x2)(cos + i sin)`` is
    RoPE's ``x1 cos - x2 sin, x2 cos + x1 sin``."""
    pairs = rotation.shape[-1]
    torch.view_as_complex(rows[..., :2 * pairs].unflatten(-1, (pairs, 2))).mul_(rotation)


def _in_pair_order(keys: CompressedKeys, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [C, k] (one row per key channel, KV heads outer) with each head's channels in
    pair order."""
    width = rows.shape[1]  # explicit: with every channel dropped (r = 0) a -1 would be ambiguous
    return rows.view(keys.kv_heads, keys.head_dim, width)[:, _pair_order(keys)].reshape(keys.channels, width)


def _dense_basis(keys: CompressedKeys, precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(basis, mean, rest)`` of :func:`reconstruct` for ``precision``, in pair order for keys
    that rotate: float32 basis [C, r], mean [C] and no rest; in bfloat16 the basis holds the
    first :data:`FLOAT32_LEAD_CHANNELS` columns and ``rest`` the others in bfloat16. Kept under
    the attention-cache budget (``4 (r + 1) C`` bytes in float32, about the unpacked codes of
    a 4k-token layer): reordering and converting on every call cost 1-2% of a 4k-token call."""
    # float16 reconstructs as float32 does: it rounds the keys it builds, not its operands.
    key = ("dense_basis", "float32" if precision == "float16" else precision)
    cached = DERIVED.get(keys, key)
    if cached is None:
        basis, mean = keys.basis.float(), keys.mean.float()
        if rotates(keys):
            basis, mean = _in_pair_order(keys, basis), _in_pair_order(keys, mean[:, None])[:, 0]
        rest = None
        if precision == "bfloat16" and keys.method == "svdq":
            basis, rest = basis[:, :FLOAT32_LEAD_CHANNELS], basis[:, FLOAT32_LEAD_CHANNELS:].to(torch.bfloat16).contiguous()
        cached = (basis.contiguous(), mean.contiguous(), rest)
        if keys.method != "svdq":
            # The baselines' identity basis [C, C] would weigh more than their keys: not kept.
            return cached
        DERIVED.put(keys, key, cached)
    return cached


def _rounds(keys: CompressedKeys, precision: str) -> bool:
    """Whether a call rounds ``keys``' reconstructed body keys to float16 (and may keep them so):
    precisions "bfloat16" and "float16" for svdq keys; the baselines' identity "basis" copies
    raw key channels, where rounding would only add error."""
    return precision in ("bfloat16", "float16") and keys.method == "svdq"


def _kept_keys_name(keys: CompressedKeys, precision: str) -> str:
    """The name of the post-RoPE body keys that dense calls of ``precision`` keep: each
    precision's own numbers (:data:`KEPT_KEYS`, :data:`KEPT_FLOAT16_KEYS`, :data:`KEPT_FLOAT32_KEYS`)."""
    if not _rounds(keys, precision):
        return KEPT_FLOAT32_KEYS
    return KEPT_KEYS if precision == "bfloat16" else KEPT_FLOAT16_KEYS


def _dequantize_range(keys: CompressedKeys, scales: torch.Tensor, mins: torch.Tensor, first: int, stop: int,
                      buffer: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """float32 latent [stop - first, r] of body tokens ``first..stop`` (``code * scale + min``),
    written into ``buffer`` (float32, at least the range's whole groups plus one group of rows).

    Whole token groups are dequantized with the group's scale and minimum broadcast (no
    gathers); the range's own rows are returned as a view. ``codes``: :func:`latent_codes`,
    looked up once by a caller that dequantizes many ranges.
    """
    codes = latent_codes(keys) if codes is None else codes
    kept, group = codes.shape[1], keys.group_size
    low, high = first // group, -(-stop // group)
    # Explicit group count: with every channel dropped (r = 0) a -1 would be ambiguous.
    by_group = buffer[:(high - low) * group].view(high - low, group, kept)
    torch.addcmul(mins[low:high, None], codes[low * group:high * group].view(high - low, group, kept),
                  scales[low:high, None], out=by_group)
    return buffer[first - low * group:stop - low * group]


def dense_body_dots(keys: CompressedKeys, grouped: torch.Tensor, precision: str = "float32",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``q . RoPE_t(k^_t)`` of grouped queries over every quantized body token.

    The same function as dotting with the reconstructed post-RoPE keys (dequantize ``code *
    scale + min``, ``latent @ basis.T + mean``, exact tokens' own rows, RoPE at the token's
    position), computed in blocks of whole token groups whose reconstructed keys stay in cache
    while they are rotated and dotted, instead of building all ``n_body * C`` float32 keys
    (128 MiB at 32k tokens of an 8 x 128 layer) and passing over them several times. Keys that
    rotate are reconstructed in pair order (:func:`_pair_order`, the queries reordered alike)
    and rotated in place.

    Args:
        grouped: float32 [Hkv, R, D] post-RoPE queries, the R rows of each KV head.
        precision: operands of the reconstruction matmul (:func:`select_precision`).
        out: float32 [Hkv, R, n_body] (a view of a larger tensor may do) to write them into.

    Returns:
        float32 [Hkv, R, n_body] unscaled dot products (``out`` when given).
    """
    kv_heads, rows, head_dim = grouped.shape
    start, n_body = body_range(keys)
    if rotates(keys):
        grouped = grouped[..., _pair_order(keys)]
    dots = torch.empty(kv_heads, rows, n_body, device=grouped.device) if out is None else out
    block = max(1, RECONSTRUCT_BLOCK_ELEMENTS // (keys.channels * keys.group_size)) * keys.group_size
    rounded = _rounds(keys, precision)
    # float32 keeps its float32 keys (the same numbers it reconstructs), exact tokens' own rows
    # written in; bfloat16 and float16 keep float16-rounded keys and dot the exact tokens apart.
    kept_name = _kept_keys_name(keys, precision)
    keeps = keys.method == "svdq"
    kept_keys = DERIVED.get(keys, kept_name) if keeps else None
    # float32 blocks [Hkv, n, D] of float16-rounded keys, the one layout both rounded ways dot
    # (kept keys or reconstructed now), so that a call gives the same bits whether the budget
    # kept the keys or dropped them.
    widened = torch.empty(kv_heads, min(block, n_body), head_dim, device=grouped.device) if rounded else None
    exact_in_rows = not rounded and keys.num_exact > 0
    if kept_keys is None:
        kept = code_widths(keys)[0]
        basis, mean, rest = _dense_basis(keys, precision)
        scales, mins, codes = keys.scales.float(), keys.mins.float(), latent_codes(keys)
        angles = _rotation_table(keys) if rotates(keys) else None
        keep = keeps and DERIVED.admits(keys, kept_name, (2 if rounded else 4) * n_body * keys.channels)
        # [Hkv, n, D] per-head blocks, float16 (bfloat16) or float32: the kept keys' layout, so
        # that cold and kept calls run the same products on the same numbers.
        body_keys = torch.empty(kv_heads, n_body if keep else min(block, n_body), head_dim,
                               dtype=torch.float16 if rounded else torch.float32, device=grouped.device)
        latent = torch.empty(block, kept, device=grouped.device)
        if exact_in_rows:
            exact = _exact_body_index(keys)
            exact_rows = _exact_key_columns(keys).permute(2, 0, 1)  # [k, Hkv, D], kept from the first call
            cuts = torch.searchsorted(exact, torch.arange(0, n_body + block, block, device=exact.device)).tolist()
    for number, first in enumerate(range(0, n_body, block)):
        stop = min(n_body, first + block)
        count = stop - first
        if kept_keys is not None:
            if rounded:
                kept_block = widened[:, :count].copy_(kept_keys[:, first:stop])
            else:
                kept_block = kept_keys[:, first:stop]
            torch.bmm(grouped, kept_block.transpose(1, 2), out=dots[:, :, first:stop])
            continue
        rows_block = reconstruct(_dequantize_range(keys, scales, mins, first, stop, latent, codes), basis, mean, rest)
        rows_block = rows_block.view(count, kv_heads, head_dim)
        if angles is not None:
            _rotate_pairs(rows_block, _rotation(keys, range(first, stop), angles)[:, None, :])
        if exact_in_rows and cuts[number] < cuts[number + 1]:
            low, high = cuts[number], cuts[number + 1]
            rows_block.index_copy_(0, exact[low:high] - first, exact_rows[low:high])
        built = body_keys[:, first:stop] if keep else body_keys[:, :count]
        built.copy_(rows_block.transpose(0, 1))
        torch.bmm(grouped, (widened[:, :count].copy_(built) if rounded else built).transpose(1, 2),
                  out=dots[:, :, first:stop])
    if rounded and keys.num_exact:
        # The exact tokens' dots from their own float32 rows, once per call (not looked up per
        # block), whichever way the others were made.
        dots.index_copy_(2, _exact_body_index(keys), torch.bmm(grouped, _exact_key_columns(keys)))
    if kept_keys is None and keep:
        DERIVED.put(keys, kept_name, body_keys, optional=True)
    return dots


#: Name of the float16 post-RoPE body keys [Hkv, n_body, D] (pair order for keys that rotate)
#: that dense calls in precision "bfloat16" keep while the budget has room (from the first call up to
#: ``FIRST_ASK_BYTES``, else the second)
#: (:meth:`svdq.derived.DerivedCache.admits`), for later calls: float16's rounding (2^-11) is a quarter of bfloat16's, and either widens to float32
#: at the same cost. Exact tokens' dots come from their own rows, not from these.
KEPT_KEYS = "kept_keys"
#: Name of the float16-rounded float32 reconstructions, [Hkv, n_body, D] float16 (pair order
#: for keys that rotate), that dense calls in precision "float16" keep on the same terms as
#: :data:`KEPT_KEYS`: half the bytes of :data:`KEPT_FLOAT32_KEYS` (64 MiB for a 32k-token
#: 8 x 128 layer), so that twice the sequences keep them under a budget.
KEPT_FLOAT16_KEYS = "kept_float16_keys"
#: Name of the float32 post-RoPE body keys [Hkv, n_body, D] (pair order for keys that rotate,
#: the exact tokens' own rows written in) that dense calls in precision "float32" keep on the
#: same terms: the numbers a call reconstructs, so a kept call gives a cold call's bits, and
#: reconstructing them was most of a kept SmolLM2 decode call on CPUs without native bfloat16
#: (docs/attention.md, round 8).
KEPT_FLOAT32_KEYS = "kept_float32_keys"


def _exact_key_columns(keys: CompressedKeys) -> torch.Tensor:
    """float32 [Hkv, D, k]: the exact tokens' post-RoPE keys (:func:`_full_rows_in_pair_order`)
    laid out for the dense dots' product, kept under the budget (``4 k C`` bytes): converting,
    reordering and rotating them on every call cost a sixth of a dense call over SmolLM2's
    whole-cache keys (an eighth of the tokens exact)."""
    cached = DERIVED.get(keys, "exact_key_columns")
    if cached is None:
        rows = _full_rows_in_pair_order(keys, keys.exact_rows, _exact_body_index(keys))
        cached = DERIVED.put(keys, "exact_key_columns", rows.permute(1, 2, 0).contiguous())
    return cached


def _exact_body_index(keys: CompressedKeys) -> torch.Tensor:
    """int64 [k]: the exact tokens' ascending body-relative indices, cached on the keys (with
    ``index_copy_`` instead of an advanced-index assignment, 11 -> 8 us per dense call)."""
    cached = keys._cache.get("exact_body_index")
    if cached is None:
        cached = keys._cache["exact_body_index"] = keys.exact_index - body_range(keys)[0]
    return cached


def _full_rows_in_pair_order(keys: CompressedKeys, stored: torch.Tensor, body_index: torch.Tensor) -> torch.Tensor:
    """16-bit pre-RoPE rows ``stored`` [k, C] of body tokens ``body_index`` [k] as float32
    [k, Hkv, D] post-RoPE keys, in pair order for keys that rotate."""
    rows = stored.float().view(-1, keys.kv_heads, keys.head_dim)
    if rotates(keys):
        rows = rows[..., _pair_order(keys)]
        _rotate_pairs(rows, _rotation(keys, body_index)[:, None, :])
    return rows


def _selected_dots(keys: CompressedKeys, queries: torch.Tensor, index: torch.Tensor,
                   precision: str = "float32") -> torch.Tensor:
    """``q . RoPE_t(k^_t)`` of grouped queries with their selected body tokens.

    Args:
        queries: float32 [..., Hkv, g, D] post-RoPE queries, each head's channels in pair order
            (:func:`_pair_order`) for keys that rotate (the keys are built in that order).
        index: int64 [..., Hkv, n] the body tokens each head of each query attends.
        precision: operands of the reconstruction matmul (:func:`select_precision`).

    Returns:
        float32 [..., Hkv, g, n] unscaled dot products.

    In precisions "bfloat16" and "float16" the keys are the float16-rounded keys that a dense
    call of that precision keeps (:data:`KEPT_KEYS`, :data:`KEPT_FLOAT16_KEYS`): gathered from them when the budget holds them, else reconstructed and
    rounded the same way, and dotted by the same per-head products, so that a result has the
    same bits whether the keys were kept or not. In precision "float32" they are gathered from
    the float32 keys a dense call keeps (:data:`KEPT_FLOAT32_KEYS`) where a sequence has them:
    a token reconstructs to the same bits whatever is reconstructed with it (:func:`_linear`),
    so the gathered rows are the rows a reconstruction gives. Exact tokens' dots come from
    their own rows either way (the kept float32 keys hold those rows too; the dots are
    replaced by the same product a reconstruction's are).
    """
    head_dim = keys.head_dim
    ratio, count = queries.shape[-2], index.shape[-1]
    by_head = queries.reshape(-1, ratio, head_dim)  # [B, g, D], one batch per (query, head)
    dots = torch.empty(by_head.shape[0], ratio, count, device=queries.device)
    rounded = _rounds(keys, precision)
    # The keys a dense call of this precision keeps: float16-rounded (bfloat16, float16) or the
    # float32 keys it reconstructs (float32), either gathered from them or rebuilt the same way.
    kept_keys = DERIVED.get(keys, _kept_keys_name(keys, precision)) if keys.method == "svdq" else None
    union = _selection_union(keys, index) if kept_keys is None else None
    if kept_keys is None and _selections_cover_body(keys, union, precision):
        # Many queries over one sequence (a prompt chunk over an offloaded prefix) that select
        # most of its tokens between them: rebuilding their union costs about what a dense call's
        # reconstruction does, so build the keys a dense call keeps instead, when the budget
        # admits them, and gather from them, in this call and the next chunks' (the same bits:
        # see above). A query-less dense call builds them; its dots are one row per KV head.
        dense_body_dots(keys, queries.new_zeros(keys.kv_heads, 1, head_dim), precision)
        kept_keys = DERIVED.get(keys, _kept_keys_name(keys, precision))
    if kept_keys is None:
        rows = _reconstructed_rows(keys, index, precision, union)
        if rounded:
            rows.copy_(rows.half())
        torch.bmm(by_head, rows.view(-1, count, head_dim).transpose(1, 2), out=dots)
    else:
        _gathered_dots(kept_keys, by_head, index, dots)
    _put_exact_dots(keys, by_head, index.reshape(-1, count), dots)
    return dots.view(*index.shape[:-1], ratio, count)


#: Share of a sequence's body tokens that the selections of one sparse call must cover between
#: them for the call to build the keys a dense call keeps (:func:`_selections_cover_body`)
#: rather than rebuild the union of its selections alone.
COVERED_BODY_SHARE = 0.5


def _selection_union(keys: CompressedKeys, index: torch.Tensor) -> torch.Tensor | None:
    """int64 [U] ascending: the distinct body tokens that the selections ``index`` [n, Hkv, m]
    of several queries touch, by marking them (a sort of every index took longer); None for
    one query."""
    if index.dim() != 3 or index.shape[0] < 2:
        return None
    seen = torch.zeros(body_range(keys)[1], dtype=torch.bool, device=index.device)
    seen[index.reshape(-1)] = True
    return seen.nonzero().squeeze(1)


def _selections_cover_body(keys: CompressedKeys, union: torch.Tensor | None, precision: str) -> bool:
    """Whether the union of several queries' selections (:func:`_selection_union`) covers at
    least :data:`COVERED_BODY_SHARE` of the body of svdq ``keys`` and the budget admits the keys
    a dense call of ``precision`` keeps (:meth:`svdq.derived.DerivedCache.admits`: from the
    first ask up to its first-ask size, larger ones from their second). A decode step's one
    query (no union) never builds them."""
    n_body = body_range(keys)[1]
    if keys.method != "svdq" or union is None or union.numel() < COVERED_BODY_SHARE * n_body:
        return False
    nbytes = (2 if _rounds(keys, precision) else 4) * n_body * keys.channels
    return DERIVED.admits(keys, _kept_keys_name(keys, precision), nbytes)


#: Kept-key rows gathered and widened at a time (float16 and float32 buffers reused across the
#: chunks: fresh buffers for a batch's selections cost more in page faults than the gather).
GATHER_ROWS = 1 << 13


def _gathered_dots(kept_keys: torch.Tensor, by_head: torch.Tensor, index: torch.Tensor, dots: torch.Tensor) -> None:
    """Dots ``dots`` [B, g, n] of ``by_head`` [B, g, D] with rows ``index`` [..., Hkv, n] of
    kept keys [Hkv, n_body, D], written in place, in chunks of (query, head) pairs."""
    kv_heads, n_body, head_dim = kept_keys.shape
    count = index.shape[-1]
    # Rows of one [Hkv * n_body, D] table: indexing with a token and a head index tensor is slower.
    heads = torch.arange(kv_heads, device=index.device)[:, None] * n_body
    flat = (index + heads).reshape(-1, count)
    table = kept_keys.view(-1, head_dim)
    chunk = max(1, GATHER_ROWS // max(1, count))
    rows = min(chunk, flat.shape[0]) * count
    halves = torch.empty(rows, head_dim, dtype=kept_keys.dtype, device=index.device)
    # float32 kept keys are gathered straight into the product's operand.
    widened = halves if kept_keys.dtype == torch.float32 else torch.empty(rows, head_dim, device=index.device)
    for first in range(0, flat.shape[0], chunk):
        stop = min(flat.shape[0], first + chunk)
        size = (stop - first) * count
        torch.index_select(table, 0, flat[first:stop].reshape(-1), out=halves[:size])
        block = (widened[:size] if widened is halves else widened[:size].copy_(halves[:size])).view(
            stop - first, count, head_dim)
        torch.bmm(by_head[first:stop], block.transpose(1, 2), out=dots[first:stop])


def _put_exact_dots(keys: CompressedKeys, by_head: torch.Tensor, index: torch.Tensor, dots: torch.Tensor) -> None:
    """Replace, in place, the dots ``dots`` [B, g, n] of selected exact tokens with their dots
    with the exact rows (post-RoPE from their own float32 rows). ``by_head`` [B, g, D] the
    queries, ``index`` [B, n] body tokens; batch ``b`` is KV head ``b % Hkv``."""
    if not keys.num_exact:
        return
    exact = _exact_body_index(keys)
    exact_rows = _exact_key_columns(keys).transpose(1, 2)  # [Hkv, k, D], kept as the dense dots keep them
    row = torch.searchsorted(exact, index).clamp(max=exact.numel() - 1)
    batch, position = (exact[row] == index).nonzero(as_tuple=True)
    if batch.numel():
        rows = exact_rows[batch % keys.kv_heads, row[batch, position]]  # [E, D]
        dots[batch, :, position] = torch.einsum("egd,ed->eg", by_head[batch], rows)


def _reconstructed_rows(keys: CompressedKeys, index: torch.Tensor, precision: str,
                        union: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE reconstructed body keys float32 [..., Hkv, n, D] of the selected tokens
    ``index`` [..., Hkv, n], each head's channels in pair order for keys that rotate (exact
    tokens not put in, no rounding: :func:`_selected_dots` does both). ``union``: the
    selections' :func:`_selection_union` of several queries, None for one."""
    kv_heads, head_dim = keys.kv_heads, keys.head_dim
    if union is not None and union.numel() * kv_heads < index.numel():
        # Several queries (a chunk of a continuation) whose selections overlap: reconstruct
        # each token they select once, every KV head together, and gather per query and head.
        rows = _body_rows(keys, union, precision)  # [U, Hkv, D]
        # Whole rows of one [Hkv * U, D] table with index_select: indexing [U, Hkv, D] with a
        # token and a head index tensor was 4x slower.
        by_head = rows.transpose(0, 1).reshape(-1, head_dim)
        heads = torch.arange(kv_heads, device=index.device)[:, None] * union.numel()
        flat = (torch.searchsorted(union, index) + heads).reshape(-1)
        return by_head.index_select(0, flat).view(*index.shape, head_dim)
    basis, mean, rest = _dense_basis(keys, precision)
    # Explicit sizes: with every channel dropped (r = 0) a -1 would be ambiguous.
    by_head = basis.view(kv_heads, head_dim, basis.shape[1])
    rest_by_head = [None] * kv_heads if rest is None else rest.view(kv_heads, head_dim, rest.shape[1])
    mean_by_head = mean.view(kv_heads, head_dim)
    kept = code_widths(keys)[0]
    per_head = index.transpose(0, -2)  # [Hkv, ..., n]
    latent = _dequantized(keys, per_head).view(kv_heads, index.numel() // kv_heads, kept)
    # Each head its own tokens: reconstruct only that head's channels, one matmul per head
    # (oneDNN's, :func:`reconstruct`; a batched matmul over the heads' strided basis rows ran 2x
    # slower), written into one contiguous [..., Hkv, n, D] that the dots read without a copy.
    rows = torch.empty(*index.shape, head_dim, device=index.device)
    for head in range(kv_heads):
        rows[..., head, :, :] = reconstruct(latent[head], by_head[head], mean_by_head[head], rest_by_head[head]).view(
            *per_head.shape[1:], head_dim)
    if rotates(keys):
        _rotate_pairs(rows, _rotation(keys, index))
    return rows


def _body_rows(keys: CompressedKeys, tokens: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """Post-RoPE reconstructed keys float32 [n, Hkv, D] of body tokens ``tokens`` [n], all KV
    heads of each token in one matmul; in pair order for keys that rotate (as
    :func:`_reconstructed_rows`), exact tokens not put in."""
    basis, mean, rest = _dense_basis(keys, precision)
    rows = reconstruct(_dequantized(keys, tokens), basis, mean, rest).view(tokens.numel(), keys.kv_heads,
                                                                          keys.head_dim)
    if rotates(keys):
        _rotate_pairs(rows, _rotation(keys, tokens)[:, None, :])
    return rows


def softmax_weights(
    query: torch.Tensor, keys: torch.Tensor, scale: float, valid: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised softmax weights of grouped queries over one token set.

    Args:
        query: float32 [..., Hkv, ratio, D]; keys: float32 [..., Hkv, n, D] (leading
            dimensions broadcast); valid: bool [..., Hkv, n] or None (all valid);
            softcap: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2), or None.

    Returns:
        ``(weights [..., Hkv, ratio, n], lse [..., Hkv, ratio])`` float32: ``weights`` are
        ``exp(score - lse)`` (they sum to 1 over the set); lse is -inf for no tokens.
    """
    return softmax_from_dots(torch.einsum("...hgd,...hnd->...hgn", query, keys), scale, valid, softcap)


def softmax_from_dots(
    dots: torch.Tensor, scale: float, valid: torch.Tensor | None = None, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights and lse from raw dot products ``q . k`` [..., Hkv, ratio, n].

    The one place where dot products become logits (scale, masking) for every torch path,
    so that a change to the logits (e.g. a softcap) applies to all of them. ``dots`` is
    scaled in place. Returns what :func:`softmax_weights` returns.
    """
    scores = dots.mul_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if valid is not None:
        scores = scores.masked_fill(~valid[..., None, :], -math.inf)
    if scores.shape[-1] == 0:
        return scores, scores.new_full(scores.shape[:-1], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp_(scores.sub_(safe[..., None])), lse


def weighted_values(values: CompressedValues, weights: torch.Tensor, seq_index: torch.Tensor | slice) -> torch.Tensor:
    """``sum_n weights[..., h, g, n] * value[seq_index[n], h]``: float32 [..., Hkv, g, D].

    Args:
        weights: float32 [..., Hkv, g, n] softmax weights (see :func:`softmax_weights`).
        seq_index: the sequence index of each weighted token: a ``slice`` or int64 [n] (the
            same tokens for every head), or int64 [..., Hkv, n].

    16-bit and per-token values are gathered and summed. SVDq latent values are not
    reconstructed: for the tokens in their quantized body the weights sum the dequantized
    latent codes, ``s = sum_t w_t l_t`` ([..., Hkv, g, r]), which is projected once per head,
    ``s @ B_h^T + mean_h * sum_t w_t``, instead of ``S * r * C`` multiply-adds to rebuild
    every value; their full-precision sinks and tail are summed exactly.
    """
    if weights.shape[-1] == 0:
        return weights.new_zeros(*weights.shape[:-1], values.head_dim)
    if values.latent is None:
        if isinstance(seq_index, slice):
            return _summed_value_rows(values, weights, seq_index)
        if values.bits is None and seq_index.dim() > 1:
            # Each head its own tokens: whole rows of one [S * H, D] table with index_select
            # (indexing [S, H, D] with a token and a head index tensor was several times slower).
            heads = torch.arange(values.heads, device=seq_index.device)[:, None]
            flat = (seq_index * values.heads + heads).reshape(-1)
            rows = values.data.reshape(values.num_tokens * values.heads, values.head_dim).index_select(0, flat).float()
            return torch.matmul(weights, rows.view(*seq_index.shape, values.head_dim))
        return torch.einsum("...hgn,...hnd->...hgd", weights, gather_values(values, seq_index))
    latent = values.latent
    if isinstance(seq_index, slice):
        return _summed_latent_range(latent, weights, seq_index)
    kv_heads, head_dim = latent.kv_heads, latent.head_dim
    v_start, v_body = body_range(latent)
    body_index = seq_index - v_start
    in_body = (body_index >= 0) & (body_index < v_body)
    output = weights.new_zeros(*weights.shape[:-1], head_dim)
    if v_body:
        body_weights = weights * in_body.unsqueeze(-2)
        codes = _dequantized(latent, body_index.clamp(0, v_body - 1))
        pattern = "...hgn,nr->...hgr" if seq_index.dim() == 1 else "...hgn,...hnr->...hgr"
        output = _project_latent(latent, torch.einsum(pattern, body_weights, codes), body_weights.sum(-1))
    if not bool(in_body.all()):
        # [Hkv, F, D]: the 16-bit sinks' and tail's rows as the kept projection holds them
        full = _value_projection(latent)[:, _latent_layout(latent)[3] + 1:]
        row = torch.where(seq_index < v_start, seq_index, seq_index - v_body).clamp(0, max(0, full.shape[1] - 1))
        if seq_index.dim() == 1:
            rows = full[:, row]
        else:
            rows = full[torch.arange(kv_heads, device=row.device)[:, None], row]
        output = output + torch.einsum("...hgn,...hnd->...hgd", weights * (~in_body).unsqueeze(-2), rows)
    return output


def _summed_latent_range(latent: CompressedKeys, weights: torch.Tensor, tokens: slice) -> torch.Tensor:
    """:func:`weighted_values` of SVDq latent values over a contiguous token range (dense
    calls: every token of the sequence) in two products: the body's latent sums with its
    softmax mass (:func:`_summed_latent_rows`) and the weights of the 16-bit sinks and tail
    are written side by side into one operand ``[rows, r + 1 + F]``, then one batched
    product per KV head with that head's :func:`_value_projection` (basis rows, mean, 16-bit
    rows) projects the sums, adds the mean with the body's softmax mass and sums the 16-bit
    tokens at once. A range that is not the whole sequence is widened with zero weights."""
    kv_heads, head_dim = latent.kv_heads, latent.head_dim
    v_start, v_body, total, kept, columns = _latent_layout(latent)
    if (tokens.start, tokens.stop) != (0, total):
        weights = torch.nn.functional.pad(weights, (tokens.start, total - tokens.stop))
    lead, ratio = weights.shape[:-3], weights.shape[-2]
    # [Hkv * rows, T]: each head's weight rows (a copy only with leading dimensions; a dense
    # call's weights [Hkv, R, T] are already laid out so).
    flat = weights.reshape(-1, total) if not lead else (
        weights.reshape(-1, kv_heads, ratio, total).transpose(0, 1).reshape(-1, total))
    projection = _value_projection(latent)
    operand = _summed_latent_rows(latent, flat[:, v_start:v_start + v_body], kept)
    if columns.numel():
        # (a cat of two contiguous parts cost less than products written into a strided view)
        operand = torch.cat([operand, flat.index_select(1, columns)], dim=1)
    output = torch.bmm(operand.view(kv_heads, -1, projection.shape[1]), projection)  # [Hkv, rows, D]
    if not lead:
        return output
    return output.view(kv_heads, -1, ratio, head_dim).transpose(0, 1).reshape(*lead, kv_heads, ratio, head_dim)


def _latent_layout(latent: CompressedKeys) -> tuple[int, int, int, int, torch.Tensor]:
    """``(body start, body tokens, total tokens, kept channels r, 16-bit token indices int64
    [F])`` of SVDq values, cached: read on every call, the properties cost more than the
    products at decode shapes."""
    cached = latent._cache.get("latent_layout")
    if cached is None:
        start, n_body = body_range(latent)
        total = latent.num_tokens
        columns = torch.cat([torch.arange(start), torch.arange(start + n_body, total)]).to(latent.codes.device)
        cached = latent._cache["latent_layout"] = (start, n_body, total, code_widths(latent)[0], columns)
    return cached


def _value_block(width: int) -> int:
    """Tokens per block of a blocked weighted sum: ``2^18`` float32 elements of rows."""
    return max(64, RECONSTRUCT_BLOCK_ELEMENTS // max(1, width))


def _summed_value_rows(values: CompressedValues, weights: torch.Tensor, tokens: slice) -> torch.Tensor:
    """``sum_n weights[..., h, g, n] * value[tokens.start + n, h]`` of 16-bit or per-token values
    over a contiguous token range, float32 [..., Hkv, g, D].

    In blocks of tokens converted to float32 in a reused buffer and summed into the output:
    converting all values at once and summing over a head-strided view of them is several
    times slower (a large transposed copy) than these cache-resident blocks.
    """
    heads, head_dim = values.heads, values.head_dim
    lead = weights.shape[:-3]
    grouped = weights.reshape(-1, heads, weights.shape[-2], weights.shape[-1])
    output = weights.new_zeros(grouped.shape[0], heads, grouped.shape[2], head_dim)
    count = tokens.stop - tokens.start
    block = _value_block(heads * head_dim)
    buffer = torch.empty(min(block, count), heads, head_dim, device=weights.device) if values.bits is None else None
    for first in range(0, count, block):
        stop = min(count, first + block)
        if buffer is not None:
            rows = buffer[:stop - first]
            rows.copy_(values.data[tokens.start + first:tokens.start + stop])
            rows = rows.transpose(0, 1)
        else:
            rows = gather_values(values, torch.arange(tokens.start + first, tokens.start + stop, device=weights.device))
        for item in range(grouped.shape[0]):
            output[item].baddbmm_(grouped[item, :, :, first:stop], rows)
    return output.reshape(*lead, heads, grouped.shape[2], head_dim)


#: Body tokens per block of the latent values' weighted sum (a multiple of every group size).
LATENT_SUM_BLOCK = 4096


def _summed_latent_rows(latent: CompressedKeys, weights: torch.Tensor, kept: int) -> torch.Tensor:
    """``sum_n weights[:, n] * [l[n], 1]`` of the dequantized latent of SVDq values' body and
    the weights' sum: weights float32 [rows, n_body] -> float32 [rows, r + 1] (r = ``kept``).

    The body is summed in fixed blocks of :data:`LATENT_SUM_BLOCK` tokens (the last one padded
    with zero weights and zero rows), each one product of the block's channel-major latent
    [r + 1, block] (a last row of ones) with the weights (:func:`_latent_product`). The block's
    latent is the kept :data:`KEPT_LATENT` where there is one (:func:`_kept_latent`), else
    dequantized now into reused buffers (:func:`_latent_blocks`); both hold the same values and
    every product and partial sum is the same, so a result has the same bits whatever the
    attention cache holds.
    """
    rows, n_body = weights.shape
    if not (n_body and rows):
        return weights.new_zeros(rows, kept + 1)
    block = min(LATENT_SUM_BLOCK, n_body)
    kept_blocks = _kept_latent(latent, block)
    if kept_blocks is not None and block == n_body:  # one block (decode shapes): one product
        return _latent_product(weights, kept_blocks[0])
    blocks = iter(kept_blocks) if kept_blocks is not None else _latent_blocks(latent, block)
    summed = None
    for first, by_channel in zip(range(0, n_body, block), blocks, strict=True):
        stop = min(n_body, first + block)
        part = weights[:, first:stop]
        if stop - first < block:
            part = torch.nn.functional.pad(part, (0, block - (stop - first)))
        product = _latent_product(part, by_channel)
        summed = product if summed is None else summed.add_(product)
    return summed


#: Multiply-adds below which a latent block's sum is one ``mm`` (MKL) rather than oneDNN's
#: product: at decode shapes (600 tokens, 36 channels, 9 rows) oneDNN's call cost twice
#: the mm's 11 us; at 4k tokens, 300 channels and 32 rows oneDNN was 1.5x faster.
LATENT_MM_MACS = 1 << 22


def _latent_product(weights: torch.Tensor, by_channel: torch.Tensor) -> torch.Tensor:
    """``weights [rows, block] @ by_channel [k, block].T`` -> float32 [rows, k] (contiguous); the
    product is chosen by the shapes alone (:data:`LATENT_MM_MACS`), never by what the cache holds."""
    rows, block = weights.shape
    if rows * block * by_channel.shape[0] < LATENT_MM_MACS or _CPU_LINEAR is None or by_channel.device.type != "cpu":
        return torch.mm(weights, by_channel.T)
    # [k, block] x [rows, block]^T -> [k, rows]: the tokens as the product's reduction.
    return _linear(by_channel, weights, None).T.contiguous()


def _latent_blocks(latent: CompressedKeys, block: int, out: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The dequantized latent of SVDq values' body, channel-major, ``block`` tokens at a time,
    with a last row of ones: float32 [r + 1, block] each (columns past the body zero), in one
    reused buffer, or written into ``out`` [blocks, r + 1, block]. Dequantized straight from the
    packed rows into the channel-major block (:func:`svdq.quant.dequantize_by_channel`): the
    same values as dequantizing the unpacked codes row-major and copying them transposed, whose
    transposed copy and unpack were most of a cold call's value sum."""
    channels = code_widths(latent)[0]
    _, n_body = body_range(latent)
    group = latent.group_size
    scales, mins, bits = latent.scales.float(), latent.mins.float(), latent.kept_bits
    reused = torch.empty(channels + 1, block, device=latent.codes.device) if out is None else None
    for index, first in enumerate(range(0, n_body, block)):
        stop = min(n_body, first + block)
        target = reused if out is None else out[index]
        low, high = first // group, stop // group  # block is a multiple of the group size
        dequantize_by_channel(latent.codes[low:high], bits, group, scales[low:high], mins[low:high],
                              target[:channels, :stop - first])
        target[channels, :stop - first] = 1.0
        target[:, stop - first:].zero_()
        yield target


#: Name of the float32 dequantized latent of SVDq values' body in channel-major blocks
#: [blocks, r + 1, block] with a row of ones (:func:`_latent_blocks`, the same values every call
#: computes), that calls on the CPU keep while the attention-cache budget has room (from a
#: sequence's first call up to ``FIRST_ASK_BYTES``, else its second;
#: :meth:`svdq.derived.DerivedCache.admits`): ``4 (r + 1)`` bytes per body token (padded to a block).
KEPT_LATENT = "kept_latent"


def _kept_latent(latent: CompressedKeys, block: int) -> torch.Tensor | None:
    """The kept :data:`KEPT_LATENT` of ``latent`` in blocks of ``block`` tokens, made now when
    the cache admits it (CPU with oneDNN only: elsewhere the blocked sum is as fast), else None."""
    kept = DERIVED.get(latent, KEPT_LATENT)
    if kept is not None or latent.codes.device.type != "cpu" or _CPU_LINEAR is None:
        return kept
    channels = code_widths(latent)[0]
    _, n_body = body_range(latent)
    blocks = -(-n_body // block)
    if not DERIVED.admits(latent, KEPT_LATENT, 4 * blocks * block * (channels + 1)):
        return None
    kept = torch.empty(blocks, channels + 1, block)
    for _ in _latent_blocks(latent, block, out=kept):
        pass
    return DERIVED.put(latent, KEPT_LATENT, kept, optional=True)


#: Name of SVDq values' projection operand, float32 [Hkv, r + 1 + F, D] (:func:`_value_projection`).
VALUE_PROJECTION = "value_projection"


def _value_projection(latent: CompressedKeys) -> torch.Tensor:
    """float32 [Hkv, r + 1 + F, D]: for each KV head its basis rows ``B_h^T`` [r, D], its mean
    [1, D] and the rows of the F 16-bit tokens (sinks, then tail), so that one batched product
    of ``[latent sums, body weight sum, 16-bit tokens' weights]`` with it is the head's values
    (:func:`_summed_latent_range`). Kept under the budget (``4 Hkv (r + 1 + F) D`` bytes): a
    function of the compressed values alone, the same kept or rebuilt."""
    cached = DERIVED.get(latent, VALUE_PROJECTION)
    if cached is None:
        kv_heads, head_dim = latent.kv_heads, latent.head_dim
        kept = code_widths(latent)[0]  # explicit: with every channel dropped (r = 0) a -1 would be ambiguous
        sinks, tail = latent.sinks.shape[0], latent.tail.shape[0]
        # Each part converted and transposed by one copy into the operand (a cold call builds it:
        # converting, then cat and contiguous copies, took 1.4-1.8x as long).
        operand = torch.empty(kv_heads, kept + 1 + sinks + tail, head_dim, device=latent.codes.device)
        operand[:, :kept].copy_(latent.basis.reshape(kv_heads, head_dim, kept).transpose(1, 2))
        operand[:, kept].copy_(latent.mean.reshape(kv_heads, head_dim))
        operand[:, kept + 1:kept + 1 + sinks].copy_(latent.sinks.reshape(sinks, kv_heads, head_dim).transpose(0, 1))
        operand[:, kept + 1 + sinks:].copy_(latent.tail.reshape(tail, kv_heads, head_dim).transpose(0, 1))
        cached = DERIVED.put(latent, VALUE_PROJECTION, operand)
    return cached


def _project_latent(latent: CompressedKeys, summed: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """Weighted latent sums [..., Hkv, g, r] and their weights' sums [..., Hkv, g] -> values
    [..., Hkv, g, D] (each head's basis rows and mean, :func:`_value_projection`)."""
    kv_heads, head_dim = latent.kv_heads, latent.head_dim
    kept, ratio = summed.shape[-1], summed.shape[-2]
    operand = torch.cat([summed, weight_sum[..., None]], dim=-1).reshape(-1, kv_heads, ratio, kept + 1)
    projected = torch.bmm(operand.transpose(0, 1).reshape(kv_heads, -1, kept + 1),
                          _value_projection(latent)[:, :kept + 1])
    return projected.view(kv_heads, -1, ratio, head_dim).transpose(0, 1).reshape(*summed.shape[:-1], head_dim)


def _attend_torch_group(
    queries: torch.Tensor, keys: CompressedKeys, values: CompressedValues, scale: float,
    selections: Sequence[BodySelection], softcap: float | None = None, precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [n, Hq, D] over one sequence -> (output [n, Hq, D], lse [n, Hq]).

    Dense queries (e.g. every position of a scored continuation) share one reconstruction of
    the keys; sparse ones gather their selections from the keys a dense call kept (float16 in
    bfloat16, float32 in float32), or reconstruct them (rounded alike) in one batched
    computation, and sum SVDq latent values over the union of their selections where that is
    cheaper than over every token (:func:`_selected_value_union`).
    """
    count, q_heads, head_dim = queries.shape
    kv_heads = keys.kv_heads
    ratio = q_heads // kv_heads
    fp_keys, fp_index = full_precision_keys(keys)
    start, n_body = body_range(keys)
    if selections[0].token_index is None:
        # [Hkv, n * ratio, D]: the query heads of a KV head, for every query.
        grouped = queries.float().reshape(count, kv_heads, ratio, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
        # One softmax over every token in sequence order (sinks, body, tail), so that the values
        # are summed over one contiguous range: latent values then take their body, sinks and
        # tail as runs, not the keys' full-precision tokens as gathered indices (the keys' and
        # values' bodies differ when their token groups do).
        # Written in place, one [Hkv, R, T] tensor: with many queries (a prompt chunk over a long
        # prefix) a concatenation of parts would double the largest tensor of the call.
        dots = torch.empty(kv_heads, grouped.shape[1], keys.num_tokens, device=grouped.device)
        fp_keys = fp_keys.transpose(0, 1)  # [Hkv, sinks + tail, D]
        torch.bmm(grouped, fp_keys[:, :start].transpose(1, 2), out=dots[..., :start])
        torch.bmm(grouped, fp_keys[:, start:].transpose(1, 2), out=dots[..., start + n_body:])
        if n_body:
            dense_body_dots(keys, grouped, precision, out=dots[..., start:start + n_body])
        weights, lse = softmax_from_dots(dots, scale, softcap=softcap)
        output = weighted_values(values, weights, slice(0, keys.num_tokens))
        output = output.reshape(kv_heads, count, ratio, head_dim).transpose(0, 1)
        return output.reshape(count, q_heads, head_dim), lse.reshape(kv_heads, count, ratio).transpose(0, 1).reshape(count, q_heads)
    grouped = queries.float().reshape(count, kv_heads, ratio, head_dim)
    weights, lse = softmax_weights(grouped, fp_keys.transpose(0, 1), scale, softcap=softcap)
    stacked = BodySelection(torch.stack([s.token_index for s in selections]), torch.stack([s.valid for s in selections]),
                            0, 0, 0, 0)
    # The selected keys come in pair order (rotated as one complex product): so do the queries.
    paired = grouped[..., _pair_order(keys)] if rotates(keys) else grouped
    body_weights, lse_body = softmax_from_dots(_selected_dots(keys, paired, stacked.token_index, precision), scale,
                                               stacked.valid, softcap)
    if values.latent is not None and _dense_latent_sum_is_cheaper(values.latent, stacked.token_index, ratio):
        # The two softmaxes merged into one set of weights over the sequence, summed densely.
        share, share_body, lse = _merge_shares(lse, lse_body)
        # Head-major [Hkv, count, ratio, T], written through a query-major view, so that the
        # sum reads it in place (a query-major tensor would be copied whole into that layout).
        dense = weights.new_zeros(kv_heads, count, ratio, keys.num_tokens)
        by_query = dense.permute(1, 0, 2, 3)
        by_query.index_copy_(-1, fp_index, weights.mul_(share[..., None]))
        # (scatter_add: padding selections point at the first body token with zero weight)
        by_query.scatter_add_(-1, (stacked.token_index + start)[:, :, None, :].expand(-1, -1, ratio, -1),
                              body_weights.mul_(share_body[..., None]))
        flat = dense.view(kv_heads, count * ratio, keys.num_tokens)
        union = _selected_value_union(values.latent, stacked.token_index + start, fp_index, count * ratio)
        output = (weighted_values(values, flat, slice(0, keys.num_tokens)) if union is None else
                  _summed_latent_columns(values.latent, flat, union))
        output = output.reshape(kv_heads, count, ratio, head_dim).transpose(0, 1)
        return output.reshape(count, q_heads, head_dim), lse.reshape(count, q_heads)
    output = weighted_values(values, weights, fp_index)
    out_body = weighted_values(values, body_weights, stacked.token_index + start)
    output, lse = merge_attention(output, lse, out_body, lse_body)
    return output.reshape(count, q_heads, head_dim), lse.reshape(count, q_heads)


#: Cost of one gathered latent element (a selected token's code, dequantized and summed by a
#: small product per query and head) in multiply-adds of the dense latent sum's product, and
#: of one element of the dense weights (zeroed and scattered into). Measured on the CPU at
#: Llama-3-8B shapes, 32k tokens, batch 1, kept (docs/attention.md, round 7): the dense sum was
#: 1.65x faster at keep 1/32 (dense/gathered work 120), the gathers 1.4x faster at 1/128 (409)
#: and 1/512, 1/2048; at 4k and 1/32 (85) the two were within 4%.
GATHERED_LATENT_COST = 200.0
DENSE_WEIGHT_COST = 4.0
#: Force the sparse value sum of SVDq latent values: None (the cost rules), "dense" (every body
#: token), "union" (the selected tokens' union, :func:`_summed_latent_columns`) or "gathered"
#: (benchmarks, tests).
SPARSE_LATENT_SUM = None


#: Cost of dequantizing one latent element of a selected token (its code, scale and minimum
#: gathered, :func:`_dequantized`) for the sum over the union of the selected tokens
#: (:func:`_selected_value_union`), in multiply-adds of the sums' products: 0.9-2.8 ns an
#: element against 0.032-0.040 ns a multiply-add (this AVX2 CPU, one thread, 256 / 446
#: channels at 4k / 32k tokens, docs/attention.md round 9).
UNION_ROW_COST = 48.0
#: Union tokens dequantized and summed at a time (:func:`_summed_latent_columns`).
UNION_BLOCK = 1024


def _selected_value_union(latent: CompressedKeys, seq_index: torch.Tensor, fp_index: torch.Tensor,
                          rows: int) -> torch.Tensor | None:
    """int64 [U] ascending value-body tokens that the selections ``seq_index`` [n, Hkv, m]
    and the keys' full-precision tokens ``fp_index`` [F] (sequence positions; the values' body
    may hold some of the keys' sinks or tail) of a sparse call touch, when summing the merged weights over those
    tokens alone (:func:`_summed_latent_columns`) costs less than over every body token: the
    ``Hkv rows U r`` multiply-adds (``rows`` weight rows per KV head) plus
    :data:`UNION_ROW_COST` per dequantized element (``U r``), against the dense sum's
    ``Hkv rows n_body (r + 1)``; else None.
    A rule on the selection's size alone (never on what the cache holds). With
    ``SPARSE_LATENT_SUM == "dense"`` always None, with ``"union"`` never."""
    if SPARSE_LATENT_SUM == "dense":
        return None
    v_start, v_body, total, kept, _ = _latent_layout(latent)
    if not v_body:
        return None
    # The distinct tokens, sorted, by marking them (padding selections mark a token whose
    # weight is zero: summed with it, they add nothing).
    seen = torch.zeros(total, dtype=torch.bool, device=seq_index.device)
    seen[seq_index.reshape(-1)] = True
    seen[fp_index] = True
    union = seen[v_start:v_start + v_body].nonzero().squeeze(1)
    size = union.numel()
    heads_rows = latent.kv_heads * rows
    if SPARSE_LATENT_SUM != "union" and heads_rows * size * kept + UNION_ROW_COST * size * kept >= (
            heads_rows * v_body * (kept + 1)):
        return None
    return union


def _summed_latent_columns(latent: CompressedKeys, weights: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_values` of SVDq latent values with weights float32 [Hkv, R, T] over the
    whole sequence that are zero on every value-body token but ``union`` [U] (ascending body
    indices, :func:`_selected_value_union`): the body's latent sum over those tokens alone, one
    ``[Hkv R, U] @ [U, r]`` product with the dequantized latent of the union and the weights'
    sums (the softmax mass that carries the mean), then the projection with the 16-bit sinks' and tail's weights
    as :func:`_summed_latent_range` does. -> float32 [Hkv, R, D]."""
    kv_heads = latent.kv_heads
    v_start, _, total, kept, columns = _latent_layout(latent)
    flat = weights.reshape(-1, total)
    selected = flat.index_select(1, union + v_start)
    # In blocks of UNION_BLOCK tokens, whose dequantized latent and its gathered scales stay in
    # cache (all 7k union tokens of a 32k-token call at once: 7x slower per element); their rows
    # gathered from the kept row-major latent where there is one (the same values).
    table = _kept_latent_rows(latent)
    summed = selected.new_zeros(selected.shape[0], kept)
    for first in range(0, union.numel(), UNION_BLOCK):
        stop = min(union.numel(), first + UNION_BLOCK)
        rows = (_dequantized(latent, union[first:stop]) if table is None else
                table.index_select(0, union[first:stop]))
        summed.addmm_(selected[:, first:stop], rows)
    # (the weights' sums apart: a column of ones next to the latent would cost a copy of it)
    parts = [summed, selected.sum(dim=1, keepdim=True)]
    if columns.numel():
        parts.append(flat.index_select(1, columns))
    operand = torch.cat(parts, dim=1)
    projection = _value_projection(latent)
    return torch.bmm(operand.view(kv_heads, -1, projection.shape[1]), projection)


#: Name of the float32 dequantized latent of SVDq values' body, row-major [n_body, r]
#: (:func:`_dequantized` of every body token, the same values), that sparse calls summing over
#: their selections' union (:func:`_summed_latent_columns`) keep while the attention-cache
#: budget has room (:meth:`svdq.derived.DerivedCache.admits`): ``4 r`` bytes per body token.
#: Gathering the union's rows from it instead of dequantizing them (three gathers, a conversion
#: and a multiply-add per element) took 1.4 ms instead of 8.2 ms at 32k tokens x 446 channels.
KEPT_LATENT_ROWS = "kept_latent_rows"


def _kept_latent_rows(latent: CompressedKeys) -> torch.Tensor | None:
    """The kept :data:`KEPT_LATENT_ROWS` of ``latent``, made now when the cache admits it (CPU
    only: the GPU runs the Triton kernels), else None."""
    kept = DERIVED.get(latent, KEPT_LATENT_ROWS)
    if kept is not None or latent.codes.device.type != "cpu":
        return kept
    n_body, width = body_range(latent)[1], code_widths(latent)[0]
    if not DERIVED.admits(latent, KEPT_LATENT_ROWS, 4 * n_body * width):
        return None
    return DERIVED.put(latent, KEPT_LATENT_ROWS, _dequantized(latent, None), optional=True)


def _dense_latent_sum_is_cheaper(latent: CompressedKeys, token_index: torch.Tensor, ratio: int) -> bool:
    """Whether sparse calls over SVDq latent values sum them densely (every body token's
    latent, the unselected ones with weight zero: the dense call's two products) rather than
    gathering the selected tokens' codes: by a cost rule on the shapes alone (never on what
    the cache holds, so that a result has the same bits kept or cold). Gathering costs
    :data:`GATHERED_LATENT_COST` per selected code (``count * Hkv * n * r``), the dense sum
    one per multiply-add (``count * Hkv * g * n_body * (r + 1)``) plus
    :data:`DENSE_WEIGHT_COST` per dense weight (``count * Hkv * g * T``)."""
    if SPARSE_LATENT_SUM is not None:
        return SPARSE_LATENT_SUM in ("dense", "union")
    kept = code_widths(latent)[0]
    n_body = body_range(latent)[1]
    rows = token_index.shape[0] * token_index.shape[1]  # (query, head) pairs
    gathered = GATHERED_LATENT_COST * rows * token_index.shape[-1] * kept
    dense = rows * ratio * (n_body * (kept + 1) + DENSE_WEIGHT_COST * latent.num_tokens)
    return dense <= gathered


def _attend_torch(queries: torch.Tensor, keys: Sequence[CompressedKeys], values: Sequence[CompressedValues],
                  scale: float, selections: Sequence[BodySelection], softcap: float | None = None,
                  precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference over a batch: entries over the same sequence run together."""
    output = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    lse = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for members in _same_sequence_groups(keys, values):
        index = torch.tensor(members, device=queries.device)
        first = members[0]
        out, lse_group = _attend_torch_group(queries[index], keys[first], values[first], scale,
                                             [selections[b] for b in members], softcap, precision)
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
    for name, given in (("keys", keys), ("values", values)):
        if not isinstance(given, Sequence):
            raise InvalidInputError(f"{name} must be a list with one compressed cache per query (batch {batch}), "
                                    f"got {type(given).__name__}")
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
    softcap: float | None = None,
    precision: str | None = None,
) -> AttentionOutput:
    """Decode attention over compressed keys and values.

    Args:
        queries: [B, Hq, D] float16/bfloat16/float32 post-RoPE decode queries; Hq a multiple
            of the keys' kv_heads (query head ``i`` uses KV head ``i // (Hq / Hkv)``).
        keys: B compressed key caches (any method: svdq, kivi, fp16) on the queries' device;
            one :class:`CompressedKeys` alone stands for a list of one.
        values: B value caches with the same token count and heads as ``keys`` (one alone
            likewise).
        scale: softmax scale; default ``1 / sqrt(D)``.
        sparsity: attend only to chosen chunks (see the module docstring); None = dense.
        backend: ``"torch"`` or ``"triton"``; default from :func:`select_backend`.
        softcap: attention logit softcapping, scores ``softcap * tanh(scores / softcap)``
            before the softmax (Gemma 2), in (0, :data:`MAX_SOFTCAP`]; None: none.
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (float16-rounded keys) for
            the torch path's key products;
            default from :func:`select_precision` (bfloat16 on CPUs that multiply it natively).

    Returns:
        :class:`AttentionOutput`: ``output`` float32 [B, Hq, D], ``lse`` float32 [B, Hq].
    """
    # One sequence's caches may be given bare; _validate wants one entry per query.
    keys = [keys] if isinstance(keys, CompressedKeys) else keys
    values = [values] if isinstance(values, CompressedValues) else values
    softmax_scale = _validate(queries, keys, values, scale, sparsity)
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap <= MAX_SOFTCAP):
        raise InvalidInputError(f"softcap must be a number in (0, {MAX_SOFTCAP:g}] or None (no softcapping), "
                                f"got {softcap!r}")
    chosen = select_backend(queries.device, backend)
    products = select_precision(queries.device, precision)
    batch, q_heads, head_dim = queries.shape
    selections: list[BodySelection] = [None] * batch  # type: ignore[list-item]
    for members in _same_sequence_groups(keys, values):
        index = torch.tensor(members, device=queries.device)
        for b, selection in zip(members, select_body_tokens_many(queries[index].float(), keys[members[0]], sparsity,
                                                                 chosen), strict=True):
            selections[b] = selection
    # Both backends compute every case (key methods, exact key tokens, 16-bit, per-token and
    # SVDq latent values, softcap), so the choice is the device's alone.
    cap = None if softcap is None else float(softcap)
    if chosen == "triton":
        from .kernels.decode_attention import attend_triton

        output, lse = attend_triton(queries, keys, values, softmax_scale, selections, cap)
    else:
        output, lse = _attend_torch(queries, keys, values, softmax_scale, selections, cap, products)
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
    "select_precision",
]
