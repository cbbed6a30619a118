"""The Redis store backend against a real redis-server: several stores on one Redis act as
replicas of one fleet (one accounting: quotas, shares, LRU and TTL hold across them),
appends through two replicas neither lose nor duplicate tokens, what was acknowledged
survives a Redis restart byte for byte, and a Redis that is down answers UnavailableError
without corrupting anything."""

from __future__ import annotations

import threading

import pytest
import torch
from redis_process import RedisProcess, needs_redis
from svdq_client.types import Profile
from svdq_server.engine import Engine, EngineConfig, UploadHeader
from svdq_server.store import SequenceState, StoredSequence, StorePolicy, open_store
from svdq_server.store_redis import LOG_MAX_APPENDS, RedisSequenceStore, read_password

import svdq
from svdq import CodecConfig, RopeConfig
from svdq.format import to_bytes
from svdq.values import compress_values, values_to_bytes

pytestmark = [needs_redis, pytest.mark.integration]

FP16 = Profile("small", 1, 1, 32, codec=CodecConfig(method="fp16"))  # predictable sizes
TINY = Profile("tiny", 2, 2, 32, rope=RopeConfig(theta=10000.0), codec=CodecConfig(bits_per_element=2.0, group_size=32))


def entry(tenant, name, tokens=64):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(tokens, 1, 32, generator=generator).half()
    values = torch.randn(tokens, 1, 32, generator=generator).half()
    state = SequenceState((svdq.compress(keys, FP16.codec),), (compress_values(values),))
    return StoredSequence(tenant, name, FP16, "pre_rope", "u", state)


SIZE = entry("x", "x").state.nbytes


def replicas(redis_server, count=2, **policy):
    return [RedisSequenceStore(redis_server.url, StorePolicy(**policy)) for _ in range(count)]


def names(store, tenant):
    found = store._redis.zrange("svdq:lru", 0, -1)
    return {member.decode().split(":", 2)[2] for member in found if member.decode().split(":", 2)[1] == tenant}


def engines(redis_server, count=2, profiles=(TINY,), **policy):
    policy = {"budget_bytes": 1 << 26, **policy}
    return [Engine(EngineConfig(device="cpu"), profiles, store=RedisSequenceStore(redis_server.url, StorePolicy(**policy)))
            for _ in range(count)]


def cache(layers=2, tokens=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, tokens, 2, 32, generator=generator), torch.randn(layers, tokens, 2, 32, generator=generator))


def blobs(state):
    return [to_bytes(layer) for layer in state.keys] + [values_to_bytes(layer) for layer in state.values]


# -- one accounting across replicas ------------------------------------------------------------

def test_shares_and_lru_hold_across_replicas(redis_server):
    # The scenario of the memory store's test, with tenant b writing through one replica and
    # tenant a through another: b within its share keeps everything, a evicts its own oldest.
    one, two = replicas(redis_server, budget_bytes=10 * SIZE)
    for index in range(3):
        one.insert(entry("b", f"b{index}"), replace=False)
    for index in range(40):
        two.insert(entry("a", f"a{index}"), replace=False)
    assert names(one, "b") == {"b0", "b1", "b2"}
    assert names(one, "a") == {f"a{index}" for index in range(33, 40)}
    assert one.tenant_totals("b")["evictions"] == 0 and one.tenant_totals("a")["evictions"] == 33
    one.insert(entry("b", "b3"), replace=False)
    assert names(two, "b") == {"b0", "b1", "b2", "b3"} and len(names(two, "a")) == 6
    assert one.totals()["sequences"] == two.totals()["sequences"] == 10
    assert one.totals()["keys"] + one.totals()["values"] == 10 * SIZE
    # an evicted sequence is gone for every replica, also one that had it cached
    with pytest.raises(svdq.NotFoundError):
        two.get("a", "a0")


