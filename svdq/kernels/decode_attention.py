"""Triton decode attention over SVDq-compressed keys (flash-decoding split + reduction).

One launch serves a whole batch of sequences (grouped by layout, see :func:`attend_triton`).
Program ``(b * Hkv + h, split)`` handles KV head ``h`` of sequence ``b`` for every query head
of its GQA group at once:

* ``split < n_splits``: a slice of the quantized body tokens, either a contiguous range
  (dense) or a slice of the per-head selected token list (sparse). Per tile of BLOCK_T
  tokens and BLOCK_R latent channels it unpacks the mixed-width codes, dequantizes with the
  group's float16 scale/min, and accumulates ``latent @ basis_h.T`` (float16 operands,
  float32 accumulation), then adds the mean. Exact key tokens (``exact_tokens``) replace
  that reconstruction with their 16-bit rows.
* ``split == n_splits``: the full-precision sinks and tail of the sequence.

Both kinds then share one path: RoPE is applied on the query side (see below), scores are
scaled (and softcapped, ``cap * tanh(s / cap)``, when asked) and go through an online softmax
in base 2, and the tile's values (16-bit, or 2/4-bit per-token codes) are accumulated. Each
program writes a partial output and log-sum-exp; a second kernel reduces the splits of every
query head.

SVDq latent values (``ValueConfig(codec=...)``: a per-layer basis ``B`` [C, r_v] and mean
over all KV heads, mixed-width codes in token groups, 16-bit sinks and tail) are never
reconstructed per token. The first kernel accumulates only the tokens whose values are
16-bit rows and writes the scaled base-2 scores of every token it attended to a buffer; a
second kernel, program ``(b * Hkv + h, split, channel block)``, turns them into the split's
normalised weights ``w_t = 2^(s_t - lse_2)`` and sums ``w_t l_t`` over the latent codes
(dequantized in the kernel from the same packed codes, scales and minimums the torch path
reads) and ``w_t`` itself, for tokens in the values' quantized body; the reduction merges
those sums over the splits with the splits' weights and projects once per query head:
``out += (sum_t w_t l_t) B_h^T + mean_h * sum_t w_t``.

RoPE without shuffling key channels: with ``c[t, e] = cos(pos_t * f_e)`` and
``s[t, e] = sin(pos_t * f_e)`` (``f_e`` the inverse frequency of channel ``e``'s pair, 0 for
channels that do not rotate), ``q . RoPE_t(k) = sum_e k[t, e] * (q[e] * c[t, e] + qp[e] * s[t, e])``
where ``qp[e] = sign_e * q[partner(e)]`` (rotate-half: ``+q[e + R/2]`` for ``e < R/2``,
``-q[e - R/2]`` for ``R/2 <= e < R``; interleaved: ``+q[e + 1]`` for even ``e``, ``-q[e - 1]``
for odd ``e``; 0 past the rotary dims). ``qp`` is prepared once per query on the host, so a
score is two dots ``q @ (k * c).T + qp @ (k * s).T``.

Code layout read by the kernels, for keys and latent values alike (see :mod:`svdq.quant`):
group ``g`` of a sequence is row ``g`` of ``codes`` (``group_bytes`` bytes); kept channel
``j`` of width ``b_j`` starts at byte ``channel_offsets[j]`` and token ``i`` of the group sits
at bits ``[i * b_j, (i + 1) * b_j)`` LSB-first, so the kernel reads the byte ``i * b_j // 8``
and its successor (for codes that straddle) and shifts by ``i * b_j % 8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..derived import DERIVED
from ..quant import channel_offsets
from ..rope import inverse_frequencies

if TYPE_CHECKING:
    from ..attention import BodySelection
    from ..codec import CompressedKeys
    from ..values import CompressedValues

_TARGET_PROGRAMS = 528  # about 4 waves of programs on a 132-SM GPU
# Latent value channels one program of the latent sum handles (and the reduction per step).
_BLOCK_RV = 32
# Per-sequence scalars handed to the kernel as one int64 row each, in this order: codes start,
# group row bytes, kept channels, scales/mins start, basis start, body positions start,
# body tokens, first body token, full-precision rows start, full-precision tokens, values
# start (token row of 16-bit/per-token values; row of a latent's 16-bit rows), exact-token
# map start (-1: the sequence has no exact tokens), exact rows start.
META_FIELDS = tl.constexpr(13)
# Per-sequence scalars of SVDq latent values: codes start, group row bytes, kept channels,
# scales/mins start, basis start, first body token, body tokens.
VALUE_META_FIELDS = tl.constexpr(7)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _reduced_cos_sin(angle):
    # Cody-Waite reduction to [-pi, pi]: fast GPU sin/cos lose accuracy on the large
    # angles of long contexts; the split 2*pi keeps n * hi exact for n < 2**15.
    two_pi_hi: tl.constexpr = 6.28125
    two_pi_lo: tl.constexpr = 0.0019353071795864769
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    reduced = (angle - turns * two_pi_hi) - turns * two_pi_lo
    return tl.cos(reduced), tl.sin(reduced)


@triton.jit
def _tanh(x):
    # From exp of a non-positive argument: never overflows; absolute error ~1e-7 near 0.
    # (libdevice's tanh would do, but the interpreter the CPU tests run under lacks it.)
    decay = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - decay) / (1.0 + decay)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _dequantized_latent(codes_ptr, scales_ptr, mins_ptr, codes_start, row_bytes, meta_start, kept,
                        group, within, token_mask, offs_r, widths, offsets):
    """float32 [tokens, channels]: ``code * scale + min`` of the tokens at (``group``, index
    ``within`` it) for the kept channels ``offs_r`` (widths/offsets loaded by the caller, 0
    past ``kept``); 0 where masked."""
    channel_mask = offs_r < kept
    bit = within[:, None] * widths[None, :]
    byte = codes_start + group[:, None] * row_bytes + offsets[None, :] + bit // 8
    shift = bit % 8
    load_mask = token_mask[:, None] & channel_mask[None, :]
    low = tl.load(codes_ptr + byte, mask=load_mask, other=0).to(tl.int32)
    high = tl.load(codes_ptr + byte + 1, mask=load_mask & (shift + widths[None, :] > 8), other=0).to(tl.int32)
    codes = ((low | (high << 8)) >> shift) & ((1 << widths[None, :]) - 1)
    meta = meta_start + group[:, None] * kept + offs_r[None, :]
    scale = tl.load(scales_ptr + meta, mask=load_mask, other=0.0).to(tl.float32)
    minimum = tl.load(mins_ptr + meta, mask=load_mask, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * scale + minimum


@triton.jit
def _split_range(meta_ptr, b, split, tokens_per_split, selected_count, SPARSE: tl.constexpr):
    """Slots ``[begin, end)`` of a body split: body tokens (dense) or selected-list entries."""
    if SPARSE:
        count = selected_count
    else:
        count = tl.load(meta_ptr + b * META_FIELDS + 6).to(tl.int32)
    begin = split * tokens_per_split
    return begin, tl.minimum(begin + tokens_per_split, count)


@triton.jit
def _body_tile(selected_ptr, pid, selected_count, slots, end, SPARSE: tl.constexpr):
    """(body-relative tokens, mask) of a tile of slots; sparse lists pad with -1."""
    token_mask = slots < end
    if SPARSE:
        tokens = tl.load(selected_ptr + pid.to(tl.int64) * selected_count + slots, mask=token_mask, other=-1)
        token_mask = token_mask & (tokens >= 0)
        tokens = tl.maximum(tokens, 0)
    else:
        tokens = slots
    return tokens, token_mask


@triton.jit
def _accumulate(q, q_partner, inv_freq, keys, positions, seq_tokens, token_mask, slots, slot_mask, m_i, l_i, acc,
                values_ptr, value_scales_ptr, value_mins_ptr, value_base, value_first, value_count,
                scores_ptr, score_rows, head_mask, h, sm_scale, softcap,
                KV_HEADS: tl.constexpr, D: tl.constexpr, VALUE_BITS: tl.constexpr,
                VALUE_GROUP: tl.constexpr, VALUE_LATENT: tl.constexpr, SOFTCAP: tl.constexpr):
    offs_d = tl.arange(0, D)
    cos, sin = _reduced_cos_sin(positions[:, None] * inv_freq[None, :])
    scores = (tl.dot(q, tl.trans(keys * cos)) + tl.dot(q_partner, tl.trans(keys * sin))) * sm_scale
    if SOFTCAP:
        scores = softcap * _tanh(scores / softcap)
    scores = tl.where(token_mask[None, :], scores * LOG2E, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if VALUE_LATENT:
        # The latent-body tokens' weights are summed over their codes by _latent_values_kernel,
        # from these scores; here only the 16-bit sinks and tail of the values.
        tl.store(scores_ptr + score_rows[:, None] + slots[None, :], scores, mask=head_mask[:, None] & slot_mask[None, :])
        in_body = (seq_tokens >= value_first) & (seq_tokens < value_first + value_count)
        full_row = tl.where(seq_tokens < value_first, seq_tokens, seq_tokens - value_count)
        rows = (value_base + full_row.to(tl.int64)) * KV_HEADS + h
        vals = tl.load(values_ptr + rows[:, None] * D + offs_d[None, :], mask=(token_mask & ~in_body)[:, None],
                       other=0.0).to(tl.float32)
        p_values = tl.where(in_body[None, :], 0.0, p)
    elif VALUE_BITS == 0:
        rows = (value_base + seq_tokens.to(tl.int64)) * KV_HEADS + h
        vals = tl.load(values_ptr + rows[:, None] * D + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        vals = vals.to(tl.float32)
        p_values = p
    else:
        rows = (value_base + seq_tokens.to(tl.int64)) * KV_HEADS + h
        row_bytes: tl.constexpr = D * VALUE_BITS // 8
        groups: tl.constexpr = D // VALUE_GROUP
        bit = offs_d * VALUE_BITS
        packed = tl.load(values_ptr + rows[:, None] * row_bytes + (bit // 8)[None, :],
                         mask=token_mask[:, None], other=0).to(tl.int32)
        codes = (packed >> (bit % 8)[None, :]) & ((1 << VALUE_BITS) - 1)
        meta = rows[:, None] * groups + (offs_d // VALUE_GROUP)[None, :]
        v_scale = tl.load(value_scales_ptr + meta, mask=token_mask[:, None], other=0.0).to(tl.float32)
        v_min = tl.load(value_mins_ptr + meta, mask=token_mask[:, None], other=0.0).to(tl.float32)
        vals = codes.to(tl.float32) * v_scale + v_min
        p_values = p
    acc = acc * alpha[:, None] + tl.dot(p_values, vals)
    return m_new, l_i, acc


@triton.jit
def _program_rows(KV_HEADS: tl.constexpr, GQA: tl.constexpr, G_PAD: tl.constexpr):
    """The program's sequence ``b``, KV head ``h``, query-head mask [G_PAD] and query rows
    (int64 [G_PAD], row ``b * Hq + h * GQA + g``): grid axis 0 is ``batch * KV_HEADS``."""
    pid = tl.program_id(0)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    offs_g = tl.arange(0, G_PAD)
    return pid, b, h, offs_g < GQA, (b * KV_HEADS * GQA + h * GQA + offs_g).to(tl.int64)


@triton.jit
def _full_range(meta_ptr, b, n_splits, tokens_per_split):
    """Sequence ``b``'s full-precision tokens: first row in the packed tables, count, and the
    first score slot (after every body split's slots)."""
    full_start = tl.load(meta_ptr + b * META_FIELDS + 8)
    full_count = tl.load(meta_ptr + b * META_FIELDS + 9).to(tl.int32)
    return full_start, full_count, n_splits * tokens_per_split


@triton.jit
def _decode_attention_kernel(
    q_ptr, q_partner_ptr, inv_freq_ptr,
    meta_ptr, codes_ptr, channel_bits_ptr, channel_offsets_ptr, scales_ptr, mins_ptr, basis_ptr, mean_ptr,
    body_positions_ptr, selected_ptr, selected_count, full_rows_ptr, full_positions_ptr, full_tokens_ptr,
    exact_map_ptr, exact_rows_ptr, value_meta_ptr,
    values_ptr, value_scales_ptr, value_mins_ptr, scores_ptr, score_slots, out_partial_ptr, lse_partial_ptr,
    tokens_per_split, n_splits, sm_scale, softcap, channel_stride,
    KV_HEADS: tl.constexpr, GQA: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    SPARSE: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr, VALUE_LATENT: tl.constexpr,
    HAS_EXACT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid, b, h, head_mask, q_rows = _program_rows(KV_HEADS, GQA, G_PAD)
    split = tl.program_id(1)
    channels: tl.constexpr = KV_HEADS * D
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=head_mask[:, None], other=0.0)
    q_partner = tl.load(q_partner_ptr + q_rows[:, None] * D + offs_d[None, :], mask=head_mask[:, None], other=0.0)
    inv_freq = tl.load(inv_freq_ptr + offs_d)
    value_base = tl.load(meta_ptr + b * META_FIELDS + 10)
    value_first = 0
    value_count = 0
    if VALUE_LATENT:
        value_first = tl.load(value_meta_ptr + b * VALUE_META_FIELDS + 5)
        value_count = tl.load(value_meta_ptr + b * VALUE_META_FIELDS + 6)
    score_rows = q_rows * score_slots
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if split < n_splits:
        begin, end = _split_range(meta_ptr, b, split, tokens_per_split, selected_count, SPARSE)
        codes_start = tl.load(meta_ptr + b * META_FIELDS + 0)
        row_bytes = tl.load(meta_ptr + b * META_FIELDS + 1)
        kept = tl.load(meta_ptr + b * META_FIELDS + 2).to(tl.int32)
        meta_start = tl.load(meta_ptr + b * META_FIELDS + 3)
        basis_start = tl.load(meta_ptr + b * META_FIELDS + 4)
        positions_start = tl.load(meta_ptr + b * META_FIELDS + 5)
        first_token = tl.load(meta_ptr + b * META_FIELDS + 7).to(tl.int32)
        exact_start = tl.load(meta_ptr + b * META_FIELDS + 11)
        exact_rows_start = tl.load(meta_ptr + b * META_FIELDS + 12)
        mean = tl.load(mean_ptr + b * channels + h * D + offs_d)
        for tile in range(begin, end, BLOCK_T):
            slots = tile + offs_t
            tokens, token_mask = _body_tile(selected_ptr, pid, selected_count, slots, end, SPARSE)
            group = (tokens // GROUP_SIZE).to(tl.int64)
            within = tokens % GROUP_SIZE
            keys = tl.zeros([BLOCK_T, D], tl.float32)
            for r0 in range(0, kept, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                channel_mask = offs_r < kept
                widths = tl.load(channel_bits_ptr + b * channel_stride + offs_r, mask=channel_mask, other=0)
                offsets = tl.load(channel_offsets_ptr + b * channel_stride + offs_r, mask=channel_mask, other=0)
                latent = _dequantized_latent(codes_ptr, scales_ptr, mins_ptr, codes_start, row_bytes, meta_start,
                                             kept, group, within, token_mask, offs_r, widths, offsets)
                basis = tl.load(basis_ptr + basis_start + (h * D + offs_d)[None, :] * kept + offs_r[:, None],
                                mask=channel_mask[:, None], other=0.0)
                keys += tl.dot(latent.to(tl.float16), basis.to(tl.float16))
            keys = keys + mean[None, :]
            if HAS_EXACT:
                if exact_start >= 0:
                    # Exact tokens score with their own 16-bit keys, not the reconstruction.
                    exact_row = tl.load(exact_map_ptr + exact_start + tokens, mask=token_mask, other=-1)
                    is_exact = exact_row >= 0
                    exact_keys = tl.load(exact_rows_ptr + (exact_rows_start + exact_row.to(tl.int64))[:, None] * channels
                                         + h * D + offs_d[None, :], mask=is_exact[:, None], other=0.0)
                    keys = tl.where(is_exact[:, None], exact_keys.to(tl.float32), keys)
            positions = tl.load(body_positions_ptr + positions_start + tokens, mask=token_mask, other=0)
            m_i, l_i, acc = _accumulate(
                q, q_partner, inv_freq, keys, positions.to(tl.float32), first_token + tokens, token_mask,
                slots, slots < end, m_i, l_i, acc, values_ptr, value_scales_ptr, value_mins_ptr, value_base,
                value_first, value_count, scores_ptr, score_rows, head_mask, h, sm_scale, softcap,
                KV_HEADS, D, VALUE_BITS, VALUE_GROUP, VALUE_LATENT, SOFTCAP)
    else:
        full_start, full_count, first_slot = _full_range(meta_ptr, b, n_splits, tokens_per_split)
        for tile in range(0, full_count, BLOCK_T):
            rows = tile + offs_t
            token_mask = rows < full_count
            index = full_start + rows
            keys = tl.load(full_rows_ptr + index[:, None] * channels + h * D + offs_d[None, :],
                           mask=token_mask[:, None], other=0.0).to(tl.float32)
            positions = tl.load(full_positions_ptr + index, mask=token_mask, other=0)
            tokens = tl.load(full_tokens_ptr + index, mask=token_mask, other=0)
            m_i, l_i, acc = _accumulate(
                q, q_partner, inv_freq, keys, positions.to(tl.float32), tokens, token_mask,
                first_slot + rows, token_mask, m_i, l_i, acc, values_ptr, value_scales_ptr, value_mins_ptr,
                value_base, value_first, value_count, scores_ptr, score_rows, head_mask, h, sm_scale, softcap,
                KV_HEADS, D, VALUE_BITS, VALUE_GROUP, VALUE_LATENT, SOFTCAP)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    partial_rows = q_rows * (n_splits + 1) + split
    tl.store(out_partial_ptr + partial_rows[:, None] * D + offs_d[None, :], out, mask=head_mask[:, None])
    tl.store(lse_partial_ptr + partial_rows, lse, mask=head_mask)


@triton.jit
def _sum_latent(acc, weight, seq_tokens, token_mask, slots, slot_mask, scores_ptr, score_rows, head_mask, lse2,
                empty, codes_ptr, scales_ptr, mins_ptr, codes_start, row_bytes, meta_start, kept, first, count,
                offs_r, widths, offsets, VALUE_GROUP: tl.constexpr):
    """Add a tile's normalised weights times latent codes ([G_PAD, BLOCK_RV]) and weights ([G_PAD])."""
    scores = tl.load(scores_ptr + score_rows[:, None] + slots[None, :], mask=head_mask[:, None] & slot_mask[None, :],
                     other=float("-inf"))
    body = seq_tokens - first
    in_body = token_mask & (body >= 0) & (body < count)
    weights = tl.where(in_body[None, :] & ~empty[:, None], tl.exp2(scores - lse2[:, None]), 0.0)
    body = tl.where(in_body, body, 0)
    latent = _dequantized_latent(codes_ptr, scales_ptr, mins_ptr, codes_start, row_bytes, meta_start, kept,
                                 (body // VALUE_GROUP).to(tl.int64), body % VALUE_GROUP, in_body, offs_r, widths,
                                 offsets)
    return acc + tl.dot(weights, latent), weight + tl.sum(weights, 1)


@triton.jit
def _latent_values_kernel(
    meta_ptr, value_meta_ptr, selected_ptr, selected_count, full_tokens_ptr,
    codes_ptr, channel_bits_ptr, channel_offsets_ptr, scales_ptr, mins_ptr,
    scores_ptr, score_slots, lse_partial_ptr, latent_partial_ptr, weight_partial_ptr,
    tokens_per_split, n_splits, channel_stride,
    KV_HEADS: tl.constexpr, GQA: tl.constexpr, G_PAD: tl.constexpr, VALUE_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_RV: tl.constexpr, SPARSE: tl.constexpr,
):
    pid, b, h, head_mask, q_rows = _program_rows(KV_HEADS, GQA, G_PAD)
    split = tl.program_id(1)
    channel_block = tl.program_id(2)
    parts = n_splits + 1
    offs_t = tl.arange(0, BLOCK_T)
    score_rows = q_rows * score_slots
    lse = tl.load(lse_partial_ptr + q_rows * parts + split, mask=head_mask, other=float("-inf"))
    empty = lse == float("-inf")
    lse2 = tl.where(empty, 0.0, lse * LOG2E)
    value_meta = value_meta_ptr + b * VALUE_META_FIELDS
    codes_start = tl.load(value_meta + 0)
    row_bytes = tl.load(value_meta + 1)
    kept = tl.load(value_meta + 2).to(tl.int32)
    meta_start = tl.load(value_meta + 3)
    first = tl.load(value_meta + 5).to(tl.int32)
    count = tl.load(value_meta + 6).to(tl.int32)
    offs_r = channel_block * BLOCK_RV + tl.arange(0, BLOCK_RV)
    channel_mask = offs_r < kept
    widths = tl.load(channel_bits_ptr + b * channel_stride + offs_r, mask=channel_mask, other=0)
    offsets = tl.load(channel_offsets_ptr + b * channel_stride + offs_r, mask=channel_mask, other=0)
    acc = tl.zeros([G_PAD, BLOCK_RV], tl.float32)
    weight = tl.zeros([G_PAD], tl.float32)
    if split < n_splits:
        begin, end = _split_range(meta_ptr, b, split, tokens_per_split, selected_count, SPARSE)
        first_token = tl.load(meta_ptr + b * META_FIELDS + 7).to(tl.int32)
        for tile in range(begin, end, BLOCK_T):
            slots = tile + offs_t
            tokens, token_mask = _body_tile(selected_ptr, pid, selected_count, slots, end, SPARSE)
            acc, weight = _sum_latent(acc, weight, first_token + tokens, token_mask, slots, slots < end, scores_ptr,
                                      score_rows, head_mask, lse2, empty, codes_ptr, scales_ptr, mins_ptr,
                                      codes_start, row_bytes, meta_start, kept, first, count, offs_r, widths,
                                      offsets, VALUE_GROUP)
    else:
        full_start, full_count, first_slot = _full_range(meta_ptr, b, n_splits, tokens_per_split)
        for tile in range(0, full_count, BLOCK_T):
            rows = tile + offs_t
            token_mask = rows < full_count
            tokens = tl.load(full_tokens_ptr + full_start + rows, mask=token_mask, other=0)
            acc, weight = _sum_latent(acc, weight, tokens, token_mask, first_slot + rows, token_mask, scores_ptr,
                                      score_rows, head_mask, lse2, empty, codes_ptr, scales_ptr, mins_ptr,
                                      codes_start, row_bytes, meta_start, kept, first, count, offs_r, widths,
                                      offsets, VALUE_GROUP)
    partial_rows = q_rows * parts + split
    tl.store(latent_partial_ptr + partial_rows[:, None] * channel_stride + offs_r[None, :], acc,
             mask=head_mask[:, None] & channel_mask[None, :])
    if channel_block == 0:
        tl.store(weight_partial_ptr + partial_rows, weight, mask=head_mask)


@triton.jit
def _reduce_splits_kernel(out_partial_ptr, lse_partial_ptr, out_ptr, lse_ptr, parts,
                          latent_partial_ptr, weight_partial_ptr, value_meta_ptr, value_basis_ptr, value_mean_ptr,
                          channel_stride, D: tl.constexpr, PARTS_PAD: tl.constexpr, VALUE_LATENT: tl.constexpr,
                          KV_HEADS: tl.constexpr, GQA: tl.constexpr, BLOCK_RV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, PARTS_PAD)
    offs_d = tl.arange(0, D)
    part_mask = offs_s < parts
    lse = tl.load(lse_partial_ptr + row * parts + offs_s, mask=part_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp(lse - top_safe)
    total = tl.sum(weights, 0)
    norm = tl.where(total > 0, total, 1.0)
    outs = tl.load(out_partial_ptr + (row * parts + offs_s)[:, None] * D + offs_d[None, :],
                   mask=part_mask[:, None], other=0.0)
    merged = tl.sum(outs * weights[:, None], 0) / norm
    if VALUE_LATENT:
        # Merge the splits' latent sums with the same weights, then project once:
        # (sum_t w_t l_t) B_h^T + mean_h * sum_t w_t.
        b = row // (KV_HEADS * GQA)
        h = (row % (KV_HEADS * GQA)) // GQA
        kept = tl.load(value_meta_ptr + b * VALUE_META_FIELDS + 2).to(tl.int32)
        basis_start = tl.load(value_meta_ptr + b * VALUE_META_FIELDS + 4)
        body_weight = tl.load(weight_partial_ptr + row * parts + offs_s, mask=part_mask, other=0.0)
        body_weight = tl.sum(body_weight * weights, 0) / norm
        projected = tl.zeros([D], tl.float32)
        for r0 in range(0, kept, BLOCK_RV):
            offs_r = r0 + tl.arange(0, BLOCK_RV)
            channel_mask = offs_r < kept
            latent = tl.load(latent_partial_ptr + (row * parts + offs_s)[:, None] * channel_stride + offs_r[None, :],
                             mask=part_mask[:, None] & channel_mask[None, :], other=0.0)
            latent = tl.sum(latent * weights[:, None], 0) / norm
            basis = tl.load(value_basis_ptr + basis_start + (h * D + offs_d)[:, None] * kept + offs_r[None, :],
                            mask=channel_mask[None, :], other=0.0).to(tl.float32)
            projected += tl.sum(basis * latent[None, :], 1)
        mean = tl.load(value_mean_ptr + b * KV_HEADS * D + h * D + offs_d)
        merged += projected + mean * body_weight
    tl.store(out_ptr + row * D + offs_d, merged)
    tl.store(lse_ptr + row, tl.where(total > 0, top_safe + tl.log(total), float("-inf")))


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def rope_query_tables(keys: CompressedKeys, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel RoPE description for the kernel.

    Returns ``inv_freq`` float32 [D] (the channel's pair frequency, 0 where nothing rotates),
    ``partner`` int64 [D] and ``sign`` float32 [D] (``qp = sign * q[..., partner]``).
    """
    from ..attention import rotates

    partner = torch.arange(head_dim, device=device)
    sign = torch.zeros(head_dim, device=device)
    inv_freq = torch.zeros(head_dim, device=device)
    if not rotates(keys):
        return inv_freq, partner, sign
    rope = keys.rope
    rotary = rope.dims(head_dim)
    pair_freq = inverse_frequencies(rope, head_dim, device)
    half = rotary // 2
    if rope.style == "half":
        inv_freq[:rotary] = torch.cat([pair_freq, pair_freq])
        partner[:half] = torch.arange(half, rotary, device=device)
        partner[half:rotary] = torch.arange(0, half, device=device)
        sign[:half], sign[half:rotary] = 1.0, -1.0
    else:
        inv_freq[:rotary] = pair_freq.repeat_interleave(2)
        even = torch.arange(0, rotary, 2, device=device)
        partner[even], partner[even + 1] = even + 1, even
        sign[even], sign[even + 1] = 1.0, -1.0
    return inv_freq, partner, sign


def _layout_signature(keys: CompressedKeys, values: CompressedValues) -> tuple:
    """Sequences with equal signatures share one launch."""
    return (keys.kv_heads, keys.group_size, keys.sinks.dtype, keys.stored_space, keys.rope,
            keys.rope is not None and keys.stored_space == "pre_rope",
            values.method, values.bits, values.group_size, values.storage_dtype)


def _sequence_layout(keys: CompressedKeys) -> dict:
    """Launch-ready per-sequence tensors and sizes, kept in ``DERIVED`` (a few bytes per token:
    int32 body positions, plus a copy of the full-precision sinks and tail).

    ``widths``/``offsets`` int32 [r] kept channel widths and byte offsets in a group row;
    ``body_positions`` int32 [n_body]; ``full_rows`` [F, C] storage dtype (sinks then tail),
    ``full_positions`` and ``full_tokens`` int32 [F] (position and sequence index);
    ``exact_map`` int32 [n_body], the row of ``exact_rows`` holding a body token's exact key
    or -1 (None without exact tokens). Also used for the latent of SVDq values (a
    :class:`CompressedKeys` without RoPE).
    """
    cached = DERIVED.get(keys, "kernel_layout")
    if cached is None:
        device = keys.codes.device
        start, n_body = keys.sinks.shape[0], keys.num_groups * keys.group_size
        widths = keys.kept_bits.to(device)
        positions = keys.token_positions()
        full_index = torch.cat([torch.arange(start, device=device), torch.arange(start + n_body, keys.num_tokens, device=device)])
        exact_map = None
        if keys.num_exact:
            exact_map = torch.full((n_body,), -1, dtype=torch.int32, device=device)
            exact_map[keys.exact_index - start] = torch.arange(keys.num_exact, dtype=torch.int32, device=device)
        cached = {
            "kept": widths.numel(),
            "widths": widths.to(torch.int32).contiguous(),
            "offsets": channel_offsets(widths, keys.group_size).to(torch.int32).contiguous(),
            "group_bytes": keys.codes.shape[1],
            "body_count": n_body,
            "body_first": start,
            "body_positions": positions[start:start + n_body].to(torch.int32).contiguous(),
            "full_rows": torch.cat([keys.sinks, keys.tail]).contiguous(),
            "full_positions": positions[full_index].to(torch.int32).contiguous(),
            "full_tokens": full_index.to(torch.int32).contiguous(),
            "full_count": full_index.numel(),
            "exact_map": exact_map,
            "rope_tables": rope_query_tables(keys, keys.head_dim, device),
        }
        DERIVED.put(keys, "kernel_layout", cached)
    return cached


def _concat(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Flatten and concatenate; returns (flat, element start of each). One tensor: no copy.

    An empty result gets one padding element so that the kernel always has a valid pointer.
    """
    flats = [t.reshape(-1) for t in tensors]
    starts, total = [], 0
    for flat in flats:
        starts.append(total)
        total += flat.numel()
    merged = flats[0] if len(flats) == 1 else torch.cat(flats)
    if merged.numel() == 0:
        merged = torch.zeros(1, dtype=merged.dtype, device=merged.device)
    return merged.contiguous(), starts


def _channel_tables(layouts: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(widths int32 [B, pad], byte offsets int32 [B, pad], pad) of every sequence's kept channels.

    ``pad`` goes to the kernels as a runtime stride: the kept count differs between layers
    and sequences, and as a constexpr it would compile a kernel for every count seen.
    """
    if len(layouts) == 1:
        return layouts[0]["widths"], layouts[0]["offsets"], max(1, layouts[0]["kept"])
    pad = max(1, max(layout["kept"] for layout in layouts))
    widths = torch.zeros(len(layouts), pad, dtype=torch.int32, device=device)
    offsets = torch.zeros(len(layouts), pad, dtype=torch.int32, device=device)
    for b, layout in enumerate(layouts):
        widths[b, : layout["kept"]] = layout["widths"]
        offsets[b, : layout["kept"]] = layout["offsets"]
    return widths, offsets, pad


def decode_attention(
    queries: torch.Tensor,
    keys: Sequence[CompressedKeys],
    values: Sequence[CompressedValues],
    scale: float,
    selections: Sequence[BodySelection],
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one launch group (same layout signature) over compressed keys.

    Args:
        queries: [B, Hq, D] post-RoPE queries (any float dtype; used as float32).
        keys, values: B compressed caches with one layout signature (kv_heads, group_size,
            RoPE, value format); D a power of two in 16..256. Keys of any method, with or
            without exact tokens; values 16-bit, per-token 2/4-bit or SVDq latent.
        scale: softmax scale.
        selections: per sequence the body tokens to attend (``token_index`` None = all).
        softcap: scores become ``softcap * tanh(score / softcap)`` before the softmax; None: none.

    Returns:
        ``(output float32 [B, Hq, D], lse float32 [B, Hq])``, natural-log lse.
    """
    batch, q_heads, head_dim = queries.shape
    device = queries.device
    first = keys[0]
    kv_heads = first.kv_heads
    gqa = q_heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(gqa))
    inv_freq, partner, sign = _sequence_layout(first)["rope_tables"]
    q = queries.float().contiguous()
    q_partner = (q[..., partner] * sign).contiguous()

    layouts = [_sequence_layout(k) for k in keys]
    channel_bits, channel_offs, r_pad = _channel_tables(layouts, device)
    codes, codes_start = _concat([k.codes for k in keys])
    scales, meta_start = _concat([k.scales for k in keys])
    mins, _ = _concat([k.mins for k in keys])
    basis, basis_start = _concat([k.basis for k in keys])
    mean = keys[0].mean.float().contiguous() if batch == 1 else torch.stack([k.mean.float() for k in keys])
    body_positions, body_start = _concat([layout["body_positions"] for layout in layouts])
    full_rows, full_start = _concat([layout["full_rows"] for layout in layouts])
    full_pos, _ = _concat([layout["full_positions"] for layout in layouts])
    full_tok, _ = _concat([layout["full_tokens"] for layout in layouts])
    with_exact = [b for b in range(batch) if layouts[b]["exact_map"] is not None]
    exact_start, exact_rows_start = [-1] * batch, [0] * batch
    if with_exact:
        exact_map, map_starts = _concat([layouts[b]["exact_map"] for b in with_exact])
        exact_rows, row_starts = _concat([keys[b].exact_rows for b in with_exact])
        for b, map_at, row_at in zip(with_exact, map_starts, row_starts, strict=True):
            exact_start[b], exact_rows_start[b] = map_at, row_at // first.channels
    else:
        exact_map = exact_rows = full_tok  # never read: HAS_EXACT is off
    value_latent = values[0].latent is not None
    value_bits = values[0].bits or 0
    value_layouts = [_sequence_layout(v.latent) for v in values] if value_latent else []
    if value_latent:
        value_data, value_start = _concat([layout["full_rows"] for layout in value_layouts])
        value_start = [start // first.channels for start in value_start]
        value_codes, value_codes_start = _concat([v.latent.codes for v in values])
        value_scales, value_meta_start = _concat([v.latent.scales for v in values])
        value_mins, _ = _concat([v.latent.mins for v in values])
        value_basis, value_basis_start = _concat([v.latent.basis for v in values])
        value_mean = torch.stack([v.latent.mean.float() for v in values]).contiguous()
        value_channel_bits, value_channel_offs, rv_pad = _channel_tables(value_layouts, device)
        value_meta = torch.tensor([
            [value_codes_start[b], layout["group_bytes"], layout["kept"], value_meta_start[b], value_basis_start[b],
             layout["body_first"], layout["body_count"]]
            for b, layout in enumerate(value_layouts)
        ], dtype=torch.int64).to(device, non_blocking=True)
    else:
        if value_bits:
            value_data, _ = _concat([v.codes for v in values])
            value_scales, _ = _concat([v.scales for v in values])
            value_mins, _ = _concat([v.mins for v in values])
        else:
            value_data, _ = _concat([v.data for v in values])
            value_scales = value_mins = value_data
        value_start = [0]
        for value in values[:-1]:
            value_start.append(value_start[-1] + value.num_tokens)
        value_meta = value_mean = value_basis = value_data  # never read: VALUE_LATENT is off
        rv_pad = 1
    # Every per-sequence scalar in one host tensor: one copy to the device per launch.
    sequence_meta = torch.tensor([
        [codes_start[b], layouts[b]["group_bytes"], layouts[b]["kept"], meta_start[b], basis_start[b],
         body_start[b], layouts[b]["body_count"], layouts[b]["body_first"], full_start[b] // first.channels,
         layouts[b]["full_count"], value_start[b], exact_start[b], exact_rows_start[b]]
        for b in range(batch)
    ], dtype=torch.int64).to(device, non_blocking=True)

    sparse = any(s.token_index is not None for s in selections)
    if sparse:
        lists = []
        for key, selection in zip(keys, selections, strict=True):
            n_body = key.num_groups * key.group_size
            if selection.token_index is None:
                lists.append(torch.arange(n_body, device=device, dtype=torch.int32).expand(kv_heads, -1))
            else:
                lists.append(torch.where(selection.valid, selection.token_index, -1).to(torch.int32))
        selected_count = max(1, max(item.shape[1] for item in lists))
        selected = torch.full((batch, kv_heads, selected_count), -1, dtype=torch.int32, device=device)
        for b, item in enumerate(lists):
            selected[b, :, : item.shape[1]] = item
        work = selected_count
    else:
        selected = torch.full((1,), -1, dtype=torch.int32, device=device)
        selected_count = 0
        work = max(1, max(layout["body_count"] for layout in layouts))

    interpreted = _interpreted()
    block_t = 32 if interpreted or head_dim >= 256 else 64
    block_r = 32
    want_splits = max(1, _TARGET_PROGRAMS // max(1, batch * kv_heads))
    tokens_per_split = max(block_t, -(-work // want_splits))
    tokens_per_split = -(-tokens_per_split // block_t) * block_t
    n_splits = -(-work // tokens_per_split)
    parts = n_splits + 1
    if value_latent:
        # Scaled base-2 scores of every attended token, [B * Hq, slots]: the body splits' slots,
        # then the full-precision tokens'. 4 bytes per query head and token (the fp16 keys and
        # values of the same tokens take 4 * Hkv * D).
        score_slots = n_splits * tokens_per_split + max(layout["full_count"] for layout in layouts)
        scores = torch.full((batch * q_heads, score_slots), float("nan"), device=device)
    else:
        score_slots, scores = 0, q
    out_partial = torch.full((batch, q_heads, parts, head_dim), float("nan"), device=device)
    lse_partial = torch.full((batch, q_heads, parts), float("nan"), device=device)
    # [BLOCK_T, D] float32 keys and their cos/sin products live in registers: for sm_90 at
    # head_dim 128, ptxas gives 4 warps ~1.8 KB of spill stack per thread, 8 warps ~0.3 KB
    # (bench/aot_compile.py).
    num_warps = 4 if head_dim <= 64 else 8
    _decode_attention_kernel[(batch * kv_heads, parts)](
        q, q_partner, inv_freq,
        sequence_meta, codes, channel_bits, channel_offs, scales, mins, basis, mean,
        body_positions, selected, selected_count, full_rows, full_pos, full_tok,
        exact_map, exact_rows, value_meta,
        value_data, value_scales, value_mins, scores, score_slots, out_partial, lse_partial,
        tokens_per_split, n_splits, scale, 1.0 if softcap is None else float(softcap), r_pad,
        KV_HEADS=kv_heads, GQA=gqa, G_PAD=g_pad, D=head_dim,
        GROUP_SIZE=first.group_size, BLOCK_T=block_t, BLOCK_R=block_r,
        SPARSE=sparse, VALUE_BITS=value_bits, VALUE_GROUP=values[0].group_size, VALUE_LATENT=value_latent,
        HAS_EXACT=bool(with_exact), SOFTCAP=softcap is not None,
        num_warps=num_warps,
    )
    if value_latent:
        latent_partial = torch.full((batch * q_heads, parts, rv_pad), float("nan"), device=device)
        weight_partial = torch.full((batch * q_heads, parts), float("nan"), device=device)
        _latent_values_kernel[(batch * kv_heads, parts, triton.cdiv(rv_pad, _BLOCK_RV))](
            sequence_meta, value_meta, selected, selected_count, full_tok,
            value_codes, value_channel_bits, value_channel_offs, value_scales, value_mins,
            scores, score_slots, lse_partial, latent_partial, weight_partial,
            tokens_per_split, n_splits, rv_pad,
            KV_HEADS=kv_heads, GQA=gqa, G_PAD=g_pad, VALUE_GROUP=values[0].group_size,
            BLOCK_T=block_t, BLOCK_RV=_BLOCK_RV, SPARSE=sparse, num_warps=4,
        )
    else:
        latent_partial = weight_partial = lse_partial  # never read: VALUE_LATENT is off
    output = torch.full((batch, q_heads, head_dim), float("nan"), device=device)
    lse = torch.full((batch, q_heads), float("nan"), device=device)
    _reduce_splits_kernel[(batch * q_heads,)](
        out_partial, lse_partial, output, lse, parts,
        latent_partial, weight_partial, value_meta, value_basis, value_mean, rv_pad,
        D=head_dim, PARTS_PAD=triton.next_power_of_2(parts), VALUE_LATENT=value_latent,
        KV_HEADS=kv_heads, GQA=gqa, BLOCK_RV=_BLOCK_RV,
    )
    return output, lse


def attend_triton(
    queries: torch.Tensor,
    keys: Sequence[CompressedKeys],
    values: Sequence[CompressedValues],
    scale: float,
    selections: Sequence[BodySelection],
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch entry point: one :func:`decode_attention` launch per layout group.

    Same arguments and results as :func:`decode_attention`, for any mix of layouts.
    """
    from ..errors import InvalidInputError

    head_dim = queries.shape[-1]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise InvalidInputError(f"the triton backend needs head_dim a power of two in 16..256, got {head_dim}")
    groups: dict[tuple, list[int]] = {}
    for b, (key, value) in enumerate(zip(keys, values, strict=True)):
        groups.setdefault(_layout_signature(key, value), []).append(b)
    if len(groups) == 1:
        return decode_attention(queries, keys, values, scale, selections, softcap)
    output = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    lse = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for members in groups.values():
        index = torch.tensor(members, device=queries.device)
        out_g, lse_g = decode_attention(queries[index], [keys[b] for b in members], [values[b] for b in members],
                                        scale, [selections[b] for b in members], softcap)
        output[index], lse[index] = out_g, lse_g
    return output, lse


__all__ = ["attend_triton", "decode_attention", "rope_query_tables"]
