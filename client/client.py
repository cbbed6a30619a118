"""Synchronous client of the svdq service, and the request/response helpers it shares with
the asyncio client (:mod:`svdq_client.aio`).

Tensors go in and come out as torch tensors; uploads are streamed in chunks of at most
``chunk_bytes``; idempotent calls are retried with exponential backoff on UNAVAILABLE;
failures raise the typed errors of :mod:`svdq_client.errors` with the server's message.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq.attention import SparsityConfig
from svdq.codec import CodecConfig
from svdq.errors import InvalidInputError
from svdq.rope import RopeConfig

from .errors import NotFoundError, ServiceError, UnavailableError, error_from_rpc
from .types import (
    AttendResult,
    AttendStats,
    BlobStats,
    CompressResult,
    FetchResult,
    Profile,
    SequenceInfo,
    ServerInfo,
    codec_to_pb,
    key_space_to_pb,
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
    """

    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0

    def delays(self) -> Iterator[float]:
        for attempt in range(self.retries):
            yield random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


def _read_pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


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
        raise InvalidInputError("client_certificate and client_key must be given together (mutual TLS)")
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


# -- requests and responses shared by both clients ------------------------------------------

def upload_messages(sequence_id: str, profile: str, keys: torch.Tensor, values: torch.Tensor | None,
                    positions: torch.Tensor | None, key_space: str, replace: bool, upload_id: str,
                    chunk_bytes: int) -> Iterator[pb.UploadChunk]:
    """The chunks of one upload, each at most about ``chunk_bytes`` of tensor data.

    Chunks walk the tokens in order and, within a token range, the layers; a token range of
    every layer fits one chunk unless a single token of all layers is already too big.
    """
    layers, tokens = keys.shape[0], keys.shape[1]
    token_layer_bytes = keys[0, 0].numel() * keys.element_size() * (2 if values is not None else 1)
    layers_per_chunk = layers if layers * token_layer_bytes <= chunk_bytes else max(1, chunk_bytes // token_layer_bytes)
    tokens_per_chunk = max(1, chunk_bytes // (layers_per_chunk * token_layer_bytes))
    header = {"sequence_id": sequence_id, "profile": profile, "upload_id": upload_id, "total_tokens": tokens,
              "key_space": key_space_to_pb(key_space), "replace": replace, "has_values": values is not None}
    for token_start in range(0, tokens, tokens_per_chunk):
        token_stop = min(tokens, token_start + tokens_per_chunk)
        for layer_start in range(0, layers, layers_per_chunk):
            layer_stop = min(layers, layer_start + layers_per_chunk)
            chunk = pb.UploadChunk(layer_start=layer_start, token_start=token_start, **header)
            tensor_to_pb(keys[layer_start:layer_stop, token_start:token_stop], chunk.keys)
            if values is not None:
                tensor_to_pb(values[layer_start:layer_stop, token_start:token_stop], chunk.values)
            if positions is not None:
                tensor_to_pb(positions[token_start:token_stop], chunk.positions)
            yield chunk


def check_cache_tensors(keys: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor | None,
                        what: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Client-side shape checks of [layers, tokens, kv_heads, head_dim] keys/values (the server
    checks everything again; this only catches mistakes before bytes travel)."""
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{what} keys must be a float16/bfloat16/float32 tensor [layers, tokens, kv_heads, "
                                f"head_dim], got {getattr(keys, 'dtype', type(keys).__name__)} "
                                f"{list(getattr(keys, 'shape', []))}")
    if values is not None and (not isinstance(values, torch.Tensor) or values.shape != keys.shape):
        raise InvalidInputError(f"{what} values must have the shape of keys {list(keys.shape)}")
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != keys.shape[1]:
            raise InvalidInputError(f"positions must be a 1-D tensor with one entry per token ({keys.shape[1]})")
        positions = positions.to(torch.int64)
    return keys.detach().cpu(), None if values is None else values.detach().cpu(), positions


def compress_request(keys: torch.Tensor, profile: str | None, layer: int, codec: CodecConfig | None,
                     rope: RopeConfig | None, positions: torch.Tensor | None, key_space: str) -> pb.CompressRequest:
    request = pb.CompressRequest(profile=profile or "", layer=layer, key_space=key_space_to_pb(key_space))
    tensor_to_pb(keys, request.keys)
    if positions is not None:
        tensor_to_pb(positions.to(torch.int64), request.positions)
    if codec is not None:
        codec_to_pb(codec, request.codec)
    if rope is not None:
        rope_to_pb(rope, request.rope)
    return request


def decompress_request(blob: bytes, profile: str | None, layer: int, key_space: str | None,
                       dtype: torch.dtype | None) -> pb.DecompressRequest:
    return pb.DecompressRequest(blob=blob, profile=profile or "", layer=layer, key_space=key_space_to_pb(key_space),
                                dtype=dtype_to_pb(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED)


def append_request(sequence_id: str, keys: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor | None,
                   expected_tokens: int) -> pb.AppendRequest:
    request = pb.AppendRequest(sequence_id=sequence_id, expected_tokens=expected_tokens)
    tensor_to_pb(keys, request.keys)
    if values is not None:
        tensor_to_pb(values, request.values)
    if positions is not None:
        tensor_to_pb(positions, request.positions)
    return request


def attend_request(queries: torch.Tensor, entries: Sequence[tuple[str, int]], sparsity: SparsityConfig | None,
                   scale: float | None) -> pb.AttendRequest:
    if not isinstance(queries, torch.Tensor) or queries.dim() != 3 or queries.shape[0] != len(entries):
        raise InvalidInputError(f"queries must be [B, q_heads, head_dim] with B = len(entries) = {len(entries)}, "
                                f"got {list(getattr(queries, 'shape', []))}")
    request = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id=seq, layer=layer) for seq, layer in entries])
    tensor_to_pb(queries, request.queries)
    if sparsity is not None:
        sparsity_to_pb(sparsity, request.sparsity)
    if scale is not None:
        request.scale = scale
    return request


def attend_result(response: pb.AttendResponse) -> AttendResult:
    return AttendResult(
        output=tensor_from_pb(response.output, "output"), lse=tensor_from_pb(response.lse, "lse"),
        stats=[AttendStats.from_pb(stat) for stat in response.stats],
    )


def fetch_request(sequence_id: str, layers: Sequence[int] | None, key_space: str | None, dtype: torch.dtype | None,
                  include_values: bool, chunk_bytes: int) -> pb.FetchRequest:
    return pb.FetchRequest(sequence_id=sequence_id, layers=list(layers or ()), key_space=key_space_to_pb(key_space),
                           dtype=dtype_to_pb(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED,
                           include_values=include_values, max_chunk_bytes=chunk_bytes)


class FetchAssembler:
    """Collects Fetch stream chunks into [layers, tokens, kv_heads, head_dim] tensors."""

    def __init__(self) -> None:
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._positions: torch.Tensor | None = None
        self._received: dict[int, int] = {}

    def add(self, chunk: pb.FetchChunk) -> None:
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


def store_chunk_request(profile: str, content_key: str, keys: torch.Tensor, values: torch.Tensor,
                        positions: torch.Tensor | None, cache_salt: str, key_space: str) -> pb.StoreChunkRequest:
    keys, values, positions = check_cache_tensors(keys, values, positions, "chunk")
    if values is None:
        raise InvalidInputError("a chunk stores keys and values: values are required")
    request = pb.StoreChunkRequest(profile=profile, content_key=content_key, cache_salt=cache_salt,
                                   key_space=key_space_to_pb(key_space))
    tensor_to_pb(keys, request.keys)
    tensor_to_pb(values, request.values)
    if positions is not None:
        tensor_to_pb(positions, request.positions)
    return request


class ChunkAssembler:
    """Collects FetchChunks stream pieces into one :class:`FetchResult` per requested chunk."""

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


def profile_request(profile: Profile, replace: bool) -> pb.RegisterProfileRequest:
    if not isinstance(profile, Profile):
        raise InvalidInputError(f"profile must be an svdq_client.Profile, got {type(profile).__name__}")
    return pb.RegisterProfileRequest(profile=profile.to_pb(), replace=replace)


# -- the synchronous client ---------------------------------------------------------------

class KVCacheClient:
    """Blocking client of ``svdq.v1.KVCache`` (see docs/service.md for the semantics).

    Args:
        address: ``host:port`` of the server.
        token: bearer token of the caller's tenant.
        root_certificates: PEM bytes or path of the CA that signed the server certificate;
            turns TLS on (``tls=True`` without it uses the system roots).
        client_certificate, client_key: PEM bytes or paths for mutual TLS.
        server_name: TLS name to verify when it differs from the address host.
        timeout: default deadline of every call, seconds.
        retries, backoff, max_backoff: retry policy on UNAVAILABLE (idempotent calls).
        chunk_bytes: largest tensor payload of one upload chunk.
        max_message_bytes: channel message size limit both ways.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | str | Path | None = None,
                 client_certificate: bytes | str | Path | None = None, client_key: bytes | str | Path | None = None,
                 server_name: str | None = None, tls: bool | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.05, max_backoff: float = 2.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        credentials, options, self._metadata = channel_settings(
            token, root_certificates, client_certificate, client_key, server_name, tls, max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.KVCacheStub(self._channel)
        self.address = address
        self.timeout = timeout
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self.chunk_bytes = chunk_bytes
        self._tokens: dict[str, int] = {}  # last known token count per sequence, for ordered appends

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVCacheClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request_factory, timeout: float | None, idempotent: bool = True):
        """Call with retries on UNAVAILABLE; ``request_factory`` builds a fresh request (or
        request iterator) per attempt."""
        delays = self.retry.delays() if idempotent else iter(())
        while True:
            try:
                return method(request_factory(), timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                typed = error_from_rpc(error)
                delay = next(delays, None) if isinstance(typed, UnavailableError) else None
                if delay is None:
                    raise typed from None
                log.info("retrying after UNAVAILABLE in %.3fs: %s", delay, typed.details)
                time.sleep(delay)

    def _streamed(self, method, request, new_assembler, finish, timeout: float | None):
        """A server-streaming call collected by a fresh assembler per attempt; the whole stream
        is retried on UNAVAILABLE (reads are idempotent)."""
        delays = self.retry.delays()
        while True:
            assembler = new_assembler()
            try:
                for message in method(request, timeout=timeout or self.timeout, metadata=self._metadata):
                    assembler.add(message)
                return finish(assembler)
            except grpc.RpcError as error:
                typed = error_from_rpc(error)
                delay = next(delays, None) if isinstance(typed, UnavailableError) else None
                if delay is None:
                    raise typed from None
                time.sleep(delay)

    # -- profiles ------------------------------------------------------------------------

    def register_profile(self, profile: Profile, replace: bool = False, *, timeout: float | None = None) -> Profile:
        """Register a model profile (identical re-registration is a no-op)."""
        request = profile_request(profile, replace)
        return Profile.from_pb(self._call(self._stub.RegisterProfile, lambda: request, timeout))

    def get_profile(self, name: str, *, timeout: float | None = None) -> Profile:
        return Profile.from_pb(self._call(self._stub.GetProfile, lambda: pb.GetProfileRequest(name=name), timeout))

    def list_profiles(self, *, timeout: float | None = None) -> list[Profile]:
        response = self._call(self._stub.ListProfiles, pb.ListProfilesRequest, timeout)
        return [Profile.from_pb(message) for message in response.profiles]

    # -- stateless codec -------------------------------------------------------------------

    def compress(self, keys: torch.Tensor, *, profile: str | None = None, layer: int = 0,
                 codec: CodecConfig | None = None, rope: RopeConfig | None = None,
                 positions: torch.Tensor | None = None, key_space: str = "pre_rope",
                 timeout: float | None = None) -> CompressResult:
        """Compress keys [tokens, kv_heads, head_dim] without storing them."""
        request = compress_request(keys, profile, layer, codec, rope, positions, key_space)
        response = self._call(self._stub.Compress, lambda: request, timeout)
        return CompressResult(response.blob, BlobStats.from_pb(response.stats))

    def decompress(self, blob: bytes, *, profile: str | None = None, layer: int = 0, key_space: str | None = None,
                   dtype: torch.dtype | None = None, timeout: float | None = None) -> torch.Tensor:
        """Keys [tokens, kv_heads, head_dim] of a blob from :meth:`compress`."""
        request = decompress_request(blob, profile, layer, key_space, dtype)
        return tensor_from_pb(self._call(self._stub.Decompress, lambda: request, timeout).keys, "keys")

    # -- stored sequences ------------------------------------------------------------------

    def upload(self, sequence_id: str, profile: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
               positions: torch.Tensor | None = None, key_space: str = "pre_rope", replace: bool = False,
               upload_id: str | None = None, timeout: float | None = None) -> SequenceInfo:
        """Store a sequence's prefill: keys (and values) [layers, tokens, kv_heads, head_dim]
        of every layer of the profile, streamed in chunks; retried streams do not duplicate."""
        keys, values, positions = check_cache_tensors(keys, values, positions, "upload")
        upload_id = upload_id or uuid.uuid4().hex

        def messages():
            return upload_messages(sequence_id, profile, keys, values, positions, key_space, replace, upload_id,
                                   self.chunk_bytes)

        response = self._call(self._stub.Upload, messages, timeout)
        info = SequenceInfo.from_pb(response.sequence)
        self._tokens[sequence_id] = info.num_tokens
        return info

    def append(self, sequence_id: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
               positions: torch.Tensor | None = None, expected_tokens: int | None = None,
               timeout: float | None = None) -> int:
        """Append a decode step: keys (and values) [layers, new_tokens, kv_heads, head_dim] of
        every layer. Returns the new token count. Ordered by ``expected_tokens`` (default: the
        count this client last saw, else asked from the server)."""
        keys, values, positions = check_cache_tensors(keys, values, positions, "append")
        if expected_tokens is None:
            expected_tokens = self._tokens.get(sequence_id)
            if expected_tokens is None:
                expected_tokens = self.describe(sequence_id, timeout=timeout).num_tokens
        request = append_request(sequence_id, keys, values, positions, expected_tokens)
        count = self._call(self._stub.Append, lambda: request, timeout).num_tokens
        self._tokens[sequence_id] = count
        return count

    def attend(self, queries: torch.Tensor, entries: Sequence[tuple[str, int]], *,
               sparsity: SparsityConfig | None = None, scale: float | None = None,
               timeout: float | None = None) -> AttendResult:
        """Attention of post-RoPE ``queries`` [B, q_heads, head_dim], row b over
        ``entries[b] = (sequence_id, layer)``: output float32 [B, q_heads, head_dim] and lse
        float32 [B, q_heads]."""
        request = attend_request(queries, entries, sparsity, scale)
        return attend_result(self._call(self._stub.Attend, lambda: request, timeout))

    def fetch(self, sequence_id: str, *, layers: Sequence[int] | None = None, key_space: str | None = None,
              dtype: torch.dtype | None = None, include_values: bool = True,
              timeout: float | None = None) -> FetchResult:
        """Reconstructed keys (and values) [layers, tokens, kv_heads, head_dim], streamed."""
        request = fetch_request(sequence_id, layers, key_space, dtype, include_values, self.chunk_bytes)
        return self._streamed(self._stub.Fetch, request, FetchAssembler, lambda assembler: assembler.result(), timeout)

    def delete(self, sequence_id: str, *, timeout: float | None = None) -> None:
        """Delete a stored sequence (NotFoundError when absent)."""
        attempts = 0

        def request():
            nonlocal attempts
            attempts += 1
            return pb.DeleteRequest(sequence_id=sequence_id)

        try:
            self._call(self._stub.Delete, request, timeout)
        except NotFoundError:
            # After an UNAVAILABLE retry, NOT_FOUND means an earlier attempt deleted it.
            if attempts == 1:
                raise
        self._tokens.pop(sequence_id, None)

    def describe(self, sequence_id: str, *, timeout: float | None = None) -> SequenceInfo:
        """Tokens, layers, bytes and compression of a stored sequence."""
        info = SequenceInfo.from_pb(
            self._call(self._stub.Describe, lambda: pb.DescribeRequest(sequence_id=sequence_id), timeout))
        self._tokens[sequence_id] = info.num_tokens
        return info

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's version, device, store budget and occupancy."""
        return ServerInfo.from_pb(self._call(self._stub.GetServerInfo, pb.ServerInfoRequest, timeout))

    # -- content-addressed chunks (KV connectors) --------------------------------------------

    def store_chunk(self, profile: str, content_key: str, keys: torch.Tensor, values: torch.Tensor, *,
                    positions: torch.Tensor | None = None, cache_salt: str = "", key_space: str = "post_rope",
                    timeout: float | None = None) -> tuple[SequenceInfo, bool]:
        """Store one chunk, keys and values [layers, tokens, kv_heads, head_dim] of every layer,
        under a content key (retried safely: a stored key is kept). Returns its info and
        whether this call created it."""
        request = store_chunk_request(profile, content_key, keys, values, positions, cache_salt, key_space)
        response = self._call(self._stub.StoreChunk, lambda: request, timeout)
        return SequenceInfo.from_pb(response.chunk), response.created

    def lookup_chunks(self, profile: str, content_keys: Sequence[str], *, cache_salt: str = "",
                      timeout: float | None = None) -> int:
        """How many of ``content_keys`` (a chain in token order), from the first on, are stored."""
        request = pb.LookupChunksRequest(profile=profile, cache_salt=cache_salt, content_keys=list(content_keys))
        return self._call(self._stub.LookupChunks, lambda: request, timeout).leading

    def fetch_chunks(self, profile: str, content_keys: Sequence[str], num_layers: int, *, cache_salt: str = "",
                     dtype: torch.dtype | None = None, timeout: float | None = None) -> list[FetchResult]:
        """Reconstructed keys and values [num_layers, tokens, kv_heads, head_dim] of stored chunks,
        one :class:`FetchResult` per content key, in one streamed call (NotFoundError when any
        is not stored)."""
        request = pb.FetchChunksRequest(profile=profile, cache_salt=cache_salt, content_keys=list(content_keys),
                                        dtype=dtype_to_pb(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED,
                                        max_chunk_bytes=self.chunk_bytes)
        return self._streamed(self._stub.FetchChunks, request, lambda: ChunkAssembler(len(content_keys)),
                              lambda assembler: assembler.result(num_layers), timeout)
