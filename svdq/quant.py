"""Per-channel asymmetric quantization over token groups, and bit packing.

Layout of one quantized token group (``group_size`` tokens, ``r`` kept channels):

* ``scales[g, j]`` and ``mins[g, j]`` (float16): the group's step and minimum for kept
  channel ``j``; a value is reconstructed as ``code * scale + min``.
* ``codes[g, :]`` (uint8 row of ``group_bytes`` bytes): the kept channels one after
  another in latent order; channel ``j`` with width ``b_j`` takes ``group_size * b_j / 8``
  bytes starting at byte ``channel_offsets[j]``. Inside a channel's bytes token ``t`` of the
  group occupies bits ``[t * b_j, (t + 1) * b_j)`` counted LSB-first across the bytes, so a
  code may straddle two bytes when ``b_j`` is 3, 5, 6 or 7.

``group_size`` is a multiple of 8, so every channel's segment is a whole number of bytes
and a new group is appended as one more row.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from .errors import InvalidInputError


def cpu_bfloat16_is_native() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU with its own instructions (AVX512-BF16 or
    AMX): a capability, not a speed (:func:`cpu_bfloat16_is_fast`). Elsewhere torch emulates
    bfloat16 matmuls, far slower than float32: 70x at 2048 x 1024 x 1024 on an AVX2-only AMD
    EPYC, where the codec's bfloat16 products made compress ~4x slower; and oneDNN raises for
    a bfloat16 linear there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Environment variable that decides whether the CPU codec and attention use bfloat16
#: products (:func:`cpu_bfloat16_is_fast`): ``auto`` (default), ``on`` or ``off``.
CPU_BFLOAT16_ENV = "SVDQ_CPU_BFLOAT16"
CPU_BFLOAT16_CHOICES = ("auto", "on", "off")
#: How much faster than float32 a bfloat16 product must measure for ``auto`` to use them: they
#: round their operands (8 bits of mantissa), so a tie goes to float32.
BFLOAT16_MIN_SPEEDUP = 1.25


@functools.lru_cache(maxsize=1)
def cpu_bfloat16_speedup() -> float | None:
    """float32 time over bfloat16 time of one ``[256, 1024] @ [1024, 256]`` product on this CPU,
    or None where bfloat16 is not native (:func:`cpu_bfloat16_is_native`: nothing is timed,
    emulation is always slower). Measured once per process, in ~20 ms: on one torch thread
    (set for the measurement, then restored) in the CPU time of the calling thread, the faster
    of 5 turns each after one untimed call of each. Wall time over torch's threads did not do:
    with the other core busy, three processes measured 1.63x, 0.57x and 7.87x on the same CPU.

    The flags do not tell the speed: on one AVX512-BF16 Xeon (no AMX) bfloat16 products ran
    0.5x the float32 rate at every codec and attention shape tried, on the AVX512-BF16 CPU of
    rounds 4-7 about 3-5x it (docs/quality.md, round 14)."""
    if not cpu_bfloat16_is_native():
        return None
    import time

    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(256, 1024, generator=generator), torch.randn(1024, 256, generator=generator)
    operands = {torch.float32: (left, right), torch.bfloat16: (left.bfloat16(), right.bfloat16())}
    best = {dtype: float("inf") for dtype in operands}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for turn in range(6):
            for dtype, (a, b) in operands.items():
                started = time.thread_time()
                torch.mm(a, b)
                if turn:  # the first turn creates oneDNN's primitives: untimed
                    best[dtype] = min(best[dtype], time.thread_time() - started)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def normalized_cpu_bfloat16(text: str) -> str:
    """A ``$SVDQ_CPU_BFLOAT16`` value as it is read: case and surrounding blanks do not count."""
    return text.strip().lower()


def cpu_bfloat16_choice() -> str:
    """``$SVDQ_CPU_BFLOAT16`` (:data:`CPU_BFLOAT16_CHOICES`, default ``auto``); InvalidInputError
    for another value."""
    choice = normalized_cpu_bfloat16(os.environ.get(CPU_BFLOAT16_ENV, "")) or "auto"
    if choice not in CPU_BFLOAT16_CHOICES:
        raise InvalidInputError(f"{CPU_BFLOAT16_ENV} must be one of {CPU_BFLOAT16_CHOICES}, "
                                f"got {os.environ[CPU_BFLOAT16_ENV]!r}")
    return choice


def cpu_bfloat16_is_fast() -> bool:
    """Whether the codec's cheap products (:func:`svdq.codec.gram`, the allocation's sample,
    narrow channels' projection) and attention's default precision use bfloat16 operands on
    this CPU: never where it is not native (:func:`cpu_bfloat16_is_native`); else by
    ``$SVDQ_CPU_BFLOAT16``: ``on`` always, ``off`` never, ``auto`` (default) where one measured
    product runs at least :data:`BFLOAT16_MIN_SPEEDUP` times the float32 rate
    (:func:`cpu_bfloat16_speedup`). Blobs differ between the two choices by that rounding only
    (the same sizes); set ``on`` or ``off`` to pin them on a machine where the two measure
    alike."""
    choice = cpu_bfloat16_choice()
    if choice == "off" or not cpu_bfloat16_is_native():
        return False
    return choice == "on" or (cpu_bfloat16_speedup() or 0.0) >= BFLOAT16_MIN_SPEEDUP


def cpu_bfloat16_summary() -> str:
    """One line for logs: whether CPU bfloat16 products are used, and why."""
    choice = cpu_bfloat16_choice()  # a bad value fails on every CPU
    if not cpu_bfloat16_is_native():
        return "CPU bfloat16 products off (not native on this CPU)"
    if choice != "auto":
        return f"CPU bfloat16 products {choice} (${CPU_BFLOAT16_ENV})"
    speedup = cpu_bfloat16_speedup()
    return (f"CPU bfloat16 products {'on' if cpu_bfloat16_is_fast() else 'off'} (measured {speedup:.2f}x the "
            f"float32 rate, auto needs {BFLOAT16_MIN_SPEEDUP}x; ${CPU_BFLOAT16_ENV}=on|off overrides)")


MAX_BITS = 8
#: largest finite float16: every group minimum and step must fit, and at width 1 the step is
#: the channel's whole range over the group
FLOAT16_MAX = 65504.0


def channel_offsets(channel_bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """int64 byte offset of each kept channel inside a group row; kept bits in latent order."""
    widths = channel_bits.to(torch.int64) * group_size // 8
    return torch.cumsum(widths, 0) - widths


def group_bytes(channel_bits: torch.Tensor, group_size: int) -> int:
    """Bytes of one packed group row for the kept channels' widths."""
    return int(channel_bits.to(torch.int64).sum()) * group_size // 8


