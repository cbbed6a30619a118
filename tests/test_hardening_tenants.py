"""Tenants cannot hurt each other: byte quotas, eviction that takes only from tenants over
their share, GetServerInfo that shows a tenant its own figures only, metric labels that no
tenant chooses, reflection as an option, and a drain period on SIGTERM."""

import re
import signal
import uuid

import grpc
import pytest
import torch
from conftest import ServerProcess
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import scrape, wait_until
from svdq_client import KVCacheClient, NotFoundError, Profile, ResourceExhaustedError
from svdq_server.auth import TokenAuthenticator
from svdq_server.store import SequenceState, SequenceStore, StoredSequence, StorePolicy

import svdq
from svdq import CodecConfig
from svdq.values import compress_values

PROFILE = Profile("small", 1, 1, 32, codec=CodecConfig(method="fp16"))  # predictable sizes
TOKENS = {"team-a": "token-team-a-0123456789", "team-b": "token-team-b-0123456789",
          "team-c": "token-team-c-0123456789"}


def cache(tokens=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, tokens, 1, 32, generator=generator).half(),
            torch.randn(1, tokens, 1, 32, generator=generator).half())


def entry(tenant, name, tokens=64):
    keys, values = cache(tokens)
    state = SequenceState((svdq.compress(keys[0], PROFILE.codec),), (compress_values(values[0]),))
    return StoredSequence(tenant, name, PROFILE, "pre_rope", "u", state)


SIZE = entry("x", "x").state.nbytes  # one 64-token sequence, keys and values


def names(store, tenant):
    return {key[1] for key in store._sequences if key[0] == tenant}


# -- the store -----------------------------------------------------------------------------

def test_a_tenant_within_its_share_loses_nothing_to_another():
    store = SequenceStore(StorePolicy(10 * SIZE, "lru"))
    for index in range(3):
        store.insert(entry("b", f"b{index}"), replace=False)
    for index in range(40):
        store.insert(entry("a", f"a{index}"), replace=False)
    assert names(store, "b") == {"b0", "b1", "b2"}  # the reproduction of issue 13: all three kept
    assert names(store, "a") == {f"a{index}" for index in range(33, 40)}  # a evicted only its own oldest
    assert store.tenant_totals("b")["evictions"] == 0 and store.tenant_totals("a")["evictions"] == 33
    # b, within its share (half the budget), may grow: a is over its share and gives first
    store.insert(entry("b", "b3"), replace=False)
    assert names(store, "b") == {"b0", "b1", "b2", "b3"} and len(names(store, "a")) == 6
    assert store.totals()["sequences"] == 10


def test_without_room_in_the_other_tenants_shares_the_requester_evicts_its_own():
    store = SequenceStore(StorePolicy(4 * SIZE, "lru"))
    store.insert(entry("a", "a0"), replace=False)
    store.insert(entry("a", "a1"), replace=False)
    store.insert(entry("b", "b0"), replace=False)
    store.insert(entry("b", "b1"), replace=False)
    store.insert(entry("b", "b2"), replace=False)  # b is at its share: its own oldest goes
    assert names(store, "a") == {"a0", "a1"} and names(store, "b") == {"b1", "b2"}
    one_over = SequenceStore(StorePolicy(2 * SIZE, "none"))
    one_over.insert(entry("a", "a0"), replace=False)
    one_over.insert(entry("b", "b0"), replace=False)
    with pytest.raises(svdq.ResourceExhaustedError, match="eviction is 'none'"):
        one_over.insert(entry("b", "b1"), replace=False)


def test_a_tenant_at_its_quota_is_refused_and_nothing_is_evicted():
    store = SequenceStore(StorePolicy(100 * SIZE, "lru", quotas={"a": 2 * SIZE + 10}, default_quota=5 * SIZE))
    store.insert(entry("a", "a0"), replace=False)
    store.insert(entry("a", "a1"), replace=False)
    store.insert(entry("b", "b0"), replace=False)
    with pytest.raises(svdq.ResourceExhaustedError, match=rf"tenant 'a' already holds {2 * SIZE} of its "
                                                          rf"{2 * SIZE + 10}-byte quota"):
        store.insert(entry("a", "a2"), replace=False)
    assert names(store, "a") == {"a0", "a1"} and store.evictions == 0
    store.insert(entry("a", "a1"), replace=True)  # replacing its own sequence frees its old bytes
    grown = entry("a", "a0", tokens=65).state
    with pytest.raises(svdq.ResourceExhaustedError, match="quota"):
        store.update(store.get("a", "a0"), grown)  # appends are held to the quota too
    assert store.get("a", "a0").state.num_tokens == 64
    for index in range(1, 5):
        store.insert(entry("b", f"b{index}"), replace=False)
    with pytest.raises(svdq.ResourceExhaustedError, match=rf"of its {5 * SIZE}-byte quota"):
        store.insert(entry("b", "b5"), replace=False)  # the default quota
    assert store.policy.quota_for("a") == 2 * SIZE + 10 and store.policy.quota_for("zed") == 5 * SIZE


