"""The value cache of one layer of one sequence: 16-bit, quantized per token, or SVDq latent.

Three ways to store values (:class:`ValueConfig`):

* ``bits=None`` (and no ``codec``): the values as given in float16 or bfloat16 (float32
  input is stored as float16, or bfloat16 when float16 would overflow).
* ``bits=2`` or ``4``: every token of every head is cut along ``head_dim`` into groups of
  ``group_size`` channels; each group has a float16 ``scale`` and ``min`` and a value is
  reconstructed as ``code * scale + min`` (the asymmetric quantizer of :mod:`svdq.quant`).
  This is KIVI's value quantizer, kept as the baseline.
* ``codec=CodecConfig(...)``: the SVDq key codec applied to values: one mean-centred basis
  per layer over all heads (the sequence's own, stored with it, or a shared calibrated
  :class:`~svdq.codec.Basis`), mixed widths per latent channel from a budget in true bits
  per value element, token groups, full-precision sinks and tail. Values carry no RoPE, so
  they go through :func:`svdq.codec.compress` as pre-RoPE keys without a RoPE description;
  the result is a :class:`~svdq.codec.CompressedKeys` (``latent``) and attention sums the
  softmax-weighted latent codes before projecting once per head (:mod:`svdq.attention`).
  :data:`DEFAULT_VALUE_CODEC` is the measured default (``docs/quality.md``).

Packed per-token code layout (``bits`` = b, ``D`` = head_dim): ``codes`` is uint8
[S, H, D * b / 8]; channel ``d`` of a token's head occupies bits ``[d * b, (d + 1) * b)``
counted LSB-first across that row's bytes, i.e. byte ``d * b // 8``, bit offset
``d * b % 8``. This is the layout of :func:`svdq.quant.pack_codes` for one channel of ``D``
"tokens"; since 8 is a multiple of b a code never straddles two bytes, which lets the unpack
here be one shift and mask per element instead of the general bit-by-bit path.

Serialized blob (little-endian)::

    0   4  magic b"SVDV"
    4   1  version: 1 for 16-bit and per-token values, 2 for SVDq latent values
    5   1  bits (0 = 16-bit values, 2 or 4 per token, 16 = SVDq latent)
    6   1  dtype of 16-bit values: 0 float16, 1 bfloat16 (0 otherwise)
    7   1  reserved (0)
    8   4  tokens (u32)
    12  2  heads (u16)
    14  2  head_dim (u16)
    16  2  group_size (u16; token group of the latent for bits 16)
    18  .. 16-bit values [S, H, D]; or scales float16 [S, H, D/G], mins float16 [S, H, D/G],
           codes uint8 [S, H, D*b/8]; or (bits 16) a whole :mod:`svdq.format` blob of the
           latent, with its own header and checksum
    end-4  CRC-32 of every byte before it

Version 1 readers reject a version 2 blob by its version byte; this reader reads both.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .codec import Basis, CodecConfig, CompressedKeys, PreparedKeys, append, compress_prepared, decompress, prepare
from .errors import FormatError, InvalidInputError
from .quant import pack_rows, quantize_groups, unpack_rows

VALUE_BITS = (None, 2, 4)
VALUE_GROUP_SIZES = (8, 16, 32, 64, 128, 256)
#: SVDq latent values at 2.5 true bits per value element (with 1.5-bit keys: 2 bits per KV
#: element), token groups of 32 and an allocation that weighs quantization noise 1/3
#: against dropping a channel: attention averages values over many tokens, so their
#: independent rounding errors shrink while a dropped channel's error does not. Measured on
#: SmolLM2 at 1,024 and 3,072-token prefixes (docs/quality.md).
DEFAULT_VALUE_CODEC = CodecConfig(bits_per_element=2.5, group_size=32, noise_averaging=3.0)
_MAGIC = b"SVDV"
_VERSION = 2
_LATENT_BITS = 16
_HEADER = struct.Struct("<4sBBBBIHHH")
_CRC = struct.Struct("<I")
_STORAGE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ValueConfig:
    """How to store values.

    Attributes:
        bits: ``None`` keeps 16-bit values (unless ``codec`` is given); 2 or 4 quantizes per token.
        group_size: channels of ``head_dim`` sharing one scale and minimum (per-token only);
            one of 8, 16, 32, 64, 128, 256 and it must divide ``head_dim``.
        codec: an svdq :class:`~svdq.codec.CodecConfig` stores the values as an SVDq latent
            (its ``bits_per_element`` counts every byte of the value blob); ``bits`` must
            then be ``None``.
    """

    bits: int | None = None
    group_size: int = 64
    codec: CodecConfig | None = None

    def __post_init__(self) -> None:
        if self.bits not in VALUE_BITS:
            raise InvalidInputError(f"value bits must be one of {VALUE_BITS}, got {self.bits!r}")
        if self.group_size not in VALUE_GROUP_SIZES:
            raise InvalidInputError(f"value group_size must be one of {VALUE_GROUP_SIZES}, got {self.group_size!r}")
        if self.codec is not None:
            if not isinstance(self.codec, CodecConfig) or self.codec.method != "svdq":
                raise InvalidInputError(f"value codec must be a CodecConfig with method 'svdq', got {self.codec!r}")
            if self.bits is not None:
                raise InvalidInputError(f"values are either quantized per token (bits={self.bits}) or stored as an "
                                        "SVDq latent (codec), not both")
            if self.codec.exact_tokens or self.codec.exact_share:
                # Attention sums latent value codes without reconstructing tokens, and exact
                # values did not bring needles back where exact keys did (docs/quality.md).
                raise InvalidInputError(f"exact_tokens and exact_share apply to keys only; the value codec has "
                                        f"exact_tokens={self.codec.exact_tokens}, "
                                        f"exact_share={self.codec.exact_share}, allowed 0")

    @property
    def method(self) -> str:
        """``"fp16"``, ``"per_token"`` or ``"svdq"``."""
        return "svdq" if self.codec is not None else ("fp16" if self.bits is None else "per_token")


@dataclass
class CompressedValues:
    """Values of one layer of one sequence (see the module docstring for the layouts).

    Exactly one representation is filled:

    * ``latent`` set (SVDq): a :class:`~svdq.codec.CompressedKeys` of the values (pre-RoPE,
      no RoPE); ``bits`` None, ``group_size`` its token group; the tensors below empty.
    * ``bits is None``: ``data`` [S, H, D] float16/bfloat16; ``codes``/``scales``/``mins`` empty.
    * ``bits`` 2 or 4: ``codes`` uint8 [S, H, D*bits/8]; ``scales``, ``mins`` float16
      [S, H, D/group_size]; ``data`` empty.
    """

    bits: int | None
    group_size: int
    heads: int
    head_dim: int
    data: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    latent: CompressedKeys | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        """``"fp16"``, ``"per_token"`` or ``"svdq"``."""
        return "svdq" if self.latent is not None else ("fp16" if self.bits is None else "per_token")

    @property
    def num_tokens(self) -> int:
        if self.latent is not None:
            return self.latent.num_tokens
        return (self.data if self.bits is None else self.codes).shape[0]

    @property
    def device(self) -> torch.device:
        if self.latent is not None:
            return self.latent.codes.device
        return (self.data if self.bits is None else self.codes).device

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the 16-bit values (of the full-precision tokens for a latent), float16 for
        per-token quantized values (their scales)."""
        if self.latent is not None:
            return self.latent.storage_dtype
        return self.data.dtype if self.bits is None else torch.float16

    @property
    def token_bytes(self) -> int:
        """Bytes one 16-bit or per-token quantized token (all heads) occupies in the blob."""
        if self.latent is not None:
            raise InvalidInputError("SVDq latent values have no fixed size per token; see nbytes")
        if self.bits is None:
            return 2 * self.heads * self.head_dim
        return self.heads * (self.head_dim * self.bits // 8 + 4 * (self.head_dim // self.group_size))

    @property
    def nbytes(self) -> int:
        """Serialized size in bytes, everything included."""
        if self.latent is not None:
            return _HEADER.size + self.latent.nbytes + _CRC.size
        return _HEADER.size + self.num_tokens * self.token_bytes + _CRC.size

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(1, self.num_tokens * self.heads * self.head_dim)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes of the same values over the serialized bytes."""
        return 2.0 * self.num_tokens * self.heads * self.head_dim / self.nbytes

    def to(self, device: torch.device | str) -> CompressedValues:
        return CompressedValues(
            self.bits, self.group_size, self.heads, self.head_dim, self.data.to(device),
            self.codes.to(device), self.scales.to(device), self.mins.to(device),
            None if self.latent is None else self.latent.to(device),
        )


def _latent_values(latent: CompressedKeys) -> CompressedValues:
    empty = torch.empty(0, latent.kv_heads, 0, dtype=torch.float16, device=latent.codes.device)
    return CompressedValues(None, latent.group_size, latent.kv_heads, latent.head_dim, empty,
                            empty.to(torch.uint8), empty, empty, latent)


def _check_values(values: torch.Tensor, name: str, scan: bool = True) -> None:
    """Type and layout, then (``scan``) the finiteness scan; the SVDq latent path leaves the
    scan to :func:`svdq.codec.prepare`, whose one min/max pass over its float32 copy also
    finds NaN and Inf (a second scan of 16-bit values took ~35 ms of a 0.6 s compress at 8k
    tokens x 1024 channels)."""
    if not isinstance(values, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidInputError(f"{name} dtype must be float16, bfloat16 or float32, got {values.dtype}")
    if values.dim() != 3 or values.shape[1] < 1 or values.shape[2] < 1:
        raise InvalidInputError(f"{name} must have shape [tokens, heads, head_dim], got {tuple(values.shape)}")
    if scan and not torch.isfinite(values).all():
        raise InvalidInputError(f"{name} contain NaN or Inf; only finite values can be stored")


def compress_values(values: torch.Tensor, config: ValueConfig | None = None,
                    basis: Basis | None = None) -> CompressedValues:
    """Store ``values`` [S, H, D] (float16/bfloat16/float32, finite) as ``config`` says.

    ``basis``: a shared calibrated value basis of this layer (SVDq latent only, see
    :func:`svdq.codec.fit_layer_basis` on values); the blob then stores its fingerprint.
    """
    config = config or ValueConfig()
    if config.codec is not None:
        return compress_prepared_values(prepare_values(values, config, basis), config)
    _check_values(values, "values")
    if basis is not None:
        raise InvalidInputError("a shared value basis only applies to SVDq latent values (ValueConfig(codec=...))")
    tokens, heads, head_dim = values.shape
    empty_u8 = torch.empty(tokens, heads, 0, dtype=torch.uint8, device=values.device)
    empty_f16 = torch.empty(tokens, heads, 0, dtype=torch.float16, device=values.device)
    if config.bits is None:
        storage = torch.bfloat16 if values.dtype == torch.bfloat16 else torch.float16
        if storage == torch.float16 and values.numel() and values.abs().max() > torch.finfo(torch.float16).max:
            storage = torch.bfloat16  # keeps the range float16 would overflow
        return CompressedValues(None, config.group_size, heads, head_dim, values.to(storage).contiguous(),
                                empty_u8, empty_f16, empty_f16)
    if head_dim % config.group_size:
        raise InvalidInputError(
            f"value group_size {config.group_size} must divide head_dim {head_dim}; "
            f"allowed here: {[g for g in VALUE_GROUP_SIZES if head_dim % g == 0]}"
        )
    groups = head_dim // config.group_size
    # quantize_groups takes min/max over dim 1: put each (token, head, group) run of channels there.
    runs = values.float().reshape(tokens * heads * groups, config.group_size, 1)
    codes, scales, mins = quantize_groups(runs, torch.tensor([config.bits]))
    codes = codes.reshape(tokens, heads, head_dim)
    empty_data = torch.empty(tokens, heads, 0, dtype=torch.float16, device=values.device)
    return CompressedValues(
        config.bits, config.group_size, heads, head_dim, empty_data, pack_rows(codes, config.bits),
        scales.reshape(tokens, heads, groups), mins.reshape(tokens, heads, groups),
    )


def prepare_values(values: torch.Tensor, config: ValueConfig, basis: Basis | None = None) -> PreparedKeys:
    """The budget-free part of :func:`compress_values` of SVDq latent values (same arguments
    and errors; :func:`svdq.codec.prepare`): :func:`compress_prepared_values` then stores them
    under any value codec that differs from ``config``'s in its bit budget only."""
    _check_values(values, "values", scan=False)
    if config.codec is None:
        raise InvalidInputError("only SVDq latent values (ValueConfig(codec=...)) can be prepared, got "
                                f"method {config.method!r}")
    if values.shape[0] == 0:
        raise InvalidInputError("values must hold at least one token to be stored as an SVDq latent, got 0")
    return prepare(values, config.codec, key_space="pre_rope", basis=basis, what="values")


def compress_prepared_values(prepared: PreparedKeys, config: ValueConfig) -> CompressedValues:
    """:func:`compress_values` of the values :func:`prepare_values` made ready, under ``config``
    (an SVDq latent): the same bytes."""
    if config.codec is None:
        raise InvalidInputError(f"prepared values are stored as an SVDq latent, not {config.method!r}")
    return _latent_values(compress_prepared(prepared, config.codec))


def append_values(compressed: CompressedValues, new_values: torch.Tensor) -> CompressedValues:
    """Append ``new_values`` [n, H, D]; returns the new state, the input is not modified.

    Per-token quantization and the SVDq latent (see :func:`svdq.codec.append`) both give
    the same result as compressing all values at once.
    """
    _check_values(new_values, "appended values")
    if tuple(new_values.shape[1:]) != (compressed.heads, compressed.head_dim):
        raise InvalidInputError(
            f"appended values must have heads={compressed.heads}, head_dim={compressed.head_dim}, "
            f"got {tuple(new_values.shape[1:])}"
        )
    new_values = new_values.to(compressed.device)
    if compressed.latent is not None:
        # append() fills the tail and quantizes each group that fills with the stored basis
        # and widths: the same bytes as compressing everything at once.
        return _latent_values(append(compressed.latent, new_values))
    if compressed.bits is None:
        storage = compressed.data.dtype
        if storage == torch.float16 and new_values.numel() and new_values.abs().max() > torch.finfo(torch.float16).max:
            raise InvalidInputError("appended values exceed the float16 range of this sequence's stored values")
        data = torch.cat([compressed.data, new_values.to(storage)])
        return CompressedValues(None, compressed.group_size, compressed.heads, compressed.head_dim, data,
                                compressed.codes, compressed.scales, compressed.mins)
    extra = compress_values(new_values, ValueConfig(compressed.bits, compressed.group_size))
    return CompressedValues(
        compressed.bits, compressed.group_size, compressed.heads, compressed.head_dim, compressed.data,
        torch.cat([compressed.codes, extra.codes]), torch.cat([compressed.scales, extra.scales]),
        torch.cat([compressed.mins, extra.mins]),
    )


def gather_values(compressed: CompressedValues, token_index: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of some tokens, per head.

    Args:
        token_index: int64 [H, n], the tokens each head needs (same count per head); int64
            [n], the same tokens for every head (whole rows: cheaper); ``None`` means every
            token of every head.

    Returns:
        float32 [H, n, D] (or [H, S, D] for ``None``).

    SVDq latent values are reconstructed here (the path for the full-precision tokens and
    for callers that need values); attention sums their latent codes instead.
    """
    if compressed.latent is not None:
        rows = decompress(compressed.latent, dtype=torch.float32).transpose(0, 1)
        if token_index is None:
            return rows
        if token_index.dim() == 1:
            return rows[:, token_index]
        heads = torch.arange(compressed.heads, device=token_index.device)[:, None]
        return rows[heads, token_index]
    if token_index is None or token_index.dim() == 1:
        rows = slice(None) if token_index is None else token_index
        if compressed.bits is None:
            return compressed.data[rows].float().transpose(0, 1)
        return _dequantize(compressed.codes[rows], compressed.scales[rows], compressed.mins[rows],
                           compressed).transpose(0, 1)
    heads = torch.arange(compressed.heads, device=token_index.device)[:, None]
    if compressed.bits is None:
        return compressed.data[token_index, heads].float()
    return _dequantize(compressed.codes[token_index, heads], compressed.scales[token_index, heads],
                       compressed.mins[token_index, heads], compressed)


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, compressed: CompressedValues) -> torch.Tensor:
    """[..., D*b/8] codes and [..., D/G] scales/mins -> float32 [..., D]."""
    unpacked = unpack_rows(codes, compressed.bits).float()
    shape = unpacked.shape
    grouped = unpacked.reshape(*shape[:-1], -1, compressed.group_size)
    return (grouped * scales.float()[..., None] + mins.float()[..., None]).reshape(shape)


def decompress_values(compressed: CompressedValues, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values [S, H, D] in ``dtype`` (default: the 16-bit storage dtype, float16 when quantized)."""
    if compressed.latent is not None:
        return decompress(compressed.latent, dtype=dtype or compressed.latent.storage_dtype)
    if compressed.bits is None:
        return compressed.data.to(dtype or compressed.data.dtype)
    return _dequantize(compressed.codes, compressed.scales, compressed.mins, compressed).to(dtype or torch.float16)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def values_to_bytes(compressed: CompressedValues) -> bytes:
    """Serialize; ``len(values_to_bytes(cv)) == cv.nbytes``.

    16-bit and per-token values are written as version 1 (readable by older readers), SVDq
    latent values as version 2.
    """
    from .format import to_bytes

    latent = compressed.latent is not None
    dtype_code = _STORAGE_DTYPES.index(compressed.data.dtype) if compressed.method == "fp16" else 0
    parts = [_HEADER.pack(_MAGIC, 2 if latent else 1, _LATENT_BITS if latent else compressed.bits or 0, dtype_code,
                          0, compressed.num_tokens, compressed.heads, compressed.head_dim, compressed.group_size)]
    if latent:
        parts.append(to_bytes(compressed.latent))
    elif compressed.bits is None:
        parts.append(_tensor_bytes(compressed.data))
    else:
        parts += [_tensor_bytes(compressed.scales), _tensor_bytes(compressed.mins), _tensor_bytes(compressed.codes)]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _read(view: memoryview, at: int, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> tuple[torch.Tensor, int]:
    count = int(np.prod(shape))
    size = count * torch.tensor([], dtype=dtype).element_size()
    if at + size > len(view):
        raise FormatError(f"values blob is truncated: {what} needs {size} bytes at offset {at}, only {len(view) - at} left")
    raw = bytearray(view[at:at + size])
    if count == 0:
        return torch.empty(shape, dtype=dtype), at
    if dtype == torch.bfloat16:
        return torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).reshape(shape).clone(), at + size
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone(), at + size


def values_from_bytes(blob: bytes | bytearray | memoryview, device: torch.device | str = "cpu",
                      basis: Basis | None = None) -> CompressedValues:
    """Parse a blob written by :func:`values_to_bytes`; :class:`FormatError` names what is wrong.

    ``basis`` must be the shared value basis when SVDq latent values were compressed with one.
    """
    data = memoryview(bytes(blob))
    if len(data) < _HEADER.size + _CRC.size:
        raise FormatError(f"values blob is truncated: {len(data)} bytes is shorter than the "
                          f"{_HEADER.size + _CRC.size}-byte minimum")
    magic, version, bits, dtype_code, _, tokens, heads, head_dim, group_size = _HEADER.unpack(data[:_HEADER.size])
    if magic != _MAGIC:
        raise FormatError(f"not an svdq values blob: magic is {magic!r}, expected {_MAGIC!r}")
    if not 1 <= version <= _VERSION:
        raise FormatError(f"values blob format version {version} is not supported (this reader: 1..{_VERSION})")
    (stored_crc,) = _CRC.unpack(data[-4:])
    if zlib.crc32(data[:-4]) != stored_crc:
        raise FormatError("values blob checksum mismatch: the data is corrupted or truncated")
    allowed_bits = (0, 2, 4) if version == 1 else (0, 2, 4, _LATENT_BITS)
    if bits not in allowed_bits or dtype_code >= len(_STORAGE_DTYPES):
        raise FormatError(f"values blob (version {version}) header has bits={bits}, dtype code {dtype_code}; "
                          f"allowed bits {', '.join(map(str, allowed_bits))}")
    if bits == _LATENT_BITS:
        from .format import from_bytes

        latent = from_bytes(data[_HEADER.size:-4], basis=basis)
        if (latent.num_tokens, latent.kv_heads, latent.head_dim, latent.group_size) != (tokens, heads, head_dim,
                                                                                        group_size):
            raise FormatError(f"values blob header says tokens={tokens}, heads={heads}, head_dim={head_dim}, "
                              f"group_size={group_size} but its latent holds {latent.num_tokens}, {latent.kv_heads}, "
                              f"{latent.head_dim}, {latent.group_size}")
        if latent.method != "svdq" or latent.rope is not None:
            raise FormatError("values blob latent must be an svdq blob without RoPE")
        result = _latent_values(latent)
        return result if str(device) == "cpu" else result.to(device)
    if heads == 0 or head_dim == 0 or group_size not in VALUE_GROUP_SIZES or (bits and head_dim % group_size):
        raise FormatError(f"values blob header has an invalid shape: heads={heads}, head_dim={head_dim}, "
                          f"group_size={group_size}")
    body = data[:-4]
    at = _HEADER.size
    empty_u8 = torch.empty(tokens, heads, 0, dtype=torch.uint8)
    empty_f16 = torch.empty(tokens, heads, 0, dtype=torch.float16)
    if bits == 0:
        values, at = _read(body, at, _STORAGE_DTYPES[dtype_code], (tokens, heads, head_dim), "values")
        result = CompressedValues(None, group_size, heads, head_dim, values, empty_u8, empty_f16, empty_f16)
    else:
        groups = head_dim // group_size
        scales, at = _read(body, at, torch.float16, (tokens, heads, groups), "scales")
        mins, at = _read(body, at, torch.float16, (tokens, heads, groups), "mins")
        codes, at = _read(body, at, torch.uint8, (tokens, heads, head_dim * bits // 8), "codes")
        result = CompressedValues(bits, group_size, heads, head_dim, empty_f16, codes, scales, mins)
    if at != len(body):
        raise FormatError(f"values blob has {len(body) - at} unexpected trailing bytes")
    return result if str(device) == "cpu" else result.to(device)


__all__ = [
    "DEFAULT_VALUE_CODEC",
    "CompressedValues",
    "ValueConfig",
    "append_values",
    "compress_values",
    "decompress_values",
    "gather_values",
    "values_from_bytes",
    "values_to_bytes",
]
