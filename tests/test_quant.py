"""Quantization and bit packing on small tensors."""

import numpy as np
import pytest
import torch

import svdq.attention as attention_module
import svdq.codec as codec_module
import svdq.quant as quant_module
from svdq.allocation import allocate_budget
from svdq.errors import InvalidInputError
from svdq.quant import (
    CPU_BFLOAT16_ENV,
    TABLE_CHANNELS,
    cpu_bfloat16_is_fast,
    cpu_bfloat16_speedup,
    cpu_bfloat16_summary,
    dequantize_by_channel,
    dequantize_groups,
    distortion_table,
    group_bytes,
    pack_codes,
    quantize_groups,
    unpack_codes,
)


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_pack_unpack_every_width(width, group_size):
    kept_bits = torch.full((5,), width, dtype=torch.int64)
    codes = torch.randint(0, 2**width, (3, group_size, 5), dtype=torch.uint8)
    rows = pack_codes(codes, kept_bits)
    assert rows.shape == (3, group_bytes(kept_bits, group_size)) == (3, 5 * group_size * width // 8)
    assert torch.equal(unpack_codes(rows, kept_bits, group_size), codes)


@pytest.mark.parametrize("group_size", [8, 64])
def test_unpack_over_several_blocks_of_groups_with_mixed_widths(group_size):
    """More groups than one unpack block holds (the last block partial): every code back."""
    from svdq.quant import UNPACK_TOKENS

    kept_bits = torch.tensor([8, 3, 1, 7, 5, 2, 6, 4, 3, 3], dtype=torch.int64)
    groups = UNPACK_TOKENS // group_size * 2 + 3
    codes = (torch.randint(0, 256, (groups, group_size, kept_bits.numel()),
                           generator=torch.Generator().manual_seed(1)) % (2**kept_bits)).to(torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, kept_bits), kept_bits, group_size), codes)


@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("groups", [1, 5, 70])
def test_dequantize_by_channel_is_the_unpacked_dequantized_latent_transposed_bit_for_bit(group_size, groups):
    """Every width 1..8, out of order, each several times; more groups than one chunk holds
    (the last chunk partial) at 70 groups of 32 or 64 tokens; written into a strided view, the
    rest of the buffer untouched (NaN)."""
    generator = torch.Generator().manual_seed(group_size + groups)
    kept_bits = torch.tensor([2, 7, 1, 8, 1, 3, 6, 4, 5, 1, 2, 8, 3, 7, 5, 6, 4], dtype=torch.int64)
    kept = kept_bits.numel()
    codes = (torch.randint(0, 256, (groups, group_size, kept), generator=generator) % (2**kept_bits)).to(torch.uint8)
    scales = (torch.rand(groups, kept, generator=generator) * 0.1).half().float()
    mins = torch.randn(groups, kept, generator=generator).half().float()
    rows = pack_codes(codes, kept_bits)
    buffer = torch.full((kept + 3, groups * group_size + 5), float("nan"))
    out = buffer[1:kept + 1, 2:2 + groups * group_size]
    assert dequantize_by_channel(rows, kept_bits, group_size, scales, mins, out) is out
    unpacked = unpack_codes(rows, kept_bits, group_size)
    expected = torch.addcmul(mins[:, None], unpacked.float(), scales[:, None])  # [groups, group_size, r]
    assert torch.equal(out, expected.reshape(-1, kept).T)
    assert torch.equal(out, dequantize_groups(codes, scales.half(), mins.half()).reshape(-1, kept).T)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[1:kept + 1, 2:2 + groups * group_size] = False
    assert bool(buffer[outside].isnan().all())


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