def test_tokens_file_gives_quotas_and_keeps_the_list_form(tmp_path):
    (tmp_path / "tokens.yaml").write_text(
        "tenants:\n"
        "  team-a: {tokens: [token-team-a-0123456789], quota_bytes: 1GiB}\n"
        "  team-b: [token-team-b-0123456789]\n"
        "  team-c: token-team-c-0123456789\n")
    auth = TokenAuthenticator.from_sources(str(tmp_path / "tokens.yaml"), None)
    assert auth.tenants == ["team-a", "team-b", "team-c"] and auth.quotas == {"team-a": 1 << 30}
    assert auth.tenant_for("Bearer token-team-a-0123456789") == "team-a"
    for text, match in (("{tokens: [token-team-a-0123456789], quota: 5}", r"unknown fields \['quota'\]"),
                        ("{tokens: [token-team-a-0123456789], quota_bytes: lots}", "quota_bytes of tenant 'team-a'"),
                        ("{tokens: [token-team-a-0123456789], quota_bytes: 0}", "must be > 0")):
        (tmp_path / "bad.yaml").write_text(f"tenants:\n  team-a: {text}\n")
        with pytest.raises(svdq.InvalidInputError, match=match):
            TokenAuthenticator.from_sources(str(tmp_path / "bad.yaml"), None)
    with pytest.raises(svdq.InvalidInputError, match="tenant names must be"):
        TokenAuthenticator({"team-a\n": ["token-team-a-0123456789"]})


# -- a real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "tokens.yaml").write_text(
        "tenants:\n"
        f"  team-a: [{TOKENS['team-a']}]\n"
        f"  team-b: {{tokens: [{TOKENS['team-b']}]}}\n"
        f"  team-c: {{tokens: [{TOKENS['team-c']}], quota_bytes: {2 * SIZE + 100}}}\n")
    server = ServerProcess(folder, ["--tokens-file", str(folder / "tokens.yaml"), "--eviction", "lru",
                                    "--store-bytes", str(12 * SIZE)]).start()
    yield server
    server.stop()


def tenant_client(server, tenant):
    return KVCacheClient(server.address, token=TOKENS[tenant], timeout=60)


@pytest.mark.integration
def test_tenants_through_the_service(tenant_server):
    keys, values = cache()
    with (tenant_client(tenant_server, "team-a") as a, tenant_client(tenant_server, "team-b") as b,
          tenant_client(tenant_server, "team-c") as c):
        for client in (a, b, c):
            client.register_profile(PROFILE)
        for index in range(3):
            b.upload(f"b{index}", "small", keys, values)
        for index in range(40):
            a.upload(f"a{index}", "small", keys, values)
        assert [b.describe(f"b{index}").num_tokens for index in range(3)] == [64, 64, 64]
        with pytest.raises(NotFoundError):
            a.describe("a0")
        c.upload("c0", "small", keys, values)
        c.upload("c1", "small", keys, values)
        with pytest.raises(ResourceExhaustedError, match=rf"tenant 'team-c' already holds {2 * SIZE} of its "
                                                          rf"{2 * SIZE + 100}-byte quota"):
            c.upload("c2", "small", keys, values)
        with pytest.raises(NotFoundError):
            c.describe("c2")
        # GetServerInfo: each tenant's own figures and quota, nothing about the others
        info_b, info_c = b.server_info(), c.server_info()
        assert (info_b.sequences, info_b.tenant_sequences, info_b.stored_bytes, info_b.evictions) == (3, 3, 3 * SIZE, 0)
        assert info_b.stored_fp16_bytes == 3 * 2 * 2 * 64 * 32 and info_b.tenant_quota_bytes == 0
        assert (info_c.sequences, info_c.stored_bytes, info_c.tenant_quota_bytes) == (2, 2 * SIZE, 2 * SIZE + 100)
        info_a = a.server_info()
        assert info_a.sequences == len([i for i in range(40) if _exists(a, f"a{i}")]) and info_a.evictions > 0
        assert info_a.store_budget_bytes == 12 * SIZE
    # operators see the whole store in the metrics
    text = scrape(tenant_server.metrics_port)
    assert _sample(text, "svdq_sequences") == 3 + 2 + info_a.sequences


