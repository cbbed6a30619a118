"""Content-addressed chunks (StoreChunk / LookupChunks / FetchChunks) on a real server process:
what the vLLM connector stores. Round trips equal the library, leading-chain lookups, tenants
and salts never share a chunk, chunks count against the store budget, bad input is refused
without changing what is stored."""

import dataclasses
import uuid

import grpc
import pytest
import torch
from conftest import TENANT_TOKENS
from svdq_client import ConflictError, KVCacheClient, NotFoundError, Profile
from svdq_client.wire import tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc
from test_server import CODEC, DIM, HEADS, LAYERS, ROPE, cache

from svdq import compress, decompress
from svdq.codec import fit_layer_basis
from svdq.errors import InvalidInputError as LocalInputError

pytestmark = pytest.mark.integration

CHUNK = 64  # tokens per chunk: two token groups of the "tiny" codec


def chain(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{index}" for index in range(count)]


@pytest.fixture
def client(shared_server):
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=60) as client:
        yield client


@pytest.fixture
def other_tenant(shared_server):
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-b"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def shared_profile(shared_server):
    """A tenant profile like "tiny" with shared per-layer bases fitted on other tokens of the
    keys that the round trip stores (tokens 512.. of seed 1)."""
    keys, _ = cache(1024, seed=1)
    bases = tuple(fit_layer_basis(keys[layer, 512:].float(), positions=torch.arange(512, 1024), rope=ROPE)
                  for layer in range(LAYERS))
    profile = Profile(f"chunks-{uuid.uuid4().hex[:8]}", LAYERS, HEADS, DIM, rope=ROPE, codec=CODEC, bases=bases)
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=60) as client:
        client.register_profile(profile)
    return profile


def store_chain(client, profile, keys, values, content_keys, salt=""):
    for index, content_key in enumerate(content_keys):
        span = slice(index * CHUNK, (index + 1) * CHUNK)
        client.store_chunk(profile, content_key, keys[:, span], values[:, span],
                           positions=torch.arange(span.start, span.stop), cache_salt=salt)


def test_chunks_round_trip_equal_the_library_with_shared_bases(client, shared_profile):
    keys, values = (tensor[:, :3 * CHUNK] for tensor in cache(1024, seed=1))
    content_keys = chain(uuid.uuid4().hex, 3)
    store_chain(client, shared_profile.name, keys, values, content_keys)
    assert client.lookup_chunks(shared_profile.name, content_keys) == 3
    fetched = client.fetch_chunks(shared_profile.name, content_keys, LAYERS)
    assert len(fetched) == 3
    for index, chunk in enumerate(fetched):
        span = slice(index * CHUNK, (index + 1) * CHUNK)
        positions = torch.arange(span.start, span.stop)
        assert torch.equal(chunk.positions, positions)
        torch.testing.assert_close(chunk.values, values[:, span], rtol=0, atol=0)  # 16-bit values
        # Only the chunk at position 0 keeps sink tokens; the others are all quantized body.
        codec = CODEC if index == 0 else dataclasses.replace(CODEC, num_sinks=0)
        for layer in range(LAYERS):
            expected = decompress(compress(keys[layer, span], codec, positions=positions, rope=ROPE,
                                           key_space="post_rope", basis=shared_profile.bases[layer]))
            torch.testing.assert_close(chunk.keys[layer], expected, rtol=0, atol=0)
            error = (chunk.keys[layer].float() - keys[layer, span].float()).norm() / keys[layer, span].float().norm()
            assert error < 0.3


