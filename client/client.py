"""Synchronous client of the svdq service, and the request/response helpers it shares with
the asyncio client (:mod:`svdq_client.aio`).

Tensors go in and come out as torch tensors; uploads are streamed in chunks of at most
``chunk_bytes``; idempotent calls are retried with exponential backoff on UNAVAILABLE;
failures raise the typed errors of :mod:`svdq_client.errors` with the server's message.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import errors as library
from svdq.attention import SparsityConfig
from svdq.codec import CodecConfig
from svdq.rope import RopeConfig

from .errors import InvalidInputError, NotFoundError, ServiceError, UnavailableError, error_from_rpc
from .types import (
    AttendResult,
    AttendStats,
    BlobStats,
    CompressResult,
    FetchResult,
    Profile,
    ProfileAssembler,
    SequenceInfo,
    ServerInfo,
    abbreviate,
    check_name,
    codec_to_pb,
    key_space_to_pb,
    profile_pieces,
    rope_to_pb,
    sparsity_to_pb,
)
from .wire import FLOAT_DTYPES, dtype_to_pb, tensor_from_pb, tensor_to_pb

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


# -- connection settings ------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for idempotent calls that got UNAVAILABLE.

    Attributes:
        retries: extra attempts after the first.
        backoff: seconds before the first retry (upper bound of its jitter).
        max_backoff: cap of one wait.
        retry_seconds: when set, retry for as long as this many seconds after the first
            failure instead of ``retries`` times: a failover to another replica, or a store
            that comes back, takes time rather than a number of attempts.
    """

    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    retry_seconds: float | None = None

    def delays(self) -> Iterator[float]:
        deadline = None if self.retry_seconds is None else time.monotonic() + self.retry_seconds
        for attempt in itertools.count():
            if deadline is None and attempt >= self.retries:
                return
            delay = random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))
            if deadline is not None and time.monotonic() + delay > deadline:
                return
            yield delay


def _read_pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def bare_token(token: str | None) -> str | None:
    """The token itself: a value copied with its ``Bearer `` prefix (as it appears in an
    ``authorization`` header) is accepted, since the client adds the prefix."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise InvalidInputError(f"token must be a string, got {type(token).__name__}", grpc.StatusCode.INVALID_ARGUMENT)
    token = token.strip()
    scheme, _, rest = token.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest.strip() else token


def channel_settings(token: str | None, root_certificates, client_certificate, client_key, server_name: str | None,
                     tls: bool | None, max_message_bytes: int):
    """(credentials or None, channel options, call metadata) for a client."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Long-lived worker channels: notice a dead server within a minute.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if bool(client_certificate) != bool(client_key):
        raise InvalidInputError("client_certificate and client_key must be given together (mutual TLS)",
                                grpc.StatusCode.INVALID_ARGUMENT)
    token = bare_token(token)
    use_tls = tls if tls is not None else bool(root_certificates or client_certificate)
    credentials = None
    if use_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(root_certificates), private_key=_read_pem(client_key),
            certificate_chain=_read_pem(client_certificate))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
    elif token:
        log.debug("sending a bearer token over a plaintext channel")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return credentials, options, metadata


def replica_addresses(address) -> list[str]:
    """``[host:port, ...]`` from one address or a list of distinct replica addresses."""
    addresses = [address] if isinstance(address, str) else address
    if (isinstance(addresses, (bytes, Path)) or not isinstance(addresses, Sequence) or not addresses
            or not all(isinstance(item, str) and item for item in addresses)):
        raise InvalidInputError(f"address must be 'host:port' or a non-empty list of them, got {abbreviate(address)}",
                                grpc.StatusCode.INVALID_ARGUMENT)
    if len(set(addresses)) != len(addresses):
        raise InvalidInputError(f"the replica addresses must be distinct, got {list(addresses)}",
                                grpc.StatusCode.INVALID_ARGUMENT)
    return list(addresses)


# -- arguments: checked and put in wire form before anything is sent ------------------------
#
# Both clients build every request through these helpers, so a bad argument fails in the
# caller's frame with a message naming what was expected (inside an upload's request
# iterator it would surface only as "Exception iterating requests!"), and the obvious
# alternatives are accepted: a Profile for its name, a numpy array for a tensor, a
# CompressResult for its blob, one (sequence_id, layer) pair for a list of one.

