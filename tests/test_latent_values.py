"""SVDq latent values: the key codec applied to values, their format, and attention that sums
latent codes instead of rebuilding values."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import torch
from helpers import seal
from test_attention import ROPE, make_case, naive_attention

from svdq import CodecConfig, compress, decompress, fit_basis, fit_layer_basis, to_bytes
from svdq.attention import SparsityConfig, attend
from svdq.errors import FormatError, InvalidInputError
from svdq.kv import CacheBudget, compress_kv
from svdq.values import (
    DEFAULT_VALUE_CODEC,
    ValueConfig,
    append_values,
    compress_values,
    decompress_values,
    gather_values,
    values_from_bytes,
    values_to_bytes,
)

# Oracles at float32 tolerances: the float32 products (conftest.exact_attention).
pytestmark = pytest.mark.usefixtures("exact_attention")


def structured_values(tokens, heads=3, head_dim=64, seed=0, rank=24):
    """Values with a slowly decaying spectrum (flatter than keys, as measured on SmolLM2)."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, rank, generator=generator) * torch.linspace(3, 0.5, rank)
    mixing = torch.randn(rank, heads * head_dim, generator=generator)
    noise = 0.1 * torch.randn(tokens, heads * head_dim, generator=generator)
    return (factors @ mixing + noise - 0.3).reshape(tokens, heads, head_dim)


def latent_config(bits=3.0, group_size=32, num_sinks=4):
    return ValueConfig(codec=CodecConfig(bits_per_element=bits, group_size=group_size, num_sinks=num_sinks))


def test_latent_values_are_the_key_codec_output_and_count_every_byte():
    values = structured_values(301)
    stored = compress_values(values, latent_config())
    same = compress(values, latent_config().codec)
    assert stored.method == "svdq" and stored.latent is not None
    assert torch.equal(stored.latent.codes, same.codes) and torch.equal(stored.latent.basis, same.basis)
    blob = values_to_bytes(stored)
    assert len(blob) == stored.nbytes == 18 + same.nbytes + 4
    assert abs(stored.bits_per_element - 8 * len(blob) / values.numel()) < 1e-12
    restored = values_from_bytes(blob)
    expected = decompress(same, dtype=torch.float32)
    assert torch.equal(decompress_values(restored, torch.float32), expected)
    assert torch.equal(gather_values(restored), expected.transpose(0, 1))
    index = torch.tensor([[0, 7, 300], [3, 3, 150], [299, 1, 2]])
    assert torch.equal(gather_values(restored, index), expected.transpose(0, 1)[torch.arange(3)[:, None], index])


def test_default_value_codec_is_svdq_weighing_noise_below_dropped_channels():
    assert DEFAULT_VALUE_CODEC.method == "svdq" and DEFAULT_VALUE_CODEC.noise_averaging > 1
    stored = compress_values(structured_values(4 + 64 * 20), ValueConfig(codec=DEFAULT_VALUE_CODEC))
    assert stored.bits_per_element <= DEFAULT_VALUE_CODEC.bits_per_element + 0.01


def test_append_latent_values_equals_compressing_at_once():
    values = structured_values(200)
    whole = compress(values, latent_config().codec)
    basis = fit_basis(values[4:4 + 32 * 4].reshape(128, -1))
    # Same basis and widths for both (as append keeps them): compress the prefix with the
    # basis the whole sequence would fit, then append the rest in uneven pieces.
    config = ValueConfig(codec=CodecConfig(schedule=(6, 4, 3, 2, 2, 1, 1, 0), group_size=32))
    at_once = compress_values(values, config, basis=basis)
    grown = compress_values(values[:37], config, basis=basis)
    for stop in (38, 101, 160, 200):
        grown = append_values(grown, values[grown.num_tokens:stop])
    assert values_to_bytes(grown) == values_to_bytes(at_once)
    assert whole.num_tokens == grown.num_tokens == 200