def test_passthrough_chunks_are_exact_and_count_against_the_budget(shared_server, client):
    profile = Profile(f"chunks-fp16-{uuid.uuid4().hex[:8]}", LAYERS, HEADS, DIM, rope=ROPE,
                      codec=dataclasses.replace(CODEC, method="fp16"))
    client.register_profile(profile)
    keys, values = cache(CHUNK, seed=2)
    before = client.server_info().stored_bytes
    info, created = client.store_chunk(profile.name, "only", keys, values)
    assert created and info.num_tokens == CHUNK and info.num_layers == LAYERS
    assert client.server_info().stored_bytes - before == info.key_bytes + info.value_bytes
    again, created = client.store_chunk(profile.name, "only", keys, values)  # a retry keeps the stored one
    assert not created and again.key_bytes == info.key_bytes
    assert client.server_info().stored_bytes - before == info.key_bytes + info.value_bytes
    (fetched,) = client.fetch_chunks(profile.name, ["only"], LAYERS)
    assert torch.equal(fetched.keys, keys) and torch.equal(fetched.values, values)
    shorter_keys, shorter_values = cache(CHUNK // 2, seed=3)
    with pytest.raises(ConflictError, match="one token range"):
        client.store_chunk(profile.name, "only", shorter_keys, shorter_values)


def test_lookup_counts_the_leading_stored_chunks(client, shared_profile):
    keys, values = cache(3 * CHUNK, seed=4)
    content_keys = chain(uuid.uuid4().hex, 3)
    store_chain(client, shared_profile.name, keys, values, content_keys)
    name = shared_profile.name
    assert client.lookup_chunks(name, content_keys + ["never-stored"]) == 3
    assert client.lookup_chunks(name, content_keys[:2] + ["never-stored", content_keys[2]]) == 2
    assert client.lookup_chunks(name, ["never-stored"] + content_keys) == 0
    assert client.lookup_chunks(name, []) == 0
    with pytest.raises(NotFoundError, match=r"content_keys\[1\]"):
        client.fetch_chunks(name, [content_keys[0], "never-stored"], LAYERS)


def test_tenants_and_salts_never_share_a_chunk(client, other_tenant):
    # "tiny" is the operator's profile: both tenants see it under the same name.
    keys, values = cache(CHUNK, seed=5)
    content_key = uuid.uuid4().hex
    client.store_chunk("tiny", content_key, keys, values, cache_salt="salt-a")
    assert client.lookup_chunks("tiny", [content_key], cache_salt="salt-a") == 1
    assert client.lookup_chunks("tiny", [content_key], cache_salt="salt-b") == 0
    assert client.lookup_chunks("tiny", [content_key]) == 0
    assert other_tenant.lookup_chunks("tiny", [content_key], cache_salt="salt-a") == 0
    with pytest.raises(NotFoundError):
        other_tenant.fetch_chunks("tiny", [content_key], LAYERS, cache_salt="salt-a")


def test_bad_chunk_requests_get_their_status_and_store_nothing(shared_server, client):
    keys, values = cache(CHUNK, seed=6)
    before = client.server_info()
    token = (("authorization", f"Bearer {TENANT_TOKENS['team-a']}"),)

    def request(**changes):
        message = pb.StoreChunkRequest(profile="tiny", content_key=uuid.uuid4().hex)
        tensor_to_pb(changes.pop("keys", keys), message.keys)
        values_given = changes.pop("values", values)
        if values_given is not None:
            tensor_to_pb(values_given, message.values)
        for name, value in changes.items():
            setattr(message, name, value)
        return message

    nan_keys = keys.clone()
    nan_keys[0, 3, 0, 0] = float("nan")
    cases = [
        (request(keys=keys[:1], values=values[:1]), grpc.StatusCode.INVALID_ARGUMENT, "every layer"),
        (request(values=None), grpc.StatusCode.INVALID_ARGUMENT, "values is required"),
        (request(values=values[:, :10]), grpc.StatusCode.INVALID_ARGUMENT, "shape of keys"),
        (request(keys=nan_keys), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (request(content_key="bad key!"), grpc.StatusCode.INVALID_ARGUMENT, "content_key"),
        (request(cache_salt="s" * 2000), grpc.StatusCode.INVALID_ARGUMENT, "cache_salt"),
        (request(profile="no-such-profile"), grpc.StatusCode.NOT_FOUND, "profile"),
    ]
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = pb_grpc.KVCacheStub(channel)
        for message, code, text in cases:
            with pytest.raises(grpc.RpcError) as raised:
                stub.StoreChunk(message, metadata=token, timeout=30)
            assert raised.value.code() == code, raised.value.details()
            assert text in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            stub.LookupChunks(pb.LookupChunksRequest(profile="tiny", content_keys=["k"] * 5000), metadata=token)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.FetchChunks(pb.FetchChunksRequest(profile="tiny"), metadata=token))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = client.server_info()
    assert (after.stored_bytes, after.tenant_sequences) == (before.stored_bytes, before.tenant_sequences)
    with pytest.raises(LocalInputError, match="values are required"):
        client.store_chunk("tiny", "k", keys, None)