def test_interleaved_widths_pack_as_one_lsb_first_bit_stream_per_channel():
    # Widths out of order (an allocation need not be monotone), every width 1..8, two groups.
    generator = torch.Generator().manual_seed(5)
    kept_bits = torch.tensor([2, 7, 1, 8, 1, 3, 6, 4, 5, 1, 2, 8, 3], dtype=torch.int64)
    codes = (torch.randint(0, 256, (2, 16, 13), generator=generator) % (2**kept_bits)).to(torch.uint8)
    rows = pack_codes(codes, kept_bits)
    for group in range(2):
        expected = bytearray()
        for channel, width in enumerate(kept_bits.tolist()):
            stream = sum(int(code) << (width * token) for token, code in enumerate(codes[group, :, channel]))
            expected += stream.to_bytes(16 * width // 8, "little")
        assert bytes(rows[group].tolist()) == bytes(expected)


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


def test_distortion_table_is_the_error_of_quantize_groups_at_every_width():
    # The table shares the group ranges across widths; it must still measure exactly what
    # quantize_groups and dequantize_groups then store, bit for bit.
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(5, 16, 7, generator=generator) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0, 3])
    latent[2, :, 6] = 0.5  # a constant channel in one group
    table = distortion_table(latent)
    assert table.shape == (7, 9) and table.dtype == torch.float64
    assert torch.equal(table[:, 0], latent.pow(2).sum(dim=(0, 1)).double())
    for width in range(1, 9):
        codes, scales, mins = quantize_groups(latent, torch.full((7,), width))
        error = (dequantize_groups(codes, scales, mins) - latent).pow(2).sum(dim=(0, 1)).double()
        assert torch.equal(table[:, width], error), width


def test_distortion_table_measures_many_channels_a_chunk_at_a_time():
    # Past TABLE_CHANNELS the table is measured chunk by chunk: every channel's error is still
    # that of quantize_groups (to float32 summation order), and a chunk's rows are what the
    # chunk alone gives.
    generator = torch.Generator().manual_seed(4)
    channels = TABLE_CHANNELS + 37
    latent = torch.randn(6, 16, channels, generator=generator) * torch.exp(-torch.arange(channels) / 90.0)
    table = distortion_table(latent)
    assert table.shape == (channels, 9)
    assert torch.equal(table[TABLE_CHANNELS:], distortion_table(latent[:, :, TABLE_CHANNELS:].contiguous()))
    torch.testing.assert_close(table[:, 0], latent.double().pow(2).sum(dim=(0, 1)), rtol=1e-6, atol=0)
    for width in range(1, 9):
        codes, scales, mins = quantize_groups(latent, torch.full((channels,), width))
        error = (dequantize_groups(codes, scales, mins).double() - latent.double()).pow(2).sum(dim=(0, 1))
        torch.testing.assert_close(table[:, width], error, rtol=1e-5, atol=0)


def test_distortion_table_refuses_latent_beyond_the_float16_metadata_range():
    with pytest.raises(InvalidInputError, match="float16"):
        distortion_table(torch.tensor([0.0, 1e6]).reshape(1, 2, 1))


def _greedy_reference(table, budget_bits, bits_per_width, channel_metadata_bits):
    """The allocator's rule spelled out plainly: every step re-derives every channel's options
    and takes the first best ratio among the affordable ones."""
    table = table.numpy()
    widths = np.arange(9)
    cost = widths * bits_per_width + np.where(widths > 0, channel_metadata_bits, 0)
    chosen = np.zeros(table.shape[0], dtype=np.int64)
    spent = 0.0
    while True:
        best, best_ratio = None, -np.inf
        for row in range(table.shape[0]):
            for width in range(chosen[row] + 1, 9):
                extra = cost[width] - cost[chosen[row]]
                gain = table[row, chosen[row]] - table[row, width]
                if extra <= budget_bits - spent and gain > 0 and gain / max(extra, 1e-9) > best_ratio:
                    best, best_ratio = (row, width), gain / max(extra, 1e-9)
        if best is None:
            return torch.from_numpy(chosen)
        spent += cost[best[1]] - cost[chosen[best[0]]]
        chosen[best[0]] = best[1]


@pytest.mark.parametrize("seed", range(12))
def test_allocate_budget_matches_the_plain_greedy_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    channels = int(torch.randint(1, 24, (1,), generator=generator))
    energy = 10 ** (4 * torch.rand(channels, generator=generator).double())
    table = energy[:, None] * 4.0 ** -torch.arange(9).double() * (1 + 0.3 * torch.rand(channels, 9, generator=generator).double())
    table[:, 0] = energy
    if seed % 3 == 0:
        table = table.round()  # ties between channels
    if seed % 4 == 1:
        table[:, 4:] = table[:, 4:5]  # widths past 4 gain nothing
    bits_per_width = int(torch.randint(1, 64, (1,), generator=generator))
    metadata = int(torch.randint(0, 200, (1,), generator=generator))
    budget = float(torch.rand(1, generator=generator)) * channels * 9 * (bits_per_width + metadata)
    expected = _greedy_reference(table, budget, bits_per_width, metadata)
    assert torch.equal(allocate_budget(table, budget, bits_per_width, metadata), expected)


