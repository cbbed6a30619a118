"""A real svdq-server process on loopback, driven through the client: round trips equal the
library, bad inputs get the right status and leave stored data unchanged, tenants are
isolated, many clients at once, health, reflection, metrics."""

import subprocess
import sys
import threading
import uuid

import grpc
import pytest
import torch
from conftest import TENANT_TOKENS, free_port
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import scrape
from svdq_client import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    KVCacheClient,
    NotFoundError,
    Profile,
    ResourceExhaustedError,
    Sparsity,
)
from svdq_client.wire import tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import CodecConfig, RopeConfig, apply_rope, compress, decompress
from svdq.attention import attend
from svdq.values import compress_values

pytestmark = pytest.mark.integration

LAYERS, HEADS, DIM = 2, 2, 32
ROPE = RopeConfig(theta=10000.0)
CODEC = CodecConfig(method="svdq", bits_per_element=2.0, group_size=32)  # the "tiny" profile of the file


def cache(tokens, seed=0):
    """Post-RoPE float16 keys with a nearly low-rank pre-RoPE form, and values."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(LAYERS, tokens, 4, generator=generator) * torch.tensor([8.0, 4, 2, 1])
    pre = latent @ torch.randn(LAYERS, 4, HEADS * DIM, generator=generator)
    pre = (pre + 0.05 * torch.randn(LAYERS, tokens, HEADS * DIM, generator=generator)).reshape(LAYERS, tokens, HEADS,
                                                                                                 DIM)
    keys = torch.stack([apply_rope(pre[layer], torch.arange(tokens), ROPE) for layer in range(LAYERS)])
    return keys.half(), torch.randn(LAYERS, tokens, HEADS, DIM, generator=generator).half()


def new_id(prefix="seq"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(shared_server):
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=60, chunk_bytes=8192) as client:
        yield client


@pytest.fixture
def raw_stub(shared_server):
    with grpc.insecure_channel(shared_server.address) as channel:
        yield pb_grpc.KVCacheStub(channel), (("authorization", f"Bearer {TENANT_TOKENS['team-a']}"),)


def test_upload_fetch_attend_equal_the_library(client):
    keys, values = cache(130)
    sequence = new_id()
    info = client.upload(sequence, "tiny", keys, values, positions=torch.arange(130), key_space="post_rope")
    local = [compress(keys[layer], CODEC, positions=torch.arange(130), rope=ROPE, key_space="post_rope")
             for layer in range(LAYERS)]
    local_values = [compress_values(values[layer]) for layer in range(LAYERS)]
    assert info.num_tokens == 130 and info.key_bytes == sum(layer.nbytes for layer in local)
    assert info.key_bits_per_element == pytest.approx(8 * info.key_bytes / keys.numel())
    fetched = client.fetch(sequence)
    assert torch.equal(fetched.keys, torch.stack([decompress(layer) for layer in local]))
    assert torch.equal(fetched.values, values) and torch.equal(fetched.positions, torch.arange(130))
    queries = torch.randn(3, 2 * HEADS, DIM)
    entries = [(sequence, 0), (sequence, 1), (sequence, 0)]
    for sparsity in (None, Sparsity(keep_fraction=0.5, chunk_size=8, num_recent=8)):
        remote = client.attend(queries, entries, sparsity=sparsity)
        expected = attend(queries, [local[layer] for _, layer in entries], [local_values[layer] for _, layer in entries],
                          sparsity=sparsity)
        torch.testing.assert_close(remote.output, expected.output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote.lse, expected.lse, rtol=1e-5, atol=1e-5)
        assert [s.key_bytes_read for s in remote.stats] == [s.key_bytes_read for s in expected.stats]
    # Attention logit softcapping (Gemma 2) travels in the request and caps the server's scores.
    remote = client.attend(4.0 * queries, entries, softcap=1.5)
    expected = attend(4.0 * queries, [local[layer] for _, layer in entries],
                      [local_values[layer] for _, layer in entries], softcap=1.5)
    torch.testing.assert_close(remote.output, expected.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote.lse, expected.lse, rtol=1e-5, atol=1e-5)
    assert (remote.output - client.attend(4.0 * queries, entries).output).abs().max() > 0.01
    client.delete(sequence)
    with pytest.raises(NotFoundError):
        client.describe(sequence)


def test_append_decode_steps_and_stateless_codec(client):
    keys, values = cache(70)
    sequence = new_id()
    client.upload(sequence, "tiny", keys[:, :64], values[:, :64], key_space="post_rope")
    for step in range(64, 70):
        assert client.append(sequence, keys[:, step:step + 1], values[:, step:step + 1]) == step + 1
    local = compress(keys[0, :64], CODEC, rope=ROPE, key_space="post_rope")
    from svdq import append as codec_append

    local = codec_append(local, keys[0, 64:])
    assert torch.equal(client.fetch(sequence, layers=[0], include_values=False).keys[0], decompress(local))
    result = client.compress(keys[1].float(), profile="tiny", key_space="post_rope", positions=torch.arange(70))
    assert result.stats.nbytes == len(result.blob) and result.stats.relative_error < 0.2
    assert client.decompress(result.blob, dtype=torch.float32).shape == (70, HEADS, DIM)
    off = client.compress(keys[1], codec=CodecConfig(method="fp16"))
    assert torch.equal(client.decompress(off.blob), keys[1])


def test_profiles_register_by_rpc(client):
    name = new_id("profile")
    profile = Profile(name, 1, 1, 16, codec=CodecConfig(method="kivi", bits=4, group_size=16))
    assert client.register_profile(profile).same_as(profile)
    assert client.register_profile(profile).same_as(profile)  # identical: idempotent
    with pytest.raises(ConflictError, match="already exists with different settings"):
        client.register_profile(Profile(name, 2, 1, 16))
    assert client.get_profile(name).same_as(profile)
    assert name in {p.name for p in client.list_profiles()}


def test_listing_profiles_leaves_their_bases_out_so_it_fits_the_message_limit(client):
    """Three profiles whose bases (2 MiB each) together pass the shared server's 3 MiB message
    limit: the listing still answers, without their bases, and get_profile has them."""
    from svdq import fit_basis

    basis = fit_basis(torch.randn(1100, 8 * 128, generator=torch.Generator().manual_seed(5)))
    names = [new_id("based") for _ in range(3)]
    for name in names:
        client.register_profile(Profile(name, 1, 8, 128, bases=(basis,)))
    listed = {p.name: p for p in client.list_profiles()}
    assert set(names) <= set(listed) and all(listed[name].bases is None for name in names)
    whole = client.get_profile(names[0])
    assert whole.bases is not None and whole.bases[0].fingerprint == basis.fingerprint


def test_profiles_are_private_to_their_tenant(shared_server, client):
    name = new_id("profile")
    mine = Profile(name, 1, 1, 16, codec=CodecConfig(method="fp16"))
    client.register_profile(mine)
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-b"]) as other:
        assert name not in {p.name for p in other.list_profiles()} and "tiny" in {p.name for p in other.list_profiles()}
        with pytest.raises(NotFoundError, match=f"profile '{name}' not found"):
            other.get_profile(name)
        other.register_profile(Profile(name, 2, 1, 16), replace=True)  # team-b's own, under the same name
        assert other.get_profile(name).num_layers == 2
        with pytest.raises(ConflictError, match="set by the server's operator"):
            other.register_profile(Profile("tiny", 1, 1, 16), replace=True)
    assert client.get_profile(name).same_as(mine)
    assert client.get_profile("tiny").num_layers == LAYERS


def test_authentication_and_tenant_isolation(shared_server, client):
    sequence = new_id()
    keys, values = cache(40)
    client.upload(sequence, "tiny", keys, values, key_space="post_rope")
    for token in (None, "not-a-valid-token-at-all"):
        with KVCacheClient(shared_server.address, token=token) as anonymous:
            with pytest.raises(AuthenticationError) as raised:
                anonymous.describe(sequence)
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-b"]) as other:
        for call in (lambda: other.describe(sequence), lambda: other.fetch(sequence), lambda: other.delete(sequence),
                     lambda: other.attend(torch.zeros(1, HEADS, DIM), [(sequence, 0)]),
                     lambda: other.append(sequence, keys[:, :1], values[:, :1], expected_tokens=40)):
            with pytest.raises(NotFoundError, match=f"sequence '{sequence}' not found"):
                call()
        assert other.server_info().tenant_sequences == 0
    assert client.describe(sequence).num_tokens == 40


def _bad_requests(sequence):
    good_keys, good_values = cache(1, seed=3)

    def append(**fields):
        request = pb.AppendRequest(sequence_id=sequence, expected_tokens=48)
        fields = {"keys": good_keys, "values": good_values, **fields}
        for name, value in fields.items():
            if isinstance(value, pb.Tensor):
                getattr(request, name).CopyFrom(value)
            elif isinstance(value, torch.Tensor):
                tensor_to_pb(value, getattr(request, name))
            else:
                setattr(request, name, value)
        return request

    short = tensor_to_pb(good_keys)
    short.data = short.data[:-2]
    nan_keys = good_keys.clone()
    nan_keys[1, 0, 1, 3] = float("inf")
    attend = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id=sequence, layer=5)])
    tensor_to_pb(torch.zeros(1, HEADS, DIM), attend.queries)
    softcaps = []
    for softcap in (0.0, -50.0, float("nan"), 1e5):
        request = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id=sequence, layer=0)], softcap=softcap)
        tensor_to_pb(torch.zeros(1, HEADS, DIM), request.queries)
        softcaps.append(("Attend", request, grpc.StatusCode.INVALID_ARGUMENT, r"softcap must be a number in \(0, 10000\]"))
    huge = pb.AppendRequest(sequence_id=sequence, expected_tokens=48)
    tensor_to_pb(torch.zeros(LAYERS, 8200, HEADS, DIM), huge.keys)  # > the server's 3 MiB message limit
    return [
        ("Append", append(keys=short), grpc.StatusCode.INVALID_ARGUMENT, "keys.data has 254 bytes"),
        ("Append", append(keys=nan_keys), grpc.StatusCode.INVALID_ARGUMENT, "keys contains NaN or Inf"),
        ("Append", append(keys=torch.zeros(LAYERS, 1, HEADS, DIM, dtype=torch.int64)), grpc.StatusCode.INVALID_ARGUMENT,
         "keys must have dtype float16, bfloat16, float32; got int64"),
        ("Append", append(keys=torch.zeros(LAYERS, 1, HEADS + 1, DIM)), grpc.StatusCode.INVALID_ARGUMENT,
         r"keys must have shape \[layers, tokens, 2, 32\]"),
        ("Append", append(expected_tokens=40), grpc.StatusCode.FAILED_PRECONDITION, "out-of-order append"),
        ("Append", append(sequence_id="no-such-sequence"), grpc.StatusCode.NOT_FOUND, "sequence 'no-such-sequence'"),
        ("Append", append(sequence_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "sequence_id must be"),
        ("Append", huge, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("Attend", attend, grpc.StatusCode.INVALID_ARGUMENT, r"entries\[0\].layer must be in 0..1"),
        *softcaps,
        ("Fetch", pb.FetchRequest(sequence_id=sequence, dtype=pb.INT64), grpc.StatusCode.INVALID_ARGUMENT,
         "dtype must be FLOAT16, BFLOAT16 or FLOAT32"),
        ("Decompress", pb.DecompressRequest(blob=b"SVDQ-not-really"), grpc.StatusCode.INVALID_ARGUMENT, "blob"),
        ("Compress", pb.CompressRequest(profile="no-such-profile", keys=tensor_to_pb(good_keys[0])),
         grpc.StatusCode.NOT_FOUND, "profile 'no-such-profile' not found"),
        ("Describe", pb.DescribeRequest(sequence_id="missing"), grpc.StatusCode.NOT_FOUND, "sequence 'missing'"),
        ("RegisterProfile", pb.RegisterProfileRequest(profile=pb.Profile(name="x", num_layers=1, kv_heads=1,
                                                                         head_dim=3)),
         grpc.StatusCode.INVALID_ARGUMENT, "profile.head_dim must be even"),
    ]


def test_every_bad_input_gets_its_status_and_leaves_data_unchanged(client, raw_stub):
    stub, metadata = raw_stub
    sequence = new_id()
    keys, values = cache(48)
    client.upload(sequence, "tiny", keys, values, key_space="post_rope")
    before = client.fetch(sequence)
    for method, request, code, match in _bad_requests(sequence):
        call = getattr(stub, method)
        with pytest.raises(grpc.RpcError) as raised:
            response = call(request, metadata=metadata, timeout=30)
            if method == "Fetch":
                list(response)
        assert raised.value.code() == code, (method, raised.value.details())
        assert pytest.importorskip("re").search(match, raised.value.details()), (method, raised.value.details())
        assert "Traceback" not in raised.value.details()
    after = client.fetch(sequence)
    assert torch.equal(after.keys, before.keys) and torch.equal(after.values, before.values)
    # the server recovered without a restart: the same sequence still takes appends
    assert client.append(sequence, keys[:, -1:], values[:, -1:]) == 49


def test_typed_client_errors_carry_the_server_message(client):
    with pytest.raises(InvalidInputError, match="keys contains NaN or Inf") as raised:
        client.compress(torch.full((4, HEADS, DIM), float("nan")))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ResourceExhaustedError):
        client.compress(torch.zeros(13000, HEADS, DIM))  # 3.3 MB > the 3 MiB message limit
    sequence = new_id()
    keys, values = cache(40)
    client.upload(sequence, "tiny", keys, values, key_space="post_rope")
    with pytest.raises(ConflictError, match="already exists"):
        client.upload(sequence, "tiny", keys, values, key_space="post_rope")
    with pytest.raises(NotFoundError, match="profile 'no-such-profile' not found"):
        client.upload(new_id(), "no-such-profile", keys, values)
    with pytest.raises(InvalidInputError, match=r"keys must have shape \[layers, tokens, 2, 32\]"):
        client.upload(new_id(), "tiny", keys[..., :16], values[..., :16])


def test_interrupted_upload_resumes_without_duplicates(raw_stub, client):
    stub, metadata = raw_stub
    sequence, upload_id = new_id(), uuid.uuid4().hex
    keys, values = cache(96)

    def chunks(stop_after=None):
        for index, start in enumerate(range(0, 96, 32)):
            if index == stop_after:
                raise RuntimeError("connection lost")  # the client side dies mid-stream
            chunk = pb.UploadChunk(sequence_id=sequence, profile="tiny", upload_id=upload_id, total_tokens=96,
                                   key_space=pb.POST_ROPE, has_values=True, token_start=start)
            tensor_to_pb(keys[:, start:start + 32], chunk.keys)
            tensor_to_pb(values[:, start:start + 32], chunk.values)
            yield chunk

    with pytest.raises(grpc.RpcError):
        stub.Upload(chunks(stop_after=2), metadata=metadata, timeout=30)
    response = stub.Upload(chunks(), metadata=metadata, timeout=30)  # the whole stream again
    assert response.sequence.num_tokens == 96
    again = stub.Upload(chunks(), metadata=metadata, timeout=30)  # a retry after success
    assert again.sequence == response.sequence
    assert torch.equal(client.fetch(sequence).values, values)


def test_many_clients_at_once(shared_server):
    errors, results = [], {}
    shared_sequence = new_id("shared")
    keys, values = cache(64, seed=11)
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"]) as setup:
        setup.upload(shared_sequence, "tiny", keys, values, key_space="post_rope")

    def worker(index):
        try:
            with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=120) as client:
                own = new_id(f"w{index}")
                own_keys, own_values = cache(40, seed=index)
                client.upload(own, "tiny", own_keys, own_values, key_space="post_rope")
                for step in range(3):
                    client.append(own, own_keys[:, step:step + 1], own_values[:, step:step + 1])
                result = client.attend(torch.randn(2, HEADS, DIM), [(own, 0), (shared_sequence, 1)])
                results[index] = (client.describe(own).num_tokens, [s.tokens_total for s in result.stats])
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert results == {index: (43, [43, 64]) for index in range(8)}


def test_attention_during_appends_sees_consistent_versions(shared_server):
    sequence = new_id()
    keys, values = cache(80, seed=4)
    seen, errors = [], []
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=120) as writer:
        writer.upload(sequence, "tiny", keys[:, :64], values[:, :64], key_space="post_rope")
        done = threading.Event()

        def reader():
            with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=120) as client:
                while not done.is_set():
                    try:
                        stats = client.attend(torch.randn(2, HEADS, DIM), [(sequence, 0), (sequence, 1)]).stats
                        seen.append([s.tokens_total for s in stats])
                    except Exception as error:  # noqa: BLE001
                        errors.append(error)
                        return

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for thread in threads:
            thread.start()
        for step in range(64, 80):
            writer.append(sequence, keys[:, step:step + 1], values[:, step:step + 1])
        done.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors and seen
    assert all(first == second and 64 <= first <= 80 for first, second in seen)


def test_health_reflection_and_the_probe_script(shared_server):
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        services = {service.name for response in responses for service in response.list_services_response.service}
    assert {"svdq.v1.KVCache", "grpc.health.v1.Health"} <= services
    probe = [sys.executable, "-m", "svdq_server.health_probe", "--timeout", "5"]
    ok = subprocess.run([*probe, "--address", shared_server.address], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run([*probe, "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_metrics_endpoint_exports_the_contract(shared_server, client):
    sequence = new_id()
    keys, values = cache(40)
    client.upload(sequence, "tiny", keys, values, key_space="post_rope")
    client.attend(torch.randn(1, HEADS, DIM), [(sequence, 0)], sparsity=Sparsity(keep_fraction=0.5))
    with pytest.raises(NotFoundError):
        client.describe("never-stored")
    text = scrape(shared_server.metrics_port)
    names = ["svdq_compression_ratio_bucket", "svdq_bits_per_element_count", "svdq_reconstruction_relative_error_sum",
             'svdq_stored_bytes{kind="keys"}', 'svdq_stored_fp16_bytes{kind="values"}', "svdq_store_budget_bytes",
             "svdq_sequences", 'svdq_evictions_total{reason="ttl"}', 'svdq_rpc_duration_seconds_bucket{le="0.005",'
             'method="Upload"}', 'svdq_rpc_total{code="NOT_FOUND",method="Describe"}', "svdq_attention_batch_size_sum",
             'svdq_attention_key_bytes_read_total{mode="sparse"}',
             'svdq_attention_dense_fp16_key_bytes_total{mode="sparse"}',
             'svdq_device_memory_bytes{device="cpu",kind="store_tensors"}', 'svdq_build_info{device="cpu"',
             "svdq_ready 1.0", "process_resident_memory_bytes"]
    missing = [name for name in names if name not in text]
    assert not missing, missing
    budget = next(line for line in text.splitlines() if line.startswith("svdq_store_budget_bytes "))
    assert float(budget.split()[1]) == 64 * 2**20
    gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("svdq_attention_cache")}
    # the sparse Attend above unpacked codes and score latents: kept, within the default 1 GiB
    assert 0 < gauges["svdq_attention_cache_bytes"] <= gauges["svdq_attention_cache_limit_bytes"] == 2**30
