"""Bad input from a careless or hostile client gets the right status and a short message:
corrupt protobuf bytes (INVALID_ARGUMENT, counted, one rate-limited warning), malformed ids,
and the client and library used the way a new user first tries them."""

import logging
import re
import uuid

import grpc
import numpy as np
import pytest
import torch
from conftest import TENANT_TOKENS
from helpers import scrape
from svdq_client import AsyncKVCacheClient, InvalidInputError, KVCacheClient, Profile
from svdq_client.types import abbreviate, check_name
from svdq_client.wire import tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_server.interceptors import RateLimitedLog

import svdq
from svdq import CodecConfig, compress, decompress, from_bytes, to_bytes
from svdq.attention import attend
from svdq.values import compress_values

pytestmark = pytest.mark.integration

HEADS, DIM = 2, 32  # the "tiny" profile of the shared server: 2 layers x 2 heads x 32
METHODS = pb.DESCRIPTOR.services_by_name["KVCache"].methods
AUTH = (("authorization", f"Bearer {TENANT_TOKENS['team-a']}"),)
CORRUPT = b"\xff\xff\xff\xff\xff"  # a field tag whose varint never ends


def new_id(prefix="seq"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def raw_call(channel, method, payloads, metadata=AUTH):
    """Send raw bytes to ``method`` with a generic call (no serializer: nothing is checked
    client-side); returns the RpcError the server answered with."""
    path = f"/svdq.v1.KVCache/{method.name}"
    with pytest.raises(grpc.RpcError) as raised:
        if method.client_streaming:
            channel.stream_unary(path)(iter(payloads), metadata=metadata, timeout=30)
        elif method.server_streaming:
            list(channel.unary_stream(path)(payloads[0], metadata=metadata, timeout=30))
        else:
            channel.unary_unary(path)(payloads[0], metadata=metadata, timeout=30)
    return raised.value


def rpc_counts(server, code):
    text = scrape(server.metrics_port)
    pattern = re.compile(r'^svdq_rpc_total\{code="' + code + r'",method="(\w+)"\} ([0-9.e+]+)$', re.MULTILINE)
    return {method: float(value) for method, value in pattern.findall(text)}


def small_cache(tokens=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, tokens, HEADS, DIM, generator=generator).half(),
            torch.randn(2, tokens, HEADS, DIM, generator=generator).half())


@pytest.fixture
def client(shared_server):
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=60) as client:
        yield client


# -- corrupt protobuf bytes ----------------------------------------------------------------

def test_corrupt_bytes_get_invalid_argument_on_every_method_and_are_counted(shared_server):
    before = rpc_counts(shared_server, "INVALID_ARGUMENT")
    log_before = shared_server.log_path.read_text(errors="replace")
    with shared_server.channel() as channel:
        for method in METHODS:
            error = raw_call(channel, method, [CORRUPT])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error.details())
            assert f"could not be parsed as a {method.input_type.full_name} message" in error.details()
        # a stream whose first chunk is valid and second corrupt
        first = pb.UploadChunk(sequence_id=new_id(), profile="tiny", upload_id="u1", total_tokens=64)
        tensor_to_pb(small_cache(32)[0], first.keys)
        error = raw_call(channel, METHODS[[m.name for m in METHODS].index("Upload")],
                         [first.SerializeToString(), CORRUPT])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "svdq.v1.UploadChunk" in error.details()
        # the caller is authenticated before its bytes are judged
        error = raw_call(channel, METHODS[0], [CORRUPT], metadata=())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    after = rpc_counts(shared_server, "INVALID_ARGUMENT")
    for method in METHODS:
        expected = 2 if method.name == "Upload" else 1
        assert after.get(method.name, 0) - before.get(method.name, 0) == expected, method.name
    new_log = shared_server.log_path.read_text(errors="replace")[len(log_before):]
    assert "Traceback" not in new_log and " ERROR " not in new_log
    # 14 unparsable requests well within one 10-second interval: at most two warning lines
    assert 1 <= new_log.count("unparsable request") <= 2, new_log


def test_rate_limited_log_counts_what_it_left_out(caplog):
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.limited"), logging.WARNING, 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.limited"):
        assert limited.log("bad request %d", 1)
        for index in range(50):
            now[0] += 0.1
            assert not limited.log("bad request %d", index)
        now[0] += 10.0
        assert limited.log("bad request %d", 99)
    assert [record.getMessage() for record in caplog.records] == [
        "bad request 1", "bad request 99 (and 50 more like it since the last such line)"]


