"""svdq: SVD-based mixed-precision compression of LLM key and value caches, and attention over them.

The core library: it knows nothing about gRPC. See :mod:`svdq.codec` for the codec,
:mod:`svdq.format` for the serialized format, :mod:`svdq.values` and :mod:`svdq.kv` for values and
the whole-cache budget, and :mod:`svdq.rope` for RoPE handling.
"""

from .codec import (
    Basis,
    CodecConfig,
    CompressedKeys,
    append,
    compress,
    decompress,
    fit_basis,
    fit_layer_basis,
    relative_error,
)
from .errors import (
    ConflictError,
    FormatError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    SvdqError,
    UnavailableError,
)
from .format import from_bytes, to_bytes
from .rope import RopeConfig, apply_rope, undo_rope

__version__ = "0.1.0"

__all__ = [
    "Basis",
    "CodecConfig",
    "CompressedKeys",
    "ConflictError",
    "FormatError",
    "InvalidInputError",
    "NotFoundError",
    "ResourceExhaustedError",
    "RopeConfig",
    "SvdqError",
    "UnavailableError",
    "append",
    "apply_rope",
    "compress",
    "decompress",
    "fit_basis",
    "fit_layer_basis",
    "from_bytes",
    "relative_error",
    "to_bytes",
    "undo_rope",
]
