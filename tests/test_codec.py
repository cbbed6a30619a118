"""SVDq codec on small synthetic tensors: round trips, budgets, append, bad input.

Quality on real keys is measured by bench/quality.py; random low-rank keys here only check
that the machinery is right.
"""

from dataclasses import replace

import pytest
import torch

import svdq.codec as codec_module
from svdq import (
    CodecConfig,
    InvalidInputError,
    RopeConfig,
    append,
    apply_rope,
    compress,
    decompress,
    fit_layer_basis,
    from_bytes,
    relative_error,
    to_bytes,
)
from svdq.codec import (
    GRAM_CHUNK,
    LOW_PRECISION_MAX_WIDTH,
    _projected_chunks,
    compress_prepared,
    compress_restored,
    finish_quantized,
    gram,
    prepare,
    quantize_prepared,
    quantized_nbytes,
    restored_quantized,
)
from svdq.quant import pack_codes, quantize_groups

ROPE = RopeConfig(theta=10000.0)


def _project(centred, basis_columns, kept_bits, low_precision):
    """float32 [tokens, r]: every chunk of the codec's projection at once."""
    return torch.cat(list(_projected_chunks(centred, basis_columns, kept_bits, low_precision)))

def layer_keys(tokens=300, heads=3, head_dim=16, seed=0, dtype=torch.float32):
    """Pre-RoPE keys with a fast-decaying spectrum and a large mean, like real key caches."""
    gen = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    decay = torch.exp(-torch.arange(channels) / 4.0)
    mixing = torch.linalg.qr(torch.randn(channels, channels, generator=gen))[0]
    latent = torch.randn(tokens, channels, generator=gen) * decay * 4
    mean = torch.randn(channels, generator=gen) * 3
    return (latent @ mixing.T + mean).reshape(tokens, heads, head_dim).to(dtype)


def test_svdq_round_trip_pre_rope_and_size_accounting():
    keys = layer_keys()
    compressed = compress(keys, CodecConfig(bits_per_element=3.0, group_size=32, num_sinks=4))
    blob = to_bytes(compressed)
    assert len(blob) == compressed.nbytes
    assert compressed.bits_per_element == pytest.approx(8 * len(blob) / keys.numel())
    assert compressed.bits_per_element <= 3.0
    assert compressed.compression_ratio == pytest.approx(2 * keys.numel() / len(blob))
    restored = decompress(compressed)
    assert restored.shape == keys.shape and restored.dtype == keys.dtype
    assert relative_error(keys, restored) < 0.05
    # sinks and the incomplete trailing group are kept in float16
    torch.testing.assert_close(restored[:4], keys[:4], rtol=1e-3, atol=1e-2)
    tail = (300 - 4) % 32
    torch.testing.assert_close(restored[-tail:], keys[-tail:], rtol=1e-3, atol=1e-2)


def test_more_bits_give_less_error():
    keys = layer_keys(tokens=600)
    errors = [relative_error(keys, decompress(compress(keys, CodecConfig(bits_per_element=b)))) for b in (1.0, 2.0, 4.0)]
    assert errors[0] > errors[1] > errors[2]


def test_post_rope_input_is_stored_pre_rope_and_returned_in_either_space():
    pre = layer_keys()
    positions = torch.arange(100, 400)
    post = apply_rope(pre, positions, ROPE)
    compressed = compress(post, CodecConfig(bits_per_element=4.0), positions=positions, rope=ROPE,
                          key_space="post_rope")
    assert compressed.stored_space == "pre_rope"
    from_pre = compress(pre, CodecConfig(bits_per_element=4.0), positions=positions, rope=ROPE)
    # Undoing RoPE is exact, so both inputs compress to the same latent representation.
    assert relative_error(decompress(from_pre, "pre_rope"), decompress(compressed, "pre_rope")) < 1e-3
    assert relative_error(post, decompress(compressed)) < 0.02
    assert relative_error(pre, decompress(compressed, "pre_rope")) < 0.02


