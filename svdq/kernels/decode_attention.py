"""Triton decode attention over SVDq-compressed keys (flash-decoding split + reduction).

One launch serves a whole batch of sequences (grouped by layout, see :func:`attend_triton`).
Program ``(b * Hkv + h, split)`` handles KV head ``h`` of sequence ``b`` for every query head
of its GQA group at once:

* ``split < n_splits``: a slice of the quantized body tokens, either a contiguous range
  (dense) or a slice of the per-head selected token list (sparse). Per tile of BLOCK_T
  tokens and BLOCK_R latent channels it unpacks the mixed-width codes, dequantizes with the
  group's float16 scale/min, and accumulates ``latent @ basis_h.T`` (float16 operands,
  float32 accumulation), then adds the mean.
* ``split == n_splits``: the full-precision sinks and tail of the sequence.

Both kinds then share one path: RoPE is applied on the query side (see below), scores go
through an online softmax in base 2 and the tile's values (16-bit, or 2/4-bit per-token
codes) are accumulated. Each program writes a partial output and log-sum-exp; a second
kernel reduces the splits of every query head.

RoPE without shuffling key channels: with ``c[t, e] = cos(pos_t * f_e)`` and
``s[t, e] = sin(pos_t * f_e)`` (``f_e`` the inverse frequency of channel ``e``'s pair, 0 for
channels that do not rotate), ``q . RoPE_t(k) = sum_e k[t, e] * (q[e] * c[t, e] + qp[e] * s[t, e])``
where ``qp[e] = sign_e * q[partner(e)]`` (rotate-half: ``+q[e + R/2]`` for ``e < R/2``,
``-q[e - R/2]`` for ``R/2 <= e < R``; interleaved: ``+q[e + 1]`` for even ``e``, ``-q[e - 1]``
for odd ``e``; 0 past the rotary dims). ``qp`` is prepared once per query on the host, so a
score is two dots ``q @ (k * c).T + qp @ (k * s).T``.

Code layout read by the kernel (see :mod:`svdq.quant`): group ``g`` of a sequence is row
``g`` of ``codes`` (``group_bytes`` bytes); kept channel ``j`` of width ``b_j`` starts at
byte ``channel_offsets[j]`` and token ``i`` of the group sits at bits
``[i * b_j, (i + 1) * b_j)`` LSB-first, so the kernel reads the byte ``i * b_j // 8`` and its
successor (for codes that straddle) and shifts by ``i * b_j % 8``.
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

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 528  # about 4 waves of programs on a 132-SM GPU
# Per-sequence scalars handed to the kernel as one int64 row each, in this order: codes start,
# group row bytes, kept channels, scales/mins start, basis start, body positions start,
# body tokens, first body token, full-precision rows start, full-precision tokens, values start.
META_FIELDS = tl.constexpr(11)
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
def _accumulate(q, q_partner, inv_freq, keys, positions, seq_tokens, token_mask, m_i, l_i, acc,
                values_ptr, value_scales_ptr, value_mins_ptr, value_base, h, qk_scale_log2,
                KV_HEADS: tl.constexpr, D: tl.constexpr, VALUE_BITS: tl.constexpr,
                VALUE_GROUP: tl.constexpr):
    offs_d = tl.arange(0, D)
    cos, sin = _reduced_cos_sin(positions[:, None] * inv_freq[None, :])
    scores = tl.dot(q, tl.trans(keys * cos)) + tl.dot(q_partner, tl.trans(keys * sin))
    scores = tl.where(token_mask[None, :], scores * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    rows = (value_base + seq_tokens.to(tl.int64)) * KV_HEADS + h
    if VALUE_BITS == 0:
        vals = tl.load(values_ptr + rows[:, None] * D + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        vals = vals.to(tl.float32)
    else:
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
    acc = acc * alpha[:, None] + tl.dot(p, vals)
    return m_new, l_i, acc

@triton.jit
def _decode_attention_kernel(
    q_ptr, q_partner_ptr, inv_freq_ptr,
    meta_ptr, codes_ptr, channel_bits_ptr, channel_offsets_ptr, scales_ptr, mins_ptr, basis_ptr, mean_ptr,
    body_positions_ptr, selected_ptr, selected_count, full_rows_ptr, full_positions_ptr, full_tokens_ptr,
    values_ptr, value_scales_ptr, value_mins_ptr, out_partial_ptr, lse_partial_ptr,
    tokens_per_split, n_splits, qk_scale_log2,
    KV_HEADS: tl.constexpr, GQA: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    SPARSE: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    channels: tl.constexpr = KV_HEADS * D
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    head_mask = offs_g < GQA
    q_rows = (b * KV_HEADS * GQA + h * GQA + offs_g).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=head_mask[:, None], other=0.0)
    q_partner = tl.load(q_partner_ptr + q_rows[:, None] * D + offs_d[None, :], mask=head_mask[:, None], other=0.0)
    inv_freq = tl.load(inv_freq_ptr + offs_d)
    value_base = tl.load(meta_ptr + b * META_FIELDS + 10)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if split < n_splits:
        body_count = tl.load(meta_ptr + b * META_FIELDS + 6).to(tl.int32)
        if SPARSE:
            count = selected_count
        else:
            count = body_count
        begin = split * tokens_per_split
        end = tl.minimum(begin + tokens_per_split, count)
        codes_start = tl.load(meta_ptr + b * META_FIELDS + 0)
        row_bytes = tl.load(meta_ptr + b * META_FIELDS + 1)
        kept = tl.load(meta_ptr + b * META_FIELDS + 2).to(tl.int32)
        meta_start = tl.load(meta_ptr + b * META_FIELDS + 3)
        basis_start = tl.load(meta_ptr + b * META_FIELDS + 4)
        positions_start = tl.load(meta_ptr + b * META_FIELDS + 5)
        first_token = tl.load(meta_ptr + b * META_FIELDS + 7).to(tl.int32)
        mean = tl.load(mean_ptr + b * channels + h * D + offs_d)
        for tile in range(begin, end, BLOCK_T):
            slots = tile + offs_t
            token_mask = slots < end
            if SPARSE:
                tokens = tl.load(selected_ptr + pid.to(tl.int64) * selected_count + slots, mask=token_mask, other=-1)
                token_mask = token_mask & (tokens >= 0)
                tokens = tl.maximum(tokens, 0)
            else:
                tokens = slots
            group = (tokens // GROUP_SIZE).to(tl.int64)
            within = tokens % GROUP_SIZE
            keys = tl.zeros([BLOCK_T, D], tl.float32)
            for r0 in range(0, kept, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                channel_mask = offs_r < kept
                widths = tl.load(channel_bits_ptr + b * R_PAD + offs_r, mask=channel_mask, other=0)
                offsets = tl.load(channel_offsets_ptr + b * R_PAD + offs_r, mask=channel_mask, other=0)
                bit = within[:, None] * widths[None, :]
                byte = codes_start + group[:, None] * row_bytes + offsets[None, :] + bit // 8
                shift = bit % 8
                load_mask = token_mask[:, None] & channel_mask[None, :]
                low = tl.load(codes_ptr + byte, mask=load_mask, other=0).to(tl.int32)
                high = tl.load(codes_ptr + byte + 1, mask=load_mask & (shift + widths[None, :] > 8),
                               other=0).to(tl.int32)
                codes = ((low | (high << 8)) >> shift) & ((1 << widths[None, :]) - 1)
                meta = meta_start + group[:, None] * kept + offs_r[None, :]
                scale = tl.load(scales_ptr + meta, mask=load_mask, other=0.0).to(tl.float32)
                minimum = tl.load(mins_ptr + meta, mask=load_mask, other=0.0).to(tl.float32)
                latent = codes.to(tl.float32) * scale + minimum
                basis = tl.load(basis_ptr + basis_start + (h * D + offs_d)[None, :] * kept + offs_r[:, None],
                                mask=channel_mask[:, None], other=0.0)
                keys += tl.dot(latent.to(tl.float16), basis.to(tl.float16))
            keys = keys + mean[None, :]
            positions = tl.load(body_positions_ptr + positions_start + tokens, mask=token_mask, other=0)
            m_i, l_i, acc = _accumulate(
                q, q_partner, inv_freq, keys, positions.to(tl.float32), first_token + tokens, token_mask,
                m_i, l_i, acc, values_ptr, value_scales_ptr, value_mins_ptr, value_base, h, qk_scale_log2,
                KV_HEADS, D, VALUE_BITS, VALUE_GROUP)
    else:
        full_start = tl.load(meta_ptr + b * META_FIELDS + 8)
        full_count = tl.load(meta_ptr + b * META_FIELDS + 9).to(tl.int32)
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
                m_i, l_i, acc, values_ptr, value_scales_ptr, value_mins_ptr, value_base, h, qk_scale_log2,
                KV_HEADS, D, VALUE_BITS, VALUE_GROUP)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    partial_rows = q_rows * (n_splits + 1) + split
    tl.store(out_partial_ptr + partial_rows[:, None] * D + offs_d[None, :], out, mask=head_mask[:, None])
    tl.store(lse_partial_ptr + partial_rows, lse, mask=head_mask)

@triton.jit
def _reduce_splits_kernel(out_partial_ptr, lse_partial_ptr, out_ptr, lse_ptr, parts,
                          D: tl.constexpr, PARTS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, PARTS_PAD)
    offs_d = tl.arange(0, D)
    part_mask = offs_s < parts
    lse = tl.load(lse_partial_ptr + row * parts + offs_s, mask=part_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp(lse - top_safe)
    total = tl.sum(weights, 0)
    outs = tl.load(out_partial_ptr + (row * parts + offs_s)[:, None] * D + offs_d[None, :],
                   mask=part_mask[:, None], other=0.0)
    merged = tl.sum(outs * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
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
            values.bits, values.group_size, values.storage_dtype)


def _sequence_layout(keys: CompressedKeys) -> dict:
    """Launch-ready per-sequence tensors and sizes, kept in ``DERIVED`` (a few bytes per token:
    int32 body positions, plus a copy of the full-precision sinks and tail).

    ``widths``/``offsets`` int32 [r] kept channel widths and byte offsets in a group row;
    ``body_positions`` int32 [n_body]; ``full_rows`` [F, C] storage dtype (sinks then tail),
    ``full_positions`` and ``full_tokens`` int32 [F] (position and sequence index).
    """
    cached = DERIVED.get(keys, "kernel_layout")
    if cached is None:
        device = keys.codes.device
        start, n_body = keys.sinks.shape[0], keys.num_groups * keys.group_size
        widths = keys.kept_bits.to(device)
        positions = keys.token_positions()
        full_index = torch.cat([torch.arange(start, device=device), torch.arange(start + n_body, keys.num_tokens, device=device)])
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


def decode_attention(
    queries: torch.Tensor,
    keys: Sequence[CompressedKeys],
    values: Sequence[CompressedValues],
    scale: float,
    selections: Sequence[BodySelection],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one launch group (same layout signature) over compressed keys.

    Args:
        queries: [B, Hq, D] post-RoPE queries (any float dtype; used as float32).
        keys, values: B compressed caches with one layout signature (kv_heads, group_size,
            RoPE, value format); D a power of two in 16..256.
        scale: softmax scale.
        selections: per sequence the body tokens to attend (``token_index`` None = all).

    Returns:
        ``(output float32 [B, Hq, D], lse float32 [B, Hq])``, natural-log lse.
    """
    batch, q_heads, head_dim = queries.shape
    device = queries.device
    first = keys[0]
    kv_heads = first.kv_heads
    gqa = q_heads // kv_heads
    inv_freq, partner, sign = _sequence_layout(first)["rope_tables"]
    q = queries.float().contiguous()
    q_partner = (q[..., partner] * sign).contiguous()

    layouts = [_sequence_layout(k) for k in keys]
    r_pad = max(1, max(layout["kept"] for layout in layouts))
    if batch == 1:
        channel_bits, channel_offs = layouts[0]["widths"], layouts[0]["offsets"]
        r_pad = max(1, layouts[0]["kept"])
    else:
        channel_bits = torch.zeros(batch, r_pad, dtype=torch.int32, device=device)
        channel_offs = torch.zeros(batch, r_pad, dtype=torch.int32, device=device)
        for b, layout in enumerate(layouts):
            channel_bits[b, : layout["kept"]] = layout["widths"]
            channel_offs[b, : layout["kept"]] = layout["offsets"]
    codes, codes_start = _concat([k.codes for k in keys])
    scales, meta_start = _concat([k.scales for k in keys])
    mins, _ = _concat([k.mins for k in keys])
    basis, basis_start = _concat([k.basis for k in keys])
    mean = keys[0].mean.float().contiguous() if batch == 1 else torch.stack([k.mean.float() for k in keys])
    body_positions, body_start = _concat([layout["body_positions"] for layout in layouts])
    full_rows, full_start = _concat([layout["full_rows"] for layout in layouts])
    full_pos, _ = _concat([layout["full_positions"] for layout in layouts])
    full_tok, _ = _concat([layout["full_tokens"] for layout in layouts])
    value_bits = values[0].bits or 0
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
    # Every per-sequence scalar in one host tensor: one copy to the device per launch.
    sequence_meta = torch.tensor([
        [codes_start[b], layouts[b]["group_bytes"], layouts[b]["kept"], meta_start[b], basis_start[b],
         body_start[b], layouts[b]["body_count"], layouts[b]["body_first"], full_start[b] // first.channels,
         layouts[b]["full_count"], value_start[b]]
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
    out_partial = torch.full((batch, q_heads, parts, head_dim), float("nan"), device=device)
    lse_partial = torch.full((batch, q_heads, parts), float("nan"), device=device)
    _decode_attention_kernel[(batch * kv_heads, parts)](
        q, q_partner, inv_freq,
        sequence_meta, codes, channel_bits, channel_offs, scales, mins, basis, mean,
        body_positions, selected, selected_count, full_rows, full_pos, full_tok,
        value_data, value_scales, value_mins, out_partial, lse_partial,
        tokens_per_split, n_splits, scale * _LOG2E,
        KV_HEADS=kv_heads, GQA=gqa, G_PAD=max(16, triton.next_power_of_2(gqa)), D=head_dim,
        GROUP_SIZE=first.group_size, R_PAD=r_pad, BLOCK_T=block_t, BLOCK_R=block_r,
        SPARSE=sparse, VALUE_BITS=value_bits, VALUE_GROUP=values[0].group_size,
        num_warps=4 if head_dim <= 128 else 8,
    )
    output = torch.full((batch, q_heads, head_dim), float("nan"), device=device)
    lse = torch.full((batch, q_heads), float("nan"), device=device)
    _reduce_splits_kernel[(batch * q_heads,)](
        out_partial, lse_partial, output, lse, parts, D=head_dim, PARTS_PAD=triton.next_power_of_2(parts),
    )
    return output, lse


def attend_triton(
    queries: torch.Tensor,
    keys: Sequence[CompressedKeys],
    values: Sequence[CompressedValues],
    scale: float,
    selections: Sequence[BodySelection],
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
        return decode_attention(queries, keys, values, scale, selections)
    output = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    lse = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for members in groups.values():
        index = torch.tensor(members, device=queries.device)
        out_g, lse_g = decode_attention(queries[index], [keys[b] for b in members], [values[b] for b in members],
                                        scale, [selections[b] for b in members])
        output[index], lse[index] = out_g, lse_g
    return output, lse


__all__ = ["attend_triton", "decode_attention", "rope_query_tables"]