def client_side(build):
    """Raise the argument errors of request builder ``build`` as :class:`svdq_client.InvalidInputError`
    (code INVALID_ARGUMENT, the server's own answer to such a request), whichever check found them."""

    @functools.wraps(build)
    def checked(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except ServiceError:
            raise
        except library.InvalidInputError as exc:
            raise InvalidInputError(str(exc), grpc.StatusCode.INVALID_ARGUMENT) from None

    return checked


def _kind(value) -> str:
    return type(value).__name__


def profile_name(profile, field: str = "profile", optional: bool = False) -> str:
    """A profile's name from a name or a :class:`Profile`; ``""`` for None when ``optional``."""
    if isinstance(profile, Profile):
        return profile.name
    if profile is None and optional:
        return ""
    if not isinstance(profile, str):
        raise library.InvalidInputError(f"{field} must be a profile name (str) or a Profile, got {_kind(profile)}")
    return check_name(profile, field)


def as_integer(value, field: str, minimum: int = 0) -> int:
    """An int (numpy integers too, not bools) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise library.InvalidInputError(f"{field} must be an integer >= {minimum}, got {_kind(value)} {abbreviate(value)}")
    if value < minimum:
        raise library.InvalidInputError(f"{field} must be an integer >= {minimum}, got {value}")
    return int(value)


def as_instance(value, kind: type, field: str):
    """``value`` when it is a ``kind`` or None."""
    if value is not None and not isinstance(value, kind):
        raise library.InvalidInputError(f"{field} must be a {kind.__name__} or None, got {_kind(value)}")
    return value


def as_tensor(value, field: str, layout: str, dims: int, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A CPU torch tensor of rank ``dims`` and one of ``dtypes`` from a tensor or numpy array
    (``layout`` names the dimensions for the message, e.g. ``[tokens, kv_heads, head_dim]``)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    names = "/".join(str(dtype).replace("torch.", "") for dtype in dtypes)
    if not isinstance(value, torch.Tensor):
        raise library.InvalidInputError(f"{field} must be a torch.Tensor (or numpy array) {layout} of {names}, "
                                        f"got {_kind(value)}")
    if value.dim() != dims or value.dtype not in dtypes:
        raise library.InvalidInputError(f"{field} must be a torch.Tensor {layout} of {names}, got "
                                        f"{str(value.dtype).replace('torch.', '')} {list(value.shape)}")
    return value.detach().cpu()


def as_positions(positions, tokens: int) -> torch.Tensor | None:
    """int64 positions [tokens] from a tensor, array or sequence of integers, or None."""
    if positions is None:
        return None
    if isinstance(positions, (list, tuple, range)):
        positions = torch.as_tensor(list(positions), dtype=torch.int64)
    positions = as_tensor(positions, "positions", f"[{tokens}] (one per token)", 1,
                          (torch.int64, torch.int32, torch.int16, torch.uint8))
    if positions.shape[0] != tokens:
        raise library.InvalidInputError(f"positions must have one entry per token ({tokens}), got {positions.shape[0]}")
    return positions.to(torch.int64)


def as_entries(entries) -> list[tuple[str, int]]:
    """``[(sequence_id, layer), ...]`` from a sequence of pairs or one pair."""
    pair = isinstance(entries, tuple) and len(entries) == 2 and isinstance(entries[0], str)
    if pair:
        entries = [entries]
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise library.InvalidInputError(f"entries must be a list of (sequence_id, layer) pairs, got {_kind(entries)}")
    checked = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise library.InvalidInputError(f"entries[{index}] must be a (sequence_id, layer) pair such as "
                                            f"('seq-1', 0), got {_kind(entry)} {abbreviate(entry)}")
        try:
            # The entry's place is named only in an error: building each field's name up front
            # cost more per entry than the checks.
            checked.append((check_name(entry[0], "sequence_id"), as_integer(entry[1], "layer")))
        except library.InvalidInputError as error:
            raise library.InvalidInputError(f"entries[{index}].{error}") from None
    return checked


def as_blob(blob) -> bytes:
    """Blob bytes from bytes-like data or a :class:`CompressResult`."""
    if isinstance(blob, CompressResult):
        return blob.blob
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise library.InvalidInputError(f"blob must be the bytes of a compressed blob (or the CompressResult of "
                                        f"compress()), got {_kind(blob)}")
    return bytes(blob)


def as_dtype(dtype) -> int:
    if dtype is None:
        return pb.DTYPE_UNSPECIFIED
    if dtype not in FLOAT_DTYPES:
        raise library.InvalidInputError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or None, "
                                        f"got {abbreviate(dtype)}")
    return dtype_to_pb(dtype)


def check_cache_tensors(keys, values, positions, what: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                     torch.Tensor | None]:
    """Keys/values [layers, tokens, kv_heads, head_dim] with at least one token, and positions
    (the server checks everything again; this catches mistakes before bytes travel)."""
    keys = as_tensor(keys, f"{what} keys", "[layers, tokens, kv_heads, head_dim]", 4)
    if values is not None:
        values = as_tensor(values, f"{what} values", "[layers, tokens, kv_heads, head_dim]", 4)
        if values.shape != keys.shape:
            raise library.InvalidInputError(f"{what} values must have the shape of keys {list(keys.shape)}, "
                                            f"got {list(values.shape)}")
    if keys.shape[1] == 0:
        raise library.InvalidInputError(f"{what} keys must hold at least one token, got shape {list(keys.shape)}")
    return keys, values, as_positions(positions, keys.shape[1])


def upload_messages(sequence_id: str, profile: str, keys: torch.Tensor, values: torch.Tensor | None,
                    positions: torch.Tensor | None, key_space: str, replace: bool, upload_id: str,
                    chunk_bytes: int) -> Iterator[pb.UploadChunk]:
    """The chunks of one upload, each at most about ``chunk_bytes`` of tensor data (arguments
    already checked by :func:`upload_request`).

    Chunks walk the layers in order and, within a layer, its tokens: the server compresses a
    layer as soon as its last chunk arrives, while the next layer is still on the wire. A
    chunk holds several whole layers when they fit, else a token range of one layer (at
    least one token).
    """
    layers, tokens = keys.shape[0], keys.shape[1]
    token_layer_bytes = keys[0, 0].numel() * keys.element_size() * (2 if values is not None else 1)
    layer_bytes = tokens * token_layer_bytes
    layers_per_chunk = max(1, chunk_bytes // layer_bytes)
    tokens_per_chunk = tokens if layers_per_chunk > 1 else max(1, chunk_bytes // token_layer_bytes)
    header = {"sequence_id": sequence_id, "profile": profile, "upload_id": upload_id, "total_tokens": tokens,
              "key_space": key_space_to_pb(key_space), "replace": replace, "has_values": values is not None}
    for layer_start in range(0, layers, layers_per_chunk):
        layer_stop = min(layers, layer_start + layers_per_chunk)
        for token_start in range(0, tokens, tokens_per_chunk):
            token_stop = min(tokens, token_start + tokens_per_chunk)
            chunk = pb.UploadChunk(layer_start=layer_start, token_start=token_start, **header)
            tensor_to_pb(keys[layer_start:layer_stop, token_start:token_stop], chunk.keys)
            if values is not None:
                tensor_to_pb(values[layer_start:layer_stop, token_start:token_stop], chunk.values)
            if positions is not None:
                tensor_to_pb(positions[token_start:token_stop], chunk.positions)
            yield chunk


@client_side
def upload_request(sequence_id, profile, keys, values, positions, key_space: str, replace: bool,
                   upload_id: str | None, chunk_bytes: int) -> Callable[[], Iterator[pb.UploadChunk]]:
    """Check an upload's arguments; returns a factory of its chunk stream (one per attempt)."""
    sequence_id = check_name(sequence_id, "sequence_id")
    profile = profile_name(profile)
    keys, values, positions = check_cache_tensors(keys, values, positions, "upload")
    key_space_to_pb(key_space)
    upload_id = check_name(upload_id, "upload_id") if upload_id is not None else uuid.uuid4().hex
    replace = bool(replace)
    return lambda: upload_messages(sequence_id, profile, keys, values, positions, key_space, replace, upload_id,
                                   chunk_bytes)


@client_side
def compress_request(keys, profile, layer, codec, rope, positions, key_space: str) -> pb.CompressRequest:
    keys = as_tensor(keys, "keys", "[tokens, kv_heads, head_dim]", 3)
    request = pb.CompressRequest(profile=profile_name(profile, optional=True), layer=as_integer(layer, "layer"),
                                 key_space=key_space_to_pb(key_space))
    tensor_to_pb(keys, request.keys)
    positions = as_positions(positions, keys.shape[0])
    if positions is not None:
        tensor_to_pb(positions, request.positions)
    if as_instance(codec, CodecConfig, "codec") is not None:
        codec_to_pb(codec, request.codec)
    if as_instance(rope, RopeConfig, "rope") is not None:
        rope_to_pb(rope, request.rope)
    return request


@client_side
def decompress_request(blob, profile, layer, key_space: str | None, dtype) -> pb.DecompressRequest:
    return pb.DecompressRequest(blob=as_blob(blob), profile=profile_name(profile, optional=True),
                                layer=as_integer(layer, "layer"), key_space=key_space_to_pb(key_space),
                                dtype=as_dtype(dtype))


@client_side
def append_request(sequence_id, keys, values, positions, expected_tokens) -> pb.AppendRequest:
    """An AppendRequest; ``expected_tokens`` None leaves it for the caller to fill in."""
    request = pb.AppendRequest(sequence_id=check_name(sequence_id, "sequence_id"))
    keys, values, positions = check_cache_tensors(keys, values, positions, "append")
    if expected_tokens is not None:
        request.expected_tokens = as_integer(expected_tokens, "expected_tokens")
    tensor_to_pb(keys, request.keys)
    if values is not None:
        tensor_to_pb(values, request.values)
    if positions is not None:
        tensor_to_pb(positions, request.positions)
    return request


@client_side
def attend_request(queries, entries, sparsity, scale, softcap=None) -> pb.AttendRequest:
    entries = as_entries(entries)
    queries = as_tensor(queries, "queries", f"[B, q_heads, head_dim] with B = len(entries) = {len(entries)}", 3)
    if queries.shape[0] != len(entries):
        raise library.InvalidInputError(f"queries must be [B, q_heads, head_dim] with B = len(entries) = "
                                        f"{len(entries)}, got {list(queries.shape)}")
    request = pb.AttendRequest()
    add = request.entries.add  # in place: a list of built entries would be copied again
    for sequence_id, layer in entries:
        add(sequence_id=sequence_id, layer=layer)
    tensor_to_pb(queries, request.queries)
    if as_instance(sparsity, SparsityConfig, "sparsity") is not None:
        sparsity_to_pb(sparsity, request.sparsity)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not 0 < scale < math.inf:
            raise library.InvalidInputError(f"scale must be a positive finite number or None, got {abbreviate(scale)}")
        request.scale = float(scale)
    if softcap is not None:
        # The range is the server's to check (svdq.attention.MAX_SOFTCAP); a non-number cannot be sent.
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating)):
            raise library.InvalidInputError(f"softcap must be a number or None, got {abbreviate(softcap)}")
        request.softcap = float(softcap)
    return request


