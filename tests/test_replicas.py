"""Several real svdq-server replicas on loopback behind one real redis-server.

kill -9 of a replica mid-upload and mid-append under load loses nothing acknowledged (Fetch
byte-identical, Attend identical through another replica), a half-finished upload is never
visible, restarted replicas serve everything; two replicas appending to one sequence at
once neither lose nor duplicate a token; Redis restarted brings the data back, Redis down
gives UNAVAILABLE and NOT_SERVING and both recover. The client's consistent hashing keeps a
sequence on one replica and fails over to the next.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import ServerProcess
from grpc_health.v1 import health_pb2
from helpers import scrape, wait_until
from redis_process import needs_redis
from svdq_client import AsyncKVCacheClient, KVCacheClient, Profile
from svdq_client.client import Replicas, append_request
from svdq_client.errors import NotFoundError, UnavailableError
from svdq_server.store_redis import LOCK_SECONDS

from svdq import CodecConfig, RopeConfig

pytestmark = [needs_redis, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PROFILE = Profile("tiny", 2, 2, 32, rope=RopeConfig(theta=10000.0), codec=CodecConfig(bits_per_element=2.0, group_size=32))
TOKENS = 96


def cache(tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, tokens, 2, 32, generator=generator).half(),
            torch.randn(2, tokens, 2, 32, generator=generator).half())


def marked(value):
    """One appended token whose values all equal ``value`` (values are stored 16-bit)."""
    keys = torch.randn(2, 1, 2, 32).half()
    return keys, torch.full((2, 1, 2, 32), float(value)).half()


QUERIES = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(7)).half()


def snapshot(client, name):
    fetched = client.fetch(name)
    return fetched.keys, fetched.values, client.attend(QUERIES, [(name, 0), (name, 1), (name, 1), (name, 0)]).output


def same(first, second):
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def replica(tmp_path, redis_server, *args):
    return ServerProcess(tmp_path, ["--store", redis_server.url, "--torch-threads", "1", "--store-check-seconds",
                                    "0.5", "--store-timeout-seconds", "3", "--grace-seconds", "0", *args])


def test_kill_9_mid_upload_and_append_loses_nothing_acknowledged(tmp_path, redis_server):
    first, second = replica(tmp_path, redis_server).start(), replica(tmp_path, redis_server).start()
    try:
        with KVCacheClient(first.address, timeout=30, retries=0) as setup:
            setup.register_profile(PROFILE)
            setup.upload("appended", "tiny", *cache(TOKENS, 0))
        acknowledged: dict[str, tuple] = {}
        in_flight: list[str] = []
        appends_acked = [0]
        killed_at = [0]
        stop = threading.Event()
        failures: list[BaseException] = []

        def uploader():
            # Pinned to the first replica without failover: the upload in flight when it dies is cut off.
            with KVCacheClient(first.address, timeout=30, retries=0) as client:
                for index in range(1000):
                    if stop.is_set():
                        return
                    name = f"upload-{index}"
                    in_flight.append(name)
                    try:
                        client.upload(name, "tiny", *cache(TOKENS, index + 1))
                        acknowledged[name] = snapshot(client, name)
                    except UnavailableError:
                        return  # the replica died

        def appender():
            # Through the replica list: when its replica dies the retry goes to the other one, and
            # expected_tokens + the digest recognise an append that landed before the kill. The
            # retries are bounded by time, not count: the killed replica may hold the sequence's
            # writer lock, which the survivor waits out (up to LOCK_SECONDS; the deadline leaves room),
            # and a loaded machine makes every attempt slower.
            with KVCacheClient([first.address, second.address], timeout=LOCK_SECONDS + 30, retry_seconds=120,
                               backoff=0.2) as client:
                client._replicas.order = lambda key: [0, 1]  # "appended" lives on the replica that is killed
                count = TOKENS
                for step in range(1000):
                    if stop.is_set() and step >= killed_at[0] + 3:  # three more through the survivor
                        return
                    try:
                        count = client.append("appended", *marked(step), expected_tokens=count)
                    except BaseException as exc:  # noqa: BLE001 - reported by the test
                        failures.append(exc)
                        return
                    appends_acked[0] = step + 1

        threads = [threading.Thread(target=uploader), threading.Thread(target=appender)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while (len(acknowledged) < 3 or appends_acked[0] < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acknowledged) >= 3 and appends_acked[0] >= 10, "no load before the kill"
        killed_at[0] = appends_acked[0]
        first.kill()  # kill -9 under load
        stop.set()
        for thread in threads:
            thread.join(timeout=240)
        assert not any(thread.is_alive() for thread in threads), "a client thread is still retrying"
        assert second.health() == health_pb2.HealthCheckResponse.SERVING
        assert not failures, failures
        with KVCacheClient(second.address, timeout=30) as client:
            for name, expected in acknowledged.items():
                assert same(snapshot(client, name), expected), name
            last = in_flight[-1]
            if last not in acknowledged:  # the cut-off upload: absent, or complete (committed, not acknowledged)
                try:
                    assert client.describe(last).num_tokens == TOKENS
                except NotFoundError:
                    pass
            values = client.fetch("appended").values
            steps = appends_acked[0]
            assert values.shape[1] == TOKENS + steps  # nothing lost, nothing applied twice
            assert values[0, TOKENS:, 0, 0].float().tolist() == [float(step) for step in range(steps)]
            appended = snapshot(client, "appended")
        # restart every replica: nothing in memory, everything acknowledged is back
        second.kill()
        restarted = replica(tmp_path, redis_server).start()
        try:
            with KVCacheClient(restarted.address, timeout=30) as client:
                for name, expected in acknowledged.items():
                    assert same(snapshot(client, name), expected), name
                assert same(snapshot(client, "appended"), appended)
                assert client.get_profile("tiny").same_as(PROFILE)  # registered over RPC, stored in Redis
        finally:
            restarted.stop()
    finally:
        first.kill()
        second.kill()


def test_two_replicas_appending_to_one_sequence_lose_and_duplicate_nothing(tmp_path, redis_server):
    servers = [replica(tmp_path, redis_server).start(), replica(tmp_path, redis_server).start()]
    try:
        with KVCacheClient(servers[0].address) as client:
            client.register_profile(PROFILE)
            client.upload("shared", "tiny", *cache(TOKENS, 0))
        steps = 15

        def writer(index, server, errors):
            try:
                with KVCacheClient(server.address, timeout=60) as client:
                    for step in range(steps):
                        # no expected_tokens: both writers append wherever the sequence is now
                        request = append_request("shared", *marked(index * 100 + step), None, None)
                        client._replicas.pick(None)[1].Append(request, timeout=60)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        errors = []
        threads = [threading.Thread(target=writer, args=(index, server, errors))
                   for index, server in ((1, servers[0]), (2, servers[1]), (3, servers[1]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        with KVCacheClient(servers[0].address) as client:
            values = client.fetch("shared").values[0, TOKENS:, 0, 0].float().round().int().tolist()
        assert len(values) == 3 * steps
        for index in (1, 2, 3):
            assert [value - index * 100 for value in values if value // 100 == index] == list(range(steps))
    finally:
        for server in servers:
            server.kill()


def test_redis_restart_and_outage(tmp_path, redis_server):
    server = replica(tmp_path, redis_server).start()
    try:
        with KVCacheClient(server.address, timeout=30, retries=0) as client:
            client.register_profile(PROFILE)
            client.upload("kept", "tiny", *cache(TOKENS, 1))
            client.append("kept", *marked(5))
            expected = snapshot(client, "kept")
            redis_server.kill()  # kill -9: what the AOF (appendfsync always) holds comes back
            redis_server.start()
            assert same(snapshot(client, "kept"), expected)
            redis_server.stop()
            for call in (lambda: client.describe("kept"), lambda: client.upload("new", "tiny", *cache(TOKENS, 2)),
                         lambda: client.append("kept", *marked(6))):
                with pytest.raises(UnavailableError, match="the store redis://127.0.0.1"):
                    call()
            wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 20,
                       "health to turn NOT_SERVING while Redis is down", interval=0.2)
            metrics = scrape(server.metrics_port)
            assert 'svdq_store_backend_up{backend="redis"} 0.0' in metrics
            redis_server.start()
            wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.SERVING, 20,
                       "health to turn SERVING once Redis is back", interval=0.2)
            assert same(snapshot(client, "kept"), expected)  # nothing corrupted by the outage
            assert client.append("kept", *marked(6)) == TOKENS + 2
            metrics = scrape(server.metrics_port)
            assert 'svdq_store_backend_up{backend="redis"} 1.0' in metrics
            assert 'svdq_store_errors_total{operation="get"}' in metrics
    finally:
        server.stop()


def test_client_hashing_keeps_sequences_on_replicas_and_fails_over(tmp_path, redis_server):
    addresses = [f"10.0.0.{index}:50051" for index in range(3)]
    router = Replicas(addresses, [None] * 3)
    owners = {f"seq-{index}": router.order(f"seq-{index}")[0] for index in range(3000)}
    shares = [list(owners.values()).count(index) / len(owners) for index in range(3)]
    assert all(0.2 < share < 0.47 for share in shares), shares
    assert all(sorted(router.order(key)) == [0, 1, 2] for key in list(owners)[:50])
    # Without replica 2 only the sequences it owned move (consistent hashing).
    smaller = Replicas(addresses[:2], [None] * 2)
    moved = [key for key, owner in owners.items() if owner != 2 and smaller.order(key)[0] != owner]
    assert not moved
    # real replicas: one killed, every sequence still served through the list
    servers = [replica(tmp_path, redis_server).start(), replica(tmp_path, redis_server).start()]
    try:
        with KVCacheClient([server.address for server in servers], timeout=30, retries=4) as client:
            client.register_profile(PROFILE)
            # Four sequences owned by each replica: the ring depends on the servers' random ports,
            # so eight fixed names all landed on one replica now and then (~1 run in 100).
            ring = {name: client._replicas.choose(name) for name in (f"s{index}" for index in range(400))}
            names = [name for name in ring if ring[name] == 0][:4] + [name for name in ring if ring[name] == 1][:4]
            for index, name in enumerate(names):
                client.upload(name, "tiny", *cache(32, index))
            expected = {name: snapshot(client, name) for name in names}
            assert {client._replicas.choose(name) for name in names} == {0, 1}  # both replicas own some
            servers[0].kill()
            for name in names:
                assert same(snapshot(client, name), expected[name])
    finally:
        for server in servers:
            server.kill()


def test_async_client_routes_by_the_same_ring_and_fails_over(tmp_path, redis_server):
    # Memory-store replicas first: a sequence exists only where the client sent it, so every
    # call of the asyncio client finding its sequences shows they all went to its owner.
    import asyncio

    addresses = []
    servers = [ServerProcess(tmp_path, ["--torch-threads", "1"]).start() for _ in range(2)]
    names = [f"a{index}" for index in range(16)]
    try:
        addresses = [server.address for server in servers]

        async def through_the_list():
            async with AsyncKVCacheClient(addresses, timeout=30) as client:
                for replica_address in addresses:  # each memory store has its own profiles
                    async with AsyncKVCacheClient(replica_address, timeout=30) as single:
                        await single.register_profile(PROFILE)
                for index, name in enumerate(names):
                    await client.upload(name, "tiny", *cache(32, index))
                    assert await client.append(name, *marked(index)) == 33
                    fetched = await client.fetch(name)
                    assert fetched.values[0, 32, 0, 0].item() == index
                    await client.attend(QUERIES, [(name, 0), (name, 1), (name, 0), (name, 1)])
                    assert (await client.describe(name)).num_tokens == 33
                return [client._replicas.choose(name) for name in names]

        owners = asyncio.run(through_the_list())
        assert set(owners) == {0, 1}
        sync_ring = Replicas(addresses, [None, None])
        assert owners == [sync_ring.order(name)[0] for name in names]  # one ring for both clients
        for name, owner in zip(names, owners, strict=True):
            with KVCacheClient(addresses[owner], timeout=30) as client:
                assert client.describe(name).num_tokens == 33
            with KVCacheClient(addresses[1 - owner], timeout=30) as client, pytest.raises(NotFoundError):
                client.describe(name)
    finally:
        for server in servers:
            server.kill()
    # Redis replicas: one is killed, the list fails over and serves every sequence
    servers = [replica(tmp_path, redis_server).start(), replica(tmp_path, redis_server).start()]
    try:
        addresses = [server.address for server in servers]

        async def failover():
            async with AsyncKVCacheClient(addresses, timeout=30, retries=4) as client:
                await client.register_profile(PROFILE)
                for index, name in enumerate(names):
                    await client.upload(name, "tiny", *cache(32, index))
                expected = {name: (await client.fetch(name)).keys for name in names}
                orphans = [name for name in names if client._replicas.order(name)[0] == 0]
                assert orphans, "replica 0 owns none of the sequences"
                servers[0].kill()
                for name in names:
                    assert torch.equal((await client.fetch(name)).keys, expected[name])
                    assert await client.append(name, *marked(1)) == 33
                assert {client._replicas.choose(name) for name in orphans} == {1}  # the survivor took them over

        asyncio.run(failover())
    finally:
        for server in servers:
            server.kill()
