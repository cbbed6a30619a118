"""Client behaviour against a scripted in-process gRPC server: retries with backoff on
UNAVAILABLE only, deadlines, typed errors with the server's message, token metadata,
upload chunking."""

import dataclasses
from concurrent import futures

import grpc
import pytest
import torch
from svdq_client import (
    AsyncKVCacheClient,
    ConflictError,
    DeadlineExceededError,
    InvalidInputError,
    KVCacheClient,
    NotFoundError,
    Profile,
    UnavailableError,
)
from svdq_client.client import (
    SEQUENCE_HEADER,
    ChunkAssembler,
    FetchAssembler,
    KnownSequences,
    Replicas,
    Restarted,
    RetryPolicy,
    upload_messages,
)
from svdq_client.errors import ServiceError
from svdq_client.types import ProfileAssembler, SequenceInfo, profile_pieces
from svdq_client.wire import tensor_from_pb, tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

import svdq


class ScriptedServicer(pb_grpc.KVCacheServicer):
    """Fails GetServerInfo with the scripted codes, then answers; records what it saw."""

    def __init__(self):
        self.script: list[grpc.StatusCode] = []
        self.calls = 0
        self.metadata = []
        self.upload_chunks = []

    def GetServerInfo(self, request, context):
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.script:
            code = self.script.pop(0)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                import time

                time.sleep(1.0)  # longer than the client's deadline
            context.abort(code, f"scripted {code.name}")
        return pb.ServerInfo(version="test", device="cpu")

    def Describe(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.SequenceInfo(sequence_id=request.sequence_id, num_tokens=7)

    def Attend(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.NOT_FOUND, "scripted")

    def Delete(self, request, context):
        self.calls += 1
        if self.script:
            context.abort(self.script.pop(0), "scripted")
        context.abort(grpc.StatusCode.NOT_FOUND, f"sequence {request.sequence_id!r} not found")

    def Upload(self, request_iterator, context):
        self.upload_chunks = list(request_iterator)
        return pb.UploadResponse(sequence=pb.SequenceInfo(sequence_id="s", num_tokens=self.upload_chunks[0].total_tokens))

    def Append(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "out-of-order append")

    def StoreChunk(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.StoreChunkResponse(created=True, chunk=pb.SequenceInfo(sequence_id="chunk/x", num_tokens=1))

    def LookupChunks(self, request, context):
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.script:
            context.abort(self.script.pop(0), "scripted")
        return pb.LookupChunksResponse(leading=len(request.content_keys))

    def FetchChunks(self, request, context):
        """One piece per chunk (both layers); with a script, the stream breaks after the first."""
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        for index, _ in enumerate(request.content_keys):
            if index == 1 and self.script:
                context.abort(self.script.pop(0), "scripted")
            piece = pb.ChunkPiece(index=index, layer_start=0)
            tensor_to_pb(torch.full((2, 3, 1, 4), float(index)), piece.keys)
            tensor_to_pb(torch.full((2, 3, 1, 4), -float(index)), piece.values)
            tensor_to_pb(torch.arange(3), piece.positions)
            yield piece


@pytest.fixture
def scripted():
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KVCacheServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_is_retried_with_backoff_then_succeeds(scripted, monkeypatch):
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    waits = []
    monkeypatch.setattr("svdq_client.client.time.sleep", waits.append)
    with KVCacheClient(address, token="secret-token-123456", retries=3, backoff=0.1, max_backoff=0.15) as client:
        assert client.server_info().version == "test"
    assert servicer.calls == 3 and len(waits) == 2
    assert 0 <= waits[0] <= 0.1 and 0 <= waits[1] <= 0.15
    assert all(seen["authorization"] == "Bearer secret-token-123456" for seen in servicer.metadata)


def test_retries_give_up_with_unavailable_and_other_codes_are_not_retried(scripted, monkeypatch):
    servicer, address = scripted
    monkeypatch.setattr("svdq_client.client.time.sleep", lambda _: None)
    servicer.script = [grpc.StatusCode.UNAVAILABLE] * 5
    with KVCacheClient(address, retries=2) as client:
        with pytest.raises(UnavailableError, match="scripted UNAVAILABLE"):
            client.server_info()
        assert servicer.calls == 3
        servicer.script, servicer.calls = [grpc.StatusCode.INVALID_ARGUMENT], 0
        with pytest.raises(InvalidInputError, match="scripted INVALID_ARGUMENT") as raised:
            client.server_info()
        assert servicer.calls == 1 and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(raised.value, svdq.InvalidInputError)  # library handlers catch remote errors too
        with pytest.raises(ConflictError, match="out-of-order append"):
            client.append("s", torch.zeros(1, 1, 1, 2), expected_tokens=3)


def test_deadline_exceeded_is_typed(scripted):
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.DEADLINE_EXCEEDED]
    with KVCacheClient(address, timeout=0.2) as client, pytest.raises(DeadlineExceededError):
        client.server_info()


def test_delete_retried_after_unavailable_treats_not_found_as_done(scripted, monkeypatch):
    servicer, address = scripted
    monkeypatch.setattr("svdq_client.client.time.sleep", lambda _: None)
    with KVCacheClient(address) as client:
        with pytest.raises(NotFoundError, match="sequence 'gone' not found"):
            client.delete("gone")
        servicer.script = [grpc.StatusCode.UNAVAILABLE]
        client.delete("gone")  # the first attempt may have deleted it before the connection broke


def test_upload_is_chunked_under_the_byte_limit_and_covers_every_token_once(scripted):
    servicer, address = scripted
    keys = torch.randn(3, 50, 2, 8).half()
    values = torch.randn(3, 50, 2, 8).half()
    with KVCacheClient(address, chunk_bytes=1000) as client:
        client.upload("s", "p", keys, values, positions=torch.arange(50) + 5, key_space="post_rope")
    chunks = servicer.upload_chunks
    assert len(chunks) > 3 and len({chunk.upload_id for chunk in chunks}) == 1
    covered = torch.zeros(3, 50, dtype=torch.int64)
    for chunk in chunks:
        part = tensor_from_pb(chunk.keys, "keys")
        assert 2 * part.numel() * 2 <= 1000
        covered[chunk.layer_start:chunk.layer_start + part.shape[0], chunk.token_start:chunk.token_start + part.shape[1]] += 1
        assert torch.equal(part, keys[chunk.layer_start:chunk.layer_start + part.shape[0],
                                      chunk.token_start:chunk.token_start + part.shape[1]])
        assert torch.equal(tensor_from_pb(chunk.positions, "p"),
                           torch.arange(chunk.token_start, chunk.token_start + part.shape[1]) + 5)
    assert torch.equal(covered, torch.ones(3, 50, dtype=torch.int64))


def test_chunks_walk_the_layers_in_order_and_split_a_layer_that_does_not_fit():
    # the server compresses a layer when its last chunk arrives: layer after layer, a layer's
    # tokens in order, several whole layers in one chunk when they fit
    keys = torch.zeros(4, 3, 2, 8, dtype=torch.float32)  # 64 bytes per token per layer, 192 per layer
    chunks = list(upload_messages("s", "p", keys, None, None, "pre_rope", False, "u", chunk_bytes=130))
    assert [(c.layer_start, c.token_start, tuple(c.keys.shape)) for c in chunks] == [
        (layer, token, (1, size, 2, 8)) for layer in range(4) for token, size in ((0, 2), (2, 1))]
    chunks = list(upload_messages("s", "p", keys, None, None, "pre_rope", False, "u", chunk_bytes=400))
    assert [(c.layer_start, c.token_start, tuple(c.keys.shape)) for c in chunks] == [(0, 0, (2, 3, 2, 8)),
                                                                                     (2, 0, (2, 3, 2, 8))]


def test_a_fetch_assembler_starts_over_only_when_a_retry_cannot_resume_what_it_holds(monkeypatch):
    starts = []
    start_over = FetchAssembler._start_over
    monkeypatch.setattr(FetchAssembler, "_start_over", lambda self: (starts.append(1), start_over(self)))
    assembler = FetchAssembler()
    request = pb.FetchRequest(sequence_id="s")
    assert assembler.resume(request) is request and len(starts) == 2  # the first attempt: nothing to resume either
    chunk = pb.FetchChunk(layer=0, token_start=0, total_tokens=4)
    tensor_to_pb(torch.ones(2, 1, 2), chunk.keys)
    tensor_to_pb(torch.arange(2), chunk.positions)
    assembler.add(chunk)  # no version named: a retry cannot resume, the two tokens held are dropped
    assert assembler.resume(request) is request and len(starts) == 3
    with pytest.raises(ServiceError, match="Fetch stream ended without data"):
        assembler.result()
    chunk.version = "v1"
    assembler.add(chunk)
    resumed = assembler.resume(request)
    assert (resumed.resume_version, resumed.resume_layer, resumed.resume_token) == ("v1", 0, 2) and len(starts) == 3


def test_a_retried_profile_or_chunk_stream_starts_over_in_a_fresh_assembler():
    profile = Profile("p", 2, 2, 8, bases=tuple(svdq.fit_basis(torch.randn(40, 16)) for _ in range(2)))
    pieces = list(profile_pieces(profile, False))
    restarted = Restarted(ProfileAssembler)
    for attempt in (pieces[:2], pieces):  # the first attempt is cut after one basis; the retry sends all again
        request = pb.GetProfileRequest(name="p")
        assert restarted.resume(request) is request
        for piece in attempt:
            restarted.add(piece)
    assert restarted.result().to_pb() == profile.to_pb()  # bases included, once each
    assert restarted.retryable(UnavailableError("down", grpc.StatusCode.UNAVAILABLE))
    assert not restarted.retryable(NotFoundError("gone", grpc.StatusCode.NOT_FOUND))
    chunks = Restarted(lambda: ChunkAssembler(1))
    piece = pb.ChunkPiece(index=0, layer_start=0)
    for name in ("keys", "values"):
        tensor_to_pb(torch.ones(1, 3, 2, 8), getattr(piece, name))
    tensor_to_pb(torch.arange(3), piece.positions)
    chunks.resume(None)
    chunks.add(piece)
    chunks.resume(None)  # a retry: what the cut attempt held is gone
    with pytest.raises(ServiceError, match="chunk 0 has 0 of 1 layers"):
        chunks.result(1)
    chunks.add(piece)
    assert torch.equal(chunks.result(1)[0].keys, torch.ones(1, 3, 2, 8))


def test_known_sequences_keep_one_count_per_sequence():
    known = KnownSequences()
    assert known.tokens("s") is None and known.info("s") is None
    info = SequenceInfo("s", "p", 7, 1, 10, 0, 28, 0, 2.8, 5.7, 2.8, "pre_rope", False)
    known.saw("s", info)
    assert known.tokens("s") == 7 and known.info("s") is info
    # an Append reply without the sequence (an older server): the count alone is known
    assert known.appended("s", pb.AppendResponse(num_tokens=9)) == 9
    assert known.tokens("s") == 9 and known.info("s") is None
    appended = dataclasses.replace(info, num_tokens=10)
    assert known.appended("s", pb.AppendResponse(num_tokens=10, sequence=appended.to_pb())) == 10
    assert known.tokens("s") == 10 and known.info("s") == appended
    known.forget("s")
    assert known.tokens("s") is None and known.info("s") is None


def test_client_side_checks_and_policy():
    assert all(0 <= delay <= 0.4 for delay in RetryPolicy(5, 0.1, 0.4).delays())
    assert len(list(RetryPolicy(5, 0.1, 0.4).delays())) == 5
    with KVCacheClient("127.0.0.1:1") as client:
        with pytest.raises(svdq.InvalidInputError, match=r"upload keys must be a torch.Tensor \[layers, tokens"):
            client.upload("s", "p", torch.zeros(2, 3, 4))
        with pytest.raises(svdq.InvalidInputError, match="values must have the shape of keys"):
            client.upload("s", "p", torch.zeros(1, 2, 1, 4), torch.zeros(1, 3, 1, 4))
        with pytest.raises(svdq.InvalidInputError, match="B = len\\(entries\\) = 2"):
            client.attend(torch.zeros(1, 2, 4), [("s", 0), ("s", 1)])
    with pytest.raises(svdq.InvalidInputError, match="given together"):
        KVCacheClient("127.0.0.1:1", client_certificate=b"x")


async def test_async_client_retries_and_types_errors(scripted, monkeypatch):
    servicer, address = scripted
    waits = []

    async def no_sleep(delay):
        waits.append(delay)

    monkeypatch.setattr("svdq_client.aio.asyncio.sleep", no_sleep)
    servicer.script = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncKVCacheClient(address, token="secret-token-123456") as client:
        assert (await client.server_info()).version == "test"
        assert servicer.calls == 2 and len(waits) == 1
        servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(InvalidInputError, match="scripted INVALID_ARGUMENT"):
            await client.server_info()


async def test_calls_about_a_sequence_carry_its_id_for_proxies(scripted):
    # deploy/envoy/envoy.yaml routes by this header; calls about no sequence carry none
    servicer, address = scripted
    with KVCacheClient(address, token="secret-token-123456") as client:
        client.describe("seq-7")
        with pytest.raises(NotFoundError):
            client.attend(torch.zeros(2, 1, 4), [("seq-8", 0), ("other", 0)])
        with pytest.raises(NotFoundError):  # no entries: no header (the real server rejects it)
            client.attend(torch.zeros(0, 1, 4), [])
        client.server_info()
    async with AsyncKVCacheClient(address) as client:
        await client.describe("seq-9")
        await client.server_info()
    assert [seen.get(SEQUENCE_HEADER) for seen in servicer.metadata] == ["seq-7", "seq-8", None, None, "seq-9", None]
    assert servicer.metadata[0]["authorization"] == "Bearer secret-token-123456"


def test_retry_seconds_bound_the_retries_by_time_not_count(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("svdq_client.client.time.monotonic", lambda: now[0])
    waited = []
    for delay in RetryPolicy(retries=0, backoff=0.5, max_backoff=1.0, retry_seconds=30.0).delays():
        waited.append(delay)
        now[0] += delay + 0.25  # the wait plus a failed attempt
    assert len(waited) > 20 and sum(waited) + 0.25 * len(waited) <= 30.0 + 1.0 + 0.25
    assert len(list(RetryPolicy(retries=2, retry_seconds=None).delays())) == 2


def test_a_dead_replica_cools_down_longer_each_time_and_a_live_one_is_preferred():
    now = [0.0]
    replicas = Replicas(["a:1", "b:1"], ["stub-a", "stub-b"], cooldown=5.0, clock=lambda: now[0])
    key = next(f"s{index}" for index in range(100) if replicas.order(f"s{index}") == [0, 1])
    unavailable = UnavailableError("down", grpc.StatusCode.UNAVAILABLE)
    assert replicas.pick(key) == (0, "stub-a")
    replicas.failed(0, unavailable)  # a: cooling until 5
    assert replicas.choose(key) == 1
    replicas.failed(0, NotFoundError("no", grpc.StatusCode.NOT_FOUND))  # an answer, not an outage
    now[0] = 6.0
    assert replicas.choose(key) == 0  # back after its cooldown
    replicas.failed(0, unavailable)  # second in a row: until 6 + 10 = 16
    replicas.failed(1, unavailable)  # b answered UNAVAILABLE once (its store was busy): until 11
    assert replicas.choose(key) == 1  # everyone cooling: the one back first, not the ring's owner
    now[0] = 12.0
    replicas.succeeded(1)
    assert replicas.choose(key) == 1
    now[0] = 17.0
    assert replicas.choose(key) == 0
    replicas.succeeded(0)
    replicas.failed(0, unavailable)  # its count started again: 5 s
    now[0] = 22.5
    assert replicas.choose(key) == 0


def test_chunk_calls_check_their_arguments_before_any_call():
    keys = torch.zeros(2, 3, 1, 4)
    with KVCacheClient("127.0.0.1:1", retries=0, timeout=1) as client:
        for call, match in (
            (lambda: client.store_chunk(7, "k", keys, keys), "profile must be a profile name"),
            (lambda: client.store_chunk("p", "bad key!", keys, keys), "content_key"),
            (lambda: client.store_chunk("p", "k", keys, keys, cache_salt=3), "cache_salt must be a string"),
            (lambda: client.store_chunk("p", "k", keys, None), "values are required"),
            (lambda: client.lookup_chunks("p", "chunk-0"), "content_keys must be a list"),
            (lambda: client.lookup_chunks("p", ["ok", "not ok"]), r"content_keys\[1\]"),
            (lambda: client.fetch_chunks("p", [], 2), "at least 1 chunk"),
            (lambda: client.fetch_chunks("p", ["k"], 0), "num_layers must be an integer >= 1"),
            (lambda: client.fetch_chunks("p", ["k"], 2, dtype=torch.int64), "dtype must be"),
        ):
            # refused in the caller's frame: 127.0.0.1:1 would answer UNAVAILABLE
            with pytest.raises(InvalidInputError, match=match) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_chunk_calls_route_by_their_content_key_in_both_clients(scripted):
    servicer, address = scripted
    keys = torch.zeros(2, 3, 1, 4)
    with KVCacheClient(address) as client:
        client.store_chunk("p", "chunk-a", keys, keys)
        assert client.lookup_chunks("p", ["chunk-b", "chunk-c"]) == 2
        assert client.lookup_chunks("p", []) == 0
        client.fetch_chunks("p", ["chunk-d", "chunk-e"], 2)
    async with AsyncKVCacheClient(address) as client:
        await client.store_chunk("p", "chunk-f", keys, keys)
        assert await client.lookup_chunks("p", ["chunk-g"]) == 1
        await client.fetch_chunks("p", ["chunk-h"], 2)
    assert [seen.get(SEQUENCE_HEADER) for seen in servicer.metadata] == [
        "chunk-a", "chunk-b", None, "chunk-d", "chunk-f", "chunk-g", "chunk-h"]


async def test_async_chunk_calls_retry_like_the_sync_ones(scripted, monkeypatch):
    """One retry policy (CallAttempts) in both clients: an UNAVAILABLE lookup is asked again, a
    FetchChunks stream cut after its first piece is fetched again and assembled once."""
    servicer, address = scripted
    monkeypatch.setattr("svdq_client.client.time.sleep", lambda _: None)

    async def no_sleep(delay):
        pass

    monkeypatch.setattr("svdq_client.aio.asyncio.sleep", no_sleep)
    with KVCacheClient(address) as client:
        servicer.script = [grpc.StatusCode.UNAVAILABLE]
        assert client.lookup_chunks("p", ["a", "b"]) == 2 and servicer.calls == 2
        servicer.script, servicer.calls = [grpc.StatusCode.UNAVAILABLE], 0
        expected = client.fetch_chunks("p", ["a", "b"], 2)
        assert servicer.calls == 2
    async with AsyncKVCacheClient(address) as client:
        servicer.script, servicer.calls = [grpc.StatusCode.UNAVAILABLE], 0
        assert await client.lookup_chunks("p", ["a", "b"]) == 2 and servicer.calls == 2
        servicer.script, servicer.calls = [grpc.StatusCode.UNAVAILABLE], 0
        fetched = await client.fetch_chunks("p", ["a", "b"], 2)
        assert servicer.calls == 2
        servicer.script, servicer.calls = [grpc.StatusCode.NOT_FOUND], 0
        with pytest.raises(NotFoundError):
            await client.fetch_chunks("p", ["a", "b"], 2)
        assert servicer.calls == 1
    for mine, theirs, index in zip(fetched, expected, range(2), strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.keys, torch.full((2, 3, 1, 4), float(index)))
        assert torch.equal(mine.values, theirs.values) and torch.equal(mine.positions, torch.arange(3))


def test_attend_entries_are_checked_and_errors_name_the_entry():
    """Entries go through the shared name and integer checks; an error names the entry's place
    (built only then)."""
    import numpy as np
    from svdq_client.client import as_entries, attend_request

    assert as_entries([("s-1", 0), ("s-2", 3)]) == [("s-1", 0), ("s-2", 3)]
    assert as_entries(("s-1", 2)) == [("s-1", 2)]
    assert as_entries([["s-1", np.int64(4)]]) == [("s-1", 4)]
    with pytest.raises(svdq.InvalidInputError, match=r"entries\[1\]\.sequence_id must be"):
        as_entries([("s-1", 0), ("bad name", 0)])
    with pytest.raises(svdq.InvalidInputError, match=r"entries\[1\]\.layer must be an integer >= 0, got -1"):
        as_entries([("s-1", 0), ("s-2", -1)])
    with pytest.raises(svdq.InvalidInputError, match=r"entries\[0\]\.layer must be an integer"):
        as_entries([("s-1", True)])
    request = attend_request(torch.zeros(2, 3, 4), [("s-1", 0), ("s-2", 5)], None, None)
    assert [(entry.sequence_id, entry.layer) for entry in request.entries] == [("s-1", 0), ("s-2", 5)]
