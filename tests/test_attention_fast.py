"""The blocked CPU paths of the torch backend against the plain reference computations.

The fast paths (dense dots in cache-sized blocks, values summed in blocks, the shared RoPE
angle table, oneDNN's float32 matmul) must compute the same function as the plain ones
(dot with every key of ``decompress``, sum every value at once) and as naive float64
attention over ``decompress``: dense and sparse, 16-bit, per-token and latent values, GQA
ratios 1..8, sinks and tail. The block sizes are shrunk so that every call spans many blocks
and ends in a partial one.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import allowed_mask
from test_attention import ROPE, make_case, naive_attention, structured_keys
from test_latent_values import latent_config, structured_values

from svdq import CodecConfig, RopeConfig, apply_rope, compress, decompress
from svdq import attention as attention_module
from svdq.attention import (
    SparsityConfig,
    _rotation_table,
    attend,
    body_range,
    dense_body_dots,
    reconstruct,
    select_body_tokens,
    select_body_tokens_many,
    weighted_values,
)
from svdq.derived import DERIVED
from svdq.rope import rope_cos_sin
from svdq.values import ValueConfig, compress_values, decompress_values, gather_values

# Oracles at float32 tolerances: the float32 products (conftest.exact_attention).
pytestmark = pytest.mark.usefixtures("exact_attention")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # 16-token groups of 3 x 64 channels: 2 groups per dense block, 21 tokens per score block.
    monkeypatch.setattr(attention_module, "RECONSTRUCT_BLOCK_ELEMENTS", 2 * 16 * 192)
    monkeypatch.setattr(attention_module, "SCORE_BLOCK_ELEMENTS", 64 * 192)


def grouped_queries(count_rows, kv_heads, head_dim, seed=0):
    return torch.randn(kv_heads, count_rows, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,key_space", [("svdq", "pre_rope"), ("svdq", "post_rope"), ("kivi", "post_rope"),
                                              ("fp16", "pre_rope")])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_blocked_dense_dots_equal_dots_with_every_reconstructed_key(method, key_space, rows):
    keys, _ = make_case(method, tokens=203, key_space=key_space)
    start, n_body = body_range(keys)
    grouped = grouped_queries(rows, keys.kv_heads, keys.head_dim)
    body = decompress(keys, "post_rope", torch.float32)[start:start + n_body].transpose(0, 1)
    reference = torch.einsum("hgd,hnd->hgn", grouped.double(), body.double())
    fast = dense_body_dots(keys, grouped)
    assert fast.shape == (keys.kv_heads, rows, n_body)
    assert torch.allclose(fast.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ratio", [1, 3, 8])
@pytest.mark.parametrize("value_kind", ["fp16", "per_token_4", "per_token_2", "latent"])
@pytest.mark.parametrize("sparse", [False, True])
def test_attend_equals_naive_float64_attention(ratio, value_kind, sparse):
    tokens, kv_heads, head_dim = 331, 3, 64
    keys, _ = make_case(tokens=tokens, kv_heads=kv_heads, head_dim=head_dim, seed=ratio)
    raw_values = structured_values(tokens, kv_heads, head_dim, seed=ratio)
    config = {"fp16": ValueConfig(), "per_token_4": ValueConfig(bits=4, group_size=32),
              "per_token_2": ValueConfig(bits=2, group_size=16), "latent": latent_config(num_sinks=3)}[value_kind]
    values = compress_values(raw_values.half(), config)
    queries = torch.randn(2, kv_heads * ratio, head_dim, generator=torch.Generator().manual_seed(7))
    sparsity = SparsityConfig(keep_fraction=0.2, chunk_size=8, num_recent=16) if sparse else None
    result = attend(queries, [keys, keys], [values, values], sparsity=sparsity, backend="torch")
    post = decompress(keys, "post_rope", torch.float32)
    dense_values = decompress_values(values, torch.float32)
    _, n_body = body_range(keys)
    for b in range(2):
        allowed = None
        if sparse:
            selection = select_body_tokens(queries[b], keys, sparsity)
            assert selection.token_index is not None and selection.per_head_count < n_body
            allowed = allowed_mask(selection, keys)
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / math.sqrt(head_dim), allowed)
        # float32 rounding of a weighted sum scales with the values (these reach ~50).
        assert torch.allclose(result.output[b].double(), expected, atol=2e-6 * dense_values.abs().max().item())
        assert torch.allclose(result.lse[b].double(), lse, atol=2e-5)


def test_dense_attention_over_many_blocks_keeps_sinks_tail_and_explicit_positions():
    tokens, kv_heads, head_dim = 250, 2, 128
    pre = structured_keys(tokens, kv_heads, head_dim, seed=4)
    positions = torch.arange(tokens) * 3 + 17  # not offset + arange: the angle table is indexed
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=64)
    keys = compress(apply_rope(pre, positions, rope), CodecConfig(group_size=16, num_sinks=5, bits_per_element=3.0),
                    rope=rope, key_space="post_rope", positions=positions)
    assert keys.sinks.shape[0] == 5 and keys.tail.shape[0] > 0
    values = compress_values(structured_values(tokens, kv_heads, head_dim, seed=5).half())
    queries = torch.randn(1, 8 * kv_heads, head_dim, generator=torch.Generator().manual_seed(8))
    result = attend(queries, [keys], [values], backend="torch")
    expected, lse = naive_attention(queries[0], decompress(keys, "post_rope", torch.float32),
                                    decompress_values(values, torch.float32), 1 / math.sqrt(head_dim))
    assert torch.allclose(result.output[0].double(), expected, atol=2e-6 * values.data.abs().max().item())
    assert torch.allclose(result.lse[0].double(), lse, atol=2e-5)


@pytest.mark.parametrize("value_kind", ["fp16", "per_token_4", "latent"])
def test_blocked_value_sums_equal_summing_every_value_at_once(value_kind):
    tokens, heads, head_dim = 203, 3, 64
    config = {"fp16": ValueConfig(), "per_token_4": ValueConfig(bits=4, group_size=32),
              "latent": latent_config()}[value_kind]
    values = compress_values(structured_values(tokens, heads, head_dim, seed=2).half(), config)
    weights = torch.rand(heads, 5, 150, generator=torch.Generator().manual_seed(3))
    tokens_slice = slice(10, 160)  # inside the latent's body (4 sinks, groups of 32)
    rows = gather_values(values).double()[:, tokens_slice]
    expected = torch.einsum("hgn,hnd->hgd", weights.double(), rows)
    # float32 rounding of a sum is bounded by a few ulps of the sum of its terms' magnitudes.
    magnitude = torch.einsum("hgn,hnd->hgd", weights.double(), rows.abs())
    error = (weighted_values(values, weights, tokens_slice).double() - expected).abs()
    assert (error <= 1e-5 * magnitude + 1e-6).all()


def test_onednn_reconstruction_is_float32_accurate():
    generator = torch.Generator().manual_seed(0)
    for rows, kept, channels in [(256, 427, 1024), (63, 33, 192), (1, 1, 64)]:
        latent = torch.randn(rows, kept, generator=generator)
        basis = torch.randn(channels, kept, generator=generator)
        mean = torch.randn(channels, generator=generator)
        exact = latent.double() @ basis.double().T + mean.double()
        addmm_error = (torch.addmm(mean, latent, basis.T).double() - exact).abs().max()
        error = (reconstruct(latent, basis, mean).double() - exact).abs().max()
        # float32 rounding of a kept-term sum: a few ulps of its magnitude, as addmm's.
        assert error <= 4 * addmm_error + 8 * torch.finfo(torch.float32).eps * exact.abs().max()


@pytest.mark.parametrize("bfloat16_rest", [False, True])
def test_a_token_reconstructs_to_the_same_bits_however_many_tokens_come_with_it(bfloat16_rest):
    """Kept keys are reconstructed in blocks of every KV head, a sparse selection per head in
    sets of any size, one row among them: a token's reconstruction must not depend on that, or
    a result would depend on what the attention cache holds."""
    generator = torch.Generator().manual_seed(0)
    tokens, kept, kv_heads, head_dim = 512, 75, 8, 128
    latent = torch.randn(tokens, kept, generator=generator)
    basis = torch.randn(kv_heads * head_dim, kept, generator=generator)
    mean = torch.randn(kv_heads * head_dim, generator=generator)
    lead, rest = basis, None
    if bfloat16_rest:
        lead, rest = basis[:, :32].contiguous(), basis[:, 32:].to(torch.bfloat16).contiguous()
    blocks = torch.cat([reconstruct(latent[first:first + 256], lead, mean, rest) for first in range(0, tokens, 256)])
    for count in (1, 2, 7, 100, 300):
        index = torch.randperm(tokens, generator=generator)[:count]
        assert torch.equal(reconstruct(latent[index], lead, mean, rest), blocks[index])
        for head in (0, 5):
            channels = slice(head * head_dim, (head + 1) * head_dim)
            alone = reconstruct(latent[index], lead[channels], mean[channels], None if rest is None else rest[channels])
            assert torch.equal(alone, blocks[index, channels])


@pytest.mark.parametrize("method,key_space", [("svdq", "post_rope"), ("svdq", "pre_rope"), ("kivi", "post_rope")])
@pytest.mark.parametrize("token_rows,span", [(8, 4096), (8, 100), (0, 4096)],
                         ids=["tokens-as-rows", "tokens-as-rows-in-spans", "queries-as-rows"])
def test_kept_score_keys_give_the_same_score_bits_and_selection(monkeypatch, method, key_space, token_rows, span):
    """The selection score's rotated low-rank keys are kept while the budget has room and only
    dotted afterwards: the same score bits (for any candidate prefix) and selections as built
    anew, so the chosen tokens never depend on what the attention cache holds; with either
    product form (tokens as the rows, in one or several spans, or the query rows first)."""
    monkeypatch.setattr(attention_module, "SCORE_TOKEN_ROWS", token_rows)
    monkeypatch.setattr(attention_module, "SCORE_TOKEN_SPAN", span)
    # A first call that keeps nothing, then one that keeps (at this size they would be kept from the first).
    monkeypatch.setattr(DERIVED, "first_ask_bytes", 0)
    keys, values = make_case(method, tokens=403, key_space=key_space)
    start, n_body = body_range(keys)
    queries = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(5))
    sparsity = SparsityConfig(keep_fraction=0.1, chunk_size=4, num_recent=24)
    name = (attention_module.SCORE_KEYS, 5)
    limit = DERIVED.limit_bytes
    try:
        DERIVED.limit_bytes = None  # no budget: built anew every call
        cold = {tokens: attention_module._head_score_dots(queries, keys, 5, tokens) for tokens in (150, n_body)}
        cold_attention = attend(queries, [keys] * 3, [values] * 3, sparsity=sparsity, backend="torch")
        assert name not in keys._cache
        DERIVED.limit_bytes = 1 << 30
        before = DERIVED.nbytes
        assert torch.equal(attention_module._head_score_dots(queries, keys, 5, 150), cold[150])
        assert name not in keys._cache  # kept from the second call on
        assert torch.equal(attention_module._head_score_dots(queries, keys, 5, 150), cold[150])
        kept = keys._cache[name]
        assert kept.shape == (keys.kv_heads, n_body, keys.head_dim) and DERIVED.nbytes - before >= kept.numel() * 4
        built = []
        original = attention_module.reconstruct
        monkeypatch.setattr(attention_module, "reconstruct", lambda *args: built.append(1) or original(*args))
        for tokens in (150, n_body):
            assert torch.equal(attention_module._head_score_dots(queries, keys, 5, tokens), cold[tokens])
        assert not built  # dotted from the kept keys
        kept_attention = attend(queries, [keys] * 3, [values] * 3, sparsity=sparsity, backend="torch")
        for ours, theirs in zip(kept_attention.stats, cold_attention.stats, strict=True):
            assert ours == theirs
        assert torch.equal(kept_attention.output, cold_attention.output)
        # A budget without room for them keeps none.
        other, _ = make_case(method, tokens=403, key_space=key_space, seed=3)
        DERIVED.clear()
        DERIVED.limit_bytes = 200_000  # less than the 300 kB they would take
        for _ in range(2):
            attention_module._head_score_dots(queries, other, 5, 150)
        assert name not in other._cache
    finally:
        DERIVED.clear()
        DERIVED.limit_bytes = limit


def test_angle_table_is_exact_shared_and_under_the_budget(monkeypatch):
    keys, _ = make_case(tokens=203)
    other, _ = make_case(tokens=150, seed=3)
    table, positions, _ = _rotation_table(keys)
    cos, sin = rope_cos_sin(ROPE, positions, keys.head_dim)
    assert torch.equal(table[positions].real, cos) and torch.equal(table[positions].imag, sin)
    again = _rotation_table(other)[0]
    # One table per RoPE and head_dim, shared by sequences.
    assert again.data_ptr() == table.data_ptr()
    # The budget may drop it; it is rebuilt with the same values.
    limit = DERIVED.limit_bytes
    try:
        DERIVED.limit_bytes = 1
        _rotation_table(keys)
        dense_body_dots(other, grouped_queries(2, 3, 64))
        rebuilt = _rotation_table(keys)[0]
        assert rebuilt.data_ptr() != table.data_ptr() and torch.equal(rebuilt[positions].real, cos)
    finally:
        DERIVED.limit_bytes = limit
    monkeypatch.setattr(attention_module, "MAX_TABLE_POSITIONS", 100)
    assert _rotation_table(keys)[0] is None  # beyond the table: computed per block instead
    queries = torch.randn(1, 6, 64)
    result = attend(queries, [keys], [compress_values(torch.randn(203, 3, 64).half())], backend="torch")
    assert torch.isfinite(result.output).all()


@pytest.mark.parametrize("rope", [RopeConfig(theta=10000.0), RopeConfig(theta=10000.0, style="interleaved"),
                                  RopeConfig(theta=10000.0, rotary_dim=32),
                                  RopeConfig(theta=10000.0, style="interleaved", rotary_dim=16)],
                         ids=["half", "interleaved", "half-partial", "interleaved-partial"])
@pytest.mark.parametrize("count", [1, 6])
def test_pair_order_paths_equal_naive_attention_for_every_rope_layout(rope, count):
    """Dense and sparse calls rotate keys in pair order (each RoPE pair's two channels side by
    side, the queries reordered alike): for both pair layouts and partial rotary, one query and
    several over one sequence (whose selections outnumber the body, so their latent comes from
    one dequantized body), 16-bit and latent values, the result is float64 attention's."""
    keys, _ = make_case(tokens=203, rope=rope)
    queries = torch.randn(count, 6, 64, generator=torch.Generator().manual_seed(7))
    post = decompress(keys, key_space="post_rope", dtype=torch.float32)
    sparsity = SparsityConfig(keep_fraction=0.5, chunk_size=4, num_recent=8)
    for values in [compress_values(torch.randn(203, 3, 64, generator=torch.Generator().manual_seed(8)).half()),
                   compress_values(structured_values(203, 3, 64, seed=2).half(), latent_config())]:
        dense_values = decompress_values(values, torch.float32)
        for chosen in (None, sparsity):
            result = attend(queries, [keys] * count, [values] * count, sparsity=chosen, backend="torch")
            for b in range(count):
                allowed = None
                if chosen is not None:
                    selection = select_body_tokens(queries[b], keys, chosen)
                    assert selection.token_index is not None  # really sparse
                    allowed = allowed_mask(selection, keys)
                expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8, allowed)
                scale = max(1.0, dense_values.abs().max().item())
                assert torch.allclose(result.output[b].double(), expected, atol=2e-5 * scale)
                assert torch.allclose(result.lse[b].double(), lse, atol=2e-5)


