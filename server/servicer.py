"""The ``svdq.v1.KVCache`` servicer: parse, call the engine in a worker thread, convert back.

Engine calls run in a thread pool so that the event loop keeps accepting requests while
torch computes, and requests on different sequences run in parallel. One exception: a small
Attend (its entries hold at most ``inline_attend_tokens`` tokens, the store is this process's
memory) that is the only engine call in flight, and did not start right after the previous
Attend ended (:data:`INLINE_AFTER_IDLE_S`), runs on the event loop itself. The hop to a worker
thread and back costs about 0.5 ms on a 2-core CPU (484-590 us in bench/service.py's stage
table) of a 5-7 ms batch-1 RPC over 4k tokens (docs/service.md, Round 11); the loop is blocked for no longer than that small call, and a second
Attend, any worker job in flight or a call queued behind the last one sends calls to the
workers again, so concurrent calls keep running in parallel. Errors are not
handled here: the engine raises typed errors and the interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq.api.types import Profile, profile_pieces
from svdq.api.wire import tensor_to_pb
from svdq.errors import InvalidInputError

from . import convert
from .engine import Engine
from .interceptors import current_tenant

DEFAULT_FETCH_CHUNK_BYTES = 4 << 20
#: An Attend that starts within this many seconds of the previous one's end goes to the
#: workers even when it is alone: it most likely waited in gRPC's queue while the previous
#: one held the event loop, and more may be waiting behind it. A client's next call after a
#: reply arrives later than this (a loopback round trip is 1-2 ms here: bench/service.py).
INLINE_AFTER_IDLE_S = 0.0005


class KVCacheServicer(pb_grpc.KVCacheServicer):
    """Thin gRPC front of an :class:`~svdq_server.engine.Engine`.

    Args:
        engine: the engine.
        executor: worker threads for engine calls.
        max_message_bytes: the server's message size limit; fetch chunks stay well below it.
    """

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor, max_message_bytes: int, *,
                 inline_attend_tokens: int = 0) -> None:
        self.engine = engine
        self.executor = executor
        self.max_fetch_chunk_bytes = max(1024, max_message_bytes // 2)
        self.inline_attend_tokens = inline_attend_tokens
        self._in_workers = 0  # engine calls submitted to the executor and not finished
        self._attends = 0  # Attend calls between entry and reply
        self._last_attend_end = 0.0  # time.perf_counter() when the last Attend left the handler
        #: Attend calls that ran on the event loop (tests and benchmarks read it)
        self.inline_attends = 0

    async def _run(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        self._in_workers += 1
        try:
            return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))
        finally:
            self._in_workers -= 1

    async def _attends_inline(self, tenant: str, request) -> bool:
        """Whether this Attend runs on the event loop (the module docstring's terms). Yields
        once before it looks at the calls in flight, so that Attend calls that arrived with
        this one count themselves."""
        if not self.inline_attend_tokens or len(request.entries) > self.engine.config.max_batch:
            return False
        tokens = self.engine.attend_tokens_in_memory(tenant, [entry.sequence_id for entry in request.entries])
        if tokens is None or tokens > self.inline_attend_tokens:
            return False
        await asyncio.sleep(0)
        return (self._attends == 1 and not self._in_workers
                and time.perf_counter() - self._last_attend_end >= INLINE_AFTER_IDLE_S)

    async def RegisterProfile(self, request, context):
        profile = Profile.from_pb(request.profile)
        return (await self._run(self.engine.register_profile, profile, request.replace, current_tenant.get())).to_pb()

    async def GetProfile(self, request, context):
        return self.engine.get_profile(convert.check_name(request.name, "name"), current_tenant.get()).to_pb()

    async def RegisterProfileStream(self, request_iterator, context):
        tenant = current_tenant.get()
        with self.engine.profile_stream(tenant) as assembler:
            async for piece in request_iterator:
                await self._run(assembler.add, piece)  # converts and checks one layer's basis
            profile = await self._run(self.engine.register_profile, assembler.result(), assembler.replace, tenant,
                                      assembler.declared_bytes)
        return profile.without_bases().to_pb()

    async def GetProfileStream(self, request, context):
        profile = self.engine.get_profile(convert.check_name(request.name, "name"), current_tenant.get())
        pieces = profile_pieces(profile)
        done = object()
        while True:
            piece = await self._run(next, pieces, done)  # builds one layer's basis message
            if piece is done:
                return
            yield piece

    async def ListProfiles(self, request, context):
        profiles = self.engine.list_profiles(current_tenant.get())
        return pb.ListProfilesResponse(
            profiles=[profile.without_bases().to_pb() for profile in profiles],
            names_with_bases=[profile.name for profile in profiles if profile.bases or profile.value_bases])

    async def Compress(self, request, context):
        tenant = current_tenant.get()

        def work():
            return self.engine.compress_keys(tenant=tenant, **convert.compress_args_from_pb(request))

        blob, stats = await self._run(work)
        return pb.CompressResponse(blob=blob, stats=stats.to_pb())

    async def Decompress(self, request, context):
        tenant = current_tenant.get()

        def work():
            return tensor_to_pb(self.engine.decompress_keys(tenant=tenant, **convert.decompress_args_from_pb(request)))

        return pb.DecompressResponse(keys=await self._run(work))

    async def Upload(self, request_iterator, context):
        tenant = current_tenant.get()
        header = None
        completed = None
        stream = object()  # owns the staged upload until it completes
        # The chunk being staged (and the layer it completes compressed) in a worker thread
        # while the loop reads the next one: one at a time, so chunks stay in order and at
        # most one more chunk than is being worked on is held.
        adding: asyncio.Future | None = None
        chunks = self._chunks_until_idle(request_iterator, context).__aiter__()
        try:
            while True:
                chunk = await self._next_chunk(chunks, adding)
                if chunk is None:
                    break
                if header is None:
                    header = convert.upload_header_from_pb(chunk)
                    completed = await self._run(self.engine.begin_upload, tenant, header, stream)
                else:
                    convert.check_same_header(chunk, header)
                if completed is None and chunk.HasField("keys"):
                    if adding is not None:
                        await adding
                    adding = asyncio.ensure_future(self._run(self._add_chunk, tenant, header, chunk))
            if adding is not None:
                await adding
            if header is None:
                raise InvalidInputError("an Upload stream must carry at least one chunk")
            info = completed or await self._run(self.engine.finish_upload, tenant, header)
        finally:
            try:
                if adding is not None:
                    # the worker finishes with the staged data before it is dropped; its error,
                    # if the stream failed for another reason first, is not the one to report
                    await asyncio.wait({adding})
                    if not adding.cancelled():
                        adding.exception()
            finally:
                # Failed, cancelled (even again while waiting above), timed out or disconnected:
                # the staged data goes now, not at some idle deadline (after success there is
                # nothing left to drop). A worker still staging finds the upload closed.
                if header is not None:
                    self.engine.abort_upload(tenant, header, stream)
        return pb.UploadResponse(sequence=info.to_pb())

    @staticmethod
    async def _next_chunk(chunks, adding: asyncio.Future | None):
        """The stream's next chunk (None at its end); raises the error of the chunk still
        being staged as soon as it fails, not when (if ever) the client sends another."""
        reading = asyncio.ensure_future(chunks.__anext__())
        try:
            if adding is not None:
                await asyncio.wait({reading, adding}, return_when=asyncio.FIRST_COMPLETED)
                if adding.done() and not adding.cancelled() and adding.exception() is not None:
                    await adding  # raises it
            return await reading
        except StopAsyncIteration:
            return None
        finally:
            if not reading.done():
                reading.cancel()

    async def _chunks_until_idle(self, request_iterator, context):
        """The stream's chunks; a stream silent for --upload-idle-seconds is closed."""
        idle = self.engine.config.upload_idle_seconds
        chunks = request_iterator.__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"upload stream sent no chunk for {idle:g} s (--upload-idle-seconds) and was "
                                    "closed; its staged data was dropped: send the upload again")
            yield chunk

    def _add_chunk(self, tenant, header, chunk) -> None:
        self.engine.add_chunk(tenant, header, convert.upload_chunk_from_pb(chunk))

    async def Append(self, request, context):
        tenant = current_tenant.get()

        def work():
            return self.engine.append(tenant, **convert.append_args_from_pb(request))

        info = await self._run(work)
        return pb.AppendResponse(num_tokens=info.num_tokens, sequence=info.to_pb())

    async def Attend(self, request, context):
        tenant = current_tenant.get()

        def work():
            return convert.attend_result_to_pb(self.engine.attend(tenant, **convert.attend_args_from_pb(request)))

        self._attends += 1
        try:
            if await self._attends_inline(tenant, request):
                self.inline_attends += 1
                return work()
            return await self._run(work)
        finally:
            self._attends -= 1
            self._last_attend_end = time.perf_counter()

    async def Fetch(self, request, context):
        tenant = current_tenant.get()
        chunk_bytes = min(request.max_chunk_bytes or DEFAULT_FETCH_CHUNK_BYTES, self.max_fetch_chunk_bytes)
        pieces = await self._run(lambda: self.engine.fetch(tenant, max_chunk_bytes=chunk_bytes,
                                                           **convert.fetch_args_from_pb(request)))
        done = object()
        while True:
            message = await self._run(lambda: _next_message(pieces, done))
            if message is done:
                return
            yield message

    async def Delete(self, request, context):
        await self._run(self.engine.delete, current_tenant.get(), convert.check_name(request.sequence_id, "sequence_id"))
        return pb.DeleteResponse()

    async def Describe(self, request, context):
        info = self.engine.describe(current_tenant.get(), convert.check_name(request.sequence_id, "sequence_id"))
        return info.to_pb()

    async def GetServerInfo(self, request, context):
        return self.engine.server_info(current_tenant.get()).to_pb()

    async def StoreChunk(self, request, context):
        tenant = current_tenant.get()

        def work():
            info, created = self.engine.store_chunk(tenant, **convert.store_chunk_args_from_pb(request))
            return pb.StoreChunkResponse(created=created, chunk=info.to_pb())

        return await self._run(work)

    async def LookupChunks(self, request, context):
        tenant = current_tenant.get()
        leading = await self._run(lambda: self.engine.lookup_chunks(tenant, **convert.chunk_keys_args_from_pb(request)))
        return pb.LookupChunksResponse(leading=leading)

    async def FetchChunks(self, request, context):
        tenant = current_tenant.get()
        chunk_bytes = min(request.max_chunk_bytes or DEFAULT_FETCH_CHUNK_BYTES, self.max_fetch_chunk_bytes)
        dtype = convert.output_dtype_from_pb(request.dtype)
        pieces = await self._run(lambda: self.engine.fetch_chunks(tenant, dtype=dtype, max_chunk_bytes=chunk_bytes,
                                                                  **convert.chunk_keys_args_from_pb(request)))
        done = object()
        while True:
            message = await self._run(_next_chunk_message, pieces, done)
            if message is done:
                return
            yield message


def _next_message(pieces, done):
    piece = next(pieces, None)
    return done if piece is None else convert.fetch_piece_to_pb(piece)


def _next_chunk_message(pieces, done):
    piece = next(pieces, None)
    return done if piece is None else convert.chunk_piece_to_pb(piece)