def attended_sequence(request: pb.AttendRequest) -> str | None:
    """The sequence an Attend is routed by: its first entry's (None without entries, which the
    server rejects)."""
    return request.entries[0].sequence_id if request.entries else None


def attend_result(response: pb.AttendResponse) -> AttendResult:
    return AttendResult(
        output=tensor_from_pb(response.output, "output"), lse=tensor_from_pb(response.lse, "lse"),
        stats=[AttendStats.from_pb(stat) for stat in response.stats],
    )


@client_side
def fetch_request(sequence_id, layers, key_space: str | None, dtype, include_values: bool,
                  chunk_bytes: int) -> pb.FetchRequest:
    if layers is None:
        layers = ()
    elif isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = (layers,)
    elif isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise library.InvalidInputError(f"layers must be a list of layer indices, one index, or None (every "
                                        f"layer), got {_kind(layers)}")
    layers = [as_integer(layer, f"layers[{index}]") for index, layer in enumerate(layers)]
    return pb.FetchRequest(sequence_id=check_name(sequence_id, "sequence_id"), layers=layers,
                           key_space=key_space_to_pb(key_space), dtype=as_dtype(dtype),
                           include_values=bool(include_values), max_chunk_bytes=chunk_bytes)


@client_side
def sequence_request(message_type, sequence_id):
    """A Delete/Describe request naming one sequence."""
    return message_type(sequence_id=check_name(sequence_id, "sequence_id"))