def test_shared_value_basis_stores_a_fingerprint_and_is_needed_to_read():
    calibration = structured_values(512, seed=5)
    basis = fit_basis(calibration.reshape(512, -1))
    values = structured_values(300, seed=6)
    own = compress_values(values, latent_config(2.0))
    shared = compress_values(values, latent_config(2.0), basis=basis)
    assert shared.latent.shared_basis == basis.fingerprint
    assert shared.nbytes <= own.nbytes + 64
    blob = values_to_bytes(shared)
    with pytest.raises(FormatError, match="shared basis"):
        values_from_bytes(blob)
    assert torch.equal(decompress_values(values_from_bytes(blob, basis=basis)), decompress_values(shared))


def test_version_1_blobs_still_read_and_version_2_bytes_are_checked():
    plain = compress_values(structured_values(40), ValueConfig(bits=4))
    blob = values_to_bytes(plain)
    assert blob[4] == 1  # older value formats keep version 1, which old readers accept
    assert torch.equal(decompress_values(values_from_bytes(blob)), decompress_values(plain))
    latent_blob = bytearray(values_to_bytes(compress_values(structured_values(90), latent_config())))
    assert latent_blob[4] == 2 and latent_blob[5] == 16

    newer = bytearray(latent_blob)
    newer[4] = 3
    with pytest.raises(FormatError, match="version 3 is not supported"):
        values_from_bytes(seal(newer[:-4]))
    as_v1 = bytearray(latent_blob)
    as_v1[4] = 1
    with pytest.raises(FormatError, match="allowed bits 0, 2, 4$"):
        values_from_bytes(seal(as_v1[:-4]))
    wrong_tokens = bytearray(latent_blob)
    wrong_tokens[8:12] = struct.pack("<I", 91)
    with pytest.raises(FormatError, match="latent holds 90"):
        values_from_bytes(seal(wrong_tokens[:-4]))
    truncated = bytearray(latent_blob[:40] + latent_blob[-4:])
    with pytest.raises(FormatError):
        values_from_bytes(seal(truncated[:-4]))
    corrupted = bytearray(latent_blob)
    corrupted[30] ^= 0xFF
    with pytest.raises(FormatError, match="checksum"):
        values_from_bytes(bytes(corrupted))


def test_latent_value_config_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="method 'svdq'"):
        ValueConfig(codec=CodecConfig(method="kivi"))
    with pytest.raises(InvalidInputError, match="not both"):
        ValueConfig(bits=2, codec=CodecConfig())
    with pytest.raises(InvalidInputError, match="CodecConfig"):
        ValueConfig(codec="svdq")
    with pytest.raises(InvalidInputError, match="only applies to SVDq latent"):
        compress_values(structured_values(10), ValueConfig(bits=4), basis=fit_basis(torch.randn(50, 192)))
    with pytest.raises(InvalidInputError, match="at least one token"):
        compress_values(torch.zeros(0, 3, 64), latent_config())
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        compress_values(torch.full((5, 3, 64), float("nan")), latent_config())
    stored = compress_values(structured_values(50), latent_config())
    with pytest.raises(InvalidInputError, match="heads=3, head_dim=64"):
        append_values(stored, torch.zeros(2, 3, 32))
    with pytest.raises(InvalidInputError, match="no fixed size per token"):
        _ = stored.token_bytes


def _case_with_latent_values(tokens, value_sinks, value_group, seed=0):
    keys, _ = make_case("svdq", tokens=tokens, key_space="post_rope", seed=seed)
    values = compress_values(structured_values(tokens, seed=seed + 3), latent_config(3.0, value_group, value_sinks))
    return keys, values


@pytest.mark.parametrize(("tokens", "value_sinks", "value_group"), [(203, 4, 32), (203, 0, 64), (150, 9, 16),
                                                                     (30, 4, 32)])
