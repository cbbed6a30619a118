"""A Fetch stream cut mid-way resumes where it ended, and an Append's reply carries the sequence.

The cut is real: a TCP proxy between the client and the shared server process closes the
first connection after half of the stream's bytes, so the client sees UNAVAILABLE mid-stream
and retries through a new connection; the bytes of that second connection show whether it
resumed or started over.

What a cut connection had delivered to the client's transport but not yet to its code is lost
with it (gRPC drops a failed stream's unread messages), and how much that is depends on how far
the client's loop lagged behind its socket (from nothing to most of the cut's 200 kB under
load). So the resume tests wait, at the cut, until the client has taken a quarter of the
stream, and compare the second connection with what the client had taken (:class:`Taken`),
not with what the proxy had forwarded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import uuid

import grpc
import pytest
import torch
from conftest import TENANT_TOKENS
from svdq_client import AsyncKVCacheClient, KVCacheClient, Profile
from svdq_client import aio as aio_client
from svdq_client import client as sync_client
from svdq_client.hf import ModelShape, RemoteOffload
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import CodecConfig, RopeConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = TENANT_TOKENS["team-a"]
LAYERS, TOKENS = 3, 512


class CuttingProxy:
    """Forwards TCP connections to ``target``; the first one is closed (both ways) once it has
    carried ``cut_after`` bytes from the server, after calling ``on_cut``."""

    def __init__(self, target: str, cut_after: int | None = None, on_cut=None) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._cut_after = cut_after
        self._on_cut = on_cut
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        #: bytes from the server, per connection in the order they were accepted
        self.received: list[int] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.received)
                self.received.append(0)
            threading.Thread(target=self._serve, args=(downstream, index), daemon=True).start()

    def _serve(self, downstream: socket.socket, index: int) -> None:
        upstream = socket.create_connection(self._target)

        def client_to_server():
            try:
                while data := downstream.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=client_to_server, daemon=True).start()
        limit = self._cut_after if index == 0 else None
        try:
            while data := upstream.recv(65536):
                if limit is not None and self.received[index] + len(data) >= limit:
                    if self._on_cut is not None:
                        self._on_cut()
                    break
                downstream.sendall(data)
                self.received[index] += len(data)
        except OSError:
            pass
        for connection in (downstream, upstream):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def close(self) -> None:
        self._listener.close()


class Taken:
    """What each Fetch attempt of the clients handed to their FetchAssembler: the request it
    sent, the bytes of the chunks it took, and (layer, next token) after its last chunk."""

    def __init__(self, monkeypatch) -> None:
        self.attempts: list[dict] = []
        condition = self._condition = threading.Condition()
        attempts = self.attempts

        class Recording(sync_client.FetchAssembler):
            def resume(self, request):
                request = super().resume(request)
                with condition:
                    attempts.append({"request": request, "bytes": 0, "reached": None})
                return request

            def add(self, chunk):
                super().add(chunk)
                tokens = sync_client.tensor_from_pb(chunk.keys, "keys").shape[0]
                with condition:
                    attempts[-1]["bytes"] += chunk.ByteSize()
                    attempts[-1]["reached"] = (chunk.layer, chunk.token_start + tokens)
                    condition.notify_all()

        monkeypatch.setattr(sync_client, "FetchAssembler", Recording)
        monkeypatch.setattr(aio_client, "FetchAssembler", Recording)

    def wait(self, size: int, timeout: float = 60.0) -> None:
        """Block until the first attempt has taken ``size`` bytes of chunks (or ``timeout``)."""
        with self._condition:
            self._condition.wait_for(lambda: self.attempts and self.attempts[0]["bytes"] >= size, timeout)

    def check_resumed(self, full: int, rest: int) -> None:
        """The second attempt asked for what followed the first one's last chunk, and its
        connection carried about the rest of the stream (a restart carries all of it again)."""
        first, second = self.attempts
        assert first["bytes"] >= full // 4, (full, first["bytes"])  # the wait at the cut saw to it
        request = second["request"]
        assert request.resume_version and (request.resume_layer, request.resume_token) == first["reached"]
        assert rest < full - first["bytes"] // 2, (full, first["bytes"], rest)


@pytest.fixture
def stored(shared_server):
    """A stored sequence of LAYERS x TOKENS (keys and values, 16-bit) and its reference Fetch."""
    profile = Profile(f"resume-{uuid.uuid4().hex[:6]}", LAYERS, 2, 32, rope=RopeConfig(theta=10000.0),
                      codec=CodecConfig(bits_per_element=2.0, group_size=32))
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(LAYERS, TOKENS, 2, 32, generator=generator).half()
    values = torch.randn(LAYERS, TOKENS, 2, 32, generator=generator).half()
    name = f"resume-{uuid.uuid4().hex[:8]}"
    with KVCacheClient(shared_server.address, token=TOKEN, timeout=60) as client:
        client.register_profile(profile)
        client.upload(name, profile.name, keys, values)
        yield name, client.fetch(name)
        client.delete(name)


def same(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in
               ((first.keys, second.keys), (first.values, second.values), (first.positions, second.positions)))


def stream_bytes(shared_server, name) -> int:
    proxy = CuttingProxy(shared_server.address)
    with KVCacheClient(proxy.address, token=TOKEN, timeout=60, chunk_bytes=8192) as client:
        client.fetch(name)
    proxy.close()
    return proxy.received[0]


def test_a_cut_fetch_resumes_where_its_stream_ended(shared_server, stored, monkeypatch):
    name, expected = stored
    full = stream_bytes(shared_server, name)
    taken = Taken(monkeypatch)
    proxy = CuttingProxy(shared_server.address, cut_after=full // 2, on_cut=lambda: taken.wait(full // 4))
    with KVCacheClient(proxy.address, token=TOKEN, timeout=60, chunk_bytes=8192, retries=3) as client:
        assert same(client.fetch(name), expected)
    proxy.close()
    cut, rest = proxy.received
    assert full // 2 - 65536 <= cut < full // 2
    taken.check_resumed(full, rest)


def test_the_async_client_resumes_too(shared_server, stored, monkeypatch):
    name, expected = stored
    full = stream_bytes(shared_server, name)
    taken = Taken(monkeypatch)
    proxy = CuttingProxy(shared_server.address, cut_after=full // 2, on_cut=lambda: taken.wait(full // 4))

    async def fetch():
        async with AsyncKVCacheClient(proxy.address, token=TOKEN, timeout=60, chunk_bytes=8192) as client:
            return await client.fetch(name)

    assert same(asyncio.run(fetch()), expected)
    proxy.close()
    taken.check_resumed(full, proxy.received[1])


def test_a_sequence_changed_during_the_cut_is_fetched_again_from_the_start(shared_server, stored):
    name, _ = stored
    full = stream_bytes(shared_server, name)
    step_keys, step_values = torch.ones(LAYERS, 1, 2, 32).half(), torch.full((LAYERS, 1, 2, 32), 7.0).half()

    def append_meanwhile():
        with KVCacheClient(shared_server.address, token=TOKEN, timeout=60) as writer:
            writer.append(name, step_keys, step_values, expected_tokens=TOKENS)

    proxy = CuttingProxy(shared_server.address, cut_after=full // 2, on_cut=append_meanwhile)
    with KVCacheClient(proxy.address, token=TOKEN, timeout=60, chunk_bytes=8192, retries=3) as client:
        fetched = client.fetch(name)
    proxy.close()
    with KVCacheClient(shared_server.address, token=TOKEN, timeout=60) as client:
        assert same(fetched, client.fetch(name))  # one version, the new one: no mix of old and new pieces
    assert fetched.values.shape[1] == TOKENS + 1 and torch.equal(fetched.values[:, -1], step_values[:, 0])
    assert proxy.received[1] >= full  # started over


def test_bad_resume_fields_get_clear_errors_and_change_nothing(shared_server, stored):
    name, expected = stored
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = pb_grpc.KVCacheStub(channel)
        first = next(iter(stub.Fetch(pb.FetchRequest(sequence_id=name, include_values=True, max_chunk_bytes=8192),
                                     metadata=metadata, timeout=60)))
        assert first.version and first.layer == 0 and first.token_start == 0

        def fetch(**resume):
            request = pb.FetchRequest(sequence_id=name, include_values=True, layers=[2, 0], max_chunk_bytes=8192,
                                      **resume)
            return list(stub.Fetch(request, metadata=metadata, timeout=60))

        cases = [
            ({"resume_layer": 2, "resume_token": 16}, grpc.StatusCode.INVALID_ARGUMENT,
             "resume_layer and resume_token need resume_version"),
            ({"resume_version": first.version, "resume_layer": 1}, grpc.StatusCode.INVALID_ARGUMENT,
             r"resume_layer must be one of the requested layers \[2, 0\], got 1"),
            ({"resume_version": first.version, "resume_layer": 0, "resume_token": TOKENS + 1},
             grpc.StatusCode.INVALID_ARGUMENT, rf"resume_token must be in 0..{TOKENS} \(the sequence's tokens\), "
             rf"got {TOKENS + 1}"),
            ({"resume_version": "someone-else.3", "resume_layer": 0}, grpc.StatusCode.FAILED_PRECONDITION,
             "changed since the interrupted Fetch .* fetch it again from the start"),
        ]
        for resume, code, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                fetch(**resume)
            assert caught.value.code() == code, resume
            assert re.search(message, caught.value.details()), caught.value.details()
        # a valid resume: layer 2 from token 500, then all of layer 0
        pieces = fetch(resume_version=first.version, resume_layer=2, resume_token=500)
        assert [(piece.layer, piece.token_start) for piece in pieces[:1]] == [(2, 500)]
        assert sum(piece.keys.shape[0] for piece in pieces if piece.layer == 2) == TOKENS - 500
        assert sum(piece.keys.shape[0] for piece in pieces if piece.layer == 0) == TOKENS
        assert fetch(resume_version=first.version, resume_layer=0, resume_token=TOKENS) == []  # nothing left
    with KVCacheClient(shared_server.address, token=TOKEN, timeout=60) as client:
        assert same(client.fetch(name), expected)


def test_the_append_reply_carries_the_sequence_so_a_spill_needs_no_describe(shared_server):
    with KVCacheClient(shared_server.address, token=TOKEN, timeout=60) as client:
        shape = ModelShape("llama", 2, 4, 2, 32, RopeConfig(theta=10000.0))
        backend = RemoteOffload(client, CodecConfig(bits_per_element=2.0, group_size=32))
        backend.open(shape)
        described = []
        describe = client.describe
        client.describe = lambda *args, **kwargs: described.append(args) or describe(*args, **kwargs)
        generator = torch.Generator().manual_seed(1)
        for spill, tokens in enumerate((40, 8, 8, 24)):
            keys = torch.randn(2, tokens, 2, 32, generator=generator)
            values = torch.randn(2, tokens, 2, 32, generator=generator)
            start = sum((40, 8, 8, 24)[:spill])
            backend.store(0, keys, values, torch.arange(start, start + tokens))
        assert described == []  # no Describe per spill
        info = describe(backend.sequence_id)
        assert client.last_info(backend.sequence_id) == info  # what the last Append's reply said
        assert backend.stats.tokens_offloaded == info.num_tokens == 80
        assert backend.stats.key_bytes_stored == info.key_bytes and backend.stats.value_bytes_stored == info.value_bytes
        backend.close()
