"""Exact tokens of the key codec: the worst-reconstructed quantized tokens kept in 16-bit,
in the format (version 2), the budget, append, attention and the API conversions."""

from __future__ import annotations

import struct

import pytest
import torch
from helpers import allowed_mask, seal
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from test_attention import naive_attention, structured_keys

from svdq import CodecConfig, FormatError, RopeConfig, append, apply_rope, compress, decompress, from_bytes, to_bytes
from svdq.api.types import codec_from_pb, codec_to_pb
from svdq.attention import SparsityConfig, attend, body_range, select_body_tokens
from svdq.errors import InvalidInputError
from svdq.values import ValueConfig, compress_values, decompress_values

# Oracles at float32 tolerances: the float32 products (conftest.exact_attention).
pytestmark = pytest.mark.usefixtures("exact_attention")

ROPE = RopeConfig(theta=10000.0)
SCHEDULE = CodecConfig(schedule=(8, 4, 2, 1, 1, 0, 0, 0), group_size=16, num_sinks=4)


def rare_token_keys(tokens=203, outliers=(50, 120, 121, 190)):
    """Structured keys with a few tokens off the common subspace (what a needle looks like)."""
    pre = structured_keys(tokens, 3, 64)
    generator = torch.Generator().manual_seed(7)
    for index in outliers:
        pre[index] += 3.0 * torch.randn(3, 64, generator=generator)
    return apply_rope(pre, torch.arange(tokens), ROPE), pre


def test_the_worst_reconstructed_tokens_are_stored_exactly():
    keys, pre = rare_token_keys()
    plain = compress(keys, SCHEDULE, rope=ROPE, key_space="post_rope")
    exact = compress(keys, CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=4), rope=ROPE,
                     key_space="post_rope")
    error = (decompress(plain, "pre_rope", torch.float32) - pre).pow(2).sum(dim=(1, 2))
    start, n_body = body_range(plain)
    worst = torch.sort(torch.topk(error[start:start + n_body], 4).indices + start).values
    assert exact.exact_index.tolist() == worst.tolist()
    restored = decompress(exact, "pre_rope", torch.float32)
    # The exact rows are the 16-bit keys; every other token reconstructs as without them.
    assert torch.equal(restored[worst], pre[worst].reshape(4, -1).half().float().reshape(4, 3, 64))
    others = torch.ones(203, dtype=torch.bool)
    others[worst] = False
    assert torch.equal(restored[others], decompress(plain, "pre_rope", torch.float32)[others])
    assert exact.nbytes == plain.nbytes + 4 + 4 * (4 + 2 * 192)


def test_round_trip_through_bytes_and_version_byte():
    keys, _ = rare_token_keys()
    compressed = compress(keys, CodecConfig(bits_per_element=3.0, group_size=16, exact_tokens=5), rope=ROPE,
                          key_space="post_rope")
    blob = to_bytes(compressed)
    assert len(blob) == compressed.nbytes and blob[4] == 2
    loaded = from_bytes(blob)
    assert torch.equal(loaded.exact_index, compressed.exact_index)
    assert torch.equal(loaded.exact_rows, compressed.exact_rows)
    assert torch.equal(decompress(loaded, "post_rope"), decompress(compressed, "post_rope"))
    # Without exact tokens blobs stay version 1, which older readers accept.
    assert to_bytes(compress(keys, SCHEDULE, rope=ROPE, key_space="post_rope"))[4] == 1


def test_exact_tokens_are_paid_from_the_budget():
    pre = structured_keys(2048, 3, 64)
    for exact_tokens in (0, 16):
        compressed = compress(pre, CodecConfig(bits_per_element=1.5, exact_tokens=exact_tokens))
        assert compressed.num_exact == exact_tokens
        assert compressed.bits_per_element <= 1.5


def _rewrite(blob: bytes, at: int, fmt: str, value) -> bytes:
    data = bytearray(blob[:-4])
    struct.pack_into(fmt, data, at, value)
    return seal(data)