def test_attention_over_latent_values_matches_naive_attention_over_their_reconstruction(tokens, value_sinks,
                                                                                      value_group):
    # The values' sinks and groups differ from the keys' (4 sinks, groups of 16), so key body
    # tokens fall in the values' sinks, body and tail alike.
    keys, values = _case_with_latent_values(tokens, value_sinks, value_group)
    queries = torch.randn(3, 9, 64)
    result = attend(queries, [keys] * 3, [values] * 3, backend="torch")
    post = decompress(keys, key_space="post_rope", dtype=torch.float32)
    dense_values = decompress_values(values, torch.float32)
    for b in range(3):
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8)
        # float32 sums in another order than the float64 oracle: error relative to |values|.
        error = (result.output[b].double() - expected).abs().max() / dense_values.abs().max()
        assert error < 1e-5
        assert torch.allclose(result.lse[b].double(), lse, atol=2e-5)


@pytest.mark.parametrize(("tokens", "value_sinks", "value_group", "block", "mm_macs"),
                         [(203, 4, 32, 4096, 1 << 22), (150, 9, 16, 64, 1 << 22), (3000, 4, 32, 256, 1 << 22),
                          (203, 4, 32, 4096, 0), (3000, 4, 32, 256, 0)])
@pytest.mark.parametrize("small", [True, False], ids=["first-ask", "second-ask"])
def test_kept_latent_gives_the_same_bits_is_charged_to_the_budget_and_kept_while_there_is_room(
        monkeypatch, tokens, value_sinks, value_group, block, mm_macs, small):
    """Kept from the first call when it is at most ``DERIVED.first_ask_bytes``, else from the
    second; never without room or a budget; the same bits kept or not."""
    import svdq.attention as attention
    from svdq.attention import KEPT_LATENT, body_range, code_widths
    from svdq.derived import DERIVED

    monkeypatch.setattr(attention, "LATENT_SUM_BLOCK", block)  # several blocks, the last one short
    monkeypatch.setattr(attention, "LATENT_MM_MACS", mm_macs)  # 0: oneDNN's product at every shape
    keys, values = _case_with_latent_values(tokens, value_sinks, value_group)
    queries = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(5))
    n_body, channels = body_range(values.latent)[1], code_widths(values.latent)[0]
    step = min(block, n_body)
    blocks = -(-n_body // step)
    kept_bytes = 4 * blocks * step * (channels + 1)  # a row of ones carries the softmax mass
    monkeypatch.setattr(DERIVED, "first_ask_bytes", kept_bytes if small else kept_bytes - 1)

    def call():
        return attend(queries, [keys] * 3, [values] * 3, backend="torch")

    limit = DERIVED.limit_bytes
    try:
        DERIVED.clear()
        DERIVED.limit_bytes = None  # library use: nothing optional is kept
        cold = call()
        assert KEPT_LATENT not in values.latent._cache
        DERIVED.limit_bytes = DERIVED.nbytes + kept_bytes - 1  # one byte short of room
        short = [call(), call()]
        assert KEPT_LATENT not in values.latent._cache
        DERIVED.limit_bytes = 1 << 30
        before = DERIVED.nbytes
        first = call()
        # a larger tensor's first ask with room is only noted: a one-off call keeps nothing
        assert (KEPT_LATENT in values.latent._cache) == small
        if not small:
            before = DERIVED.nbytes
        second = call()
        kept = values.latent._cache[KEPT_LATENT]
        assert kept.dtype == torch.float32 and kept.shape == (blocks, channels + 1, step)
        assert DERIVED.nbytes - before >= kept_bytes
        again = call()
    finally:
        DERIVED.clear()
        DERIVED.limit_bytes = limit
    # kept or dequantized per call, the same products and sums: the same bits
    for result in (*short, first, second, again):
        assert torch.equal(result.output, cold.output) and torch.equal(result.lse, cold.lse)
    post = decompress(keys, key_space="post_rope", dtype=torch.float32)
    dense_values = decompress_values(values, torch.float32)
    for b in range(3):
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8)
        assert (cold.output[b].double() - expected).abs().max() / dense_values.abs().max() < 1e-5
        assert torch.allclose(cold.lse[b].double(), lse, atol=2e-5)