def test_recency_seen_through_one_replica_protects_against_eviction_by_another(redis_server):
    one, two = replicas(redis_server, budget_bytes=3 * SIZE)
    for name in ("s0", "s1", "s2"):
        one.insert(entry("t", name), replace=False)
    two.get("t", "s0")  # s0 used through the other replica: s1 is now the least recent
    one.insert(entry("t", "s3"), replace=False)
    assert names(one, "t") == {"s0", "s2", "s3"}


def test_quota_is_one_limit_for_all_replicas(redis_server):
    one, two = replicas(redis_server, budget_bytes=100 * SIZE, quotas={"a": 2 * SIZE + 10})
    one.insert(entry("a", "a0"), replace=False)
    two.insert(entry("a", "a1"), replace=False)
    with pytest.raises(svdq.ResourceExhaustedError, match=rf"tenant 'a' already holds {2 * SIZE} of its"):
        one.insert(entry("a", "a2"), replace=False)
    with pytest.raises(svdq.ResourceExhaustedError, match="quota"):
        two.insert(entry("a", "a2"), replace=False)
    assert names(one, "a") == {"a0", "a1"} and one.evictions == 0
    grown = entry("a", "a0", tokens=65).state
    target = two.get("a", "a0")
    with target.write_lock, pytest.raises(svdq.ResourceExhaustedError, match="quota"):
        two.update(target, grown)
    assert one.get("a", "a0").state.num_tokens == 64


def test_ttl_expires_for_every_replica(redis_server):
    one, two = replicas(redis_server, budget_bytes=10 * SIZE, ttl_seconds=0.5)
    evicted = []
    one._on_evict = evicted.append
    one.insert(entry("t", "old"), replace=False)
    two.get("t", "old")
    import time

    time.sleep(0.8)
    assert one.expire() == 1 and evicted == ["ttl"]
    with pytest.raises(svdq.NotFoundError):
        two.get("t", "old")
    assert two.totals()["sequences"] == 0 and two.tenant_totals("t")["evictions"] == 1


# -- sequences through several replicas ----------------------------------------------------------