def test_bad_exact_sections_are_refused():
    keys, _ = rare_token_keys()
    compressed = compress(keys, CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=2), rope=ROPE,
                          key_space="post_rope")
    blob = to_bytes(compressed)
    # header 28 + rope 28 + widths 96, then the count and the indices
    count_at = 28 + 28 + 96
    assert struct.unpack_from("<I", blob, count_at)[0] == 2
    with pytest.raises(FormatError, match="exact tokens; allowed 1.."):
        from_bytes(_rewrite(blob, count_at, "<I", 0))
    with pytest.raises(FormatError, match="describe"):
        from_bytes(_rewrite(blob, count_at, "<I", 3))
    first, second = compressed.exact_index.tolist()
    with pytest.raises(FormatError, match="ascend strictly inside the quantized tokens"):
        from_bytes(_rewrite(blob, count_at + 4, "<I", second))  # not ascending
    with pytest.raises(FormatError, match="ascend strictly inside the quantized tokens"):
        from_bytes(_rewrite(blob, count_at + 4, "<I", 1))  # a sink
    with pytest.raises(FormatError, match="need method svdq and format version 2"):
        from_bytes(_rewrite(blob, 4, "<B", 1))


def test_append_keeps_the_exact_tokens_and_quantizes_new_groups_without_any():
    keys, _ = rare_token_keys(tokens=300)
    config = CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=3)
    first = compress(keys[:200], config, rope=ROPE, key_space="post_rope")
    grown = append(first, keys[200:])
    assert torch.equal(grown.exact_index, first.exact_index)
    # Tokens already quantized keep their reconstruction; the old tail is quantized now.
    start, n_body = body_range(first)
    assert torch.equal(decompress(grown, "post_rope")[:start + n_body], decompress(first, "post_rope")[:start + n_body])
    assert len(to_bytes(grown)) == grown.nbytes


@pytest.mark.parametrize("sparsity", [None, SparsityConfig(keep_fraction=0.25, chunk_size=8, num_recent=24)])
@pytest.mark.parametrize("queries_per_call", [1, 5])
def test_attention_reads_the_exact_rows(sparsity, queries_per_call):
    keys_post, _ = rare_token_keys(tokens=403, outliers=(40, 200, 201, 333))
    keys = compress(keys_post, CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=4), rope=ROPE,
                    key_space="post_rope")
    values = compress_values(torch.randn(403, 3, 64, generator=torch.Generator().manual_seed(2)).half(),
                             ValueConfig(bits=4, group_size=32))
    queries = torch.randn(queries_per_call, 6, 64, generator=torch.Generator().manual_seed(3))
    result = attend(queries, [keys] * queries_per_call, [values] * queries_per_call, sparsity=sparsity,
                    backend="torch")
    post = decompress(keys, "post_rope", torch.float32)
    dense_values = decompress_values(values, torch.float32)
    for b in range(queries_per_call):
        allowed = None
        if sparsity is not None:
            allowed = allowed_mask(select_body_tokens(queries[b], keys, sparsity), keys)
        expected, lse = naive_attention(queries[b], post, dense_values, 1 / 8, allowed)
        assert torch.allclose(result.output[b].double(), expected, atol=2e-5)
        assert torch.allclose(result.lse[b].double(), lse, atol=2e-5)
    plain = compress(keys_post, SCHEDULE, rope=ROPE, key_space="post_rope")
    plain_read = attend(queries[:1], [plain], [values]).stats[0].key_bytes_read
    if sparsity is None:
        assert result.stats[0].key_bytes_read == plain_read + 4 * (4 + 2 * 192)


def test_bad_exact_token_options():
    with pytest.raises(InvalidInputError, match="exact_tokens must be an integer in 0..1024"):
        CodecConfig(exact_tokens=-1)
    with pytest.raises(InvalidInputError, match="exact_tokens must be an integer in 0..1024"):
        CodecConfig(exact_tokens=2000)
    with pytest.raises(InvalidInputError, match="apply to method 'svdq' only"):
        CodecConfig(method="kivi", exact_tokens=4)
    with pytest.raises(InvalidInputError, match="exact_tokens and exact_share apply to keys only"):
        ValueConfig(codec=CodecConfig(exact_tokens=4))
    with pytest.raises(InvalidInputError, match="exact_share=0.125, allowed 0"):
        ValueConfig(codec=CodecConfig(exact_share=0.125))