@pytest.mark.parametrize("value_sum", [None, "dense", "union", "gathered"])
@pytest.mark.parametrize("value_sinks", [0, 4, 12])
def test_sparse_attention_over_latent_values_matches_the_same_selection_over_16_bit_values(monkeypatch, value_sinks,
                                                                                          value_sum):
    import svdq.attention as attention

    # The cost rule's choice, and each way forced: the merged weights summed densely or over
    # the union of the selected tokens, the selected codes gathered.
    monkeypatch.setattr(attention, "SPARSE_LATENT_SUM", value_sum)
    keys, values = _case_with_latent_values(400, value_sinks, 32, seed=2)
    as_16_bit = compress_values(decompress_values(values, torch.float32))
    sparsity = SparsityConfig(keep_fraction=0.1, chunk_size=8, num_recent=16)
    for count in (1, 4):  # one query, and several queries of one sequence batched together
        queries = torch.randn(count, 9, 64, generator=torch.Generator().manual_seed(count))
        latent = attend(queries, [keys] * count, [values] * count, sparsity=sparsity, backend="torch")
        plain = attend(queries, [keys] * count, [as_16_bit] * count, sparsity=sparsity, backend="torch")
        assert latent.stats[0].tokens_attended < 400
        # as_16_bit rounds every reconstructed value to float16 (half an ulp, 2**-11 relative);
        # an output averages such values, so its error is bounded by the largest value's.
        largest = float(decompress_values(values, torch.float32).abs().max())
        assert torch.allclose(latent.output, plain.output, atol=2.0**-11 * largest, rtol=0)
        assert torch.allclose(latent.lse, plain.lse, atol=1e-5)


@pytest.mark.parametrize("value_sum", ["dense", "union"])
def test_sparse_latent_value_sums_give_the_same_bits_kept_or_cold(monkeypatch, value_sum):
    import svdq.attention as attention
    from svdq.attention import KEPT_LATENT, KEPT_LATENT_ROWS
    from svdq.derived import DERIVED

    if attention._CPU_LINEAR is None:
        pytest.skip("the latent is kept only where torch's CPU build has oneDNN (svdq.attention._CPU_LINEAR)")
    monkeypatch.setattr(attention, "SPARSE_LATENT_SUM", value_sum)
    keys, values = _case_with_latent_values(400, 4, 32, seed=2)
    sparsity = SparsityConfig(keep_fraction=0.1, chunk_size=8, num_recent=16)
    queries = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(7))

    def call():
        return attend(queries, [keys] * 2, [values] * 2, sparsity=sparsity, backend="torch")

    limit = DERIVED.limit_bytes
    try:
        DERIVED.clear()
        DERIVED.limit_bytes = None
        cold = call()
        DERIVED.limit_bytes = 1 << 30
        results = [call() for _ in range(3)]
        # The dense sum dots the kept channel-major latent; the union's sum gathers its tokens'
        # rows from the kept row-major one (dequantized every call before round 14).
        assert (KEPT_LATENT in values.latent._cache) == (value_sum == "dense")
        assert (KEPT_LATENT_ROWS in values.latent._cache) == (value_sum == "union")
    finally:
        DERIVED.clear()
        DERIVED.limit_bytes = limit
    for result in results:
        assert torch.equal(result.output, cold.output) and torch.equal(result.lse, cold.lse)


def test_the_sparse_value_sum_rule_gathers_few_tokens_of_a_long_body_and_sums_short_ones_densely():
    from svdq.attention import _dense_latent_sum_is_cheaper

    keys, values = _case_with_latent_values(4000, 4, 32)
    few, many = torch.zeros(1, 3, 8, dtype=torch.long), torch.zeros(1, 3, 1000, dtype=torch.long)
    assert not _dense_latent_sum_is_cheaper(values.latent, few, 3)
    assert _dense_latent_sum_is_cheaper(values.latent, many, 3)


