"""Tensors on the wire: torch tensor <-> ``svdq.v1.Tensor``.

A ``Tensor`` message is a dtype, a shape and the elements as raw little-endian bytes in
row-major order, exactly ``prod(shape) * itemsize`` of them. Decoding checks all of it
strictly (and, on request, finiteness and the expected shape) and raises
:class:`svdq.errors.InvalidInputError` naming the field, so a server can pass the message
back to the caller unchanged. Client and server share this one implementation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb

from svdq.errors import InvalidInputError

_TO_PB = {
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.float32: pb.FLOAT32,
    torch.int64: pb.INT64,
}
_FROM_PB = {code: dtype for dtype, code in _TO_PB.items()}
_ITEMSIZE = {pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT32: 4, pb.INT64: 8}
# bfloat16 has no numpy dtype: its bytes travel as int16 and are reinterpreted.
_NUMPY = {pb.FLOAT16: "<f2", pb.BFLOAT16: "<i2", pb.FLOAT32: "<f4", pb.INT64: "<i8"}
_NAMES = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.FLOAT32: "float32", pb.INT64: "int64"}
MAX_DIMS = 8
#: largest size of one dimension (int32 range: what torch kernels index with)
MAX_DIM_SIZE = (1 << 31) - 1
#: largest product of the dimensions, zero-sized ones counted as 1: a tensor with a zero
#: dimension holds nothing, but its other dimensions still reach every reshape and view
MAX_ELEMENTS = 1 << 40

#: float dtypes a key or value tensor may have
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_to_pb(dtype: torch.dtype) -> int:
    """The ``svdq.v1.DType`` code of a torch dtype (float16, bfloat16, float32, int64)."""
    try:
        return _TO_PB[dtype]
    except KeyError:
        raise InvalidInputError(
            f"tensor dtype {dtype} cannot travel on the wire; allowed: float16, bfloat16, float32, int64"
        ) from None


def dtype_from_pb(code: int, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a ``svdq.v1.DType`` code; DTYPE_UNSPECIFIED and unknown codes are errors."""
    try:
        return _FROM_PB[code]
    except KeyError:
        raise InvalidInputError(
            f"{field} must be one of FLOAT16, BFLOAT16, FLOAT32, INT64, got enum value {code}"
        ) from None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN or Inf.

    On the CPU the check runs in numpy: torch's float16 ``isfinite`` is several times slower,
    and this check runs on every key, value and query that reaches the server.
    """
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    if tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    host = tensor.detach()
    exponent_bits = _EXPONENT_BITS.get(host.dtype)
    if exponent_bits is not None:
        # A 16-bit float is not finite exactly when its exponent bits are all ones: two
        # integer passes, where numpy's float16 isfinite converts every element first.
        exponent = host.contiguous().view(torch.int16).numpy().view(np.uint16) & exponent_bits
        return not bool((exponent == exponent_bits).any())
    return bool(np.isfinite(host.numpy()).all())


_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def tensor_to_pb(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a tensor of any shape (float16, bfloat16, float32 or int64) into a ``Tensor``
    message (written into ``out`` when given, e.g. a sub-message field)."""
    message = out if out is not None else pb.Tensor()
    code = dtype_to_pb(tensor.dtype)
    host = tensor.detach().to("cpu").contiguous()
    if host.dtype == torch.bfloat16:
        host = host.view(torch.int16)
    array = host.numpy()
    if sys.byteorder != "little":
        array = array.byteswap()
    message.dtype = code
    message.shape[:] = list(tensor.shape)
    message.data = array.tobytes()
    return message


def tensor_from_pb(
    message: pb.Tensor,
    field: str,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = False,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Decode a ``Tensor`` message strictly.

    Args:
        message: the wire tensor.
        field: the request field's name, used in error messages.
        dtypes: allowed dtypes (default: any wire dtype).
        shape: expected shape; ``None`` entries match any size; its length is the required rank.
        finite: reject NaN and Inf.
        max_bytes: reject larger payloads.

    Returns:
        A CPU tensor of the message's dtype and shape (a copy; it does not alias the message).
    """
    dtype = dtype_from_pb(message.dtype, f"{field}.dtype")
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InvalidInputError(f"{field} must have dtype {allowed}; got {_NAMES[message.dtype]}")
    dims = list(message.shape)
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise InvalidInputError(f"{field}.shape must have at most {MAX_DIMS} non-negative dimensions, got {dims}")
    if any(d > MAX_DIM_SIZE for d in dims) or math.prod(max(d, 1) for d in dims) > MAX_ELEMENTS:
        raise InvalidInputError(f"{field}.shape {dims} is too large: each dimension may be at most {MAX_DIM_SIZE} and "
                                f"their product (zero-sized dimensions counted as 1) at most {MAX_ELEMENTS}")
    if shape is not None:
        if len(dims) != len(shape) or any(want is not None and want != got for want, got in zip(shape, dims, strict=True)):
            expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise InvalidInputError(f"{field} must have shape {expected}, got {dims}")
    count = math.prod(dims)
    expected_bytes = count * _ITEMSIZE[message.dtype]
    if max_bytes is not None and expected_bytes > max_bytes:
        raise InvalidInputError(f"{field} is {expected_bytes} bytes; at most {max_bytes} are allowed per message")
    data = message.data  # each read of a bytes field copies it (64 MiB: ~50 ms here)
    if len(data) != expected_bytes:
        raise InvalidInputError(
            f"{field}.data has {len(data)} bytes, but shape {dims} of {_NAMES[message.dtype]} "
            f"needs exactly {expected_bytes}"
        )
    array = np.frombuffer(data, dtype=_NUMPY[message.dtype]).reshape(dims)
    tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    if message.dtype == pb.BFLOAT16:
        tensor = tensor.view(torch.bfloat16)
    if finite and not all_finite(tensor):
        raise InvalidInputError(f"{field} contains NaN or Inf; only finite values are allowed")
    return tensor


def optional_tensor_from_pb(parent, name: str, field: str, **checks) -> torch.Tensor | None:
    """``tensor_from_pb`` of sub-message ``name`` of ``parent``, or ``None`` when it is unset."""
    if not parent.HasField(name):
        return None
    return tensor_from_pb(getattr(parent, name), field, **checks)


__all__ = [
    "FLOAT_DTYPES",
    "MAX_DIMS",
    "MAX_DIM_SIZE",
    "MAX_ELEMENTS",
    "all_finite",
    "dtype_from_pb",
    "dtype_to_pb",
    "optional_tensor_from_pb",
    "tensor_from_pb",
    "tensor_to_pb",
]