@pytest.mark.parametrize("value_sinks", [0, 4, 12])
def test_latent_sum_over_the_selected_union_equals_the_dense_sum_and_the_rule_takes_it_for_few_tokens(
        monkeypatch, value_sinks):
    """A sparse call's merged weights are zero off its selections and the keys' full-precision
    tokens: summing SVDq latent values over the union of those tokens (in several blocks
    here) is the dense sum up to float32 rounding, and the rule takes it only while the union
    is a small share of the body."""
    monkeypatch.setattr(attention_module, "UNION_BLOCK", 16)
    values = compress_values(structured_values(300, seed=3), latent_config(3.0, 32, value_sinks))
    latent = values.latent
    kv_heads, total = latent.kv_heads, latent.num_tokens
    v_start, v_body = body_range(latent)
    generator = torch.Generator().manual_seed(2)
    # The keys' sinks (4) and tail (the last 20) carry weight wherever the values' body lies.
    fp_index = torch.cat([torch.arange(4), torch.arange(total - 20, total)])
    selected = torch.randint(v_start, v_start + v_body, (1, kv_heads, 12), generator=generator)
    union = attention_module._selected_value_union(latent, selected, fp_index, 32)
    assert union is not None
    expected = torch.zeros(total, dtype=torch.bool)
    expected[selected.reshape(-1)] = expected[fp_index] = True
    assert torch.equal(union, expected[v_start:v_start + v_body].nonzero().squeeze(1))
    weights = torch.zeros(kv_heads, 32, total)  # 32 weight rows per KV head
    weights[..., union + v_start] = torch.rand(kv_heads, 32, union.numel(), generator=generator)
    others = torch.cat([torch.arange(v_start), torch.arange(v_start + v_body, total)])
    weights[..., others] = torch.rand(kv_heads, 32, others.numel(), generator=generator)
    weights /= weights.sum(dim=-1, keepdim=True)  # softmax weights sum to one
    dense = weighted_values(values, weights, slice(0, total))
    torch.testing.assert_close(attention_module._summed_latent_columns(latent, weights, union), dense,
                               rtol=1e-5, atol=1e-5)
    # Every body token selected: the dense sum is cheaper.
    everything = torch.arange(v_start, v_start + v_body).expand(1, kv_heads, -1)
    assert attention_module._selected_value_union(latent, everything, fp_index, 32) is None
    monkeypatch.setattr(attention_module, "SPARSE_LATENT_SUM", "union")
    assert attention_module._selected_value_union(latent, everything, fp_index, 32).numel() == v_body


