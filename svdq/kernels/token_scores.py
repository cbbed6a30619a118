"""Triton kernel of the sparse selection score: :func:`svdq.attention.token_scores` on the GPU.

The score of body token ``t`` for query head ``i`` (KV head ``h = i // G``) is
``q_i . RoPE_t(k_t)`` with the low-rank key ``k_t = [l_t, 1] @ W_h`` over the ``m`` score
channels: ``l_t`` [m] is the token's dequantized latent of those channels and ``W_h``
[m + 1, D] holds their basis columns for head ``h``, then the mean (the cached
:func:`svdq.attention.score_latent` and the same columns the torch reference builds).

Program ``(token block, h, query block)`` builds the low-rank keys of BLOCK_T tokens for KV
head ``h`` once (one ``[BLOCK_T, m + 1] @ [m + 1, D]`` dot), then scores BLOCK_Q query rows
of that head's GQA group (row ``r`` = query ``r // G``, head ``h * G + r % G``). RoPE is
applied on the query side exactly as in :mod:`svdq.kernels.decode_attention`:
``q . RoPE_t(k) = q @ (k * cos_t).T + qp @ (k * sin_t).T`` with the host-prepared partner
query ``qp`` (:func:`~svdq.kernels.decode_attention.rope_query_tables`), so key channels are
never shuffled and partial or interleaved RoPE need no special case. Everything is float32
with IEEE dots: the selection compares scores, and TF32 rounding would reorder near-ties
against the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..derived import DERIVED
from .decode_attention import _reduced_cos_sin, _sequence_layout

if TYPE_CHECKING:
    from ..codec import CompressedKeys

BLOCK_T = 64


@triton.jit
def _token_scores_kernel(latent_ptr, columns_ptr, queries_ptr, partners_ptr, inv_freq_ptr, positions_ptr, out_ptr,
                         tokens, count, latent_width, channels,
                         GROUP: tl.constexpr, Q_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr,
                         ROTATES: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    pid_q = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < tokens
    m_mask = offs_m < latent_width
    d_mask = offs_d < D
    latent = tl.load(latent_ptr + offs_t[:, None] * latent_width + offs_m[None, :],
                     mask=t_mask[:, None] & m_mask[None, :], other=0.0)
    columns = tl.load(columns_ptr + offs_m[:, None] * channels + h * D + offs_d[None, :],
                      mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    keys = tl.dot(latent, columns, input_precision="ieee")  # [BLOCK_T, BLOCK_D]

    offs_r = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_mask = offs_r < count * GROUP
    # Row r of this program: query r // GROUP, query head h * GROUP + r % GROUP of [n, Hq, D].
    head_row = (offs_r // GROUP) * Q_HEADS + h * GROUP + offs_r % GROUP
    q_offsets = head_row[:, None] * D + offs_d[None, :]
    qd_mask = r_mask[:, None] & d_mask[None, :]
    q = tl.load(queries_ptr + q_offsets, mask=qd_mask, other=0.0)
    if ROTATES:
        positions = tl.load(positions_ptr + offs_t, mask=t_mask, other=0).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + offs_d, mask=d_mask, other=0.0)
        cos, sin = _reduced_cos_sin(positions[:, None] * inv_freq[None, :])
        partners = tl.load(partners_ptr + q_offsets, mask=qd_mask, other=0.0)
        scores = (tl.dot(q, tl.trans(keys * cos), input_precision="ieee")
                  + tl.dot(partners, tl.trans(keys * sin), input_precision="ieee"))
    else:
        scores = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [BLOCK_Q, BLOCK_T]
    # out[t, query, head] of [tokens, n, Hq] is out_ptr + t * n * Hq + head_row (int64: a
    # million tokens times 64 queries of 32 heads passes 2**31).
    out_offsets = offs_t[None, :].to(tl.int64) * (count * Q_HEADS) + head_row[:, None]
    tl.store(out_ptr + out_offsets, scores, mask=r_mask[:, None] & t_mask[None, :])


def token_scores_triton(queries: torch.Tensor, keys: CompressedKeys, score_channels: int, tokens: int) -> torch.Tensor:
    """Approximate ``q . RoPE_t(k_t)`` of the first ``tokens`` body tokens over the leading
    ``score_channels`` latent channels; the contract of :func:`svdq.attention.token_scores`.

    Args:
        queries: [n, Hq, D] post-RoPE queries (any float dtype; scored in float32), on the
            device of ``keys``; ``Hq`` a multiple of ``keys.kv_heads``.
        keys: compressed keys (svdq or kivi: the score reads the cached low-rank latent).
        score_channels: leading latent channels of the score, as in ``SparsityConfig``.
        tokens: body tokens to score (the candidates, a prefix of the body).

    Returns:
        float32 [tokens, n, Hq] scores (unscaled), every element written by the kernel.
    """
    from ..attention import _score_columns, body_range, rotates, score_latent

    count, q_heads, head_dim = queries.shape
    kv_heads = keys.kv_heads
    group = q_heads // kv_heads
    device = queries.device
    channels, latent = score_latent(keys, score_channels)
    latent = latent[:tokens].contiguous()
    # [m + 1, C], kept under the budget like the torch path's columns (a gather, a concatenation
    # and a transposed copy per layer per decode step otherwise).
    column_key = ("score_columns_t", channels.numel())
    columns = DERIVED.get(keys, column_key)
    if columns is None:
        columns = _score_columns(keys, channels).T.contiguous()
        DERIVED.put(keys, column_key, columns)
    queries = queries.float().contiguous()
    # The layout the decode kernel keeps under the budget: not re-derived per call.
    inv_freq, partner, sign = _sequence_layout(keys)["rope_tables"]
    partners = (queries[..., partner] * sign).contiguous()
    body_start, _ = body_range(keys)
    positions = keys.token_positions()[body_start:body_start + tokens].contiguous()
    out = torch.full((tokens, count, q_heads), float("nan"), device=device)
    rows = count * group
    if tokens == 0 or rows == 0:
        return out
    block_q = max(16, min(64, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(tokens, BLOCK_T), kv_heads, triton.cdiv(rows, block_q))
    _token_scores_kernel[grid](
        latent, columns, queries, partners, inv_freq, positions, out,
        tokens, count, latent.shape[1], keys.channels,
        GROUP=group, Q_HEADS=q_heads, D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=max(16, triton.next_power_of_2(latent.shape[1])), BLOCK_T=BLOCK_T, BLOCK_Q=block_q,
        ROTATES=rotates(keys),
        # [BLOCK_T, D] float32 keys, their cos/sin products and the partner queries live in
        # registers: for sm_90 at head_dim 128 ptxas spills 3.1 KB of stack per thread with
        # 4 warps and 1.2 KB with 8 (bench/aot_compile.py).
        num_warps=4 if head_dim <= 64 else 8,
    )
    return out