# -- ids -----------------------------------------------------------------------------------

def test_ids_are_defined_in_one_place_and_long_ones_are_not_echoed():
    assert check_name("dup", "sequence_id") == "dup"
    for bad in ("dup\n", "dup\r\n", "\ndup", "", "-lead", "caf\u00e9", "a" * 129, "x y"):
        with pytest.raises(svdq.InvalidInputError, match="1-128 characters of ASCII letters, digits and '._:/-'"):
            check_name(bad, "sequence_id")
    with pytest.raises(svdq.InvalidInputError) as raised:
        check_name("z" * 20_000, "sequence_id")
    assert len(str(raised.value)) < 250 and "(20000 characters)" in str(raised.value)
    assert abbreviate("short") == "'short'" and abbreviate(b"\x00" * 100).endswith("... (100 bytes)")


def test_the_server_refuses_bad_ids_with_a_short_message(shared_server, client):
    sequence = new_id()
    client.upload(sequence, "tiny", *small_cache())
    requests = {
        "Describe": pb.DescribeRequest(sequence_id=sequence + "\n"),
        "Delete": pb.DeleteRequest(sequence_id="q" * 20_000),
        "GetProfile": pb.GetProfileRequest(name="p" * 20_000),
        "Fetch": pb.FetchRequest(sequence_id="f" * 20_000),
    }
    upload = pb.UploadChunk(sequence_id=sequence + "\n", profile="tiny", upload_id="u", total_tokens=40)
    tensor_to_pb(small_cache()[0], upload.keys)
    by_name = {method.name: method for method in METHODS}
    with shared_server.channel() as channel:
        for name, request in [*requests.items(), ("Upload", upload)]:
            error = raw_call(channel, by_name[name], [request.SerializeToString()])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
            assert "1-128 characters" in error.details() and len(error.details()) < 300, (name, error.details())
    assert client.describe(sequence).num_tokens == 40  # "dup\n" named nothing and created nothing
    with pytest.raises(InvalidInputError, match="sequence_id must be 1-128 characters"):
        client.describe(sequence + "\n")  # refused client-side with the same rule


# -- the client and the library as a new user tries them --------------------------------------

def test_client_accepts_the_obvious_alternatives(shared_server, client):
    profile = client.get_profile("tiny")
    keys, values = small_cache(48)
    sequence = new_id()
    info = client.upload(sequence, profile, keys.numpy(), values.numpy())  # a Profile, numpy arrays
    assert info.profile == "tiny" and info.num_tokens == 48
    assert client.get_profile(profile).same_as(profile)
    queries = torch.randn(1, HEADS, DIM)
    as_pair = client.attend(queries, (sequence, 1))  # one (sequence_id, layer) pair
    as_list = client.attend(queries.numpy(), [(sequence, 1)])
    assert torch.equal(as_pair.output, as_list.output)
    assert torch.equal(client.fetch(sequence, layers=1).keys, client.fetch(sequence, layers=[1]).keys)
    result = client.compress(keys[0].numpy(), profile=profile)
    assert torch.equal(client.decompress(result), client.decompress(result.blob))  # the CompressResult itself
    assert client.append(sequence, keys[:, :1].numpy(), values[:, :1].numpy()) == 49
    with KVCacheClient(shared_server.address, token=f"Bearer {TENANT_TOKENS['team-a']}") as prefixed:
        assert prefixed.describe(sequence).num_tokens == 49


