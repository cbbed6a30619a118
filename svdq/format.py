"""Serialized format of :class:`~svdq.codec.CompressedKeys` (versions 1, 2 and 3).

All integers and floats are little-endian. A blob is::

    offset size  field
    0      4     magic b"SVDQ"
    4      1     format version: 3 when the exact tokens are stored as corrections (flag
                 bit6), 2 when they are 16-bit rows (flag bit5 alone), else 1
    5      1     method: 0 svdq, 1 kivi, 2 fp16
    6      1     flags: bit0 input was post-RoPE, bit1 stored post-RoPE, bit2 has RoPE,
                 bit3 shared basis (not stored), bit4 explicit positions, bit5 exact tokens,
                 bit6 exact tokens as corrections (with bit5)
    7      1     dtypes: low nibble input dtype, high nibble full-precision dtype
                 (0 float16, 1 bfloat16, 2 float32)
    8      4     tokens (u32)
    12     2     kv_heads (u16)
    14     2     head_dim (u16)
    16     2     group_size (u16)
    18     2     num_sinks, configured (u16)
    20     8     position_offset (i64)
    28     28    RoPE, only if flag bit2: theta f64, rotary_dim u16, style u8, scaling u8,
                 factor f32, low_freq_factor f32, high_freq_factor f32, original_max u32
    ..     8     shared basis fingerprint (u64), only if flag bit3
    ..     C/2   channel widths, two 4-bit widths per byte, low nibble first (svdq, kivi)
    ..     4     exact token count k (u32), only if flag bit5; then
    ..     1     correction width b (u8: 8, 4 or 2), only if flag bit6
    ..     4k    their sequence indices u32 [k], ascending, inside the quantized groups
    ..     2Ck   without bit6: their rows [k, C] in the full-precision dtype (replace the
                 reconstruction); with bit6 instead: scales float16 [k, H], mins float16
                 [k, H] and codes [k, H, D*b/8] (svdq.quant.pack_rows) of a correction per
                 token and head added to the token's reconstruction (8Hk + CkB/8 bytes)
    ..     4C    mean float32 [C] (svdq with stored basis)
    ..     2Cr   basis float16 [C, r] row-major (svdq with stored basis)
    ..     8S    positions int64 [S] (only if flag bit4)
    ..     2Cs   sinks [s, C] in the full-precision dtype, s = min(num_sinks, tokens)
    ..     2Gr   scales float16 [G, r], then mins float16 [G, r], G = quantized groups
    ..     G*B   codes [G, B] uint8, B = group_size * sum(widths) / 8 (see svdq.quant)
    ..     2Ct   tail [t, C] in the full-precision dtype
    end-4  4     CRC-32 of every byte before it

Counts that are not stored (s, G, t) follow from tokens, num_sinks and group_size. A reader
rejects a wrong magic, a newer version, a size that does not match the header and a
checksum mismatch, each with a :class:`~svdq.errors.FormatError` that says which. Version 1
readers reject a version 2 blob by its version byte, version 2 readers a version 3 one.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from .codec import (
    EXACT_BITS,
    GROUP_SIZES,
    MAX_SINKS,
    METHODS,
    Basis,
    CompressedKeys,
    CostLimits,
    check_cost,
    check_group_bytes,
    exact_corrected_rows,
    identity_basis,
    reconstruct_tokens,
)
from .errors import FormatError, InvalidInputError, ResourceExhaustedError
from .quant import group_bytes
from .rope import ROPE_SCALINGS, ROPE_STYLES, RopeConfig

MAGIC = b"SVDQ"
#: Blobs without exact tokens are written as version 1, which older readers accept; 16-bit
#: exact rows as version 2; exact corrections as version 3, the newest.
_VERSION_EXACT = 2
_VERSION_CORRECTION = 3
VERSION = _VERSION_CORRECTION
_HEADER = struct.Struct("<4sBBBBIHHHHq")
_ROPE = struct.Struct("<dHBBfffI")
_FINGERPRINT = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_COUNT = struct.Struct("<I")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_F_POST_IN, _F_POST_STORED, _F_ROPE, _F_SHARED, _F_POSITIONS, _F_EXACT, _F_CORRECTION = 1, 2, 4, 8, 16, 32, 64
_WIDTH = struct.Struct("<B")
# Positions must leave room for arange(offset, offset + tokens) in int64.
_MAX_POSITION = 1 << 62


def _layout(method: str, channels: int, tokens: int, num_sinks: int, group_size: int, kept_bits: np.ndarray,
            has_rope: bool, stored_basis: bool, explicit_positions: bool, exact_tokens: int = 0,
            exact_bits: int = 16, kv_heads: int = 1) -> dict[str, int]:
    """Byte size of every section, from the shapes alone."""
    sinks = 0 if method == "fp16" else min(num_sinks, tokens)
    groups = 0 if method == "fp16" else (tokens - sinks) // group_size
    tail = tokens - sinks - groups * group_size
    kept = int(np.count_nonzero(kept_bits))
    quantized = method != "fp16"
    basis_stored = method == "svdq" and stored_basis
    return {
        "header": _HEADER.size,
        "rope": _ROPE.size if has_rope else 0,
        "fingerprint": _FINGERPRINT.size if method == "svdq" and not stored_basis else 0,
        "widths": (channels + 1) // 2 if quantized else 0,
        "mean": 4 * channels if basis_stored else 0,
        "basis": 2 * channels * kept if basis_stored else 0,
        "positions": 8 * tokens if explicit_positions else 0,
        "exact": _exact_size(channels, exact_tokens, exact_bits, kv_heads),
        "sinks": 2 * channels * sinks,
        "scales": 2 * groups * kept,
        "mins": 2 * groups * kept,
        "codes": groups * int(kept_bits.astype(np.int64).sum()) * group_size // 8,
        "tail": 2 * channels * tail,
        "crc": _CRC.size,
    }


def _exact_size(channels: int, exact_tokens: int, exact_bits: int, kv_heads: int) -> int:
    """Bytes of the exact-token section: count, indices and 16-bit rows, or the correction's
    width, scales, minimums and codes."""
    if not exact_tokens:
        return 0
    if exact_bits == 16:
        return _COUNT.size + (4 + 2 * channels) * exact_tokens
    return _COUNT.size + _WIDTH.size + (4 + 4 * kv_heads + channels * exact_bits // 8) * exact_tokens


def serialized_size(compressed: CompressedKeys) -> int:
    """Exact length of :func:`to_bytes` of ``compressed`` without building it."""
    return sum(_layout(
        compressed.method, compressed.channels, compressed.num_tokens, compressed.num_sinks,
        compressed.group_size, compressed.kept_bits.cpu().numpy(), compressed.rope is not None,
        compressed.shared_basis is None, compressed.positions is not None, compressed.num_exact,
        compressed.exact_bits, compressed.kv_heads,
    ).values())


def fixed_size(*, method: str, channels: int, tokens: int, num_sinks: int, group_size: int, has_rope: bool,
               stored_basis: bool, explicit_positions: bool, exact_tokens: int = 0, exact_bits: int = 16,
               kv_heads: int = 1) -> int:
    """Bytes that do not depend on the channel widths (a blob with every channel dropped):
    header, RoPE, widths map, mean, positions, exact tokens, full-precision sinks and tail,
    checksum. The bit allocator spends what the budget leaves after these."""
    return sum(_layout(method, channels, tokens, num_sinks, group_size, np.zeros(channels, dtype=np.int64),
                       has_rope, stored_basis, explicit_positions, exact_tokens, exact_bits, kv_heads).values())


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def to_bytes(compressed: CompressedKeys) -> bytes:
    """Serialize; ``len(to_bytes(c)) == c.nbytes``."""
    flags = 0
    flags |= _F_POST_IN if compressed.input_space == "post_rope" else 0
    flags |= _F_POST_STORED if compressed.stored_space == "post_rope" else 0
    flags |= _F_ROPE if compressed.rope is not None else 0
    flags |= _F_SHARED if compressed.shared_basis is not None else 0
    flags |= _F_POSITIONS if compressed.positions is not None else 0
    flags |= _F_EXACT if compressed.num_exact else 0
    correction = bool(compressed.num_exact) and compressed.exact_bits != 16
    flags |= _F_CORRECTION if correction else 0
    dtypes = _DTYPES.index(compressed.input_dtype) | (_DTYPES.index(compressed.storage_dtype) << 4)
    version = _VERSION_CORRECTION if correction else _VERSION_EXACT if compressed.num_exact else 1
    parts = [_HEADER.pack(
        MAGIC, version, METHODS.index(compressed.method), flags, dtypes, compressed.num_tokens,
        compressed.kv_heads, compressed.head_dim, compressed.group_size, compressed.num_sinks,
        compressed.position_offset,
    )]
    rope = compressed.rope
    if rope is not None:
        parts.append(_ROPE.pack(rope.theta, rope.rotary_dim, ROPE_STYLES.index(rope.style),
                                ROPE_SCALINGS.index(rope.scaling), rope.factor, rope.low_freq_factor,
                                rope.high_freq_factor, rope.original_max_position))
    if compressed.method == "svdq" and compressed.shared_basis is not None:
        parts.append(_FINGERPRINT.pack(compressed.shared_basis))
    if compressed.method != "fp16":
        widths = compressed.channel_bits.cpu().numpy().astype(np.uint8)
        if widths.size % 2:
            widths = np.append(widths, 0)
        parts.append((widths[0::2] | (widths[1::2] << 4)).astype(np.uint8).tobytes())
    if correction:
        parts += [_COUNT.pack(compressed.num_exact), _WIDTH.pack(compressed.exact_bits),
                  _tensor_bytes(compressed.exact_index.to(torch.int32)), _tensor_bytes(compressed.exact_scales),
                  _tensor_bytes(compressed.exact_mins), _tensor_bytes(compressed.exact_codes)]
    elif compressed.num_exact:
        parts += [_COUNT.pack(compressed.num_exact), _tensor_bytes(compressed.exact_index.to(torch.int32)),
                  _tensor_bytes(compressed.exact_rows)]
    if compressed.method == "svdq" and compressed.shared_basis is None:
        parts.append(_tensor_bytes(compressed.mean.float()))
        parts.append(_tensor_bytes(compressed.basis.to(torch.float16)))
    if compressed.positions is not None:
        parts.append(_tensor_bytes(compressed.positions.to(torch.int64)))
    parts += [_tensor_bytes(compressed.sinks), _tensor_bytes(compressed.scales), _tensor_bytes(compressed.mins),
              _tensor_bytes(compressed.codes), _tensor_bytes(compressed.tail)]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.at = data, 0

    def take(self, size: int, what: str) -> memoryview:
        if self.at + size > len(self.data):
            raise FormatError(f"blob is truncated: {what} needs {size} bytes at offset {self.at}, "
                              f"only {len(self.data) - self.at} left")
        view = self.data[self.at:self.at + size]
        self.at += size
        return view

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        itemsize = torch.tensor([], dtype=dtype).element_size()
        raw = bytes(self.take(count * itemsize, what))
        if dtype == torch.bfloat16:
            return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(shape).clone() \
                if count else torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone() if count else torch.empty(shape, dtype=dtype)


#: largest magnitude a blob's float32 mean may have: with float16 basis, scales, minimums and
#: at most 8-bit codes, the reconstruction then stays finite in float32
MAX_MEAN_MAGNITUDE = 1e30


def from_bytes(blob: bytes | bytearray | memoryview, basis: Basis | None = None,
               device: torch.device | str = "cpu", limits: CostLimits | None = None) -> CompressedKeys:
    """Parse a blob written by :func:`to_bytes`.

    ``basis`` must be the shared basis when the blob was compressed with one. Every header
    field is checked against ``limits`` (default: the library's :class:`CostLimits`) and the
    blob's real length before anything is allocated, and every float section must be finite,
    so a crafted blob fails with :class:`FormatError` instead of allocating or returning NaN.
    """
    data = memoryview(bytes(blob))
    if len(data) < _HEADER.size + _CRC.size:
        raise FormatError(f"blob is truncated: {len(data)} bytes is shorter than the {_HEADER.size + _CRC.size}-byte minimum")
    magic, version = bytes(data[:4]), data[4]
    if magic != MAGIC:
        raise FormatError(f"not an svdq blob: magic is {magic!r}, expected {MAGIC!r}")
    if version > VERSION:
        raise FormatError(f"blob format version {version} is newer than this reader (supports up to {VERSION}); "
                          "upgrade svdq to read it")
    if version < 1:
        raise FormatError(f"blob format version {version} is not valid")
    (stored_crc,) = _CRC.unpack(data[-4:])
    if zlib.crc32(data[:-4]) != stored_crc:
        raise FormatError("blob checksum mismatch: the data is corrupted or truncated")
    reader = _Reader(data[:-4])
    (_, _, method_id, flags, dtypes, tokens, kv_heads, head_dim, group_size, num_sinks,
     offset) = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    if method_id >= len(METHODS):
        raise FormatError(f"unknown method id {method_id}")
    if (dtypes & 15) >= len(_DTYPES) or (dtypes >> 4) >= len(_DTYPES):
        raise FormatError(f"unknown dtype code {dtypes:#x}")
    method = METHODS[method_id]
    channels = kv_heads * head_dim
    if kv_heads < 1 or head_dim < 2 or head_dim % 2 or group_size not in GROUP_SIZES:
        raise FormatError(f"invalid shape in header: kv_heads={kv_heads} (>= 1), head_dim={head_dim} (even, >= 2), "
                          f"group_size={group_size} (one of {GROUP_SIZES})")
    if tokens < 1 or num_sinks > MAX_SINKS or not 0 <= offset <= _MAX_POSITION - tokens:
        raise FormatError(f"invalid header: tokens={tokens} (>= 1), num_sinks={num_sinks} (<= {MAX_SINKS}), "
                          f"position_offset={offset} (>= 0, offset + tokens <= {_MAX_POSITION})")
    try:
        check_cost(tokens, kv_heads, head_dim, limits, what="blob header", operation="decompress")
    except ResourceExhaustedError as exc:
        raise FormatError(f"{exc}; this reader does not load such blobs") from None
    rope = None
    if flags & _F_ROPE:
        theta, rotary, style, scaling, factor, low, high, orig = _ROPE.unpack(reader.take(_ROPE.size, "rope"))
        try:
            rope = RopeConfig(theta, rotary, ROPE_STYLES[style], ROPE_SCALINGS[scaling], factor, low, high, orig)
            rope.dims(head_dim)
        except (IndexError, InvalidInputError) as exc:
            raise FormatError(f"invalid rope description in blob: {exc}") from exc
    shared = None
    if method == "svdq" and flags & _F_SHARED:
        (shared,) = _FINGERPRINT.unpack(reader.take(_FINGERPRINT.size, "basis fingerprint"))
        if basis is None:
            raise FormatError(f"blob was compressed with a shared basis (fingerprint {shared:016x}); pass that basis to load it")
        if basis.fingerprint != shared:
            raise FormatError(f"blob needs the shared basis {shared:016x}, but the given basis is {basis.fingerprint:016x}")
        if basis.channels != channels:
            raise FormatError(f"blob has {channels} channels but its shared basis has {basis.channels}")
    if method == "fp16":
        channel_bits = np.zeros(channels, dtype=np.uint8)
    else:
        packed = np.frombuffer(bytes(reader.take((channels + 1) // 2, "channel widths")), dtype=np.uint8)
        channel_bits = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)[:channels].copy()
        if channel_bits.max(initial=0) > 8:
            raise FormatError("channel widths above 8 bits in blob")
    sinks_n = 0 if method == "fp16" else min(num_sinks, tokens)
    groups = 0 if method == "fp16" else (tokens - sinks_n) // group_size
    exact_n, exact_bits = 0, 16
    if flags & _F_CORRECTION and (not flags & _F_EXACT or version < _VERSION_CORRECTION):
        raise FormatError(f"exact corrections (flag bit6) need exact tokens (bit5) and format version "
                          f"{_VERSION_CORRECTION}, got flags {flags:#x} version {version}")
    if flags & _F_EXACT:
        if method != "svdq" or version < _VERSION_EXACT:
            raise FormatError(f"exact tokens (flag bit5) need method svdq and format version {_VERSION_EXACT}, got "
                              f"{method} version {version}")
        (exact_n,) = _COUNT.unpack(reader.take(_COUNT.size, "exact token count"))
        if not 1 <= exact_n <= groups * group_size:
            raise FormatError(f"blob has {exact_n} exact tokens; allowed 1..{groups * group_size} (its quantized tokens)")
        if flags & _F_CORRECTION:
            (exact_bits,) = _WIDTH.unpack(reader.take(_WIDTH.size, "exact correction width"))
            if exact_bits not in EXACT_BITS or exact_bits == 16:
                raise FormatError(f"exact correction width {exact_bits} in blob; allowed "
                                  f"{', '.join(str(b) for b in EXACT_BITS if b != 16)}")
    # The whole layout follows from the header, widths and exact count: compare it with the
    # real length before reading (and allocating) any section.
    expected = sum(_layout(method, channels, tokens, num_sinks, group_size, channel_bits, bool(flags & _F_ROPE),
                           shared is None, bool(flags & _F_POSITIONS), exact_n, exact_bits, kv_heads).values())
    if expected != len(data):
        raise FormatError(f"blob is {len(data)} bytes but its header and channel widths describe {expected}: "
                          "truncated, padded or a header field is wrong")
    storage = _DTYPES[dtypes >> 4]
    exact_index = exact_rows = None
    if exact_n:
        exact_index = reader.tensor(torch.int32, (exact_n,), "exact token indices").to(torch.int64)
        if int(exact_index[0]) < sinks_n or int(exact_index[-1]) >= sinks_n + groups * group_size or (
                exact_n > 1 and not bool((exact_index[1:] > exact_index[:-1]).all())):
            raise FormatError(f"exact token indices must ascend strictly inside the quantized tokens "
                              f"{sinks_n}..{sinks_n + groups * group_size - 1}")
        if exact_bits == 16:
            exact_rows = reader.tensor(storage, (exact_n, channels), "exact token rows")
        else:
            correction_sections = (
                reader.tensor(torch.float16, (exact_n, kv_heads), "exact correction scales"),
                reader.tensor(torch.float16, (exact_n, kv_heads), "exact correction mins"),
                reader.tensor(torch.uint8, (exact_n, kv_heads, head_dim * exact_bits // 8), "exact correction codes"),
            )
    kept_idx = np.nonzero(channel_bits)[0]
    kept = kept_idx.size
    if method == "svdq" and shared is None:
        mean = reader.tensor(torch.float32, (channels,), "mean")
        basis_cols = reader.tensor(torch.float16, (channels, kept), "basis")
    elif method == "svdq":
        mean = basis.mean.float().clone()
        basis_cols = basis.components.to(torch.float16)[:, torch.from_numpy(kept_idx)].contiguous()
    elif method == "kivi":
        if kept != channels:
            raise FormatError(f"kivi blob keeps {kept} of {channels} channels; the baseline keeps all")
        mean = torch.zeros(channels)
        basis_cols = identity_basis(channels, torch.device("cpu"))
    else:  # fp16 passthrough keeps no latent channel
        mean = torch.zeros(channels)
        basis_cols = torch.empty(channels, 0, dtype=torch.float16)
    positions = reader.tensor(torch.int64, (tokens,), "positions") if flags & _F_POSITIONS else None
    if positions is not None and (int(positions.min()) < 0 or int(positions.max()) > _MAX_POSITION):
        raise FormatError(f"blob positions must be in 0..{_MAX_POSITION}")
    tail_n = tokens - sinks_n - groups * group_size
    kept_bits = torch.from_numpy(channel_bits[kept_idx].astype(np.int64))
    sinks = reader.tensor(storage, (sinks_n, channels), "sinks")
    scales = reader.tensor(torch.float16, (groups, kept), "scales")
    mins = reader.tensor(torch.float16, (groups, kept), "mins")
    codes = reader.tensor(torch.uint8, (groups, group_bytes(kept_bits, group_size)), "codes")
    tail = reader.tensor(storage, (tail_n, channels), "tail")
    if reader.at != len(reader.data):
        raise FormatError(f"blob has {len(reader.data) - reader.at} unexpected trailing bytes")
    corrections = correction_sections[:2] if exact_n and exact_bits != 16 else (None, None)
    for name, section in (("mean", mean), ("basis", basis_cols), ("sinks", sinks), ("scales", scales),
                          ("mins", mins), ("tail", tail), ("exact token rows", exact_rows),
                          ("exact correction scales", corrections[0]), ("exact correction mins", corrections[1])):
        if section is None:
            continue
        if not bool(torch.isfinite(section).all()):
            raise FormatError(f"blob holds NaN or Inf in its {name}; a blob from to_bytes never does")
    if mean.numel() and float(mean.abs().max()) > MAX_MEAN_MAGNITUDE:
        raise FormatError(f"blob mean reaches {float(mean.abs().max()):.3g}, beyond {MAX_MEAN_MAGNITUDE:g}")
    exact = {}
    if exact_n and exact_bits != 16:
        exact_rows = _corrected_rows(codes, scales, mins, kept_bits, group_size, basis_cols, mean,
                                     exact_index - sinks_n, storage, exact_bits, *correction_sections)
        exact = {"exact_bits": exact_bits, "exact_scales": correction_sections[0],
                 "exact_mins": correction_sections[1], "exact_codes": correction_sections[2]}
    compressed = CompressedKeys(
        method=method, kv_heads=kv_heads, head_dim=head_dim, input_dtype=_DTYPES[dtypes & 15],
        storage_dtype=storage, stored_space="post_rope" if flags & _F_POST_STORED else "pre_rope", rope=rope,
        group_size=group_size, num_sinks=num_sinks, position_offset=offset,
        channel_bits=torch.from_numpy(channel_bits), basis=basis_cols, mean=mean, sinks=sinks, codes=codes,
        scales=scales, mins=mins, tail=tail, positions=positions, shared_basis=shared,
        input_space="post_rope" if flags & _F_POST_IN else "pre_rope", exact_index=exact_index, exact_rows=exact_rows,
        **exact,
    )
    check_group_bytes(compressed)
    return compressed.to(device) if str(device) != "cpu" else compressed


def _corrected_rows(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, kept_bits: torch.Tensor,
                    group_size: int, basis_cols: torch.Tensor, mean: torch.Tensor, body_index: torch.Tensor,
                    storage: torch.dtype, bits: int, correction_scales: torch.Tensor, correction_mins: torch.Tensor,
                    correction_codes: torch.Tensor) -> torch.Tensor:
    """The exact rows (``storage`` dtype) of the body tokens ``body_index`` rebuilt from the
    blob's corrections as compress built them, before the one CompressedKeys is made."""
    restored = reconstruct_tokens(codes, scales, mins, kept_bits, group_size, basis_cols, mean, body_index)
    rows = exact_corrected_rows(restored, correction_codes, correction_scales, correction_mins, bits)
    if not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) > torch.finfo(storage).max:
        raise FormatError(f"blob's exact corrections give rows beyond {storage}; a blob from to_bytes never does")
    return rows.to(storage)
