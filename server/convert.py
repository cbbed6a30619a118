"""Request messages -> engine domain objects, and engine results -> response messages.

The servicer stays thin by calling one function here per direction; the API-level types
(profiles, sequence info, stats) carry their own ``from_pb``/``to_pb`` in
:mod:`svdq.api.types`, and tensors go through :mod:`svdq.api.wire`.
"""

from __future__ import annotations

import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb

from svdq.api.types import check_name, codec_from_pb, key_space_from_pb, rope_from_pb, sparsity_from_pb
from svdq.api.wire import FLOAT_DTYPES, dtype_from_pb, optional_tensor_from_pb, tensor_from_pb, tensor_to_pb
from svdq.errors import InvalidInputError

from .engine import ChunkPiece, FetchPiece, UploadChunkData, UploadHeader

_INT64 = (torch.int64,)


def _float_tensor(parent, name: str, field: str, shape=None) -> torch.Tensor:
    if not parent.HasField(name):
        raise InvalidInputError(f"{field} is required")
    return tensor_from_pb(getattr(parent, name), field, dtypes=FLOAT_DTYPES, shape=shape, finite=True)


def _positions(parent, field: str = "positions") -> torch.Tensor | None:
    return optional_tensor_from_pb(parent, "positions", field, dtypes=_INT64, shape=(None,))


def output_dtype_from_pb(code: int, field: str = "dtype") -> torch.dtype | None:
    """Requested float output dtype; DTYPE_UNSPECIFIED means "as stored"."""
    if code == pb.DTYPE_UNSPECIFIED:
        return None
    dtype = dtype_from_pb(code, field)
    if dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{field} must be FLOAT16, BFLOAT16 or FLOAT32, got INT64")
    return dtype


def compress_args_from_pb(request: pb.CompressRequest) -> dict:
    """Keyword arguments of :meth:`Engine.compress_keys`."""
    return {
        "keys": _float_tensor(request, "keys", "keys", shape=(None, None, None)),
        "profile_name": check_name(request.profile, "profile") if request.profile else "",
        "layer": request.layer,
        "codec": codec_from_pb(request.codec) if request.HasField("codec") else None,
        "rope": rope_from_pb(request.rope) if request.HasField("rope") else None,
        "positions": _positions(request),
        "key_space": key_space_from_pb(request.key_space, "key_space", "pre_rope"),
    }


def decompress_args_from_pb(request: pb.DecompressRequest) -> dict:
    """Keyword arguments of :meth:`Engine.decompress_keys`."""
    if not request.blob:
        raise InvalidInputError("blob is required")
    return {
        "blob": request.blob,
        "profile_name": check_name(request.profile, "profile") if request.profile else "",
        "layer": request.layer,
        "key_space": key_space_from_pb(request.key_space, "key_space", None),
        "dtype": output_dtype_from_pb(request.dtype),
    }


def upload_header_from_pb(chunk: pb.UploadChunk) -> UploadHeader:
    """The header fields of an upload's first chunk."""
    return UploadHeader(
        sequence_id=check_name(chunk.sequence_id, "sequence_id"),
        profile=check_name(chunk.profile, "profile"),
        upload_id=check_name(chunk.upload_id, "upload_id"),
        total_tokens=chunk.total_tokens,
        key_space=key_space_from_pb(chunk.key_space, "key_space", "pre_rope"),
        replace=chunk.replace,
        has_values=chunk.has_values,
    )


def check_same_header(chunk: pb.UploadChunk, header: UploadHeader) -> None:
    """Later chunks may leave the header empty or repeat it exactly."""
    if not chunk.sequence_id and not chunk.profile and not chunk.upload_id:
        return
    if upload_header_from_pb(chunk) != header:
        raise InvalidInputError("every chunk of one upload stream must repeat the first chunk's header fields "
                                "(sequence_id, profile, upload_id, total_tokens, key_space, replace, has_values) "
                                "exactly, or leave them empty")


def upload_chunk_from_pb(chunk: pb.UploadChunk) -> UploadChunkData:
    """Tensors of one upload chunk, strictly checked."""
    return UploadChunkData(
        layer_start=chunk.layer_start,
        token_start=chunk.token_start,
        keys=_float_tensor(chunk, "keys", "keys", shape=(None, None, None, None)),
        values=_float_tensor(chunk, "values", "values", shape=(None, None, None, None))
        if chunk.HasField("values") else None,
        positions=_positions(chunk),
    )