def test_client_argument_errors_are_typed_and_raised_before_anything_is_sent():
    """Against a port nobody listens on: a call that reached the network would fail with
    UNAVAILABLE, so every InvalidInputError here comes from the client's own checks."""
    keys = torch.zeros(2, 4, HEADS, DIM)
    cases = [
        (lambda c: c.attend(torch.zeros(1, HEADS, DIM), ["s1"]), r"entries\[0\] must be a \(sequence_id, layer\) pair"),
        (lambda c: c.attend(torch.zeros(1, HEADS, DIM), "s1"), "entries must be a list of"),
        (lambda c: c.attend(torch.zeros(1, HEADS, DIM), [("s1", "0")]), r"entries\[0\].layer must be an integer"),
        (lambda c: c.attend(torch.zeros(1, HEADS, DIM), [("s1", 0)], scale=float("inf")), "scale must be a positive"),
        (lambda c: c.attend([[0.0]], [("s1", 0)]), "queries must be a torch.Tensor"),
        (lambda c: c.upload("s", Profile("p", 2, HEADS, DIM), keys.double().numpy()),
         r"upload keys must be a torch.Tensor \[layers, tokens, kv_heads, head_dim\] of float16/bfloat16/float32, "
         "got float64"),
        (lambda c: c.upload("s", {"name": "p"}, keys), "profile must be a profile name"),
        (lambda c: c.upload("s", "p", keys, key_space="postrope"), "key_space must be 'pre_rope' or 'post_rope'"),
        (lambda c: c.upload("s", "p", keys[:, :0]), "must hold at least one token"),
        (lambda c: c.upload("s", "p", keys, positions=torch.arange(3)), r"one entry per token \(4\)"),
        (lambda c: c.upload("s\n", "p", keys), "sequence_id must be 1-128"),
        (lambda c: c.upload("s", "p", keys, upload_id="u u"), "upload_id must be 1-128"),
        (lambda c: c.append("s", keys, expected_tokens=-1), "expected_tokens must be an integer >= 0"),
        (lambda c: c.compress(keys[0], codec={"bits_per_element": 2}), "codec must be a CodecConfig"),
        (lambda c: c.compress(keys[0], layer=1.5), "layer must be an integer"),
        (lambda c: c.decompress("not bytes"), "blob must be the bytes of a compressed blob"),
        (lambda c: c.decompress(b"x", dtype="float16"), "dtype must be torch.float16"),
        (lambda c: c.fetch("s", layers="0"), "layers must be a list of layer indices"),
        (lambda c: c.describe(7), "sequence_id must be a string"),
        (lambda c: c.delete("x" * 20_000), r"\(20000 characters\)"),
        (lambda c: c.get_profile(None), "name must be a profile name"),
        (lambda c: c.register_profile("tiny"), "profile must be an svdq_client.Profile"),
    ]
    with KVCacheClient("127.0.0.1:1", timeout=5, retries=0) as client:
        for call, match in cases:
            with pytest.raises(InvalidInputError, match=match) as raised:
                call(client)
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert isinstance(raised.value, svdq.InvalidInputError)  # library handlers catch it too


async def test_async_client_checks_arguments_the_same_way():
    async with AsyncKVCacheClient("127.0.0.1:1", timeout=5, retries=0) as client:
        with pytest.raises(InvalidInputError, match=r"entries\[0\] must be a \(sequence_id, layer\) pair"):
            await client.attend(torch.zeros(1, HEADS, DIM), ["s1"])
        with pytest.raises(InvalidInputError, match="profile must be a profile name"):
            await client.upload("s", 3, torch.zeros(2, 4, HEADS, DIM))
        with pytest.raises(InvalidInputError, match="blob must be the bytes"):
            await client.decompress(None)


def test_a_doubled_bearer_prefix_gets_a_hint(shared_server):
    with shared_server.channel() as channel:
        error = raw_call(channel, METHODS[0], [b""],
                         metadata=(("authorization", f"Bearer Bearer {TENANT_TOKENS['team-a']}"),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the token itself starts with 'Bearer '" in error.details()


def test_library_accepts_one_cache_and_blob_bytes():
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(80, HEADS, DIM, generator=generator)
    values = torch.randn(80, HEADS, DIM, generator=generator)
    compressed = compress(keys, CodecConfig(bits_per_element=2.0, group_size=32))
    cached_values = compress_values(values)
    queries = torch.randn(1, 2 * HEADS, DIM, generator=generator)
    single = attend(queries, compressed, cached_values)
    listed = attend(queries, [compressed], [cached_values])
    assert torch.equal(single.output, listed.output) and torch.equal(single.lse, listed.lse)
    blob = to_bytes(compressed)
    assert torch.equal(decompress(blob), decompress(from_bytes(blob)))
    assert torch.equal(decompress(bytearray(blob)), decompress(compressed))
    with pytest.raises(svdq.InvalidInputError, match="decompress takes CompressedKeys"):
        decompress(keys)
    with pytest.raises(svdq.InvalidInputError, match="keys must be a list with one compressed cache per query"):
        attend(queries, iter([compressed]), [cached_values])
    with pytest.raises(svdq.FormatError):
        decompress(b"definitely not a blob")
    assert np.isfinite(single.output.numpy()).all()
