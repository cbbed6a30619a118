"""Profiles whose shared bases pass one gRPC message travel as a stream (one layer's basis per
message) through both clients; --max-profile-bytes still bounds a tenant's bases, and malformed streams
get INVALID_ARGUMENT without registering anything."""

import asyncio
import re

import grpc
import pytest
import torch
from conftest import ServerProcess
from svdq_client import AsyncKVCacheClient, KVCacheClient, NotFoundError, Profile, ResourceExhaustedError
from svdq_client.types import basis_bytes, basis_to_pb, profile_pieces
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import CodecConfig, fit_basis
from svdq.values import DEFAULT_VALUE_CODEC

pytestmark = pytest.mark.integration

HEADS, DIM = 2, 128  # 256 channels: one layer's key basis is ~134 kB on the wire (float16 components)
MESSAGE_LIMIT = 1 << 20
PROFILE_LIMIT = 16 << 20  # per tenant: "big" and "big-async" (6.3 MB each) and "keys-only" fit together


def bases(layers: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(fit_basis(torch.randn(300, HEADS * DIM, generator=generator)) for _ in range(layers))


def big_profile(name: str, layers: int) -> Profile:
    """Key and value bases of ``layers`` layers: 12 layers are 3.2 MB on the wire, three times
    the test server's message limit."""
    return Profile(name, layers, HEADS, DIM, codec=CodecConfig(bits_per_element=2.0), bases=bases(layers, 0),
                   value_codec=DEFAULT_VALUE_CODEC, value_bases=bases(layers, 1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("profile-stream"),
                            ["--max-message-bytes", str(MESSAGE_LIMIT), "--max-profile-bytes", str(PROFILE_LIMIT)]
                            ).start()
    yield process
    process.stop()


def test_a_profile_larger_than_one_message_registers_and_comes_back_whole(server):
    profile = big_profile("big", 12)
    assert profile.to_pb().ByteSize() > 3 * MESSAGE_LIMIT
    assert profile.bases_bytes <= PROFILE_LIMIT
    with KVCacheClient(server.address, timeout=60) as client:
        # one message cannot carry it: the server's message limit refuses the unary form
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.KVCacheStub(channel).RegisterProfile(pb.RegisterProfileRequest(profile=profile.to_pb()),
                                                             timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.register_profile(profile) is profile
        client.register_profile(profile)  # identical re-registration: a no-op, not a ConflictError
        assert client.get_profile("big").same_as(profile)
        listed = {listed.name: listed for listed in client.list_profiles()}
        assert listed["big"].bases is None and listed["big"].num_layers == 12
        # the bases are used: an upload compresses with them
        keys = torch.randn(12, 80, HEADS, DIM).half()
        info = client.upload("with-shared-bases", "big", keys, keys.clone())
        assert info.num_tokens == 80


def test_the_async_client_streams_profiles_the_same_way(server):
    profile = big_profile("big-async", 12)

    async def round_trip():
        async with AsyncKVCacheClient(server.address, timeout=60) as client:
            assert await client.register_profile(profile) is profile
            return await client.get_profile("big-async")

    assert asyncio.run(round_trip()).same_as(profile)


def test_a_profile_over_the_profile_limit_is_refused_before_its_bases_arrive(server):
    profile = big_profile("too-big", 40)
    assert profile.bases_bytes == 80 * basis_bytes(HEADS * DIM) > PROFILE_LIMIT
    with KVCacheClient(server.address, timeout=60) as client:
        with pytest.raises(ResourceExhaustedError, match=rf"profile 'too-big' has {profile.bases_bytes} bytes of shared "
                           r"bases held in memory \(float32\); this tenant's other profiles hold \d+ and its profile "
                           rf"streams in progress 0, and the server holds at most {PROFILE_LIMIT} bytes of bases per "
                           r"tenant \(--max-profile-bytes\)"):
            client.register_profile(profile)
        with pytest.raises(NotFoundError):
            client.get_profile("too-big")
        # keys only fits
        keys_only = Profile("keys-only", 12, HEADS, DIM, codec=CodecConfig(bits_per_element=2.0),
                            bases=profile.bases[:12])
        client.register_profile(keys_only)
        assert client.get_profile("keys-only").same_as(keys_only)  # what the server stored


def _stream(server, pieces):
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.KVCacheStub(channel).RegisterProfileStream(iter(pieces), timeout=60)
    return refused.value


@pytest.mark.parametrize("case, message", [
    ("no profile first", r"the first message of a profile stream must carry the profile \(without bases\)"),
    ("bases in the first message", "carries the profile without bases: send each layer's basis in a message"),
    ("odd count", r"key_bases must be 0 or the profile's num_layers 3, got 2"),
    ("too many", r"sent more bases than the 3 key and 0 value bases its first message declared"),
    ("too few", r"profile stream ended after 2 of the 3 bases its first message declared; send them all"),
    ("wrong shape", r"profile.bases\[1\].mean must have shape \[256\], got \[512\]"),
    ("profile twice", "after the first message of a profile stream, each message carries one layer's basis"),
    ("empty", r"a profile stream must carry at least its first message"),
])
def test_malformed_profile_streams_are_invalid_arguments_and_register_nothing(server, case, message):
    profile = Profile(f"bad-{case.replace(' ', '-')}", 3, HEADS, DIM, codec=CodecConfig(), bases=bases(3, 2))
    pieces = list(profile_pieces(profile))
    wide = basis_to_pb(fit_basis(torch.randn(600, 512)))
    streams = {
        "no profile first": pieces[1:],
        "bases in the first message": [pb.ProfilePiece(profile=profile.to_pb(), key_bases=3)],
        "odd count": [pb.ProfilePiece(profile=pieces[0].profile, key_bases=2)] + pieces[1:3],
        "too many": pieces + pieces[1:2],
        "too few": pieces[:-1],
        "wrong shape": pieces[:2] + [pb.ProfilePiece(basis=wide)] + pieces[3:],
        "profile twice": pieces[:2] + pieces[:1],
        "empty": [],
    }
    error = _stream(server, streams[case])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert re.search(message, error.details()), error.details()
    with KVCacheClient(server.address, timeout=60) as client:
        with pytest.raises(NotFoundError):
            client.get_profile(profile.name)