def test_explicit_positions_and_bfloat16_round_trip_through_bytes():
    keys = layer_keys(dtype=torch.bfloat16)
    positions = torch.randperm(5000)[:300]
    compressed = compress(keys, positions=positions, rope=ROPE, key_space="post_rope")
    assert torch.equal(compressed.token_positions(), positions)
    loaded = from_bytes(to_bytes(compressed))
    assert torch.equal(decompress(loaded), decompress(compressed))
    assert decompress(loaded).dtype == torch.bfloat16
    assert torch.equal(loaded.token_positions(), positions)


def test_schedule_sets_widths_by_equal_channel_groups():
    keys = layer_keys(heads=2, head_dim=16)
    compressed = compress(keys, CodecConfig(schedule=(8, 4, 2, 1, 1, 0, 0, 0), group_size=16))
    assert compressed.channel_bits.tolist() == [8] * 4 + [4] * 4 + [2] * 4 + [1] * 8 + [0] * 12


def test_budget_allocation_favours_leading_channels():
    compressed = compress(layer_keys(tokens=2000), CodecConfig(bits_per_element=1.5))
    bits = compressed.channel_bits.tolist()
    assert bits[0] >= bits[len(bits) // 2] and bits[-1] == 0
    assert compressed.bits_per_element <= 1.5


def test_baselines_share_the_layout():
    keys = layer_keys()
    kivi = compress(keys, CodecConfig(method="kivi", bits=2, group_size=32, num_sinks=0))
    # 9 groups of 32 tokens at 2 bits + 32 bits of scale and min per group, 12 tail tokens in
    # float16, header and checksum
    expected = (288 * 3 + 12 * 16) / 300
    assert expected < kivi.bits_per_element < expected + 0.05
    assert len(to_bytes(kivi)) == kivi.nbytes
    passthrough = compress(keys, CodecConfig(method="fp16"))
    assert passthrough.num_groups == 0
    assert 16.0 < passthrough.bits_per_element < 16.1
    torch.testing.assert_close(decompress(passthrough), keys, rtol=1e-3, atol=1e-3)
    assert relative_error(keys, decompress(from_bytes(to_bytes(kivi)))) < 0.3


def test_append_equals_compressing_at_once_with_the_same_basis_and_widths():
    keys = layer_keys(tokens=333)
    positions = torch.arange(333)
    post = apply_rope(keys, positions, ROPE)
    basis = fit_layer_basis(layer_keys(tokens=500, seed=1))
    config = CodecConfig(schedule=(8, 4, 2, 1, 0, 0), group_size=16, num_sinks=4)
    kwargs = dict(rope=ROPE, key_space="post_rope", basis=basis)
    whole = compress(post, config, positions=positions, **kwargs)
    state = compress(post[:2], config, positions=positions[:2], **kwargs)  # shorter than the sinks
    for start, stop in [(2, 3), (3, 40), (40, 41), (41, 200), (200, 333)]:
        state = append(state, post[start:stop])
    assert state.num_tokens == 333 and state.num_groups == whole.num_groups
    assert to_bytes(state) == to_bytes(whole)


def test_append_leaves_the_original_untouched_and_checks_shapes():
    keys = layer_keys()
    compressed = compress(keys)
    before = to_bytes(compressed)
    grown = append(compressed, layer_keys(tokens=70, seed=3))
    assert to_bytes(compressed) == before
    assert grown.num_tokens == 370
    with pytest.raises(InvalidInputError, match="kv_heads=3, head_dim=16"):
        append(compressed, torch.zeros(5, 2, 16))
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        append(compressed, torch.full((5, 3, 16), float("nan")))


def test_shared_basis_is_referenced_not_stored():
    keys = layer_keys()
    basis = fit_layer_basis(layer_keys(tokens=800, seed=5))
    own = compress(keys, CodecConfig(schedule=(4, 2, 1, 0)))
    shared = compress(keys, CodecConfig(schedule=(4, 2, 1, 0)), basis=basis)
    assert shared.nbytes < own.nbytes - 2 * 48 * 24  # no [C, r] float16 basis
    blob = to_bytes(shared)
    with pytest.raises(Exception, match="shared basis"):
        from_bytes(blob)
    other = fit_layer_basis(layer_keys(tokens=800, seed=6))
    with pytest.raises(Exception, match="needs the shared basis"):
        from_bytes(blob, basis=other)
    assert torch.equal(decompress(from_bytes(blob, basis=basis)), decompress(shared))


def test_short_sequences_stay_full_precision():
    keys = layer_keys(tokens=10)
    compressed = compress(keys, CodecConfig(group_size=64))
    assert compressed.num_groups == 0
    torch.testing.assert_close(decompress(compressed), keys, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: compress(torch.zeros(10, 48)), "shape \\[tokens, kv_heads, head_dim\\]"),
        (lambda: compress(torch.zeros(0, 3, 16)), "at least one token"),
        (lambda: compress(torch.zeros(10, 3, 16, dtype=torch.float64)), "float16, bfloat16 or float32"),
        (lambda: compress(torch.zeros(10, 3, 16, dtype=torch.int32)), "float16, bfloat16 or float32"),
        (lambda: compress(torch.tensor([[[float("inf"), 0.0]]])), "NaN or Inf"),
        (lambda: compress(torch.zeros(10, 3, 15)), "even head_dim"),
        (lambda: compress(torch.zeros(10, 3, 16), key_space="post_rope"), "need a rope description"),
        (lambda: compress(torch.zeros(10, 3, 16), key_space="rotated"), "key_space must be one of"),
        (lambda: compress(torch.zeros(10, 3, 16), positions=torch.arange(9)), "one entry per token"),
        (lambda: compress(torch.zeros(10, 3, 16), positions=torch.arange(10) - 5), ">= 0"),
        (lambda: CodecConfig(bits_per_element=0), "bits_per_element must be in"),
        (lambda: CodecConfig(bits_per_element=17), "bits_per_element must be in"),
        (lambda: CodecConfig(group_size=48), "group_size must be one of"),
        (lambda: CodecConfig(method="zip"), "method must be one of"),
        (lambda: CodecConfig(schedule=(9, 1)), "schedule widths"),
        (lambda: CodecConfig(method="kivi", bits=0), "bits must be in 1..8"),
        (lambda: CodecConfig(num_sinks=-1), "num_sinks"),
    ],
)
def test_bad_input_raises_a_typed_error_that_says_what_is_allowed(make, message):
    with pytest.raises(InvalidInputError, match=message):
        make()