@client_side
def profile_name_request(name) -> pb.GetProfileRequest:
    return pb.GetProfileRequest(name=profile_name(name, "name"))


class FetchAssembler:
    """Collects Fetch stream chunks into [layers, tokens, kv_heads, head_dim] tensors, and knows
    where a stream that was cut off resumes (:meth:`resume`)."""

    def __init__(self) -> None:
        self._start_over()

    def _start_over(self) -> None:
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._positions: torch.Tensor | None = None
        self._received: dict[int, int] = {}
        self._version = ""
        #: (layer, next token) after the last chunk received: where a resumed stream continues
        self._reached: tuple[int, int] | None = None
        self._resuming = False

    def add(self, chunk: pb.FetchChunk) -> None:
        if self._reached is not None and chunk.version != self._version:
            raise ServiceError(f"Fetch stream switched from version {self._version!r} to {chunk.version!r} "
                               "mid-stream", grpc.StatusCode.INTERNAL)
        keys = tensor_from_pb(chunk.keys, "keys")
        total, start, stop = chunk.total_tokens, chunk.token_start, chunk.token_start + keys.shape[0]
        if chunk.layer not in self._keys:
            self._keys[chunk.layer] = torch.empty((total, *keys.shape[1:]), dtype=keys.dtype)
            self._received[chunk.layer] = 0
        self._keys[chunk.layer][start:stop] = keys
        self._received[chunk.layer] += stop - start
        if chunk.HasField("values"):
            values = tensor_from_pb(chunk.values, "values")
            if chunk.layer not in self._values:
                self._values[chunk.layer] = torch.empty((total, *values.shape[1:]), dtype=values.dtype)
            self._values[chunk.layer][start:stop] = values
        if self._positions is None:
            self._positions = torch.empty(total, dtype=torch.int64)
        self._positions[start:stop] = tensor_from_pb(chunk.positions, "positions")
        self._version, self._reached = chunk.version, (chunk.layer, stop)

    def resume(self, request: pb.FetchRequest) -> pb.FetchRequest:
        """The request of the next attempt: from where the chunks received so far end (a
        server that names no version cannot resume: the fetch starts over)."""
        self._resuming = bool(self._reached and self._version)
        if not self._resuming:  # the first attempt too: nothing to resume
            self._start_over()
            return request
        resumed = pb.FetchRequest()
        resumed.CopyFrom(request)
        resumed.resume_version = self._version
        resumed.resume_layer, resumed.resume_token = self._reached
        return resumed

    def retryable(self, error: ServiceError) -> bool:
        """Whether a failed attempt is worth another: UNAVAILABLE resumes; a resume that the
        server refused because the sequence changed meanwhile starts over."""
        if isinstance(error, UnavailableError):
            return True
        if self._resuming and error.code == grpc.StatusCode.FAILED_PRECONDITION:
            log.info("the sequence changed while its Fetch was interrupted; fetching it from the start: %s",
                     error.details)
            self._start_over()
            return True
        return False

    def result(self) -> FetchResult:
        if not self._keys:
            raise ServiceError("Fetch stream ended without data", grpc.StatusCode.INTERNAL)
        layers = sorted(self._keys)
        for layer in layers:
            if self._received[layer] != self._keys[layer].shape[0]:
                raise ServiceError(f"Fetch stream ended early: layer {layer} has {self._received[layer]} of "
                                   f"{self._keys[layer].shape[0]} tokens", grpc.StatusCode.INTERNAL)
        keys = torch.stack([self._keys[layer] for layer in layers])
        values = torch.stack([self._values[layer] for layer in layers]) if self._values else None
        return FetchResult(keys, values, self._positions)


def as_cache_salt(cache_salt) -> str:
    """A chunk's cache salt: any string (its length is the server's to limit)."""
    if not isinstance(cache_salt, str):
        raise library.InvalidInputError(f"cache_salt must be a string ('' for none), got {_kind(cache_salt)}")
    return cache_salt


def as_content_keys(content_keys, at_least: int = 0) -> list[str]:
    """Chunk content keys from a sequence of names (a single str is refused: it would be read
    as one key per character)."""
    if isinstance(content_keys, (str, bytes)) or not isinstance(content_keys, Sequence):
        raise library.InvalidInputError(f"content_keys must be a list of content keys (str), got "
                                        f"{_kind(content_keys)} {abbreviate(content_keys)}")
    if len(content_keys) < at_least:
        raise library.InvalidInputError(f"content_keys must name at least {at_least} chunk, got none")
    return [check_name(key, f"content_keys[{index}]") for index, key in enumerate(content_keys)]


@client_side
def store_chunk_request(profile, content_key, keys, values, positions, cache_salt, key_space: str) -> pb.StoreChunkRequest:
    profile = profile_name(profile)
    content_key = check_name(content_key, "content_key")
    keys, values, positions = check_cache_tensors(keys, values, positions, "chunk")
    if values is None:
        raise library.InvalidInputError("a chunk stores keys and values: values are required")
    request = pb.StoreChunkRequest(profile=profile, content_key=content_key, cache_salt=as_cache_salt(cache_salt),
                                   key_space=key_space_to_pb(key_space))
    tensor_to_pb(keys, request.keys)
    tensor_to_pb(values, request.values)
    if positions is not None:
        tensor_to_pb(positions, request.positions)
    return request


@client_side
def lookup_chunks_request(profile, content_keys, cache_salt) -> pb.LookupChunksRequest:
    return pb.LookupChunksRequest(profile=profile_name(profile), cache_salt=as_cache_salt(cache_salt),
                                  content_keys=as_content_keys(content_keys))


