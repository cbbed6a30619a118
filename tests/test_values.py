"""Value store: 16-bit passthrough and 2/4-bit per-token quantization, bytes, append, format."""

from __future__ import annotations

import pytest
import torch

from svdq.errors import FormatError, InvalidInputError
from svdq.quant import pack_codes
from svdq.quant import pack_rows as pack_value_codes
from svdq.quant import unpack_rows as unpack_value_codes
from svdq.values import (
    ValueConfig,
    append_values,
    compress_values,
    decompress_values,
    gather_values,
    values_from_bytes,
    values_to_bytes,
)


def _values(tokens=37, heads=3, head_dim=64, dtype=torch.float16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, heads, head_dim, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_values_are_kept_exactly(dtype):
    values = _values(dtype=dtype)
    stored = compress_values(values)
    assert stored.data.dtype == dtype
    assert torch.equal(decompress_values(stored), values)
    assert stored.nbytes == len(values_to_bytes(stored))
    assert stored.nbytes == 2 * values.numel() + 18 + 4


def test_float32_values_overflowing_float16_are_stored_as_bfloat16():
    values = _values(dtype=torch.float32) * 1e5
    stored = compress_values(values)
    assert stored.data.dtype == torch.bfloat16
    assert torch.isfinite(decompress_values(stored).float()).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_quantized_values_error_is_bounded_by_half_a_step(bits, group_size):
    values = _values(dtype=torch.float32)
    stored = compress_values(values, ValueConfig(bits=bits, group_size=group_size))
    restored = decompress_values(stored, torch.float32)
    step = stored.scales.float().repeat_interleave(group_size, dim=-1)
    assert ((restored - values).abs() <= step / 2 + 1e-3 * values.abs() + 1e-6).all()
    assert stored.codes.shape == (37, 3, 64 * bits // 8)
    # Honest bytes: codes + fp16 scale and min per group, header and checksum.
    expected = 37 * 3 * (64 * bits // 8 + 4 * (64 // group_size)) + 18 + 4
    assert stored.nbytes == expected == len(values_to_bytes(stored))
    assert stored.compression_ratio == pytest.approx(2 * values.numel() / expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_value_code_layout_is_the_quant_module_layout(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    ours = pack_value_codes(codes, bits)
    # svdq.quant packs [groups, group_size, channels]: one channel of 64 "tokens" per row.
    theirs = pack_codes(codes[:, :, None], torch.tensor([bits]))
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_value_codes(ours, bits), codes)


@pytest.mark.parametrize("bits", [None, 2, 4])
def test_append_equals_compressing_everything_at_once(bits):
    values = _values(tokens=50)
    config = ValueConfig(bits=bits, group_size=32)
    first = compress_values(values[:31], config)
    before = values_to_bytes(first)
    grown = append_values(first, values[31:])
    assert values_to_bytes(grown) == values_to_bytes(compress_values(values, config))
    assert values_to_bytes(first) == before  # the input state is not modified
    assert grown.num_tokens == 50


@pytest.mark.parametrize("bits", [None, 4])
def test_gather_values_picks_tokens_per_head(bits):
    values = _values(tokens=20)
    stored = compress_values(values, ValueConfig(bits=bits, group_size=32))
    full = decompress_values(stored, torch.float32)
    index = torch.tensor([[0, 5, 19], [3, 3, 1], [7, 8, 9]])
    picked = gather_values(stored, index)
    for head in range(3):
        assert torch.allclose(picked[head], full[index[head], head])
    assert torch.allclose(gather_values(stored), full.transpose(0, 1))
    shared = torch.tensor([19, 0, 4])  # the same tokens for every head
    assert torch.equal(gather_values(stored, shared), gather_values(stored, shared.expand(3, -1)))


@pytest.mark.parametrize("bits", [None, 2])
def test_round_trip_through_bytes(bits):
    stored = compress_values(_values(dtype=torch.bfloat16), ValueConfig(bits=bits, group_size=16))
    loaded = values_from_bytes(values_to_bytes(stored))
    assert torch.equal(decompress_values(loaded).float(), decompress_values(stored).float())
    assert loaded.bits == bits


def test_corrupted_truncated_and_foreign_blobs_are_rejected():
    blob = values_to_bytes(compress_values(_values(), ValueConfig(bits=4)))
    flipped = bytearray(blob)
    flipped[40] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        values_from_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="truncated|checksum"):
        values_from_bytes(blob[:-9])
    with pytest.raises(FormatError, match="magic"):
        values_from_bytes(b"SVDQ" + blob[4:])
    with pytest.raises(FormatError, match="shorter"):
        values_from_bytes(b"SV")


def test_bad_inputs_name_the_field():
    with pytest.raises(InvalidInputError, match="bits"):
        ValueConfig(bits=3)
    with pytest.raises(InvalidInputError, match="group_size"):
        ValueConfig(bits=4, group_size=48)
    with pytest.raises(InvalidInputError, match="divide head_dim"):
        compress_values(_values(head_dim=48), ValueConfig(bits=4, group_size=32))
    with pytest.raises(InvalidInputError, match="shape"):
        compress_values(torch.zeros(4, 64))
    with pytest.raises(InvalidInputError, match="dtype"):
        compress_values(torch.zeros(4, 2, 8, dtype=torch.int32))
    bad = _values()
    bad[3, 1, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        compress_values(bad)
    stored = compress_values(_values())
    with pytest.raises(InvalidInputError, match="heads=3"):
        append_values(stored, torch.zeros(2, 2, 64))
    assert stored.num_tokens == 37  # a rejected append leaves the state untouched
