"""Torch reference of attention over compressed keys against a naive oracle built from
codec.decompress, plus sparsity, byte accounting, merge and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import allowed_mask

from svdq import CodecConfig, RopeConfig, apply_rope, compress, decompress, to_bytes
from svdq import attention as attention_module
from svdq.attention import (
    SparsityConfig,
    attend,
    body_range,
    merge_attention,
    score_latent,
    select_backend,
    select_body_tokens,
    token_scores,
)
from svdq.errors import InvalidInputError
from svdq.values import ValueConfig, compress_values, decompress_values, values_to_bytes

# Oracles at float32 tolerances: the float32 products (conftest.exact_attention).
pytestmark = pytest.mark.usefixtures("exact_attention")


def structured_keys(tokens, kv_heads, head_dim, seed=0, rank=6):
    """Pre-RoPE keys with a decaying spectrum (like real keys; random ones have none)."""
    generator = torch.Generator().manual_seed(seed)
    channels = kv_heads * head_dim
    factors = torch.randn(tokens, rank, generator=generator) * torch.linspace(4, 1, rank)
    mixing = torch.randn(rank, channels, generator=generator)
    noise = 0.05 * torch.randn(tokens, channels, generator=generator)
    return (factors @ mixing + noise + 0.5).reshape(tokens, kv_heads, head_dim)


def naive_attention(queries, keys_post, values, scale, allowed=None, softcap=None):
    """queries [Hq, D]; keys_post, values [S, Hkv, D]; allowed bool [Hkv, S] or None."""
    q_heads, kv_heads = queries.shape[0], keys_post.shape[1]
    ratio = q_heads // kv_heads
    keys_rep = keys_post.double().repeat_interleave(ratio, dim=1)
    values_rep = values.double().repeat_interleave(ratio, dim=1)
    scores = torch.einsum("hd,shd->hs", queries.double(), keys_rep) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.repeat_interleave(ratio, dim=0), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hs,shd->hd", torch.softmax(scores, -1), values_rep), lse


ROPE = RopeConfig(theta=10000.0)


def make_case(method="svdq", tokens=203, kv_heads=3, head_dim=64, key_space="pre_rope", rope=ROPE, value_bits=None,
              seed=0, group_size=16):
    pre = structured_keys(tokens, kv_heads, head_dim, seed)
    keys = apply_rope(pre, torch.arange(tokens), rope) if key_space == "post_rope" else pre
    kwargs = {"schedule": (8, 4, 2, 1, 1, 0, 0, 0)} if method == "svdq" else {}
    compressed = compress(keys, CodecConfig(method=method, group_size=group_size, num_sinks=4, **kwargs),
                          rope=rope, key_space=key_space)
    generator = torch.Generator().manual_seed(seed + 1)
    values = compress_values(torch.randn(tokens, kv_heads, head_dim, generator=generator).half(),
                             ValueConfig(bits=value_bits, group_size=32))
    return compressed, values


@pytest.mark.parametrize("method", ["svdq", "kivi", "fp16"])
@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_dense_reference_matches_naive_attention_over_decompressed_keys(method, key_space):
    keys, values = make_case(method, key_space=key_space, value_bits=4)
    queries = torch.randn(2, 9, 64)
    result = attend(queries, [keys, keys], [values, values], backend="torch")
    post = decompress(keys, key_space="post_rope", dtype=torch.float32)
    dense_values = decompress_values(values, torch.float32)
    for b in range(2):
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8)
        assert torch.allclose(result.output[b].double(), expected, atol=2e-5)
        assert torch.allclose(result.lse[b].double(), lse, atol=2e-5)
    assert result.output.dtype == torch.float32 and result.lse.shape == (2, 9)
    stats = result.stats[0]
    assert stats.tokens_attended == stats.tokens_total == 203
    assert stats.dense_fp16_key_bytes == 2 * 203 * 192


@pytest.mark.parametrize("style,rotary_dim", [("interleaved", 0), ("half", 32)])
def test_rope_styles_and_partial_rotary(style, rotary_dim):
    rope = RopeConfig(theta=500000.0, style=style, rotary_dim=rotary_dim)
    keys, values = make_case(rope=rope, key_space="post_rope", seed=3)
    queries = torch.randn(1, 6, 64)
    result = attend(queries, [keys], [values], scale=0.3, backend="torch")
    expected, lse = naive_attention(queries[0], decompress(keys, "post_rope", torch.float32),
                                    decompress_values(values, torch.float32), 0.3)
    assert torch.allclose(result.output[0].double(), expected, atol=2e-5)
    assert torch.allclose(result.lse[0].double(), lse, atol=2e-5)


def test_batch_of_different_lengths_and_methods():
    first, first_values = make_case("svdq", tokens=150)
    second, second_values = make_case("kivi", tokens=77, key_space="post_rope", value_bits=2, seed=5)
    queries = torch.randn(2, 3, 64)
    result = attend(queries, [first, second], [first_values, second_values], backend="torch")
    for b, (keys, values) in enumerate([(first, first_values), (second, second_values)]):
        expected, _ = naive_attention(queries[b], decompress(keys, "post_rope", torch.float32),
                                      decompress_values(values, torch.float32), 1 / 8)
        assert torch.allclose(result.output[b].double(), expected, atol=2e-5)


def test_sparse_reference_is_exact_attention_over_the_selected_tokens():
    keys, values = make_case(tokens=403)
    queries = torch.randn(1, 6, 64)
    sparsity = SparsityConfig(keep_fraction=0.25, chunk_size=8, num_recent=24)
    selection = select_body_tokens(queries[0], keys, sparsity)
    assert selection.token_index is not None
    allowed = allowed_mask(selection, keys)
    result = attend(queries, [keys], [values], sparsity=sparsity, backend="torch")
    expected, lse = naive_attention(queries[0], decompress(keys, "post_rope", torch.float32),
                                    decompress_values(values, torch.float32), 1 / 8, allowed)
    assert torch.allclose(result.output[0].double(), expected, atol=2e-5)
    assert torch.allclose(result.lse[0].double(), lse, atol=2e-5)
    # Sinks and the recent window are always attended, on top of the selected chunks.
    assert allowed[:, :4].all() and allowed[:, -24:].all()
    stats = result.stats[0]
    assert stats.tokens_attended == int(allowed[0].sum())


def test_many_sparse_queries_over_one_sequence_equal_one_call_each(monkeypatch):
    """A chunk of queries over one sequence reconstructs the union of their selections once
    (the chunk's selections overlap); each query still attends exactly its own tokens."""
    keys, values = make_case(method="svdq", tokens=403, key_space="post_rope")
    queries = torch.randn(12, 6, 64, generator=torch.Generator().manual_seed(4))
    sparsity = SparsityConfig(keep_fraction=0.25, chunk_size=8, num_recent=24)
    unions = []
    original = attention_module._body_rows
    monkeypatch.setattr(attention_module, "_body_rows",
                        lambda k, index, *rest: unions.append(index) or original(k, index, *rest))
    together = attend(queries, [keys] * 12, [values] * 12, sparsity=sparsity, backend="torch")
    start, n_body = body_range(keys)
    assert len(unions) == 1 and unions[0] is not None and unions[0].numel() <= n_body  # one shared reconstruction
    decompressed = decompress(keys, "post_rope", torch.float32)
    for b in range(12):
        alone = attend(queries[b:b + 1], [keys], [values], sparsity=sparsity, backend="torch")
        torch.testing.assert_close(together.output[b], alone.output[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.lse[b], alone.lse[0], atol=1e-5, rtol=0)
        assert together.stats[b].key_bytes_read == alone.stats[0].key_bytes_read
        allowed = allowed_mask(select_body_tokens(queries[b], keys, sparsity), keys)
        expected, lse = naive_attention(queries[b], decompressed, decompress_values(values, torch.float32), 1 / 8,
                                        allowed)
        assert torch.allclose(together.output[b].double(), expected, atol=2e-5)
        assert torch.allclose(together.lse[b].double(), lse, atol=2e-5)


def test_budget_selects_keep_fraction_of_the_tokens_on_top_of_the_forced_ones():
    # 1/32 of 1000 tokens is 32 tokens = 4 chunks of 8, selected from the body even though
    # sinks + tail + recent chunks alone exceed 32 tokens (the old budget selected nothing).
    keys, values = make_case(tokens=1000, group_size=32)
    sparsity = SparsityConfig(keep_fraction=1 / 32, chunk_size=8, num_recent=40)
    selection = select_body_tokens(torch.randn(6, 64), keys, sparsity)
    start, n_body = body_range(keys)
    full_precision = 1000 - n_body
    first_forced = (1000 - 40 - start) // 8
    forced = n_body - first_forced * 8
    assert full_precision + forced > 32
    assert selection.per_head_count == 4 * 8 + forced
    for head in range(3):
        tokens = selection.token_index[head][selection.valid[head]]
        assert (tokens < first_forced * 8).sum() == 32
        assert torch.equal(tokens[-forced:], torch.arange(first_forced * 8, n_body))
    stats = attend(torch.randn(1, 6, 64), [keys], [values], sparsity=sparsity, backend="torch").stats[0]
    assert stats.tokens_attended == full_precision + 32 + forced


@pytest.mark.parametrize("method,key_space,rope", [
    ("svdq", "pre_rope", ROPE),
    ("svdq", "pre_rope", RopeConfig(style="interleaved")),
    ("svdq", "pre_rope", RopeConfig(rotary_dim=32)),
    ("svdq", "pre_rope", None),
    ("kivi", "post_rope", ROPE),
    ("kivi", "pre_rope", RopeConfig(style="interleaved", rotary_dim=16)),
])
@pytest.mark.parametrize("token_rows", [8, 0], ids=["tokens-as-rows", "queries-as-rows"])
def test_token_scores_equal_the_query_dotted_with_rotated_low_rank_keys(monkeypatch, method, key_space, rope,
                                                                        token_rows):
    monkeypatch.setattr(attention_module, "SCORE_TOKEN_ROWS", token_rows)  # either product form
    keys, _ = make_case(method, tokens=200, key_space=key_space, rope=rope)
    queries = torch.randn(2, 6, 64)
    channels, latent = score_latent(keys, 5)
    assert latent.shape == (body_range(keys)[1], channels.numel() + 1)
    if method == "svdq":
        assert torch.equal(channels, torch.arange(5))  # svdq's latent order is importance order
    scores = token_scores(queries, keys, 5, 150)
    low_rank = (latent[:150, :-1] @ keys.basis.float()[:, channels].T + keys.mean.float()).reshape(150, 3, 64)
    if key_space == "pre_rope" and rope is not None:
        start, _ = body_range(keys)
        low_rank = apply_rope(low_rank, keys.token_positions()[start:start + 150], rope)
    expected = torch.einsum("nhd,thd->tnh", queries.double(), low_rank.double().repeat_interleave(2, dim=1))
    assert scores.shape == (150, 2, 6)
    assert torch.allclose(scores.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_sparse_selection_finds_a_planted_needle(chunk_size):
    tokens, kv_heads, head_dim = 1024, 2, 64
    pre = structured_keys(tokens, kv_heads, head_dim, seed=7)
    direction = pre[:, 0].std(dim=0)
    direction = direction / direction.norm()
    needle = 600
    pre[needle, 0] += 40 * direction  # a key far along a high-variance direction of head 0
    keys = compress(pre, CodecConfig(schedule=(8, 4, 2, 1, 1, 0, 0, 0), group_size=32), rope=ROPE)
    values = compress_values(torch.randn(tokens, kv_heads, head_dim).half())
    # Rotated to the needle's own position, so that q . RoPE(k) peaks at the needle.
    query = apply_rope((40 * direction).reshape(1, 1, head_dim), torch.tensor([needle]), ROPE)[0]
    queries = torch.cat([query, torch.zeros(1, head_dim)]).reshape(1, 2, head_dim)
    # 1/1024 of the tokens: a single chunk (a single token for chunk_size 1) is selected.
    sparsity = SparsityConfig(keep_fraction=1 / 1024, chunk_size=chunk_size, num_recent=0, score_channels=8)
    selection = select_body_tokens(queries[0], keys, sparsity)
    start, _ = body_range(keys)
    assert selection.per_head_count <= 32 + chunk_size
    assert (selection.token_index[0][selection.valid[0]] + start == needle).any()
    result = attend(queries, [keys], [values], sparsity=sparsity, backend="torch")
    dense = attend(queries, [keys], [values], backend="torch")
    assert torch.allclose(result.output[0, 0], dense.output[0, 0], atol=1e-2)


def test_sparse_bytes_read_count_selected_codes_and_the_score_reads():
    keys, values = make_case(tokens=403, group_size=16)
    sparsity = SparsityConfig(keep_fraction=1 / 16, chunk_size=4, num_recent=16, score_channels=3)
    queries = torch.randn(1, 3, 64)
    selection = select_body_tokens(queries[0], keys, sparsity)
    stats = attend(queries, [keys], [values], sparsity=sparsity, backend="torch").stats[0]
    start, n_body = body_range(keys)
    kept_bits = keys.kept_bits
    kept, channels = kept_bits.numel(), keys.channels
    union = torch.unique(selection.token_index[selection.valid])
    groups = torch.unique(union // 16).numel()
    candidates = (403 - 16 - start) // 4 * 4
    score = -(-candidates * int(kept_bits[:3].sum()) // 8) + 4 * 3 * -(-candidates // 16)
    expected = ((403 - n_body) * channels * 2 + 2 * channels * kept + 4 * channels
                + -(-union.numel() * int(kept_bits.sum()) // 8) + 4 * kept * groups + score)
    assert selection.summary_bytes == score
    assert stats.key_bytes_read == expected


def test_keep_everything_equals_dense_and_bytes_add_up():
    keys, values = make_case(tokens=203)
    queries = torch.randn(1, 3, 64)
    dense = attend(queries, [keys], [values], backend="torch")
    everything = attend(queries, [keys], [values], sparsity=SparsityConfig(keep_fraction=1.0), backend="torch")
    assert torch.equal(dense.output, everything.output)
    # Dense reads the whole blob except its header, channel-width map and checksum.
    kept = keys.kept_bits.numel()
    overhead = 28 + 28 + (192 + 1) // 2 + 4
    assert dense.stats[0].key_bytes_read == keys.nbytes - overhead
    assert kept > 0


def test_attend_does_not_modify_stored_data():
    keys, values = make_case(value_bits=4)
    key_blob, value_blob = to_bytes(keys), values_to_bytes(values)
    attend(torch.randn(1, 3, 64), [keys], [values], sparsity=SparsityConfig(keep_fraction=0.5, chunk_size=8))
    assert to_bytes(keys) == key_blob and values_to_bytes(values) == value_blob


def test_merge_attention_equals_attention_over_the_union():
    generator = torch.Generator().manual_seed(4)
    queries = torch.randn(4, 32, generator=generator)
    keys = torch.randn(50, 2, 32, generator=generator)
    values = torch.randn(50, 2, 32, generator=generator)
    full, full_lse = naive_attention(queries, keys, values, 0.2)
    first, first_lse = naive_attention(queries, keys[:17], values[:17], 0.2)
    second, second_lse = naive_attention(queries, keys[17:], values[17:], 0.2)
    merged, merged_lse = merge_attention(first.float(), first_lse.float(), second.float(), second_lse.float())
    assert torch.allclose(merged.double(), full, atol=1e-5)
    assert torch.allclose(merged_lse.double(), full_lse, atol=1e-5)
    empty = torch.full_like(first_lse, -math.inf).float()
    alone, alone_lse = merge_attention(first.float(), first_lse.float(), torch.zeros_like(first).float(), empty)
    assert torch.allclose(alone.double(), first, atol=1e-6) and torch.allclose(alone_lse.double(), first_lse)
    nothing, nothing_lse = merge_attention(torch.zeros(2, 3), torch.full((2,), -math.inf),
                                           torch.zeros(2, 3), torch.full((2,), -math.inf))
    assert not nothing.isnan().any() and torch.isinf(nothing_lse).all()
    with pytest.raises(InvalidInputError, match="matching shapes"):
        merge_attention(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2))


def test_backend_choice_and_override(monkeypatch):
    monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    assert select_backend("cpu") == "torch"
    assert select_backend("cuda") == "triton"
    monkeypatch.setenv("SVDQ_BACKEND", "torch")
    assert select_backend("cuda") == "torch"
    monkeypatch.setenv("SVDQ_BACKEND", "cuda-magic")
    with pytest.raises(InvalidInputError, match="SVDQ_BACKEND"):
        select_backend("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidInputError, match="TRITON_INTERPRET"):
        select_backend("cpu", "triton")
    with pytest.raises(InvalidInputError, match="backend must be one of"):
        select_backend("cpu", "numpy")


@pytest.mark.parametrize("method, sparse", [("svdq", False), ("svdq", True), ("fp16", False)])
def test_softcap_caps_full_precision_and_latent_scores_before_the_softmax(method, sparse):
    """Gemma 2's attention logit softcapping: scores ``cap * tanh(s / cap)``, on the sinks and
    recent tokens kept in full precision and on the latent body alike, dense or sparse."""
    keys, values = make_case(method, tokens=403)
    queries = 3.0 * torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(11))
    sparsity = SparsityConfig(keep_fraction=0.25, chunk_size=8, num_recent=24) if sparse else None
    post, dense_values = decompress(keys, "post_rope", torch.float32), decompress_values(values, torch.float32)
    capped = attend(queries, [keys, keys], [values, values], sparsity=sparsity, backend="torch", softcap=2.0)
    uncapped = attend(queries, [keys, keys], [values, values], sparsity=sparsity, backend="torch")
    for b in range(2):
        allowed = None
        if sparse:
            allowed = allowed_mask(select_body_tokens(queries[b], keys, sparsity), keys)
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8, allowed, softcap=2.0)
        torch.testing.assert_close(capped.output[b].double(), expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(capped.lse[b].double(), lse, atol=2e-5, rtol=0)
    # A cap of 2 on scores of std ~3 changes the attention: the check above could fail.
    assert (capped.output - uncapped.output).abs().max() > 0.05
    # The Triton kernels softcap too: tests/test_kernels.py::test_softcap checks them against this path.


@pytest.mark.parametrize("softcap", [0.0, -50.0, float("nan"), float("inf"), 1e5, True, "50"])
def test_bad_softcap_is_refused(softcap):
    keys, values = make_case(tokens=40)
    with pytest.raises(InvalidInputError, match=r"softcap must be a number in \(0, 10000\] or None"):
        attend(torch.randn(1, 3, 64), [keys], [values], softcap=softcap)


def test_bad_inputs_are_rejected_with_the_field_named():
    keys, values = make_case(tokens=40)
    good = torch.randn(1, 3, 64)
    cases = [
        (dict(queries=torch.randn(3, 64)), "queries must have shape"),
        (dict(queries=good.int()), "queries dtype"),
        (dict(queries=torch.full((1, 3, 64), float("nan"))), "NaN"),
        (dict(queries=torch.randn(1, 4, 64)), "multiple of"),
        (dict(queries=torch.randn(1, 3, 32)), "head_dim"),
        (dict(keys=[keys, keys]), "one entry per query"),
        (dict(keys=["blob"]), "CompressedKeys"),
        (dict(values=[compress_values(torch.randn(41, 3, 64))]), "41 tokens"),
        (dict(values=[compress_values(torch.randn(40, 1, 64))]), "heads=1"),
        (dict(scale=-1.0), "scale"),
        (dict(scale=float("inf")), "scale"),
        (dict(sparsity=0.5), "SparsityConfig"),
        (dict(backend="cuda"), "backend"),
    ]
    for override, message in cases:
        arguments = dict(queries=good, keys=[keys], values=[values])
        arguments.update(override)
        queries = arguments.pop("queries")
        with pytest.raises(InvalidInputError, match=message):
            attend(queries, arguments.pop("keys"), arguments.pop("values"), **arguments)
    for field, value in [("keep_fraction", 0.0), ("keep_fraction", 1.5), ("chunk_size", 0), ("num_recent", -1),
                         ("score_channels", 0)]:
        with pytest.raises(InvalidInputError, match=field):
            SparsityConfig(**{field: value})