def quantize_groups(
    latent: torch.Tensor, kept_bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``latent`` [groups, group_size, r] (float32) channel by channel.

    Returns ``codes`` (uint8 [groups, group_size, r]), ``scales`` and ``mins`` (float16
    [groups, r]). Codes are computed against the float16-rounded scale and minimum, so that
    dequantization from the stored values is what the encoder measured.

    Raises InvalidInputError when a group's minimum or range leaves the float16 range: the
    stored metadata would be infinite and every later use of it NaN.
    """
    levels = (2 ** kept_bits.to(torch.float32) - 1).to(latent.device)
    low, high = _group_range(latent)
    codes, scales, mins = _quantize_in_range(latent, low, high, levels)
    return codes.to(torch.uint8), scales, mins


def _group_range(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 minimum and maximum [groups, r] of every channel over its token group, checked
    against the float16 range of the metadata that will store them."""
    # Two reductions: torch.aminmax over a middle dimension is several times slower on the CPU.
    low, high = latent.amin(dim=1), latent.amax(dim=1)
    if low.numel():
        check_metadata_range(float(low.abs().max()), float((high - low).max()))
    return low, high


def _quantize_in_range(
    latent: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (float32, whole numbers 0..levels), float16 scales and minimums of ``latent``
    [groups, group_size, r] with the group range ``low``/``high`` [groups, r] and ``levels``
    (a scalar or one per channel). Shared by :func:`quantize_groups` and the error table, so
    the allocation measures exactly the quantization the encoder then performs."""
    scales, mins, _, inverse, offset = _steps(low, high, levels)
    return _codes(latent, inverse, offset, levels), scales, mins


def _steps(low: torch.Tensor, high: torch.Tensor, levels: torch.Tensor | float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float16 scales and minimums, float32 steps, inverse steps and code offsets of the group
    ranges ``low``/``high`` [groups, r] at ``levels``: a scalar, one per channel [r], or one per
    width [widths, 1, 1] (the error table's widths at once: scales [widths, groups, r], mins
    [groups, r]; every entry the same operations on the same values as one width alone)."""
    # Each operation once (these run on [groups, r] for every quantization, so at short
    # sequences their count, not their size, is the cost): the float32 minimums computed once,
    # 1 / step as its reciprocal (what ``1.0 / step`` computes, times 1.0).
    mins = low.to(torch.float16)
    low16 = mins.float()
    scales = ((high - low16) / levels).to(torch.float16)
    # float16 may round the step down so that the maximum needs one level more: nudge it up.
    scales = torch.where(
        low16 + scales.float() * levels < high,
        torch.nextafter(scales, torch.full_like(scales, float("inf"))),
        scales,
    )
    if scales.numel() and not bool(torch.isfinite(scales).all()):  # the nudge may step past 65504
        check_metadata_range(float(low.abs().max()), float("inf"))
    step = scales.float()
    # code = floor((latent - min) / step + 1/2), as latent * (1 / step) + (1/2 - min / step):
    # one pass over the latent instead of a subtraction, a division and a rounding. A zero
    # step (a constant channel) gives code 0.
    inverse = torch.where(step > 0, step.reciprocal(), 0.0)
    offset = (low16 * inverse).neg_().add_(0.5)
    return scales, mins, step, inverse, offset


def _codes(latent: torch.Tensor, inverse: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor | float,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 codes of ``latent`` [groups, group_size, r] from :func:`_steps`' inverse steps and
    offsets [groups, r], into ``out`` (a buffer of ``latent``'s shape) when given."""
    codes = torch.addcmul(offset[:, None, :], latent, inverse[:, None, :], out=out)
    if isinstance(levels, torch.Tensor):
        codes = codes.clamp_(torch.zeros((), device=codes.device), levels)
    else:
        codes = codes.clamp_(0, levels)
    return codes.floor_()


def check_metadata_range(largest_minimum: float, largest_range: float) -> None:
    """Refuse latent values whose float16 group minimum or width-1 step would overflow."""
    if largest_minimum > FLOAT16_MAX or largest_range > FLOAT16_MAX:
        raise InvalidInputError(
            f"too large in magnitude to quantize: a channel reaches {largest_minimum:.4g} and spans "
            f"{largest_range:.4g} within one group, but group minimums and steps are stored as float16, so "
            f"both must stay within {FLOAT16_MAX:.0f}; scale the data down or keep it unquantized (codec method "
            "'fp16' for keys, no value bits for values)"
        )


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """float32 [groups, group_size, r] from codes [groups, group_size, r] and fp16 scales/mins."""
    return codes.float() * scales.float()[:, None, :] + mins.float()[:, None, :]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (each < 2**bits, ``bits`` 1, 2, 4 or 8) -> uint8 [..., D*bits/8]:
    code ``d`` of a row occupies bits ``[d * bits, (d + 1) * bits)`` LSB-first across the row's
    bytes, never straddling two bytes. The per-token layout of quantized values and of exact
    key residuals."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_byte)
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 [..., B] -> uint8 codes [..., B*8/bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


#: tokens of the groups :func:`pack_codes` packs at a time
PACK_TOKENS = 512


def pack_codes(codes: torch.Tensor, kept_bits: torch.Tensor) -> torch.Tensor:
    """Pack codes [groups, group_size, r] into rows uint8 [groups, group_bytes].

    Every 8 consecutive tokens of a channel of width ``b`` fill exactly ``b`` bytes, so each
    channel's 8-token runs are shifted into one 64-bit word (token ``i`` at bit ``i * b``),
    for all channels at once with per-channel shifts; the word's ``b`` low bytes are the
    segment's bytes, in order. One gather of those bytes from the words' little-endian byte
    view writes the rows: gathering codes per width instead (``codes[:, :, channels]``) took
    3x as long.
    """
    groups, group_size, kept = codes.shape
    if group_size % 8:
        raise InvalidInputError(f"group_size must be a multiple of 8, got {group_size}")
    row_bytes = group_bytes(kept_bits, group_size)
    if not (groups and row_bytes):
        return torch.empty(groups, row_bytes, dtype=torch.uint8, device=codes.device)
    if sys.byteorder != "little":  # the byte view below reads the words little-endian
        raise NotImplementedError("pack_codes needs a little-endian host")
    bits = kept_bits.to(codes.device, torch.int64)
    words_per_channel = group_size // 8
    source = _word_sources(bits, group_size)
    # [8, r]: token i of a run at bit i * b. The eight shifted codes occupy disjoint bits, so
    # their sum is their OR: one shift and one sum over the run's tokens, for all at once
    # (eight shift-and-or passes were ~24 small ops per block, most of a short sequence's pack).
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64)[:, None] * bits
    rows = torch.empty(groups, row_bytes, dtype=torch.uint8, device=codes.device)
    # On the CPU a few groups at a time, so that their 64-bit words stay in cache
    # (2x faster than all groups at once at 8k tokens).
    step = max(1, PACK_TOKENS // group_size) if codes.device.type == "cpu" else groups
    for first in range(0, groups, step):
        tokens = codes[first:first + step].reshape(-1, words_per_channel, 8, kept)
        words = (tokens.to(torch.int64) << shifts).sum(dim=2)  # [groups, words, channels]
        rows[first:first + step] = words.view(torch.uint8).reshape(tokens.shape[0], -1)[:, source]
    return rows


#: tokens of the groups :func:`unpack_codes` and :func:`dequantize_by_channel` unpack at a time:
#: their word table (8 byte-shifted copies of the rows), 64-bit words and codes stay in the
#: core's caches (at 4k tokens of 256 channels 1024 ran 1.1-1.6x faster than 256, 512 or 4096
#: for the dequantization)
UNPACK_TOKENS = 1024


def _word_sources(kept_bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """int64 [group_bytes]: where each byte of a packed group row lies in the group's 64-bit
    words viewed as bytes, ``[words_per_channel, r, 8]`` (channel ``j``'s 8-token run ``w`` is
    the ``b_j`` low bytes of word ``(w, j)``, :func:`pack_codes`)."""
    bits = kept_bits.to(torch.int64)
    kept = bits.numel()
    channel = torch.repeat_interleave(torch.arange(kept, device=bits.device), bits * (group_size // 8))
    within = torch.arange(group_bytes(bits, group_size), device=bits.device) - channel_offsets(bits, group_size)[channel]
    width = bits[channel]
    return ((within // width) * kept + channel) * 8 + within % width


def _to_int64(value: int) -> int:
    """A 64-bit mask held in a Python int (0..2**64-1) as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _bit_range(low: int, high: int) -> int:
    return (1 << high) - (1 << low)


@functools.lru_cache(maxsize=64)
def _unpack_plan(widths: tuple[int, ...], group_size: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What :func:`_unpacked_runs` needs of a width pattern alone, made once per pattern
    (sequences of one layer share theirs; a batch's cold entries pay it once):

    * ``index`` int64 [r * W] (``W = group_size / 8`` runs of 8 tokens per channel): where
      channel ``j``'s run ``w`` starts, as an int64 index into a group's word table, 8 copies of
      the row shifted by 0..7 bytes and read as 64-bit words (``shift * words + byte // 8``),
      so that one gather loads each run's ``b_j`` bytes, unaligned, as the low bytes of a word;
    * ``steps`` int64 [9, r * W]: per run, three (keep mask, move mask, left shift) that spread
      a run's 8 codes of ``b`` bits (code ``t`` at bit ``t * b``) to one code per byte (code
      ``t`` at bit ``8 t``): codes 4..7 to the upper 32 bits, then 2..3 of each half to its upper
      16 bits, then the odd code of each quarter to its upper byte (the bytes past the run's
      ``b`` are masked off in the first step);
    * the row's bytes and the words of one shifted copy.
    """
    offsets = channel_offsets(torch.tensor(widths, dtype=torch.int64), group_size).tolist()
    row_bytes = sum(widths) * group_size // 8
    words = row_bytes // 8 + 1  # one word more: a load may start in a row's last 7 bytes
    runs = group_size // 8
    index, steps = [], []
    for width, offset in zip(widths, offsets, strict=True):
        for run in range(runs):
            start = offset + run * width
            index.append(start % 8 * words + start // 8)
        b = width
        steps.append([
            _bit_range(0, 4 * b), _bit_range(4 * b, 8 * b), 32 - 4 * b,
            _bit_range(0, 2 * b) | _bit_range(32, 32 + 2 * b),
            _bit_range(2 * b, 4 * b) | _bit_range(32 + 2 * b, 32 + 4 * b), 16 - 2 * b,
            sum(_bit_range(16 * q, 16 * q + b) for q in range(4)),
            sum(_bit_range(16 * q + b, 16 * q + 2 * b) for q in range(4)), 8 - b,
        ])
    per_run = torch.tensor([[_to_int64(v) for v in step] for step in steps], dtype=torch.int64)
    per_run = per_run.repeat_interleave(runs, dim=0).T.contiguous()
    return torch.tensor(index, dtype=torch.int64, device=device), per_run.to(device), row_bytes, words


def _unpacked_runs(rows: torch.Tensor, kept_bits: torch.Tensor, group_size: int
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """The codes of packed group rows uint8 [groups, group_bytes] (:func:`pack_codes`), a block
    of :data:`UNPACK_TOKENS` tokens of groups at a time on the CPU (all groups elsewhere):
    ``(first group, codes uint8 [count, r, W, 8])``, channel ``j``'s run ``w`` holding the
    codes of the group's tokens ``8 w .. 8 w + 7`` in order, one per byte, in a buffer reused
    by the next block.

    Each run of 8 codes is loaded as one 64-bit word (:func:`_unpack_plan`: one gather from 8
    byte-shifted copies of the rows) and its codes spread to one per byte in three
    shift-and-mask steps on the words, for all channels at once."""
    groups, kept = rows.shape[0], kept_bits.numel()
    if sys.byteorder != "little":  # the words are read from, and give back, little-endian bytes
        raise NotImplementedError("unpacking codes needs a little-endian host")
    index, steps, row_bytes, words = _unpack_plan(tuple(kept_bits.tolist()), group_size, rows.device)
    step = max(1, UNPACK_TOKENS // group_size) if rows.device.type == "cpu" else groups
    count = min(step, groups)
    width = 8 * words
    # Reused buffers; the bytes past each row stay zero (a load there is masked off anyway).
    padded = rows.new_zeros(count, width + 8)
    table = torch.empty(count, 8, width, dtype=torch.uint8, device=rows.device)
    runs = torch.empty(count, index.numel(), dtype=torch.int64, device=rows.device)
    kept_part = torch.empty_like(runs)
    for first in range(0, groups, step):
        count = min(step, groups - first)
        padded[:count, :row_bytes] = rows[first:first + count]
        # 8 copies of each row shifted by 0..7 bytes, so that every run is an aligned word of one.
        table[:count].copy_(padded[:count].as_strided((count, 8, width), (width + 8, 1, 1)))
        run = runs[:count]
        torch.gather(table[:count].view(torch.int64).view(count, 8 * words), 1, index.expand(count, -1), out=run)
        keep = kept_part[:count]
        for spread in range(3):
            torch.bitwise_and(run, steps[3 * spread], out=keep)
            run.bitwise_and_(steps[3 * spread + 1]).bitwise_left_shift_(steps[3 * spread + 2]).bitwise_or_(keep)
        yield first, run.view(torch.uint8).view(count, kept, group_size // 8, 8)


def unpack_codes(rows: torch.Tensor, kept_bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes [groups, group_size, r].

    The runs' codes, one per byte (:func:`_unpacked_runs`), are copied token-major into the
    result, one transposed byte copy per block, instead of shifting each of a word's 8 tokens
    out and masking it (two 64-bit passes and a strided copy per token).
    """
    groups = rows.shape[0]
    kept = kept_bits.numel()
    codes = torch.empty(groups, group_size, kept, dtype=torch.uint8, device=rows.device)
    if groups == 0 or kept == 0:
        return codes.zero_()
    by_run = codes.view(groups, group_size // 8, 8, kept)
    on_cpu = rows.device.type == "cpu"
    for first, block in _unpacked_runs(rows, kept_bits, group_size):
        target, source = by_run[first:first + block.shape[0]], block.permute(0, 2, 3, 1)
        if on_cpu:  # numpy's strided byte copy ran 1.6-2.4x as fast as torch's copy_ here
            np.copyto(target.numpy(), source.numpy())
        else:
            target.copy_(source)
    return codes


def dequantize_by_channel(rows: torch.Tensor, kept_bits: torch.Tensor, group_size: int, scales: torch.Tensor,
                          mins: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The dequantized latent of packed group rows, channel-major: ``out[j, g * group_size + t]
    = code * scale + min`` of kept channel ``j``, token ``t`` of group ``g``.

    Args:
        rows: uint8 [groups, group_bytes] (:func:`pack_codes`).
        kept_bits: the kept channels' widths [r].
        scales, mins: float32 [groups, r] (the stored float16 ones, converted).
        out: float32 [r, groups * group_size], written (rows may be strided, tokens contiguous).

    The same values as :func:`unpack_codes` then ``torch.addcmul(mins, codes, scales)``
    (one fused multiply-add per value) and a transposed copy, without the transpose, whose
    strided writes were most of that cost: the runs' codes come one per byte in token order
    (:func:`_unpacked_runs`), so the multiply-add reads them channel-major with the group's
    scale and minimum broadcast along the group's tokens.
    """
    groups, kept = rows.shape[0], kept_bits.numel()
    if groups == 0 or kept == 0:
        return out
    codes = None  # float32 codes of a block, sized by the first (the largest) block
    target = out.view(kept, groups, group_size)
    by_channel_scales, by_channel_mins = scales.T, mins.T
    for first, block in _unpacked_runs(rows, kept_bits, group_size):
        count = block.shape[0]
        if codes is None:
            codes = torch.empty(count, kept, group_size, device=rows.device)
        part = codes[:count]
        part.copy_(block.view(count, kept, group_size))
        # min + code * scale, fused (addcmul_'s one rounding, as dequantizing the unpacked codes).
        into = target[:, first:first + count]
        into.copy_(by_channel_mins[:, first:first + count, None].expand(kept, count, group_size))
        into.addcmul_(part.transpose(0, 1), by_channel_scales[:, first:first + count, None])
    return out


#: latent channels per pass of :func:`distortion_table`: a chunk and its temporaries stay in
#: the core's caches through the nine widths (one pass over all channels per width ran 3-4x
#: slower, from memory)
TABLE_CHANNELS = 256


def distortion_table(latent: torch.Tensor) -> torch.Tensor:
    """Squared error of each latent channel at every width 0..8, float64 [channels, 9].

    ``latent`` is [groups, group_size, channels] (callers may pass a sample of the groups:
    the allocation only compares errors). Width 0 means the channel is dropped and
    reconstructs as 0, the mean. The group ranges are the same at every width, so they are
    found (and range-checked) once; each width then costs one quantize-and-compare pass.
    Channels are measured :data:`TABLE_CHANNELS` at a time; each sum runs over one channel's
    values as before, though torch may add them in another order (last bits) when the last
    chunk is narrower than its vector width (not at 64 or 128 channels per head).
    """
    table = torch.empty(latent.shape[-1], MAX_BITS + 1, dtype=torch.float64)
    # A CPU cache measure, like pack_codes' and the rotation's blocks: on a GPU more chunks only
    # add launches and device-to-host copies.
    step = TABLE_CHANNELS if latent.device.type == "cpu" else max(1, latent.shape[-1])
    for first in range(0, latent.shape[-1], step):
        part = latent[:, :, first:first + step].contiguous()
        rows = table[first:first + part.shape[-1]]
        rows[:, 0] = part.pow(2).sum(dim=(0, 1)).double().cpu()
        low, high = _group_range(part)
        # The steps of every width at once (~20 small ops on [groups, r] per width were most
        # of a short sequence's table), then per width the passes over the part, into two
        # buffers that every width reuses (fresh ones were fresh pages and cache misses).
        levels = [float(2**width - 1) for width in range(1, MAX_BITS + 1)]
        _, mins, steps, inverses, offsets = _steps(low, high, torch.tensor(levels, device=part.device)[:, None, None])
        minimum = mins.float()[:, None, :]
        codes, error = torch.empty_like(part), torch.empty_like(part)
        for width in range(1, MAX_BITS + 1):
            _codes(part, inverses[width - 1], offsets[width - 1], levels[width - 1], out=codes)
            # codes * step + minimum: what dequantize_groups computes from the stored values
            torch.addcmul(minimum, codes, steps[width - 1][:, None, :], out=error).sub_(part)
            rows[:, width] = error.pow_(2).sum(dim=(0, 1)).double().cpu()
    return table