@client_side
def fetch_chunks_request(profile, content_keys, num_layers, cache_salt, dtype,
                         chunk_bytes: int) -> tuple[pb.FetchChunksRequest, int]:
    """The request and the checked ``num_layers``."""
    request = pb.FetchChunksRequest(profile=profile_name(profile), cache_salt=as_cache_salt(cache_salt),
                                    content_keys=as_content_keys(content_keys, at_least=1), dtype=as_dtype(dtype),
                                    max_chunk_bytes=chunk_bytes)
    return request, as_integer(num_layers, "num_layers", minimum=1)


def chunk_route(request) -> str | None:
    """The routing key (the :data:`SEQUENCE_HEADER` value) of a chunk call: the content key of
    its chunk, or of the first chunk of a chain. A lookup and the fetch that follows it name
    the same first key, so both reach the one replica whose cache the lookup warmed (None: an
    empty lookup, which touches no chunk)."""
    if isinstance(request, pb.StoreChunkRequest):
        return request.content_key
    return request.content_keys[0] if request.content_keys else None


class ChunkAssembler:
    """Collects one attempt's FetchChunks stream pieces into one :class:`FetchResult` per
    requested chunk (a retry starts over in a new one: :class:`Restarted`)."""

    def __init__(self, count: int) -> None:
        self._pieces: list[dict[int, pb.ChunkPiece]] = [{} for _ in range(count)]

    def add(self, piece: pb.ChunkPiece) -> None:
        if piece.index >= len(self._pieces):
            raise ServiceError(f"FetchChunks sent chunk index {piece.index} of {len(self._pieces)} requested",
                               grpc.StatusCode.INTERNAL)
        self._pieces[piece.index][piece.layer_start] = piece

    def result(self, num_layers: int) -> list[FetchResult]:
        results = []
        for index, pieces in enumerate(self._pieces):
            keys, values, layer = [], [], 0
            while layer < num_layers and layer in pieces:
                piece = pieces[layer]
                keys.append(tensor_from_pb(piece.keys, "keys"))
                values.append(tensor_from_pb(piece.values, "values"))
                layer += keys[-1].shape[0]
            if layer != num_layers:
                raise ServiceError(f"FetchChunks stream ended early: chunk {index} has {layer} of {num_layers} layers",
                                   grpc.StatusCode.INTERNAL)
            positions = tensor_from_pb(pieces[0].positions, "positions")
            results.append(FetchResult(torch.cat(keys), torch.cat(values), positions))
        return results


@client_side
def profile_stream(profile: Profile, replace: bool) -> Callable[[], Iterator[pb.ProfilePiece]]:
    """Check a profile; returns a factory of its RegisterProfileStream messages (one stream per
    attempt): one layer's basis per message, so a profile of any size passes the message limit."""
    if not isinstance(profile, Profile):
        raise library.InvalidInputError(f"profile must be an svdq_client.Profile, got {type(profile).__name__}")
    replace = bool(replace)
    return lambda: profile_pieces(profile, replace)


class Restarted:
    """The assembler of a stream that a retry receives again whole (a profile, chunks): each
    attempt collects into a fresh ``factory()`` (its ``add`` and ``result``); UNAVAILABLE is
    retried. A Fetch resumes instead (:class:`FetchAssembler`)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._current = None  # made by resume, which every attempt (the first too) starts with

    def resume(self, request):
        self._current = self._factory()
        return request

    def retryable(self, error: ServiceError) -> bool:
        return isinstance(error, UnavailableError)

    def add(self, message) -> None:
        self._current.add(message)

    def result(self, *args):
        return self._current.result(*args)


class KnownSequences:
    """What a client last heard about each sequence from the server: its token count (the
    default ``expected_tokens`` of its next append) and its :class:`SequenceInfo` (from the
    replies of Upload, Append and Describe)."""

    def __init__(self) -> None:
        # one entry per sequence: (token count, info); the count is the info's when there is
        # one, kept alone only after an Append reply without info
        self._seen: dict[str, tuple[int, SequenceInfo | None]] = {}

    def tokens(self, sequence_id: str) -> int | None:
        seen = self._seen.get(sequence_id)
        return None if seen is None else seen[0]

    def info(self, sequence_id: str) -> SequenceInfo | None:
        seen = self._seen.get(sequence_id)
        return None if seen is None else seen[1]

    def saw(self, sequence_id: str, info: SequenceInfo) -> None:
        self._seen[sequence_id] = (info.num_tokens, info)

    def appended(self, sequence_id: str, response: pb.AppendResponse) -> int:
        """Note an Append's reply; returns the new token count. A server older than the
        reply's ``sequence`` field leaves only the count known."""
        if response.HasField("sequence"):
            self.saw(sequence_id, SequenceInfo.from_pb(response.sequence))
        else:
            self._seen[sequence_id] = (response.num_tokens, None)
        return response.num_tokens

    def forget(self, sequence_id: str) -> None:
        self._seen.pop(sequence_id, None)


# -- several replicas: consistent hashing with failover --------------------------------------

#: points per replica on the hash ring: evens out the sequences each replica owns
RING_POINTS = 128
#: seconds a replica that answered UNAVAILABLE is passed over before it gets traffic again
REPLICA_COOLDOWN_SECONDS = 5.0
#: call metadata naming the sequence a call is about (a chunk call: its content key,
#: :func:`chunk_route`): the key both the client's ring and a proxy's ring hash route by
#: (deploy/envoy/envoy.yaml), so either keeps a sequence on one replica
SEQUENCE_HEADER = "x-svdq-sequence-id"