def test_codec_message_carries_exact_tokens():
    config = CodecConfig(bits_per_element=2.0, exact_tokens=4)
    assert codec_from_pb(codec_to_pb(config, pb.Codec())) == config
    with pytest.raises(InvalidInputError, match="exact_tokens"):
        codec_from_pb(pb.Codec(method="svdq", exact_tokens=5000))
    corrected = CodecConfig(bits_per_element=2.0, exact_tokens=4, exact_share=0.125, exact_bits=4)
    assert codec_from_pb(codec_to_pb(corrected, pb.Codec())) == corrected
    with pytest.raises(InvalidInputError, match="exact_bits must be one of"):
        codec_from_pb(pb.Codec(method="svdq", exact_tokens=4, exact_bits=5))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_corrections_round_trip_as_version_3_and_count_every_byte(bits):
    keys, pre = rare_token_keys()
    config = CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=4, exact_bits=bits)
    compressed = compress(keys, config, rope=ROPE, key_space="post_rope")
    plain = compress(keys, SCHEDULE, rope=ROPE, key_space="post_rope")
    blob = to_bytes(compressed)
    assert blob[4] == 3 and len(blob) == compressed.nbytes
    # count, width, then per token: index, a float16 scale and minimum per head, 3 * 64 codes
    assert compressed.nbytes == plain.nbytes + 4 + 1 + 4 * (4 + 3 * 4 + 192 * bits // 8)
    loaded = from_bytes(blob)
    assert torch.equal(loaded.exact_rows, compressed.exact_rows) and to_bytes(loaded) == blob
    assert torch.equal(decompress(loaded, "post_rope"), decompress(compressed, "post_rope"))
    # The same worst tokens as 16-bit rows, reconstructed to within the correction's rounding
    # (each head's error shrinks by about the number of levels) and the rows' 16-bit rounding.
    index = compressed.exact_index
    assert index.tolist() == compress(keys, replace_bits(config, 16), rope=ROPE,
                                      key_space="post_rope").exact_index.tolist()
    before = (decompress(plain, "pre_rope", torch.float32)[index] - pre[index]).abs().amax(dim=2)
    after = (decompress(compressed, "pre_rope", torch.float32)[index] - pre[index]).abs().amax(dim=2)
    rounding = pre[index].abs().amax(dim=2) * 2.0 ** -10
    assert bool((after <= before / (2 ** bits - 1) + rounding).all())


def replace_bits(config: CodecConfig, bits: int) -> CodecConfig:
    from dataclasses import replace

    return replace(config, exact_bits=bits)


def test_exact_share_scales_the_count_with_the_sequence_and_stays_in_the_budget():
    config = CodecConfig(bits_per_element=2.0, group_size=16, exact_tokens=3, exact_share=0.05, exact_bits=4)
    assert config.exact_count(1000) == 50 and config.exact_count(20) == 3 and config.exact_count(2) == 2
    for tokens in (404, 2052):
        compressed = compress(structured_keys(tokens, 3, 64), config)
        assert compressed.num_exact == config.exact_count(tokens - 4)
        assert compressed.bits_per_element <= 2.0


def test_a_version_2_reader_refuses_corrections_by_the_version_byte():
    import svdq.format as fmt

    keys, _ = rare_token_keys()
    blob = to_bytes(compress(keys, CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=2,
                                               exact_bits=4), rope=ROPE, key_space="post_rope"))
    old = fmt.VERSION
    try:
        fmt.VERSION = 2
        with pytest.raises(FormatError, match="version 3 is newer than this reader"):
            from_bytes(blob)
    finally:
        fmt.VERSION = old


def test_bad_correction_sections_are_refused():
    keys, _ = rare_token_keys()
    blob = to_bytes(compress(keys, CodecConfig(schedule=SCHEDULE.schedule, group_size=16, exact_tokens=2,
                                               exact_bits=4), rope=ROPE, key_space="post_rope"))
    width_at = 28 + 28 + 96 + 4
    assert blob[width_at] == 4
    with pytest.raises(FormatError, match="exact correction width 3 in blob; allowed 8, 4, 2"):
        from_bytes(_rewrite(blob, width_at, "<B", 3))
    with pytest.raises(FormatError, match="exact corrections .flag bit6. need exact tokens .bit5. and format version 3"):
        from_bytes(_rewrite(blob, 4, "<B", 2))
    with pytest.raises(FormatError, match="describe"):
        from_bytes(_rewrite(blob, width_at, "<B", 8))
    # a scale of the correction that is not finite
    scales_at = width_at + 1 + 4 * 2
    with pytest.raises(FormatError, match="NaN or Inf in its exact correction scales"):
        from_bytes(_rewrite(blob, scales_at, "<H", 0x7C00))


def test_bad_exact_share_and_width_options():
    with pytest.raises(InvalidInputError, match=r"exact_share must be a fraction in \[0, 0.5\]"):
        CodecConfig(exact_share=0.6)
    with pytest.raises(InvalidInputError, match="exact_bits must be one of"):
        CodecConfig(exact_tokens=4, exact_bits=3)
    with pytest.raises(InvalidInputError, match="exact_bits=4 needs exact tokens"):
        CodecConfig(exact_bits=4)
    with pytest.raises(InvalidInputError, match="apply to method 'svdq' only"):
        CodecConfig(method="kivi", exact_share=0.1)
