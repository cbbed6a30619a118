"""asyncio client of the svdq service: :class:`AsyncKVCacheClient`, the same methods as
:class:`svdq_client.KVCacheClient` as coroutines, built on the same request helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq.attention import SparsityConfig
from svdq.codec import CodecConfig
from svdq.rope import RopeConfig

from .client import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    CallAttempts,
    ChunkAssembler,
    FetchAssembler,
    KnownSequences,
    Replicas,
    Restarted,
    RetryPolicy,
    append_request,
    attend_request,
    attend_result,
    attended_sequence,
    channel_settings,
    chunk_route,
    compress_request,
    decompress_request,
    fetch_chunks_request,
    fetch_request,
    lookup_chunks_request,
    profile_name_request,
    profile_stream,
    replica_addresses,
    sequence_request,
    store_chunk_request,
    upload_request,
)
from .errors import NotFoundError
from .types import (
    AttendResult,
    BlobStats,
    CompressResult,
    FetchResult,
    Profile,
    ProfileAssembler,
    SequenceInfo,
    ServerInfo,
)
from .wire import tensor_from_pb


class AsyncKVCacheClient:
    """Non-blocking client of ``svdq.v1.KVCache``; arguments as :class:`svdq_client.KVCacheClient`,
    including a list of replicas (the same ring and failover, :class:`svdq_client.client.Replicas`).

    Use ``async with AsyncKVCacheClient(...) as client:`` or call :meth:`close`.
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
            self._channels = [grpc.aio.insecure_channel(target, options=options) for target in addresses]
        else:
            self._channels = [grpc.aio.secure_channel(target, credentials, options=options) for target in addresses]
        self._replicas = Replicas(addresses, [pb_grpc.KVCacheStub(channel) for channel in self._channels])
        self.address = address
        self.timeout = timeout
        self.retry = RetryPolicy(retries, backoff, max_backoff, retry_seconds)
        self.chunk_bytes = chunk_bytes
        self._known = KnownSequences()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def __aenter__(self) -> AsyncKVCacheClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _call(self, method: str, request_factory, timeout: float | None, idempotent: bool = True,
                    sequence_id: str | None = None):
        """As :meth:`svdq_client.KVCacheClient._call`: the same :class:`~svdq_client.client.CallAttempts`
        policy, the delays awaited."""
        attempts = CallAttempts(self._replicas, self.retry, self._metadata, sequence_id, method, idempotent)
        while True:
            try:
                response = await getattr(attempts.stub(), method)(request_factory(), timeout=timeout or self.timeout,
                                                                  metadata=attempts.metadata)
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.retry_after(error))
                continue
            attempts.succeeded()
            return response

    async def _streamed(self, method: str, request, assembler, finish, timeout: float | None,
                        sequence_id: str | None = None):
        """As :meth:`svdq_client.KVCacheClient._streamed`, the delays awaited."""
        attempts = CallAttempts(self._replicas, self.retry, self._metadata, sequence_id, method,
                                retryable=assembler.retryable)
        while True:
            try:
                async for message in getattr(attempts.stub(), method)(assembler.resume(request),
                                                                      timeout=timeout or self.timeout,
                                                                      metadata=attempts.metadata):
                    assembler.add(message)
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.retry_after(error))
                continue
            attempts.succeeded()
            return finish(assembler)

    async def register_profile(self, profile: Profile, replace: bool = False, *,
                               timeout: float | None = None) -> Profile:
        await self._call("RegisterProfileStream", profile_stream(profile, replace), timeout)
        return profile

    async def get_profile(self, name: str, *, timeout: float | None = None) -> Profile:
        return await self._streamed("GetProfileStream", profile_name_request(name), Restarted(ProfileAssembler),
                                    Restarted.result, timeout)

    async def list_profiles(self, *, timeout: float | None = None) -> list[Profile]:
        """The profiles this caller can use, by name, without their shared bases (a listing of
        several would pass the message limit): :meth:`get_profile` returns one whole."""
        response = await self._call("ListProfiles", pb.ListProfilesRequest, timeout)
        return [Profile.from_pb(message) for message in response.profiles]

    async def compress(self, keys: torch.Tensor, *, profile: str | None = None, layer: int = 0,
                       codec: CodecConfig | None = None, rope: RopeConfig | None = None,
                       positions: torch.Tensor | None = None, key_space: str = "pre_rope",
                       timeout: float | None = None) -> CompressResult:
        request = compress_request(keys, profile, layer, codec, rope, positions, key_space)
        response = await self._call("Compress", lambda: request, timeout)
        return CompressResult(response.blob, BlobStats.from_pb(response.stats))

    async def decompress(self, blob: bytes, *, profile: str | None = None, layer: int = 0,
                         key_space: str | None = None, dtype: torch.dtype | None = None,
                         timeout: float | None = None) -> torch.Tensor:
        request = decompress_request(blob, profile, layer, key_space, dtype)
        return tensor_from_pb((await self._call("Decompress", lambda: request, timeout)).keys, "keys")

    async def upload(self, sequence_id: str, profile: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
                     positions: torch.Tensor | None = None, key_space: str = "pre_rope", replace: bool = False,
                     upload_id: str | None = None, timeout: float | None = None) -> SequenceInfo:
        messages = upload_request(sequence_id, profile, keys, values, positions, key_space, replace, upload_id,
                                  self.chunk_bytes)
        response = await self._call("Upload", messages, timeout, sequence_id=sequence_id)
        info = SequenceInfo.from_pb(response.sequence)
        self._known.saw(sequence_id, info)
        return info

    async def append(self, sequence_id: str, keys: torch.Tensor, values: torch.Tensor | None = None, *,
                     positions: torch.Tensor | None = None, expected_tokens: int | None = None,
                     timeout: float | None = None) -> int:
        request = append_request(sequence_id, keys, values, positions, expected_tokens)
        if expected_tokens is None:
            expected_tokens = self._known.tokens(sequence_id)
            if expected_tokens is None:
                expected_tokens = (await self.describe(sequence_id, timeout=timeout)).num_tokens
            request.expected_tokens = expected_tokens
        response = await self._call("Append", lambda: request, timeout, sequence_id=sequence_id)
        return self._known.appended(sequence_id, response)

    async def attend(self, queries: torch.Tensor, entries: Sequence[tuple[str, int]], *,
                     sparsity: SparsityConfig | None = None, scale: float | None = None,
                     softcap: float | None = None, timeout: float | None = None) -> AttendResult:
        request = attend_request(queries, entries, sparsity, scale, softcap)
        return attend_result(await self._call("Attend", lambda: request, timeout,
                                               sequence_id=attended_sequence(request)))

    async def fetch(self, sequence_id: str, *, layers: Sequence[int] | None = None, key_space: str | None = None,
                    dtype: torch.dtype | None = None, include_values: bool = True,
                    timeout: float | None = None) -> FetchResult:
        request = fetch_request(sequence_id, layers, key_space, dtype, include_values, self.chunk_bytes)
        return await self._streamed("Fetch", request, FetchAssembler(), lambda assembler: assembler.result(),
                                    timeout, sequence_id=request.sequence_id)

    async def delete(self, sequence_id: str, *, timeout: float | None = None) -> None:
        message = sequence_request(pb.DeleteRequest, sequence_id)
        attempts = 0

        def request():
            nonlocal attempts
            attempts += 1
            return message

        try:
            await self._call("Delete", request, timeout, sequence_id=message.sequence_id)
        except NotFoundError:
            if attempts == 1:
                raise
        self._known.forget(sequence_id)

    async def describe(self, sequence_id: str, *, timeout: float | None = None) -> SequenceInfo:
        request = sequence_request(pb.DescribeRequest, sequence_id)
        response = await self._call("Describe", lambda: request, timeout, sequence_id=request.sequence_id)
        info = SequenceInfo.from_pb(response)
        self._known.saw(sequence_id, info)
        return info

    def last_info(self, sequence_id: str) -> SequenceInfo | None:
        """As :meth:`svdq_client.KVCacheClient.last_info` (no call)."""
        return self._known.info(sequence_id)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_pb(await self._call("GetServerInfo", pb.ServerInfoRequest, timeout))

    # -- content-addressed chunks (KV connectors): as the synchronous client's ------------------

    async def store_chunk(self, profile: str, content_key: str, keys: torch.Tensor, values: torch.Tensor, *,
                          positions: torch.Tensor | None = None, cache_salt: str = "", key_space: str = "post_rope",
                          timeout: float | None = None) -> tuple[SequenceInfo, bool]:
        request = store_chunk_request(profile, content_key, keys, values, positions, cache_salt, key_space)
        response = await self._call("StoreChunk", lambda: request, timeout, sequence_id=chunk_route(request))
        return SequenceInfo.from_pb(response.chunk), response.created

    async def lookup_chunks(self, profile: str, content_keys: Sequence[str], *, cache_salt: str = "",
                            timeout: float | None = None) -> int:
        request = lookup_chunks_request(profile, content_keys, cache_salt)
        return (await self._call("LookupChunks", lambda: request, timeout, sequence_id=chunk_route(request))).leading

    async def fetch_chunks(self, profile: str, content_keys: Sequence[str], num_layers: int, *,
                           cache_salt: str = "", dtype: torch.dtype | None = None,
                           timeout: float | None = None) -> list[FetchResult]:
        request, num_layers = fetch_chunks_request(profile, content_keys, num_layers, cache_salt, dtype,
                                                   self.chunk_bytes)
        count = len(request.content_keys)
        return await self._streamed("FetchChunks", request, Restarted(lambda: ChunkAssembler(count)),
                                    lambda assembler: assembler.result(num_layers), timeout,
                                    sequence_id=chunk_route(request))
