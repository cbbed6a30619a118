"""Server processes with small stores: LRU eviction, RESOURCE_EXHAUSTED without eviction,
TTL expiry, and a graceful stop on SIGTERM that finishes the call in flight."""

import signal
import threading
import time
import uuid

import grpc
import pytest
import torch
from helpers import scrape, wait_until
from svdq_client import KVCacheClient, NotFoundError, Profile, ResourceExhaustedError, UnavailableError
from svdq_client.wire import tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import CodecConfig

pytestmark = pytest.mark.integration

PROFILE = Profile("small", 1, 1, 32, codec=CodecConfig(method="fp16"))  # predictable sizes: ~8.3 KB per 64 tokens


def cache(tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 1, 32, generator=generator).half(), torch.randn(1, tokens, 1, 32,
                                                                                generator=generator).half()


def sizes(client, sequence):
    info = client.describe(sequence)
    return info.key_bytes + info.value_bytes


@pytest.fixture(scope="module")
def lru_server(tmp_path_factory):
    from conftest import ServerProcess

    # Staging room for the raw "huge" upload below, so that the store's own check refuses it.
    server = ServerProcess(tmp_path_factory.mktemp("lru"), ["--store-bytes", "30000", "--eviction", "lru",
                                                            "--staging-bytes", "1MiB"]).start()
    yield server
    server.stop()


def test_lru_eviction_through_the_service(lru_server):
    with KVCacheClient(lru_server.address) as client:
        client.register_profile(PROFILE)
        keys, values = cache(64)
        for name in ("a", "b", "c"):
            client.upload(name, "small", keys, values)
        per_sequence = sizes(client, "a")
        assert 3 * per_sequence <= 30000 < 4 * per_sequence  # three fit, a fourth does not
        client.describe("a")  # "b" is now the least recently used
        client.upload("d", "small", keys, values)
        with pytest.raises(NotFoundError):
            client.describe("b")
        assert {client.describe(name).num_tokens for name in ("a", "c", "d")} == {64}
        info = client.server_info()
        assert info.evictions == 1 and info.stored_bytes <= info.store_budget_bytes == 30000
        with pytest.raises(ResourceExhaustedError, match="more than the whole store budget"):
            client.upload("huge", "small", *cache(300))


def test_ttl_expiry(tmp_path):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, ["--ttl-seconds", "1"]).start()
    try:
        with KVCacheClient(server.address) as client:
            client.register_profile(PROFILE)
            client.upload("short-lived", "small", *cache(16))
            assert client.describe("short-lived").num_tokens == 16
            assert "\nsvdq_sequences 1.0\n" in scrape(server.metrics_port)
            # No call touches the store meanwhile: the server's expiry job drops it, and the
            # gauges show that (a scrape itself does no expiry work).
            wait_until(lambda: "\nsvdq_sequences 0.0\n" in scrape(server.metrics_port), 5,
                       "the expiry job to drop the idle sequence")
            assert 'svdq_evictions_total{reason="ttl"} 1.0' in scrape(server.metrics_port)
            with pytest.raises(NotFoundError):
                client.describe("short-lived")
            assert client.server_info().evictions == 1
    finally:
        assert server.stop() == 0


def test_no_eviction_refuses_and_keeps_data_then_stops_gracefully_on_sigterm(tmp_path):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, ["--store-bytes", "15000", "--eviction", "none", "--grace-seconds", "30"])
    server.start()
    try:
        with KVCacheClient(server.address) as client:
            client.register_profile(PROFILE)
            keys, values = cache(64)
            client.upload("kept", "small", keys, values)
            before = client.fetch("kept")
            with pytest.raises(ResourceExhaustedError, match="eviction is 'none'"):
                client.upload("refused", "small", keys, values)
            with pytest.raises(ResourceExhaustedError, match="store budget"):
                client.append("kept", *cache(64, seed=1))
            after = client.fetch("kept")
            assert torch.equal(after.keys, before.keys) and torch.equal(after.values, before.values)
            with pytest.raises(NotFoundError):
                client.describe("refused")
            client.delete("kept")

        # An upload stream that stays open across SIGTERM must still complete.
        release = threading.Event()
        upload_id = uuid.uuid4().hex
        keys, values = cache(64, seed=2)

        def chunks():
            for index, start in enumerate((0, 32)):
                if index == 1:
                    release.wait(timeout=60)
                chunk = pb.UploadChunk(sequence_id="in-flight", profile="small", upload_id=upload_id,
                                       total_tokens=64, has_values=True, token_start=start)
                tensor_to_pb(keys[:, start:start + 32], chunk.keys)
                tensor_to_pb(values[:, start:start + 32], chunk.values)
                yield chunk

        with grpc.insecure_channel(server.address) as channel:
            future = pb_grpc.KVCacheStub(channel).Upload.future(chunks(), timeout=60)
            time.sleep(0.5)  # let the first chunk reach the server
            server.process.send_signal(signal.SIGTERM)
            deadline, refused = time.monotonic() + 30, False
            while not refused and time.monotonic() < deadline:  # new calls are refused once stopping begins
                try:
                    with KVCacheClient(server.address, retries=0, timeout=2) as late:
                        late.server_info()
                    time.sleep(0.1)
                except UnavailableError:
                    refused = True
            assert refused
            assert server.health() != 1  # not SERVING any more
            release.set()
            assert future.result(timeout=60).sequence.num_tokens == 64
        assert server.process.wait(timeout=60) == 0
        assert '"event": "stopped"' in server.log()
    finally:
        server.kill()
