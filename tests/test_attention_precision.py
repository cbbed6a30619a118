"""The bfloat16 products of the torch attention path (``precision="bfloat16"``, the CPU default).

Their error is judged against what the compression itself costs: ``bench/attention.py --part
precision`` measured the extra error of the bfloat16 path at 0.8% / 1.7% (median / max over
16 peaked queries, 4k tokens, Llama-3-8B shapes, dense; sparse 0.02% / 0.05%) of the
compression error of the attention output. These tests allow 3x the largest measured share,
5%, on a smaller layer whose energy spreads past the float32 lead channels,
for every case the path serves: dense and sparse, 16-bit and latent values, exact key tokens,
softcap, and keys kept by an earlier dense call.

``precision="float16"`` (float32 products over float16-rounded keys, for CPUs without native
bfloat16) is held to the same bound: on this file's layer its share measured 0.2-1.4% against
bfloat16's 0.2-3.4% (docs/attention.md, round 11).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_attention import structured_keys
from test_latent_values import latent_config, structured_values

from svdq import CodecConfig, InvalidInputError, RopeConfig, apply_rope, compress
from svdq import attention as attention_module
from svdq.attention import (
    KEPT_FLOAT16_KEYS,
    KEPT_FLOAT32_KEYS,
    KEPT_KEYS,
    SparsityConfig,
    attend,
    select_precision,
)
from svdq.derived import DERIVED
from svdq.values import ValueConfig, compress_values

ROPE = RopeConfig(theta=500000.0)
TOKENS, KV_HEADS, HEAD_DIM, Q_HEADS = 600, 2, 128, 8
#: 3x the largest share of the compression error measured by bench/attention.py --part precision.
ALLOWED_SHARE = 0.05


@pytest.fixture
def budget():
    """A set attention-cache budget (as a server sets it), restored afterwards."""
    limit = DERIVED.limit_bytes
    DERIVED.clear()
    DERIVED.limit_bytes = 1 << 30
    yield DERIVED
    DERIVED.clear()
    DERIVED.limit_bytes = limit


def layer(exact_tokens=0, seed=0):
    """Post-RoPE keys whose energy spreads over ~48 latent channels (past the 32 kept in float32)."""
    pre = structured_keys(TOKENS, KV_HEADS, HEAD_DIM, seed=seed, rank=48)
    positions = torch.arange(TOKENS)
    post = apply_rope(pre, positions, ROPE)
    # 3 bits keep 48 latent channels at this length: 16 past the float32 lead, with energy.
    keys = compress(post.half(), CodecConfig(bits_per_element=3.0, group_size=32, exact_tokens=exact_tokens),
                    rope=ROPE, key_space="post_rope", positions=positions)
    assert keys.kept_bits.numel() > attention_module.FLOAT32_LEAD_CHANNELS
    return post, keys


def peaked_queries(post, count=6, seed=1):
    """Queries that point at one body key each (post-RoPE direction, varied sharpness) plus
    noise: aimed at a 16-bit sink or tail token they would measure no compression at all."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(8, TOKENS - 64, (count, Q_HEADS), generator=generator)
    heads = torch.arange(Q_HEADS) // (Q_HEADS // KV_HEADS)
    target = post[targets, heads[None, :]]
    norm = target.norm(dim=-1, keepdim=True)
    # The target's logit from 4 to 24 (a model's range), the noise's logits about +-2.
    peak = torch.linspace(4.0, 24.0, count)[:, None, None]
    noise = 2 * torch.randn(count, Q_HEADS, HEAD_DIM, generator=generator) / HEAD_DIM**0.5
    return (peak * target / norm + noise) * HEAD_DIM**0.5 / norm


def uncompressed_attention(queries, post, values, softcap=None):
    """float64 attention over the uncompressed keys and the values as stored (decompressed)."""
    from svdq.values import decompress_values

    dense = decompress_values(values, torch.float64)
    ratio = Q_HEADS // KV_HEADS
    scores = torch.einsum("bhd,shd->bhs", queries.double(), post.double().repeat_interleave(ratio, 1)) / math.sqrt(HEAD_DIM)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.einsum("bhs,shd->bhd", torch.softmax(scores, -1), dense.repeat_interleave(ratio, 1))