def test_allocate_budget_with_no_budget_keeps_nothing():
    table = torch.tensor([[4.0, 1.0] + [0.5] * 7])
    assert allocate_budget(table, -5.0, 8, 0).tolist() == [0]
    assert allocate_budget(table, 0.0, 8, 0).tolist() == [0]


def _greedy_reference_vectorised(table, budget_bits, bits_per_width, channel_metadata_bits):
    """The same plain rule as _greedy_reference, every option of every channel re-derived at
    each step, in numpy so that tables of hundreds of channels stay quick."""
    table = table.numpy()
    widths = np.arange(9)
    cost = (widths * bits_per_width + np.where(widths > 0, channel_metadata_bits, 0)).astype(np.float64)
    chosen = np.zeros(table.shape[0], dtype=np.int64)
    rows = np.arange(table.shape[0])
    spent = 0.0
    while True:
        extra = cost[None, :] - cost[chosen][:, None]
        gain = table[rows, chosen][:, None] - table
        usable = (widths[None, :] > chosen[:, None]) & (gain > 0) & (extra <= budget_bits - spent)
        ratio = np.where(usable, gain / np.maximum(extra, 1e-9), -np.inf)
        row, width = divmod(int(np.argmax(ratio)), 9)
        if ratio[row, width] == -np.inf:
            return torch.from_numpy(chosen)
        spent += float(extra[row, width])
        chosen[row] = width


@pytest.mark.parametrize("seed", range(16))
def test_allocate_budget_matches_the_plain_greedy_rule_on_large_and_nonconvex_tables(seed):
    # The allocator orders every channel's steps once instead of stepping; on measured
    # quantization errors (spectra that decay, heavy-tailed ones) and on error curves that
    # are not convex in the width (the greedy then jumps widths), and over budgets from
    # nothing to everything, it must still choose what the step-by-step rule chooses.
    generator = torch.Generator().manual_seed(seed)
    channels = int(torch.randint(100, 400, (1,), generator=generator))
    kind = seed % 4
    if kind == 0:
        latent = torch.randn(8, 32, channels, generator=generator) * torch.exp(-torch.arange(channels) / 40.0)
        table = distortion_table(latent)
    elif kind == 1:
        latent = torch.rand(4, 64, channels, generator=generator) ** 3 * 10 ** (3 * torch.rand(channels, generator=generator))
        table = distortion_table(latent)
    elif kind == 2:  # decreasing but not convex
        scale = 10 ** (3 * torch.rand(channels, 1, generator=generator).double())
        table = torch.rand(channels, 9, generator=generator).double().sort(dim=1, descending=True).values * scale
    else:  # not even decreasing, with ties
        table = (5 * torch.rand(channels, 9, generator=generator).double()).round()
    bits_per_width = int(torch.randint(1, 512, (1,), generator=generator))
    metadata = int(torch.randint(0, 3000, (1,), generator=generator))
    for share in (0.0, 0.05, 0.3, 1.0, 10.0):
        budget = share * channels * (4 * bits_per_width + metadata)
        expected = _greedy_reference_vectorised(table, budget, bits_per_width, metadata)
        assert torch.equal(allocate_budget(table, budget, bits_per_width, metadata), expected), share


def test_the_vectorised_reference_is_the_plain_rule():
    generator = torch.Generator().manual_seed(5)
    table = (10 * torch.rand(20, 9, generator=generator).double()).round()
    for budget in (0.0, 50.0, 400.0, 5000.0):
        assert torch.equal(_greedy_reference_vectorised(table, budget, 7, 30), _greedy_reference(table, budget, 7, 30))