@pytest.mark.parametrize("span", [4096, 300], ids=["one-span", "spans"])
def test_cold_score_blocks_give_the_kept_keys_score_bits_at_llama_shapes(monkeypatch, span):
    """At Llama-3-8B head shapes (8 KV heads x 128, 4 query heads each, one decode query) a
    cold score dots each 256-token block where it was built (a strided head-major view) and a
    kept one dots the kept keys in spans: the same score bits and the same selection, over
    several blocks and spans that do not line up with them."""
    monkeypatch.setattr(attention_module, "SCORE_TOKEN_SPAN", span)
    tokens = 1400
    pre = structured_keys(tokens, 8, 128, seed=7, rank=24)
    keys = compress(pre, CodecConfig(num_sinks=4), rope=ROPE, key_space="pre_rope")
    start, n_body = body_range(keys)
    assert n_body > 4 * max(64, attention_module.SCORE_BLOCK_ELEMENTS // keys.channels)  # several cold blocks
    queries = torch.randn(1, 32, 128, generator=torch.Generator().manual_seed(8))
    sparsity = SparsityConfig(keep_fraction=1 / 16, chunk_size=16, num_recent=64)
    name = (attention_module.SCORE_KEYS, sparsity.score_channels)
    limit = DERIVED.limit_bytes
    try:
        DERIVED.limit_bytes = None  # no budget: built anew every call
        cold = attention_module._head_score_dots(queries, keys, sparsity.score_channels, n_body)
        cold_selection = select_body_tokens_many(queries, keys, sparsity)
        assert name not in keys._cache
        DERIVED.limit_bytes = 1 << 30
        for _ in range(2):  # kept by the second call at the latest
            attention_module._head_score_dots(queries, keys, sparsity.score_channels, n_body)
        assert name in keys._cache
        assert torch.equal(attention_module._head_score_dots(queries, keys, sparsity.score_channels, n_body), cold)
        kept_selection = select_body_tokens_many(queries, keys, sparsity)
        assert torch.equal(kept_selection[0].token_index, cold_selection[0].token_index)
    finally:
        DERIVED.clear()
        DERIVED.limit_bytes = limit


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_a_chunk_of_sparse_queries_covering_the_body_keeps_the_dense_keys_at_the_same_bits(precision):
    """Several sparse queries over one sequence whose selections cover most of its body build the
    keys a dense call keeps (when the budget admits them) and gather from them, this call and the
    next: the same output and lse bits as rebuilding the union of their selections without a
    budget. One query (a decode step) selects too little to build them."""
    keys, values = make_case("svdq", tokens=403, key_space="post_rope")
    start, n_body = body_range(keys)
    queries = torch.randn(12, 6, 64, generator=torch.Generator().manual_seed(4))
    sparsity = SparsityConfig(keep_fraction=0.25, chunk_size=8, num_recent=24)
    name = attention_module._kept_keys_name(keys, precision)
    limit = DERIVED.limit_bytes
    try:
        DERIVED.limit_bytes = None  # no budget: nothing kept, the union rebuilt
        rebuilt = attend(queries, [keys] * 12, [values] * 12, sparsity=sparsity, backend="torch", precision=precision)
        assert name not in keys._cache
        index = torch.stack([s.token_index for s in select_body_tokens_many(queries.float(), keys, sparsity)])
        union = attention_module._selection_union(keys, index)
        assert attention_module._selections_cover_body(keys, union, precision) is False  # no budget, no room
        assert torch.unique(index).numel() >= attention_module.COVERED_BODY_SHARE * n_body
        DERIVED.limit_bytes = 1 << 30
        for _ in range(2):
            kept = attend(queries, [keys] * 12, [values] * 12, sparsity=sparsity, backend="torch", precision=precision)
            assert keys._cache[name].shape == (keys.kv_heads, n_body, keys.head_dim)
            assert torch.equal(kept.output, rebuilt.output) and torch.equal(kept.lse, rebuilt.lse)
        single, single_values = make_case("svdq", tokens=403, key_space="post_rope")
        attend(queries[:1], [single], [single_values], sparsity=sparsity, backend="torch", precision=precision)
        assert name not in single._cache
    finally:
        DERIVED.limit_bytes = limit