def shares(result, reference, exact):
    """Per query: |bfloat16 - float32| / |float32 - uncompressed| (relative L2 over [Hq, D])."""
    extra = (result.double() - reference.double()).flatten(1).norm(dim=1)
    compression = (reference.double() - exact).flatten(1).norm(dim=1)
    return extra / compression


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("sparse,value_kind,exact_tokens,softcap", [
    (False, "fp16", 0, None), (False, "latent", 0, None), (False, "fp16", 8, None), (False, "fp16", 0, 30.0),
    (True, "fp16", 0, None), (True, "latent", 8, 30.0),
])
def test_rounded_keys_error_is_a_small_share_of_the_compression_error(budget, sparse, value_kind, exact_tokens,
                                                                      softcap, precision):
    """bfloat16 (bfloat16 operands, float16-rounded keys) and float16 (float16-rounded float32
    reconstructions) against the float32 path, cold and with kept keys."""
    post, keys = layer(exact_tokens)
    assert keys.num_exact == exact_tokens
    raw_values = structured_values(TOKENS, KV_HEADS, HEAD_DIM, seed=3).half()
    values = compress_values(raw_values, latent_config() if value_kind == "latent" else ValueConfig())
    queries = peaked_queries(post)
    sparsity = SparsityConfig(keep_fraction=0.1, chunk_size=8, num_recent=32) if sparse else None
    exact = uncompressed_attention(queries, post, values, softcap)
    call = dict(sparsity=sparsity, softcap=softcap)
    reference = attend(queries, [keys] * 6, [values] * 6, precision="float32", **call)
    budget.limit_bytes = None  # no budget: nothing is kept, every call reconstructs
    cold = attend(queries, [keys] * 6, [values] * 6, precision=precision, **call)
    kept_name = KEPT_KEYS if precision == "bfloat16" else KEPT_FLOAT16_KEYS
    assert kept_name not in keys._cache
    budget.limit_bytes = 1 << 30
    for _ in range(2):  # dense calls keep the keys from the second on
        attend(queries[:1], [keys], [values], precision=precision)
    assert kept_name in keys._cache
    kept = attend(queries, [keys] * 6, [values] * 6, precision=precision, **call)
    # The same bits kept or cold: a result never depends on what the budget holds.
    assert torch.equal(kept.output, cold.output) and torch.equal(kept.lse, cold.lse)
    for result in (cold, kept):
        share = shares(result.output, reference.output, exact)
        assert (share <= ALLOWED_SHARE).all(), share
        # The rounding changes the output: the path under test really ran.
        assert (share > 0).all()
        # The log-sum-exp moves by the same small amount as the scores (|score| <= ~40 here).
        assert (result.lse - reference.lse).abs().max() < 0.02
        for ours, theirs in zip(result.stats, reference.stats, strict=True):
            assert ours == theirs  # same tokens attended, same bytes read