@pytest.fixture
def native_bfloat16(monkeypatch):
    """The codec's bfloat16 products as on a CPU that multiplies bfloat16 natively (this one
    may emulate them: slow, but the same rounding)."""
    monkeypatch.setattr(codec_module, "_CPU_BF16_PRODUCTS", True)


@pytest.mark.parametrize("tokens, channels", [(70, 48), (3000, 256), (2100, 600)])
def test_gram_is_the_covariance_to_bfloat16_rounding(tokens, channels, native_bfloat16):
    rows = torch.randn(tokens, channels, generator=torch.Generator().manual_seed(channels)) + 0.5
    product = gram(rows)
    exact = rows.double().T @ rows.double()
    assert product.dtype == torch.float32 and torch.equal(product, product.T)
    error = float((product.double() - exact).norm() / exact.norm())
    assert error < 2.0**-8  # bfloat16 epsilon: the inputs and every entry rounded once
    if tokens > GRAM_CHUNK:
        # the chunks' roundings are independent: their sum errs less than one bfloat16 product
        single = (rows.bfloat16().T @ rows.bfloat16()).double()
        assert error < 0.8 * float((single - exact).norm() / exact.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_non_finite_keys_are_refused_in_every_dtype_and_space(dtype, bad, key_space):
    # The scan runs on the codec's float32 copy (after un-rotating post-RoPE keys).
    keys = layer_keys(tokens=80, dtype=dtype)
    keys[41, 2, 5] = bad
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        compress(keys, rope=ROPE, key_space=key_space)


def test_float16_keys_past_the_float16_range_after_unrotating_keep_bfloat16_storage():
    keys = layer_keys(tokens=80, dtype=torch.float16)
    keys[1, 0, 0] = keys[1, 0, 8] = 65000.0  # a rotate-half pair: un-rotating position 1 reaches ~89k
    compressed = compress(keys, rope=ROPE, key_space="post_rope")
    assert compressed.storage_dtype == torch.bfloat16
    assert torch.isfinite(decompress(compressed, dtype=torch.float32)).all()


@pytest.mark.parametrize("shared", [False, True])
def test_compress_stores_the_quantized_projection_of_every_group(shared):
    # Long enough that the allocation samples some groups (more than 2048 / 8 of them): the
    # sampled groups' latent is reused and the others are projected; both must be what a
    # plain projection of the whole body quantizes to.
    keys = layer_keys(tokens=2300, dtype=torch.float16)
    basis = fit_layer_basis(layer_keys(tokens=500, seed=1)) if shared else None
    compressed = compress(keys, CodecConfig(group_size=8), basis=basis)
    assert compressed.num_groups > 2048 // 8
    body = keys.float().reshape(2300, -1)[compressed.num_sinks:compressed.num_sinks + 8 * compressed.num_groups]
    latent = _project(body - compressed.mean, compressed.basis, compressed.kept_bits, True)
    codes, scales, mins = quantize_groups(latent.reshape(compressed.num_groups, 8, -1), compressed.kept_bits)
    assert torch.equal(compressed.scales, scales) and torch.equal(compressed.mins, mins)
    assert torch.equal(compressed.codes, pack_codes(codes, compressed.kept_bits))


def test_projection_is_float32_for_wide_channels_and_bfloat16_close_for_narrow_ones(native_bfloat16):
    generator = torch.Generator().manual_seed(3)
    centred = torch.randn(300, 48, generator=generator)
    basis = torch.linalg.qr(torch.randn(48, 48, generator=generator))[0][:, :10].to(torch.float16)
    widths = torch.tensor([8, 6, 5, 4, 4, 3, 2, 1, 1, 1])
    wide = widths > LOW_PRECISION_MAX_WIDTH
    exact = centred @ basis.float()
    latent = _project(centred, basis, widths, True)
    assert torch.equal(latent[:, wide], centred @ basis[:, wide].float())
    assert not torch.equal(latent[:, ~wide], exact[:, ~wide])  # the bfloat16 products did run
    # Each narrow value within bfloat16 rounding (inputs and result) of the float32 product,
    # far below the 1/15-of-the-range step of a 4-bit channel.
    scale = (centred.abs() @ basis.float().abs())[:, ~wide]
    assert ((latent[:, ~wide] - exact[:, ~wide]).abs() <= 2.0**-7 * scale).all()
    # Without low precision: float32 throughout, the product with the basis padded with zero
    # columns to a multiple of 8 (small products may then differ from the plain one in the
    # last bits, as a product's layout may: within float32 rounding).
    padded = torch.cat([basis.float(), torch.zeros(48, 6)], dim=1)
    float32 = _project(centred, basis, widths, False)
    assert torch.equal(float32, (centred @ padded)[:, :10])
    assert torch.allclose(float32, exact, rtol=0, atol=1e-5 * float(scale.max()))


@pytest.mark.parametrize(("tokens", "channels", "kept"), [(1100, 600, 37), (64, 257, 8), (2048, 512, 511)])
def test_float32_covariance_blocks_and_padded_projection_keep_the_plain_products_bits(monkeypatch, tokens,
                                                                                      channels, kept):
    # The float32 covariance is computed from the blocks on and above its diagonal, mirrored:
    # exactly symmetric and as close to float64 as the plain product (the same bits where
    # MKL blocks over the tokens alone, as on the AVX2 EPYC; not on every CPU: an AVX-512
    # Xeon's differ in last bits). The projection's basis padded with zero columns to a
    # multiple of 8 must give the plain product's bits (an append projects as a compress).
    monkeypatch.setattr(codec_module, "_CPU_BF16_PRODUCTS", False)
    generator = torch.Generator().manual_seed(channels)
    rows = torch.randn(tokens, channels, generator=generator) * torch.linspace(3, 0.1, channels)
    assert channels > codec_module.GRAM_BLOCK
    blocked, plain, exact = gram(rows), rows.T @ rows, rows.double().T @ rows.double()
    assert torch.equal(blocked, blocked.T)

    def error(product):
        return float((product.double() - exact).norm() / exact.norm())

    assert error(blocked) <= 1.05 * error(plain) + 1e-9 and error(blocked) < 1e-6
    basis = torch.randn(channels, kept, generator=generator).to(torch.float16)
    widths = torch.ones(kept, dtype=torch.int64)
    assert torch.equal(_project(rows, basis, widths, True), torch.cat(
        [chunk @ basis.float() for chunk in rows.split(GRAM_CHUNK)]))


def test_a_cpu_that_emulates_bfloat16_runs_every_codec_product_in_float32(monkeypatch):
    # Emulated bfloat16 matmuls run far below the float32 rate, so there the cheap products
    # (covariance, error-table sample, narrow channels' projection) stay float32.
    monkeypatch.setattr(codec_module, "_CPU_BF16_PRODUCTS", False)
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(2100, 96, generator=generator)
    assert torch.equal(gram(rows), rows.T @ rows)
    basis = torch.linalg.qr(torch.randn(96, 96, generator=generator))[0][:, :12].to(torch.float16)
    widths = torch.tensor([8, 5, 4, 4, 3, 2, 2, 1, 1, 1, 1, 1])
    assert torch.equal(_project(rows, basis, widths, True), torch.cat(
        [chunk @ basis.float() for chunk in rows.split(GRAM_CHUNK)]))
    # compress then is the float32 codec: its blob differs from the native-bfloat16 one only
    # by that rounding, at the same size.
    keys = layer_keys(tokens=2300, dtype=torch.float16)
    emulating = compress(keys, CodecConfig(group_size=8))
    monkeypatch.setattr(codec_module, "_CPU_BF16_PRODUCTS", True)
    native = compress(keys, CodecConfig(group_size=8))
    assert emulating.nbytes == native.nbytes and torch.equal(emulating.kept_bits, native.kept_bits)
    assert relative_error(keys, decompress(emulating)) <= 1.01 * relative_error(keys, decompress(native))


def test_append_fills_a_group_of_a_sequence_that_kept_no_channel():
    # 32 tokens in groups of 32 leave no quantized group after the sinks, so compress keeps no
    # latent channel; the group an append fills is then projected on an empty basis.
    keys = layer_keys(tokens=40, dtype=torch.float16)
    compressed = compress(keys[:32], CodecConfig(bits_per_element=2.0, group_size=32))
    assert compressed.kept_bits.numel() == 0 and compressed.num_groups == 0
    longer = append(compressed, keys[32:])
    assert longer.num_tokens == 40 and longer.num_groups == 1 and longer.codes.shape == (1, 0)
    assert longer.nbytes == len(to_bytes(longer))


def test_kivi_quantizes_the_keys_own_channels_and_decompresses_without_a_basis_product():
    from svdq.quant import dequantize_groups, unpack_codes

    keys = layer_keys(tokens=4 + 3 * 32 + 5, heads=2, head_dim=16)
    compressed = compress(keys, CodecConfig(method="kivi", bits=2, group_size=32))
    body = keys.reshape(keys.shape[0], -1)[4:100].to(torch.float16).float().reshape(3, 32, -1)
    codes, scales, mins = quantize_groups(body, compressed.kept_bits)
    assert torch.equal(compressed.codes, pack_codes(codes, compressed.kept_bits))
    assert torch.equal(compressed.scales, scales) and torch.equal(compressed.mins, mins)
    restored = decompress(from_bytes(to_bytes(compressed)))
    expected = dequantize_groups(unpack_codes(compressed.codes, compressed.kept_bits, 32), scales, mins)
    assert torch.equal(restored[4:100].reshape(3, 32, -1), expected)
    assert torch.equal(restored[100:], keys[100:].to(torch.float16).float())
    grown = append(compress(keys[:40], CodecConfig(method="kivi", bits=2, group_size=32)), keys[40:])
    assert to_bytes(grown) == to_bytes(compressed)  # appended groups quantize the same channels


@pytest.mark.parametrize("method", ["svdq", "kivi", "fp16"])
@pytest.mark.parametrize("tokens", [3, 300])
def test_prepared_keys_compress_to_the_bytes_of_compress_under_every_budget(method, tokens):
    post = apply_rope(layer_keys(tokens), torch.arange(tokens) + 5, ROPE)
    arguments = {"positions": torch.arange(tokens) + 5, "rope": ROPE, "key_space": "post_rope"}
    shared = fit_layer_basis(layer_keys(400, seed=1)) if method == "svdq" else None
    base = {"svdq": CodecConfig(bits_per_element=2.0, exact_tokens=2, exact_share=0.125, exact_bits=2),
            "kivi": CodecConfig(method="kivi", bits=2), "fp16": CodecConfig(method="fp16")}[method]
    configs = [replace(base, bits_per_element=bits) for bits in (1.0, 3.0, 1.5)] if method == "svdq" else [base]
    if method == "svdq":
        configs.append(replace(base, bits_per_element=None, schedule=(4, 2, 0)))
    for basis in (None, shared) if method == "svdq" else (None,):
        prepared = prepare(post, base, basis=basis, **arguments)
        for config in configs:  # in turns, twice: what one compress leaves does not change the next
            for _ in range(2):
                assert to_bytes(compress_prepared(prepared, config)) == \
                    to_bytes(compress(post, config, basis=basis, **arguments))
    with pytest.raises(InvalidInputError, match="only the bit budget may differ"):
        compress_prepared(prepare(post, base, **arguments), replace(base, num_sinks=0))


def test_the_reconstruction_that_chose_the_exact_tokens_decompresses_to_the_same_bits():
    post = apply_rope(layer_keys(300), torch.arange(300), ROPE)
    prepared = prepare(post, CodecConfig(exact_tokens=3, exact_bits=4), rope=ROPE, key_space="post_rope",
                       positions=torch.arange(300))
    compressed, body = compress_restored(prepared, CodecConfig(bits_per_element=2.0, exact_tokens=3, exact_bits=4))
    assert body.shape == (compressed.num_groups * compressed.group_size, 48)
    for space in ("pre_rope", "post_rope"):
        assert torch.equal(decompress(compressed, space, torch.float32, body=body),
                           decompress(compressed, space, torch.float32))
    with pytest.raises(InvalidInputError, match=r"body must be the \[\d+, 48\] reconstruction"):
        decompress(compressed, body=body[1:])
    assert compress_restored(prepared, CodecConfig(bits_per_element=2.0, exact_bits=16))[1] is None  # no exact tokens


@pytest.mark.parametrize("exact", [CodecConfig(bits_per_element=2.0, exact_tokens=3, exact_bits=4),
                                   CodecConfig(bits_per_element=2.0, exact_tokens=3),
                                   CodecConfig(bits_per_element=2.0)])
@pytest.mark.parametrize("basis", [False, True])
def test_an_unpacked_candidate_restores_and_stores_what_compress_gives(exact, basis):
    # compress_kv scores every candidate split from quantize_prepared before packing it:
    # its reconstruction must be decompress's, bit for bit, and its finished blob compress's.
    post = apply_rope(layer_keys(300), torch.arange(300) + 2, ROPE)
    arguments = {"positions": torch.arange(300) + 2, "rope": ROPE, "key_space": "post_rope"}
    shared = fit_layer_basis(layer_keys(400, seed=1)) if basis else None
    prepared = prepare(post, exact, basis=shared, **arguments)
    for bits in (1.0, 2.5):
        config = replace(exact, bits_per_element=bits)
        expected = compress(post, config, basis=shared, **arguments)
        for space in ("pre_rope", "post_rope"):
            quantized = quantize_prepared(prepared, config, restore=True)
            assert torch.equal(restored_quantized(prepared, quantized, space),
                               decompress(expected, space, torch.float32))
        assert to_bytes(finish_quantized(prepared, quantized)) == to_bytes(expected)
        assert quantized_nbytes(prepared, quantized) == expected.nbytes  # compress_kv packs only its winner
    # Pre-RoPE keys with a rope: the angles are computed when a candidate is first rotated.
    pre = prepare(layer_keys(300), exact, positions=torch.arange(300) + 2, rope=ROPE, basis=shared)
    quantized = quantize_prepared(pre, config, restore=True)
    expected = compress(layer_keys(300), config, positions=torch.arange(300) + 2, rope=ROPE, basis=shared)
    for _ in range(2):
        assert torch.equal(restored_quantized(pre, quantized, "post_rope"), decompress(expected, "post_rope", torch.float32))
    if exact.exact_tokens == 0:  # without exact tokens nothing reconstructs the body unasked
        with pytest.raises(InvalidInputError, match="restore=True"):
            restored_quantized(prepared, quantize_prepared(prepared, config), "post_rope")