def _ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def call_metadata(metadata: tuple, sequence_id: str | None) -> tuple:
    """The client's metadata plus the :data:`SEQUENCE_HEADER` of a call about ``sequence_id``
    (None for calls about no sequence: profiles, server info, the stateless codec)."""
    return (*metadata, (SEQUENCE_HEADER, sequence_id)) if sequence_id else metadata


class Replicas:
    """The stubs of one server, or of several replicas behind one shared store (``svdq-server
    --store redis://...``), and which one each call goes to; both clients use it, with sync or
    ``grpc.aio`` stubs alike.

    A call about a sequence goes to the replica that owns the sequence id on a consistent-hash
    ring, so the sequence stays in one replica's cache while that replica is healthy, and adding
    or removing a replica moves only ~1/N of the sequences. A replica that answered UNAVAILABLE
    (:meth:`failed`) is passed over for :data:`REPLICA_COOLDOWN_SECONDS`, so the client's retry
    goes to the next replica on the ring.
    """

    def __init__(self, addresses: Sequence[str], stubs: Sequence, cooldown: float = REPLICA_COOLDOWN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.addresses = list(addresses)
        self._stubs = list(stubs)
        self._ring = sorted((_ring_hash(f"{address}#{point}"), index) for index, address in enumerate(self.addresses)
                            for point in range(RING_POINTS))
        self._hashes = [point for point, _ in self._ring]
        self._down_until = [0.0] * len(self.addresses)
        self._failures = [0] * len(self.addresses)
        self._cooldown = cooldown
        self._clock = clock

    def order(self, key: str) -> list[int]:
        """Replica indices in ring order from ``key``'s owner: the failover order."""
        start = bisect.bisect(self._hashes, _ring_hash(key))
        order: list[int] = []
        for offset in range(len(self._ring)):
            index = self._ring[(start + offset) % len(self._ring)][1]
            if index not in order:
                order.append(index)
                if len(order) == len(self.addresses):
                    break
        return order

    def choose(self, key: str) -> int:
        """The first replica in ``key``'s order that is not cooling down; when all are, the one
        whose cooldown ends first (a dead replica's grows with each failure, so a live one that
        answered UNAVAILABLE once is tried again before it)."""
        if len(self.addresses) == 1:
            return 0
        order = self.order(key)
        now = self._clock()
        return next((index for index in order if self._down_until[index] <= now),
                    min(order, key=lambda index: self._down_until[index]))

    def pick(self, sequence_id: str | None):
        """``(index, stub)`` for a call about ``sequence_id`` (None: no sequence)."""
        index = self.choose(sequence_id or "")
        return index, self._stubs[index]

    def failed(self, index: int, error: ServiceError) -> None:
        """Note a failed call to replica ``index``: UNAVAILABLE starts its cooldown, twice as
        long for each further one in a row (at most 12 times :data:`REPLICA_COOLDOWN_SECONDS`)."""
        if isinstance(error, UnavailableError) and len(self.addresses) > 1:
            cooldown = self._cooldown * min(12, 2 ** self._failures[index])
            self._failures[index] += 1
            log.info("replica %s answered UNAVAILABLE; failing over for %.0fs", self.addresses[index], cooldown)
            self._down_until[index] = self._clock() + cooldown

    def succeeded(self, index: int) -> None:
        """Note a call that replica ``index`` answered: its failures in a row start again from 0."""
        self._failures[index] = 0


class CallAttempts:
    """The retry and failover policy of one call, the same for both clients (the synchronous one
    sleeps the delays, the asyncio one awaits them): each attempt goes to the replica that
    :meth:`Replicas.pick` chooses for the routing ``key``; a failed attempt is tried again after
    the next :class:`RetryPolicy` delay when ``retryable(error)`` says so (default: UNAVAILABLE of
    an idempotent call; a streamed call's assembler also resumes), else its typed error is raised.

    Use: ``stub = attempts.stub()``, call it with ``attempts.metadata``, then
    ``attempts.succeeded()``, or on ``grpc.RpcError`` wait ``attempts.retry_after(error)`` seconds
    (it raises when the call is not tried again) and start over.
    """

    def __init__(self, replicas: Replicas, retry: RetryPolicy, metadata: tuple, key: str | None, method: str,
                 idempotent: bool = True, retryable: Callable[[ServiceError], bool] | None = None) -> None:
        self._replicas = replicas
        self._delays = retry.delays() if idempotent else iter(())
        self._retryable = retryable or (lambda error: isinstance(error, UnavailableError))
        self._key = key
        self._method = method
        self._index = 0
        self.metadata = call_metadata(metadata, key)

    def stub(self):
        """The stub of the replica this attempt goes to."""
        self._index, stub = self._replicas.pick(self._key)
        return stub

    def succeeded(self) -> None:
        self._replicas.succeeded(self._index)

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the typed error when there is none."""
        typed = error_from_rpc(error)
        self._replicas.failed(self._index, typed)
        delay = next(self._delays, None) if self._retryable(typed) else None
        if delay is None:
            raise typed from None
        log.info("retrying %s in %.3fs: %s", self._method, delay, typed.details)
        return delay


# -- the synchronous client ---------------------------------------------------------------

class KVCacheClient:
    """Blocking client of ``svdq.v1.KVCache`` (see docs/service.md for the semantics).

    Args:
        address: ``host:port`` of the server, or a list of replicas that share one store
            (``svdq-server --store redis://...``): calls are routed by sequence id with
            consistent hashing and fail over to the next replica (:class:`Replicas`). Each
            call about a sequence carries its id in the :data:`SEQUENCE_HEADER` metadata,
            which a proxy can route by (deploy/envoy/envoy.yaml).
        token: bearer token of the caller's tenant.
        root_certificates: PEM bytes or path of the CA that signed the server certificate;
            turns TLS on (``tls=True`` without it uses the system roots).
        client_certificate, client_key: PEM bytes or paths for mutual TLS.
        server_name: TLS name to verify when it differs from the address host.
        timeout: default deadline of every call, seconds.
        retries, backoff, max_backoff, retry_seconds: retry policy on UNAVAILABLE (idempotent
            calls; :class:`RetryPolicy`).
        chunk_bytes: largest tensor payload of one upload chunk.
        max_message_bytes: channel message size limit both ways.
    """

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | str | Path | None = None,
                 client_certificate: bytes | str | Path | None = None, client_key: bytes | str | Path | None = None,
                 server_name: str | None = None, tls: bool | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.05, max_backoff: float = 2.0, retry_seconds: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        credentials, options, self._metadata = channel_settings(
            token, root_certificates, client_certificate, client_key, server_name, tls, max_message_bytes)
        addresses = replica_addresses(address)
        if credentials is None:
            self._channels = [grpc.insecure_channel(target, options=options) for target in addresses]
        else:
            self._channels = [grpc.secure_channel(target, credentials, options=options) for target in addresses]
        self._replicas = Replicas(addresses, [pb_grpc.KVCacheStub(channel) for channel in self._channels])
        self.address = address
        self.timeout = timeout
        self.retry = RetryPolicy(retries, backoff, max_backoff, retry_seconds)
        self.chunk_bytes = chunk_bytes
        self._known = KnownSequences()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> KVCacheClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, request_factory, timeout: float | None, idempotent: bool = True,
              sequence_id: str | None = None):
        """Call ``method`` on the replica of ``sequence_id`` (the routing key) under the
        :class:`CallAttempts` policy; ``request_factory`` builds a fresh request (or request
        iterator) per attempt."""
        attempts = CallAttempts(self._replicas, self.retry, self._metadata, sequence_id, method, idempotent)
        while True:
            try:
                response = getattr(attempts.stub(), method)(request_factory(), timeout=timeout or self.timeout,
                                                            metadata=attempts.metadata)
            except grpc.RpcError as error:
                time.sleep(attempts.retry_after(error))
                continue
            attempts.succeeded()
            return response

    def _streamed(self, method: str, request, assembler, finish, timeout: float | None,
                  sequence_id: str | None = None):
        """A server-streaming call collected by ``assembler``; an attempt that failed in a way
        ``assembler.retryable`` accepts is retried from where its stream was cut
        (``assembler.resume``)."""
        attempts = CallAttempts(self._replicas, self.retry, self._metadata, sequence_id, method,
                                retryable=assembler.retryable)
        while True:
            try:
                for message in getattr(attempts.stub(), method)(assembler.resume(request),
                                                                timeout=timeout or self.timeout,
                                                                metadata=attempts.metadata):
                    assembler.add(message)
            except grpc.RpcError as error:
                time.sleep(attempts.retry_after(error))
                continue
            attempts.succeeded()
            return finish(assembler)

    # -- profiles ------------------------------------------------------------------------

    def register_profile(self, profile: Profile, replace: bool = False, *, timeout: float | None = None) -> Profile:
        """Register a model profile (identical re-registration is a no-op); its shared bases
        travel one layer per message, up to the server's --max-profile-bytes. Returns it."""
        self._call("RegisterProfileStream", profile_stream(profile, replace), timeout)
        return profile

    def get_profile(self, name: str, *, timeout: float | None = None) -> Profile:
        """A profile whole, its shared bases streamed one layer per message."""
        return self._streamed("GetProfileStream", profile_name_request(name), Restarted(ProfileAssembler),
                              Restarted.result, timeout)

    def list_profiles(self, *, timeout: float | None = None) -> list[Profile]:
        """The profiles this caller can use, by name, without their shared bases (a listing of
        several would pass the message limit): :meth:`get_profile` returns one whole."""
        response = self._call("ListProfiles", pb.ListProfilesRequest, timeout)
        return [Profile.from_pb(message) for message in response.profiles]

    # -- stateless codec -------------------------------------------------------------------

    def compress(self, keys: torch.Tensor, *, profile: str | None = None, layer: int = 0,
                 codec: CodecConfig | None = None, rope: RopeConfig | None = None,
                 positions: torch.Tensor | None = None, key_space: str = "pre_rope",
                 timeout: float | None = None) -> CompressResult:
        """Compress keys [tokens, kv_heads, head_dim] without storing them."""
        request = compress_request(keys, profile, layer, codec, rope, positions, key_space)
        response = self._call("Compress", lambda: request, timeout)
        return CompressResult(response.blob, BlobStats.from_pb(response.stats))

    def decompress(self, blob: bytes, *, profile: str | None = None, layer: int = 0, key_space: str | None = None,
                   dtype: torch.dtype | None = None, timeout: float | None = None) -> torch.Tensor:
        """Keys [tokens, kv_heads, head_dim] of a blob from :meth:`compress`."""
        request = decompress_request(blob, profile, layer, key_space, dtype)
        return tensor_from_pb(self._call("Decompress", lambda: request, timeout).keys, "keys")

    # -- stored sequences ------------------------------------------------------------------

    def upload(self, sequence_id: str, profile: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
               positions: torch.Tensor | None = None, key_space: str = "pre_rope", replace: bool = False,
               upload_id: str | None = None, timeout: float | None = None) -> SequenceInfo:
        """Store a sequence's prefill: keys (and values) [layers, tokens, kv_heads, head_dim]
        of every layer of the profile, streamed in chunks; retried streams do not duplicate."""
        messages = upload_request(sequence_id, profile, keys, values, positions, key_space, replace, upload_id,
                                  self.chunk_bytes)
        response = self._call("Upload", messages, timeout, sequence_id=sequence_id)
        info = SequenceInfo.from_pb(response.sequence)
        self._known.saw(sequence_id, info)
        return info

    def append(self, sequence_id: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
               positions: torch.Tensor | None = None, expected_tokens: int | None = None,
               timeout: float | None = None) -> int:
        """Append a decode step: keys (and values) [layers, new_tokens, kv_heads, head_dim] of
        every layer. Returns the new token count. Ordered by ``expected_tokens`` (default: the
        count this client last saw, else asked from the server)."""
        request = append_request(sequence_id, keys, values, positions, expected_tokens)
        if expected_tokens is None:
            expected_tokens = self._known.tokens(sequence_id)
            if expected_tokens is None:
                expected_tokens = self.describe(sequence_id, timeout=timeout).num_tokens
            request.expected_tokens = expected_tokens
        response = self._call("Append", lambda: request, timeout, sequence_id=sequence_id)
        return self._known.appended(sequence_id, response)

    def attend(self, queries: torch.Tensor, entries: Sequence[tuple[str, int]], *,
               sparsity: SparsityConfig | None = None, scale: float | None = None,
               softcap: float | None = None, timeout: float | None = None) -> AttendResult:
        """Attention of post-RoPE ``queries`` [B, q_heads, head_dim], row b over
        ``entries[b] = (sequence_id, layer)``: output float32 [B, q_heads, head_dim] and lse
        float32 [B, q_heads]. ``softcap``: attention logit softcapping (Gemma 2), scores
        ``softcap * tanh(scores / softcap)`` before the softmax."""
        request = attend_request(queries, entries, sparsity, scale, softcap)
        return attend_result(self._call("Attend", lambda: request, timeout,
                                         sequence_id=attended_sequence(request)))

    def fetch(self, sequence_id: str, *, layers: Sequence[int] | None = None, key_space: str | None = None,
              dtype: torch.dtype | None = None, include_values: bool = True,
              timeout: float | None = None) -> FetchResult:
        """Reconstructed keys (and values) [layers, tokens, kv_heads, head_dim], streamed."""
        request = fetch_request(sequence_id, layers, key_space, dtype, include_values, self.chunk_bytes)
        return self._streamed("Fetch", request, FetchAssembler(), lambda assembler: assembler.result(), timeout,
                             sequence_id=request.sequence_id)

    def delete(self, sequence_id: str, *, timeout: float | None = None) -> None:
        """Delete a stored sequence (NotFoundError when absent)."""
        message = sequence_request(pb.DeleteRequest, sequence_id)
        attempts = 0

        def request():
            nonlocal attempts
            attempts += 1
            return message

        try:
            self._call("Delete", request, timeout, sequence_id=message.sequence_id)
        except NotFoundError:
            # After an UNAVAILABLE retry, NOT_FOUND means an earlier attempt deleted it.
            if attempts == 1:
                raise
        self._known.forget(sequence_id)

    def describe(self, sequence_id: str, *, timeout: float | None = None) -> SequenceInfo:
        """Tokens, layers, bytes and compression of a stored sequence."""
        request = sequence_request(pb.DescribeRequest, sequence_id)
        info = SequenceInfo.from_pb(self._call("Describe", lambda: request, timeout, sequence_id=request.sequence_id))
        self._known.saw(sequence_id, info)
        return info

    def last_info(self, sequence_id: str) -> SequenceInfo | None:
        """The sequence as this client's last Upload, Append or Describe of it left it (no
        call; None when this client has not seen it, or its last Append's server did not say)."""
        return self._known.info(sequence_id)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's version, device, store budget and occupancy."""
        return ServerInfo.from_pb(self._call("GetServerInfo", pb.ServerInfoRequest, timeout))

    # -- content-addressed chunks (KV connectors) --------------------------------------------

    def store_chunk(self, profile: str, content_key: str, keys: torch.Tensor, values: torch.Tensor, *,
                    positions: torch.Tensor | None = None, cache_salt: str = "", key_space: str = "post_rope",
                    timeout: float | None = None) -> tuple[SequenceInfo, bool]:
        """Store one chunk, keys and values [layers, tokens, kv_heads, head_dim] of every layer,
        under a content key (retried safely: a stored key is kept). Returns its info and
        whether this call created it."""
        request = store_chunk_request(profile, content_key, keys, values, positions, cache_salt, key_space)
        response = self._call("StoreChunk", lambda: request, timeout, sequence_id=chunk_route(request))
        return SequenceInfo.from_pb(response.chunk), response.created

    def lookup_chunks(self, profile: str, content_keys: Sequence[str], *, cache_salt: str = "",
                      timeout: float | None = None) -> int:
        """How many of ``content_keys`` (a chain in token order), from the first on, are stored."""
        request = lookup_chunks_request(profile, content_keys, cache_salt)
        return self._call("LookupChunks", lambda: request, timeout, sequence_id=chunk_route(request)).leading

    def fetch_chunks(self, profile: str, content_keys: Sequence[str], num_layers: int, *, cache_salt: str = "",
                     dtype: torch.dtype | None = None, timeout: float | None = None) -> list[FetchResult]:
        """Reconstructed keys and values [num_layers, tokens, kv_heads, head_dim] of stored chunks,
        one :class:`FetchResult` per content key, in one streamed call (NotFoundError when any
        is not stored)."""
        request, num_layers = fetch_chunks_request(profile, content_keys, num_layers, cache_salt, dtype,
                                                   self.chunk_bytes)
        count = len(request.content_keys)
        return self._streamed("FetchChunks", request, Restarted(lambda: ChunkAssembler(count)),
                              lambda assembler: assembler.result(num_layers), timeout,
                              sequence_id=chunk_route(request))