@pytest.mark.parametrize("small", [True, False], ids=["first-ask", "second-ask"])
def test_kept_keys_need_a_budget_with_room_and_are_charged_to_it(budget, monkeypatch, small):
    post, keys = layer()
    values = compress_values(structured_values(TOKENS, KV_HEADS, HEAD_DIM, seed=3).half())
    queries = peaked_queries(post, count=1)
    _, n_body = attention_module.body_range(keys)
    size = 2 * n_body * KV_HEADS * HEAD_DIM
    monkeypatch.setattr(budget, "first_ask_bytes", size if small else size - 1)
    attend(queries, [keys], [values], precision="float32")
    assert KEPT_KEYS not in keys._cache  # float32 keeps float32 keys, never these float16 ones
    before = budget.nbytes
    first = attend(queries, [keys], [values], precision="bfloat16")
    # Kept from the first call up to first_ask_bytes; larger, from the second call on: a
    # sequence attended once does not pay for building what costs it more than it saves.
    assert (KEPT_KEYS in keys._cache) == small
    second = attend(queries, [keys], [values], precision="bfloat16")
    assert torch.equal(second.output, first.output) and torch.equal(second.lse, first.lse)
    kept = keys._cache[KEPT_KEYS]
    assert kept.dtype == torch.float16 and kept.shape == (KV_HEADS, n_body, HEAD_DIM)
    assert budget.nbytes - before >= kept.numel() * 2
    again = attend(queries, [keys], [values], precision="bfloat16")
    # The same bits whether the keys were kept or reconstructed (cold and kept dot the same
    # float16-rounded keys): a result never depends on what the budget holds.
    assert torch.equal(again.output, first.output) and torch.equal(again.lse, first.lse)
    sparsity = SparsityConfig(keep_fraction=0.1, chunk_size=8, num_recent=32)
    sparse_kept = attend(queries, [keys], [values], sparsity=sparsity, precision="bfloat16")
    budget.clear()
    sparse_cold = attend(queries, [keys], [values], sparsity=sparsity, precision="bfloat16")
    assert torch.equal(sparse_cold.output, sparse_kept.output) and torch.equal(sparse_cold.lse, sparse_kept.lse)
    assert KEPT_KEYS not in keys._cache
    cold = attend(queries, [keys], [values], precision="bfloat16")
    assert torch.equal(cold.output, first.output) and torch.equal(cold.lse, first.lse)
    # A budget without room for them keeps none.
    other_post, other = layer(seed=5)
    budget.limit_bytes = 100_000  # less than the 295 kB they would take
    for _ in range(2):
        attend(peaked_queries(other_post, count=1), [other], [values], precision="bfloat16")
    assert KEPT_KEYS not in other._cache
    # Library use (no limit) keeps none either.
    budget.limit_bytes = None
    third_post, third = layer(seed=6)
    for _ in range(2):
        attend(peaked_queries(third_post, count=1), [third], [values], precision="bfloat16")
    assert KEPT_KEYS not in third._cache


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("value_kind", ["fp16", "latent"])
def test_float32_and_float16_keep_their_keys_and_give_the_same_bits(budget, monkeypatch, value_kind, precision):
    """Dense float32 calls keep their float32 rotated body keys (from the first call when they
    are at most ``first_ask_bytes``, here from the second), the
    exact tokens' own rotated rows written in; float16 calls keep the same reconstructions
    rounded to float16 (half the bytes, charged to the budget), the exact tokens dotted from
    their own float32 rows. A kept call gives the bits of a cold one (no budget, nothing
    kept), with or without exact tokens and for either value kind."""
    kept_name, dtype = (KEPT_FLOAT32_KEYS, torch.float32) if precision == "float32" else (
        KEPT_FLOAT16_KEYS, torch.float16)
    monkeypatch.setattr(budget, "first_ask_bytes", 0)  # a first call that keeps nothing, then one that does
    for exact_tokens in (0, 8):
        post, keys = layer(exact_tokens=exact_tokens, seed=7 + exact_tokens)
        assert keys.num_exact == exact_tokens
        raw_values = structured_values(TOKENS, KV_HEADS, HEAD_DIM, seed=3).half()
        values = compress_values(raw_values, latent_config() if value_kind == "latent" else ValueConfig())
        queries = peaked_queries(post, count=3)
        budget.limit_bytes = None  # library use: nothing kept, every call reconstructs
        cold = attend(queries, [keys] * 3, [values] * 3, precision=precision)
        assert kept_name not in keys._cache
        budget.limit_bytes = 1 << 30
        first = attend(queries, [keys] * 3, [values] * 3, precision=precision)
        assert kept_name not in keys._cache  # admitted on the second ask
        before, optional = budget.nbytes, budget.optional_bytes
        second = attend(queries, [keys] * 3, [values] * 3, precision=precision)
        kept_keys = keys._cache[kept_name]
        start, n_body = attention_module.body_range(keys)
        assert kept_keys.dtype == dtype and kept_keys.shape == (KV_HEADS, n_body, HEAD_DIM)
        # Charged to the budget as an optional tensor, at its own size (half float32's in float16;
        # latent values keep their own optional latent from the second call too).
        size = kept_keys.numel() * kept_keys.element_size()
        assert budget.nbytes - before >= size
        if value_kind == "fp16":
            assert budget.optional_bytes - optional == size
        others = {KEPT_KEYS, KEPT_FLOAT16_KEYS, KEPT_FLOAT32_KEYS} - {kept_name}
        assert not others & set(keys._cache)
        kept = attend(queries, [keys] * 3, [values] * 3, precision=precision)
        for result in (first, second, kept):
            assert torch.equal(result.output, cold.output) and torch.equal(result.lse, cold.lse)
        if precision == "float16":
            # float32's reconstructions, rounded: the kept keys are float32's kept keys in float16.
            budget.clear()
            for _ in range(2):
                attend(queries, [keys] * 3, [values] * 3, precision="float32")
            float32_keys = keys._cache[KEPT_FLOAT32_KEYS]
            body = torch.ones(n_body, dtype=torch.bool)
            body[attention_module._exact_body_index(keys)] = False
            assert torch.equal(kept_keys[:, body], float32_keys[:, body].half())
            exact = attend(queries, [keys] * 3, [values] * 3, precision="float32")
            assert not torch.equal(exact.output, kept.output)
            torch.testing.assert_close(kept.output, exact.output, atol=1e-3, rtol=0)
        elif exact_tokens:
            # The exact tokens are their own 16-bit rows, rotated, not their reconstruction.
            exact = attention_module._exact_body_index(keys)
            own = attention_module._full_rows_in_pair_order(keys, keys.exact_rows, exact)
            assert torch.equal(kept_keys[:, exact], own.transpose(0, 1))
        budget.clear()