def test_any_replica_serves_any_sequence_byte_identical(redis_server):
    first, second = engines(redis_server)
    keys, values = cache()
    header = UploadHeader("s", "tiny", "u1", 100, "pre_rope", False, True)
    first.upload("t", header, keys, values)
    # the same upload retried through another replica (its answer was lost) is recognised
    assert second.begin_upload("t", header).num_tokens == 100
    expected = 100
    for step in range(LOG_MAX_APPENDS + 5):  # past the log limit: the layers are rewritten once
        engine = (first, second)[step % 2]
        new_keys, new_values = cache(tokens=3, seed=step + 1)
        expected = engine.append("t", "s", new_keys, new_values, expected_tokens=expected).num_tokens
    assert expected == 100 + 3 * (LOG_MAX_APPENDS + 5)
    late = engines(redis_server, 1)[0]  # a replica that starts now, with nothing in memory
    states = [engine.store.get("t", "s").state for engine in (first, second, late)]
    assert blobs(states[0]) == blobs(states[1]) == blobs(states[2])
    queries = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(9))
    outputs = [engine.attend("t", [("s", 0), ("s", 1), ("s", 1)], queries).output for engine in (first, second, late)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    # a retried append (same bytes, same expected count) is recognised on another replica
    new_keys, new_values = cache(tokens=3, seed=1000)
    count = first.append("t", "s", new_keys, new_values, expected_tokens=expected).num_tokens
    assert second.append("t", "s", new_keys, new_values, expected_tokens=expected).num_tokens == count == expected + 3
    with pytest.raises(svdq.ConflictError, match="out-of-order"):
        late.append("t", "s", *cache(tokens=3, seed=1001), expected_tokens=expected)


def test_warm_attend_takes_no_store_transaction_and_no_reload(redis_server, monkeypatch):
    # Replicas serving Attend must not serialise on the store: a warm Attend reads the version
    # (one script call) and records the use at most once per TOUCH_SECONDS per replica, outside
    # any WATCH on the books; the decoded sequence comes from the read-through cache.
    import redis as redis_client
    from svdq_server import store_redis

    monkeypatch.setattr(store_redis, "TOUCH_SECONDS", 3600.0)
    first, second = engines(redis_server)
    keys, values = cache()
    first.upload("t", UploadHeader("s", "tiny", "u1", 100, "pre_rope", False, True), keys, values)
    queries = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    expected = first.attend("t", [("s", 0), ("s", 1)], queries).output
    assert torch.equal(second.attend("t", [("s", 0), ("s", 1)], queries).output, expected)  # loads once
    monitor = redis_client.Redis.from_url(redis_server.url)
    monitor.config_resetstat()
    calls = 20
    for _ in range(calls):
        for engine in (first, second):
            assert torch.equal(engine.attend("t", [("s", 0), ("s", 1)], queries).output, expected)
    commands = {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in monitor.info("commandstats").items()}
    commands.pop("config|resetstat")
    assert commands.get("evalsha") == 2 * calls  # one version check per Attend (both entries: one sequence)
    assert not {"multi", "exec", "watch", "hgetall", "lrange", "zadd"} & commands.keys(), commands
    monkeypatch.setattr(store_redis, "TOUCH_SECONDS", 0.0)  # now every use is recorded, still without a transaction
    monitor.config_resetstat()
    first.attend("t", [("s", 0)], queries[:1])
    commands = {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in monitor.info("commandstats").items()}
    assert commands.get("zadd") == 1 and "exec" not in commands, commands
    monitor.close()


def test_a_held_writer_lock_is_renewed_and_a_dead_holders_lock_runs_out(redis_server):
    import time

    from svdq_server.store_redis import LOCK_SECONDS

    first, second = engines(redis_server)
    keys, values = cache(tokens=64)
    first.upload("t", UploadHeader("s", "tiny", "u1", 64, "pre_rope", False, True), keys, values)
    monitor = first.store._redis
    lock_key = "svdq:lock:1:t:s"
    entry = first.store.get("t", "s")
    with entry.write_lock:  # a write that takes longer than the lock's lifetime keeps its lock
        time.sleep(LOCK_SECONDS + 1)
        assert monitor.pttl(lock_key) > 0
    assert not monitor.exists(lock_key)  # released
    # a replica killed while it held the lock: nobody renews it, and the next writer gets it
    # once it runs out (at most LOCK_SECONDS), not after the wait limit
    monitor.set(lock_key, "token-of-a-dead-replica", px=int(LOCK_SECONDS * 1000))
    appended = second.append("t", "s", *cache(tokens=1, seed=5), expected_tokens=64)
    assert appended.num_tokens == 65 and first.store.get("t", "s").state.num_tokens == 65


def test_concurrent_appends_through_two_replicas_lose_and_duplicate_nothing(redis_server):
    first, second = engines(redis_server)
    keys, values = cache(tokens=64)
    first.upload("t", UploadHeader("s", "tiny", "u1", 64, "pre_rope", False, True), keys, values)
    steps = 12
    # Every appended token carries its writer and step in its values, so the stored sequence
    # shows which appends landed and in what order.
    def worker(engine, writer, errors):
        try:
            for step in range(steps):
                marker = torch.full((2, 1, 2, 32), float(writer * 100 + step))
                engine.append("t", "s", torch.randn(2, 1, 2, 32), marker)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    errors = []
    threads = [threading.Thread(target=worker, args=(engine, writer, errors))
               for writer, engine in ((1, first), (2, second), (3, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    fetched = next(iter(engines(redis_server, 1)[0].fetch("t", "s", layers=[0])))
    markers = [int(value) for value in fetched.values[64:, 0, 0].round().tolist()]
    assert len(markers) == 3 * steps and fetched.total_tokens == 64 + 3 * steps
    for writer in (1, 2, 3):
        assert [marker - writer * 100 for marker in markers if marker // 100 == writer] == list(range(steps))


def test_profiles_registered_through_one_replica_are_known_to_all(redis_server):
    first, second = engines(redis_server)
    mine = Profile("mine", 1, 1, 32, codec=CodecConfig(method="fp16"))
    first.register_profile(mine, tenant="alpha")
    assert [profile.name for profile in second.list_profiles("alpha")] == ["mine", "tiny"]
    assert [profile.name for profile in second.list_profiles("beta")] == ["tiny"]
    assert second.get_profile("mine", "alpha").same_as(mine)
    with pytest.raises(svdq.ConflictError, match="already exists"):
        second.register_profile(Profile("mine", 1, 1, 64), tenant="alpha")
    # a stored sequence keeps the profile it was stored with when the name is registered anew
    second.upload("alpha", UploadHeader("s", "mine", "u", 8, "pre_rope", False, True), torch.randn(1, 8, 1, 32),
                  torch.randn(1, 8, 1, 32))
    second.register_profile(Profile("mine", 1, 1, 64, codec=CodecConfig(method="fp16")), replace=True, tenant="alpha")
    assert engines(redis_server, 1)[0].describe("alpha", "s").num_tokens == 8


# -- durability and outages -----------------------------------------------------------------------

def test_acknowledged_data_survives_a_redis_restart(redis_server):
    engine = engines(redis_server, 1)[0]
    keys, values = cache()
    engine.upload("t", UploadHeader("s", "tiny", "u1", 100, "pre_rope", False, True), keys, values)
    engine.append("t", "s", *cache(tokens=5, seed=3), expected_tokens=100)
    before = blobs(engine.store.get("t", "s").state)
    totals = engine.store.totals()
    redis_server.kill()  # kill -9: only what Redis had fsynced to its AOF comes back
    redis_server.start()
    fresh = engines(redis_server, 1)[0]
    assert blobs(fresh.store.get("t", "s").state) == before
    assert fresh.store.totals() == totals


def test_redis_down_answers_unavailable_and_corrupts_nothing(redis_server):
    engine = engines(redis_server, 1)[0]
    engine.store._redis.connection_pool.connection_kwargs.update(socket_timeout=2, socket_connect_timeout=2)
    keys, values = cache()
    engine.upload("t", UploadHeader("s", "tiny", "u1", 100, "pre_rope", False, True), keys, values)
    before = blobs(engine.store.get("t", "s").state)
    redis_server.stop()
    for call in (lambda: engine.describe("t", "s"),
                 lambda: engine.append("t", "s", *cache(tokens=5, seed=3), expected_tokens=100),
                 lambda: engine.upload("t", UploadHeader("s2", "tiny", "u2", 100, "pre_rope", False, True), keys, values),
                 lambda: engine.store.ping()):
        with pytest.raises(svdq.UnavailableError, match=r"the store redis://127.0.0.1:\d+/0 is unavailable"):
            call()
    redis_server.start()
    assert blobs(engine.store.get("t", "s").state) == before
    assert engine.append("t", "s", *cache(tokens=5, seed=3), expected_tokens=100).num_tokens == 105
    assert engine.store.totals()["sequences"] == 1


def test_store_url_and_password_checks(tmp_path, redis_server):
    for url, match in (("redis://:secret@127.0.0.1:6379/0", "must not contain a password"),
                       ("http://127.0.0.1:6379", "must be 'memory' or redis://"),
                       ("redis:///0", "must be 'memory' or redis://")):
        with pytest.raises(svdq.InvalidInputError, match=match):
            open_store(url, StorePolicy(1 << 20))
    (tmp_path / "password").write_text("s3cret-password\n")
    assert read_password(str(tmp_path / "password")) == "s3cret-password"
    with pytest.raises(svdq.InvalidInputError, match="cannot read --store-password-file"):
        read_password(str(tmp_path / "missing"))
    secured = RedisProcess(tmp_path / "secured", password="s3cret-password").start()
    try:
        with pytest.raises(Exception, match="(?i)auth"):
            RedisSequenceStore(secured.url, StorePolicy(1 << 20)).ping()
        store = RedisSequenceStore(secured.url, StorePolicy(1 << 20), password=read_password(str(tmp_path / "password")))
        store.ping()
        store.insert(entry("t", "s"), replace=False)
        assert store.totals()["sequences"] == 1
    finally:
        secured.kill()
