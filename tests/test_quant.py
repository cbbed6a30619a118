"""Quantization and bit packing on small tensors."""

import pytest
import torch

from svdq.quant import dequantize_groups, group_bytes, pack_codes, quantize_groups, unpack_codes


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_pack_unpack_every_width(width, group_size):
    kept_bits = torch.full((5,), width, dtype=torch.int64)
    codes = torch.randint(0, 2**width, (3, group_size, 5), dtype=torch.uint8)
    rows = pack_codes(codes, kept_bits)
    assert rows.shape == (3, group_bytes(kept_bits, group_size)) == (3, 5 * group_size * width // 8)
    assert torch.equal(unpack_codes(rows, kept_bits, group_size), codes)


def test_mixed_widths_layout_is_lsb_first_channel_after_channel():
    kept_bits = torch.tensor([3, 1, 8, 5], dtype=torch.int64)
    codes = (torch.randint(0, 256, (2, 8, 4)) % (2**kept_bits)).to(torch.uint8)
    rows = pack_codes(codes, kept_bits)
    assert torch.equal(unpack_codes(rows, kept_bits, 8), codes)
    # Channel 0 (3 bits) fills bytes 0..2; token t sits at bits [3t, 3t+3) LSB-first.
    stream = int.from_bytes(bytes(rows[0, :3].tolist()), "little")
    assert [(stream >> (3 * t)) & 7 for t in range(8)] == codes[0, :, 0].tolist()
    # Channel 2 (8 bits) starts after 3 + 1 bytes and stores one code per byte.
    assert rows[1, 4:12].tolist() == codes[1, :, 2].tolist()


@pytest.mark.parametrize("width", range(1, 9))
def test_quantization_error_is_bounded_by_half_a_step(width):
    latent = torch.randn(4, 32, 6) * torch.tensor([0.01, 1, 10, 100, 1000, 3])
    kept_bits = torch.full((6,), width, dtype=torch.int64)
    codes, scales, mins = quantize_groups(latent, kept_bits)
    assert int(codes.max()) <= 2**width - 1
    error = (dequantize_groups(codes, scales, mins) - latent).abs()
    # half a step, plus float16 rounding of the minimum
    bound = scales.float()[:, None, :] / 2 + mins.float().abs()[:, None, :] * 2**-10 + 1e-6
    assert bool((error <= bound).all())


def test_constant_channel_reconstructs_exactly():
    latent = torch.full((2, 8, 3), 0.75)
    codes, scales, mins = quantize_groups(latent, torch.tensor([1, 4, 8]))
    assert torch.equal(dequantize_groups(codes, scales, mins), latent)