def test_precision_default_override_and_bad_values(monkeypatch):
    monkeypatch.delenv("SVDQ_ATTENTION_PRECISION", raising=False)
    monkeypatch.setattr(attention_module, "_BF16_FAST", True)
    assert select_precision("cpu") == "bfloat16"
    assert select_precision("cuda") == "float32"
    monkeypatch.setattr(attention_module, "_BF16_FAST", False)
    assert select_precision("cpu") == "float32"  # emulated bfloat16 would be slower
    monkeypatch.setenv("SVDQ_ATTENTION_PRECISION", "bfloat16")
    assert select_precision("cpu") == "bfloat16"
    assert select_precision("cpu", "float32") == "float32"
    monkeypatch.setenv("SVDQ_ATTENTION_PRECISION", "fp8")
    with pytest.raises(InvalidInputError, match="SVDQ_ATTENTION_PRECISION must be one of"):
        select_precision("cpu")
    monkeypatch.delenv("SVDQ_ATTENTION_PRECISION")
    post, keys = layer()
    values = compress_values(structured_values(TOKENS, KV_HEADS, HEAD_DIM, seed=3).half())
    with pytest.raises(InvalidInputError,
                       match=r"precision must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'"):
        attend(peaked_queries(post, count=1), [keys], [values], precision="float64")


@pytest.mark.parametrize("precision", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("exact_tokens,chunk_size,count,rope", [
    (0, 8, 1, ROPE), (8, 8, 1, ROPE), (8, 1, 1, ROPE), (8, 4, 6, ROPE),
    (8, 8, 1, RopeConfig(theta=10000.0, style="interleaved", rotary_dim=64)),
])
def test_sparse_calls_give_the_same_bits_with_kept_keys_and_without(budget, monkeypatch, exact_tokens, chunk_size,
                                                                    count, rope, precision):
    """A sparse call gathers its selected keys from the keys a dense call of its precision kept
    (bfloat16: float16-rounded; float32: the float32 keys, exact tokens' rows written in), or,
    with none kept, reconstructs them (and rounds them the same way): the same output and
    lse bits either way (exact tokens, single-token selections, a chunk of queries whose
    selections are reconstructed as one union, interleaved partial RoPE), so that a result never
    depends on what the attention cache holds."""
    pre = structured_keys(TOKENS, KV_HEADS, HEAD_DIM, seed=4, rank=48)
    positions = torch.arange(TOKENS)
    post = apply_rope(pre, positions, rope)
    keys = compress(post.half(), CodecConfig(bits_per_element=3.0, group_size=32, exact_tokens=exact_tokens),
                    rope=rope, key_space="post_rope", positions=positions)
    assert keys.num_exact == exact_tokens
    values = compress_values(structured_values(TOKENS, KV_HEADS, HEAD_DIM, seed=3).half())
    queries = peaked_queries(post, count=count)
    sparsity = SparsityConfig(keep_fraction=0.05, chunk_size=chunk_size, num_recent=16)
    # Kept keys are gathered a few (query, head) selections at a time: several chunks here.
    monkeypatch.setattr(attention_module, "GATHER_ROWS", 64)
    reconstructions = []
    original = attention_module._reconstructed_rows
    monkeypatch.setattr(attention_module, "_reconstructed_rows",
                        lambda *args: reconstructions.append(1) or original(*args))
    kept_name = {"bfloat16": KEPT_KEYS, "float16": KEPT_FLOAT16_KEYS, "float32": KEPT_FLOAT32_KEYS}[precision]
    budget.limit_bytes = None  # nothing kept: the selected keys are reconstructed
    cold = attend(queries, [keys] * count, [values] * count, sparsity=sparsity, precision=precision)
    assert kept_name not in keys._cache and reconstructions == [1]
    budget.limit_bytes = 1 << 30
    for _ in range(2):  # dense calls keep the keys from the second on
        attend(queries[:1], [keys], [values], precision=precision)
    assert kept_name in keys._cache
    kept = attend(queries, [keys] * count, [values] * count, sparsity=sparsity, precision=precision)
    assert reconstructions == [1]  # gathered from the kept keys, nothing reconstructed
    assert cold.stats == kept.stats and kept.stats[0].tokens_attended < TOKENS // 2  # really sparse
    assert torch.equal(kept.output, cold.output) and torch.equal(kept.lse, cold.lse)
    if precision == "float32":
        return
    # float32 rounds nothing: it differs from both, by the rounding only.
    exact = attend(queries, [keys] * count, [values] * count, sparsity=sparsity, precision="float32")
    assert not torch.equal(exact.output, kept.output)
    torch.testing.assert_close(exact.output, kept.output, atol=2e-2, rtol=0)