def append_args_from_pb(request: pb.AppendRequest) -> dict:
    """Keyword arguments of :meth:`Engine.append`."""
    return {
        "sequence_id": check_name(request.sequence_id, "sequence_id"),
        "keys": _float_tensor(request, "keys", "keys", shape=(None, None, None, None)),
        "values": _float_tensor(request, "values", "values", shape=(None, None, None, None))
        if request.HasField("values") else None,
        "positions": _positions(request),
        "expected_tokens": request.expected_tokens if request.HasField("expected_tokens") else None,
    }


def attend_args_from_pb(request: pb.AttendRequest) -> dict:
    """Keyword arguments of :meth:`Engine.attend`."""
    entries = [(check_name(entry.sequence_id, f"entries[{index}].sequence_id"), entry.layer)
               for index, entry in enumerate(request.entries)]
    return {
        "entries": entries,
        "queries": _float_tensor(request, "queries", "queries", shape=(len(entries), None, None)),
        "sparsity": sparsity_from_pb(request.sparsity) if request.HasField("sparsity") else None,
        "scale": request.scale if request.HasField("scale") else None,
        "softcap": request.softcap if request.HasField("softcap") else None,
    }


def attend_result_to_pb(result) -> pb.AttendResponse:
    """An :class:`~svdq.api.types.AttendResult` as a response."""
    response = pb.AttendResponse()
    tensor_to_pb(result.output, response.output)
    tensor_to_pb(result.lse, response.lse)
    response.stats.extend(stat.to_pb() for stat in result.stats)
    return response


def fetch_args_from_pb(request: pb.FetchRequest) -> dict:
    """Keyword arguments of :meth:`Engine.fetch`."""
    return {
        "sequence_id": check_name(request.sequence_id, "sequence_id"),
        "layers": list(request.layers) or None,
        "key_space": key_space_from_pb(request.key_space, "key_space", None),
        "dtype": output_dtype_from_pb(request.dtype),
        "include_values": request.include_values,
        "resume_version": request.resume_version,
        "resume_layer": request.resume_layer,
        "resume_token": request.resume_token,
    }


def fetch_piece_to_pb(piece: FetchPiece) -> pb.FetchChunk:
    """One :class:`~svdq_server.engine.FetchPiece` as a stream message."""
    message = pb.FetchChunk(layer=piece.layer, token_start=piece.token_start, total_tokens=piece.total_tokens,
                            version=piece.version)
    tensor_to_pb(piece.keys, message.keys)
    if piece.values is not None:
        tensor_to_pb(piece.values, message.values)
    tensor_to_pb(piece.positions, message.positions)
    return message


def store_chunk_args_from_pb(request: pb.StoreChunkRequest) -> dict:
    """Keyword arguments of :meth:`Engine.store_chunk`."""
    return {
        "profile_name": check_name(request.profile, "profile"),
        "content_key": request.content_key,
        "cache_salt": request.cache_salt,
        "keys": _float_tensor(request, "keys", "keys", shape=(None, None, None, None)),
        "values": _float_tensor(request, "values", "values", shape=(None, None, None, None)),
        "positions": _positions(request),
        "key_space": key_space_from_pb(request.key_space, "key_space", "post_rope"),
    }


def chunk_keys_args_from_pb(request: pb.LookupChunksRequest | pb.FetchChunksRequest) -> dict:
    """The chunk selection of :meth:`Engine.lookup_chunks` / :meth:`Engine.fetch_chunks`."""
    return {
        "profile_name": check_name(request.profile, "profile"),
        "cache_salt": request.cache_salt,
        "content_keys": list(request.content_keys),
    }


def chunk_piece_to_pb(piece: ChunkPiece) -> pb.ChunkPiece:
    """One :class:`~svdq_server.engine.ChunkPiece` as a stream message."""
    message = pb.ChunkPiece(index=piece.index, layer_start=piece.layer_start)
    tensor_to_pb(piece.keys, message.keys)
    tensor_to_pb(piece.values, message.values)
    tensor_to_pb(piece.positions, message.positions)
    return message