def _exists(client, sequence):
    try:
        client.describe(sequence)
        return True
    except NotFoundError:
        return False


def _sample(text, name, labels=""):
    match = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


# -- metrics: no label value chosen by a tenant ---------------------------------------------

@pytest.mark.integration
def test_tenant_registered_profiles_share_one_label(tenant_server):
    keys = torch.randn(8, 1, 32).half()
    with tenant_client(tenant_server, "team-b") as client:
        for index in range(150):
            name = f"mine-{index}-{uuid.uuid4().hex[:6]}"
            client.register_profile(Profile(name, 1, 1, 32, codec=CodecConfig(method="fp16")))
            client.compress(keys, profile=name)
        client.compress(keys, codec=CodecConfig(method="fp16"))
        client.upload(f"labelled-{uuid.uuid4().hex[:6]}", name, *cache(8))
    text = scrape(tenant_server.metrics_port)
    labels = set(re.findall(r'^svdq_\w+\{.*?profile="([^"]*)"', text, re.MULTILINE))
    assert labels == {"tenant", "none"}, labels  # "small" of the other test is a tenant profile too
    # one series per (profile label, kind): 151 compress/upload calls, two profile labels
    series = [line for line in text.splitlines() if line.startswith('svdq_compression_ratio_count{kind="keys"')]
    assert len(series) == 2 and _sample(text, "svdq_compression_ratio_count", '{kind="keys",profile="tenant"}') >= 151
    assert "mine-" not in text


def test_operator_profiles_keep_their_name_label():
    from svdq_server.engine import Engine, EngineConfig
    from svdq_server.metrics import Metrics

    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 20), [PROFILE], metrics=metrics)
    metrics.bind_engine(engine, "test")
    engine.register_profile(Profile("tenant-made", 1, 1, 32, codec=CodecConfig(method="fp16")), tenant="t")
    keys = torch.randn(8, 1, 32)
    engine.compress_keys(keys, tenant="t", profile_name="small")
    engine.compress_keys(keys, tenant="t", profile_name="tenant-made")
    engine.compress_keys(keys, tenant="t", codec=CodecConfig(method="fp16"))
    counts = {sample.labels["profile"]: sample.value for family in metrics.registry.collect()
              if family.name == "svdq_compression_ratio" for sample in family.samples
              if sample.name.endswith("_count")}
    assert counts == {"small": 1, "tenant": 1, "none": 1}


# -- reflection and graceful shutdown ----------------------------------------------------------

def _reflection_services(server):
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        return {service.name for response in responses for service in response.list_services_response.service}


@pytest.mark.integration
def test_reflection_is_an_option(tenant_server, tmp_path):
    assert "svdq.v1.KVCache" in _reflection_services(tenant_server)  # the default: on
    server = ServerProcess(tmp_path, [], env={"SVDQ_REFLECTION": "false"}).start()
    try:
        with pytest.raises(grpc.RpcError) as raised:
            _reflection_services(server)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


@pytest.mark.integration
def test_sigterm_answers_not_serving_while_the_port_still_serves(tmp_path):
    server = ServerProcess(tmp_path, ["--drain-seconds", "4", "--grace-seconds", "5"]).start()
    try:
        with KVCacheClient(server.address, timeout=10, retries=0) as client:
            client.register_profile(PROFILE)
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 3,
                       "health to turn NOT_SERVING after SIGTERM", interval=0.05)
            assert client.get_profile("small").same_as(PROFILE)  # draining: calls are still answered
            assert server.process.poll() is None
            assert server.process.wait(timeout=30) == 0
        assert "drain_seconds" in server.log()
    finally:
        server.kill()