def test_a_batch_mixing_latent_and_16_bit_values_answers_each_entry_as_alone():
    keys, latent = _case_with_latent_values(203, 4, 32)
    other_keys, other_values = make_case("svdq", tokens=150, seed=4, value_bits=None, rope=ROPE)
    queries = torch.randn(2, 9, 64)
    together = attend(queries, [keys, other_keys], [latent, other_values], backend="torch")
    alone = [attend(queries[b:b + 1], [k], [v], backend="torch")
             for b, (k, v) in enumerate([(keys, latent), (other_keys, other_values)])]
    for b in range(2):
        assert torch.allclose(together.output[b], alone[b].output[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One budget for keys and values (svdq.kv)

def _layer(tokens=900, seed=0):
    keys, _ = make_case("svdq", tokens=tokens, key_space="post_rope", seed=seed)
    post_keys = decompress(keys, key_space="post_rope", dtype=torch.float32)
    return post_keys, structured_values(tokens, seed=seed + 7)


def test_cache_budget_spends_the_total_bits_on_the_measured_best_split():
    keys, values = _layer()
    budget = CacheBudget(bits_per_element=2.0, key_shares=(0.25, 0.5), probe_queries=32)
    cache = compress_kv(keys, values, budget, positions=torch.arange(900), rope=ROPE, key_space="post_rope")
    assert set(cache.split_errors) == {0.25, 0.5}
    assert cache.key_share == min(cache.split_errors, key=cache.split_errors.get)
    assert cache.nbytes == len(values_to_bytes(cache.values)) + cache.keys.nbytes
    # Both codecs count every byte: the whole cache lands on the budget (900 tokens: small tails).
    assert cache.bits_per_element == pytest.approx(2.0, abs=0.05)
    # Keys that barely matter (a flat score: every probe attends almost uniformly) leave the
    # bits to values, and values of rank two (two latent channels hold them) leave them to keys.
    flat_keys = keys * 1e-3
    assert compress_kv(flat_keys, values, budget, positions=torch.arange(900), rope=ROPE,
                       key_space="post_rope").key_share == 0.25
    generator = torch.Generator().manual_seed(3)
    rank_two = (torch.randn(900, 2, generator=generator) @ torch.randn(2, 192, generator=generator)).reshape(900, 3, 64)
    sharp_keys = 2 * torch.randn(900, 3, 64, generator=generator)  # full rank: every key bit counts
    assert compress_kv(sharp_keys, rank_two, budget, positions=torch.arange(900), rope=ROPE,
                       key_space="post_rope").key_share == 0.5


def _compress_kv_one_by_one(keys, values, budget, key_basis=None, value_basis=None, **arguments):
    """compress_kv as it was before candidates shared their preparation: a plain compress and
    compress_values per candidate share, then the same probe error."""
    from svdq.kv import MIN_VALUE_BITS, _attention
    from svdq.rope import apply_rope

    candidates = []
    for share in budget.key_shares:
        key_config = replace(budget.key_codec, bits_per_element=2 * budget.bits_per_element * share)
        compressed_keys = compress(keys, key_config, basis=key_basis, **arguments)
        value_bits = max(2 * budget.bits_per_element - compressed_keys.bits_per_element, MIN_VALUE_BITS)
        value_config = ValueConfig(codec=replace(budget.value_codec, bits_per_element=value_bits))
        candidates.append((share, compressed_keys, compress_values(values, value_config, basis=value_basis)))
    positions = candidates[0][1].token_positions()
    reference_keys = apply_rope(keys.float(), positions, ROPE) if arguments["key_space"] == "pre_rope" \
        else keys.float()
    probe_index = torch.linspace(keys.shape[0] // 2, keys.shape[0] - 1,
                                 min(budget.probe_queries, keys.shape[0])).round().long().unique()
    probes, probe_positions = reference_keys[probe_index], positions[probe_index]
    reference = _attention(probes, reference_keys, values.float(), probe_positions, positions)
    energy = float(reference.double().pow(2).sum().clamp(min=1e-300))
    errors = {}
    for share, compressed_keys, compressed_values in candidates:
        output = _attention(probes, decompress(compressed_keys, "post_rope", dtype=torch.float32),
                            decompress_values(compressed_values, torch.float32), probe_positions, positions)
        errors[share] = float((output - reference).double().pow(2).sum()) / energy
    share = min(errors, key=errors.get)
    chosen = next(candidate for candidate in candidates if candidate[0] == share)
    return chosen[1], chosen[2], share, errors


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("shared", [False, True])
def test_compress_kv_stores_the_bytes_and_split_of_a_compress_per_candidate(key_space, shared):
    keys, values = _layer(1100, seed=2)
    if key_space == "pre_rope":
        keys = decompress(compress(keys, CodecConfig(method="fp16"), rope=ROPE, key_space="post_rope"), "pre_rope",
                          dtype=torch.float32)
    key_basis = value_basis = None
    if shared:
        calibration_keys, calibration_values = _layer(700, seed=5)
        key_basis = fit_layer_basis(calibration_keys, torch.arange(700), ROPE)
        value_basis = fit_basis(calibration_values.reshape(700, -1))
    arguments = {"positions": torch.arange(1100) + 3, "rope": ROPE, "key_space": key_space}
    budget = CacheBudget(bits_per_element=2.0, key_codec=CodecConfig(exact_tokens=4, exact_share=0.125, exact_bits=2))
    cache = compress_kv(keys, values, budget, key_basis=key_basis, value_basis=value_basis, **arguments)
    keys_alone, values_alone, share, errors = _compress_kv_one_by_one(keys, values, budget, key_basis, value_basis,
                                                                      **arguments)
    assert (cache.key_share, cache.split_errors) == (share, errors)
    assert len(set(errors.values())) == len(errors)  # the candidates differ: the choice is a real one
    assert to_bytes(cache.keys) == to_bytes(keys_alone)
    assert values_to_bytes(cache.values) == values_to_bytes(values_alone)


def test_keys_over_their_share_leave_the_values_less_and_the_whole_cache_on_the_budget():
    keys, values = _layer(2052)
    corrected = CodecConfig(exact_tokens=4, exact_share=0.5, exact_bits=4)
    budget = CacheBudget(bits_per_element=2.0, key_shares=(0.25,), key_codec=corrected)
    cache = compress_kv(keys, values, budget, positions=torch.arange(2052), rope=ROPE, key_space="post_rope")
    assert cache.keys.num_exact == 1024 and cache.keys.exact_bits == 4
    # 1024 corrections cost the keys more than their quarter of the budget; the values pay.
    assert cache.keys.bits_per_element > 2.0
    assert cache.values.bits_per_element == pytest.approx(4.0 - cache.keys.bits_per_element, abs=0.05)
    assert cache.bits_per_element <= 2.0 + 1e-3


def test_cache_budget_from_a_ratio_and_its_bad_inputs():
    assert CacheBudget.from_ratio(8).bits_per_element == 2.0
    with pytest.raises(InvalidInputError, match=">= 1"):
        CacheBudget.from_ratio(0.5)
    with pytest.raises(InvalidInputError, match=r"in \(0, 16"):
        CacheBudget(bits_per_element=0)
    with pytest.raises(InvalidInputError, match="fractions"):
        CacheBudget(key_shares=(0.0, 0.5))
    with pytest.raises(InvalidInputError, match="above 16"):
        CacheBudget(bits_per_element=12, key_shares=(0.8,))
    with pytest.raises(InvalidInputError, match="svdq CodecConfig"):
        CacheBudget(key_codec=CodecConfig(method="kivi"))
    with pytest.raises(InvalidInputError, match="probe_queries"):
        CacheBudget(probe_queries=0)
    keys, values = _layer(200)
    with pytest.raises(InvalidInputError, match="keys' shape"):
        compress_kv(keys, values[:100], CacheBudget(), rope=ROPE, key_space="post_rope")