def test_allocate_budget_takes_a_step_that_rounds_above_the_one_before_it_right_after_it():
    # Channel 1's errors fall by the same amount at widths 1 and 2, but in float64 its second
    # step's ratio comes out one ulp above its first. The greedy takes the first step only
    # after channel 0 (whose one step has that higher ratio), so with two steps' worth of
    # budget channel 1 ends at width 1; ordering its second step by its own ratio would
    # spend the budget on it (width 2) instead.
    d0, d1, d2 = 1.0655445815182092, 0.7751835746703206, 0.484822567822432
    assert (d0 - d1) / 3 < (d1 - d2) / 3 and (d0 - d1) / 3 >= (d0 - d2) / 6
    table = torch.tensor([[d1] + [d2] * 8, [d0, d1] + [d2] * 7], dtype=torch.float64)
    assert _greedy_reference(table, 6.0, 3, 0).tolist() == [1, 1]
    assert allocate_budget(table, 6.0, 3, 0).tolist() == [1, 1]


def test_cpu_bfloat16_products_only_where_they_measure_faster(monkeypatch):
    # The ISA flags do not tell the speed (an AVX512-BF16 Xeon without AMX ran bfloat16
    # products at half the float32 rate): "auto" goes by the measured ratio, a near tie to
    # float32; the environment pins it; a CPU that emulates bfloat16 never uses it.
    monkeypatch.delenv(CPU_BFLOAT16_ENV, raising=False)
    monkeypatch.setattr(codec_module, "_CPU_BF16_PRODUCTS", None)
    monkeypatch.setattr(attention_module, "_BF16_FAST", None)
    monkeypatch.delenv("SVDQ_ATTENTION_PRECISION", raising=False)
    monkeypatch.setattr(quant_module, "cpu_bfloat16_is_native", lambda: True)
    for speedup, fast in ((0.5, False), (1.1, False), (3.0, True)):
        monkeypatch.setattr(quant_module, "cpu_bfloat16_speedup", lambda speedup=speedup: speedup)
        assert cpu_bfloat16_is_fast() is fast
        # the codec's cheap products and attention's default precision follow it
        assert codec_module._bfloat16_products(torch.device("cpu")) is fast
        assert attention_module.select_precision("cpu") == ("bfloat16" if fast else "float32")
        assert f"measured {speedup:.2f}x" in cpu_bfloat16_summary()
    assert codec_module._bfloat16_products(torch.device("cuda"))  # the GPU always
    monkeypatch.setenv(CPU_BFLOAT16_ENV, "off")
    assert not cpu_bfloat16_is_fast()
    monkeypatch.setattr(quant_module, "cpu_bfloat16_speedup", lambda: 0.5)
    monkeypatch.setenv(CPU_BFLOAT16_ENV, " On ")
    assert cpu_bfloat16_is_fast() and "products on ($SVDQ_CPU_BFLOAT16)" in cpu_bfloat16_summary()

    def never_timed():
        raise AssertionError("emulated bfloat16 must not be timed")

    monkeypatch.setattr(quant_module, "cpu_bfloat16_is_native", lambda: False)
    monkeypatch.setattr(quant_module, "cpu_bfloat16_speedup", never_timed)
    assert not cpu_bfloat16_is_fast()  # "on" cannot make emulation native
    monkeypatch.delenv(CPU_BFLOAT16_ENV)
    assert not cpu_bfloat16_is_fast() and "not native" in cpu_bfloat16_summary()
    monkeypatch.setenv(CPU_BFLOAT16_ENV, "yes")
    with pytest.raises(InvalidInputError, match=r"SVDQ_CPU_BFLOAT16 must be one of \('auto', 'on', 'off'\), got 'yes'"):
        cpu_bfloat16_is_fast()


def test_cpu_bfloat16_speedup_is_measured_where_bfloat16_is_native():
    speedup = cpu_bfloat16_speedup()
    if not quant_module.cpu_bfloat16_is_native():
        assert speedup is None
    else:
        assert 0.0 < speedup < float("inf")
        assert cpu_bfloat16_speedup() == speedup  # once per process
        # measured on one torch thread, and torch's thread count put back afterwards
        threads = torch.get_num_threads()
        assert 0.0 < cpu_bfloat16_speedup.__wrapped__() < float("inf")
        assert torch.get_num_threads() == threads
