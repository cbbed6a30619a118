"""Hostile and careless input against a real svdq-server process (issue 13, part 1): the
staging budget under abandoned uploads (the issue's reproduction, RSS measured), stalled
streams closed by the idle timeout and by connection age, crafted blobs, transposed and
oversized keys, zero-dimension tensors, large-magnitude keys and non-finite attention."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from helpers import seal
from svdq_client import KVCacheClient, Profile
from svdq_client.wire import tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

from svdq import CodecConfig, RopeConfig
from svdq.format import _HEADER

pytestmark = pytest.mark.integration

NARROW = Profile("narrow", 1, 1, 16, codec=CodecConfig(method="fp16"))  # 32 bytes per 16-bit token
TINY = Profile("tiny-svdq", 2, 2, 32, rope=RopeConfig(theta=10000.0), codec=CodecConfig(group_size=32))
RAW = Profile("raw", 2, 2, 32, rope=RopeConfig(theta=10000.0), codec=CodecConfig(method="fp16"))


def rss_bytes(server, field: str = "VmRSS") -> int:
    """The server process's resident memory now (VmRSS) or at its peak so far (VmHWM)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp("hardening"), ["--store-bytes", "16MiB", "--max-channels", "1024"]).start()
    with KVCacheClient(process.address) as client:
        for profile in (NARROW, TINY, RAW):
            client.register_profile(profile)
    yield process
    process.stop()


@pytest.fixture
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.KVCacheStub(channel)


def held_upload(stub, sequence, total_tokens, chunk_tokens, release: threading.Event, dtype=torch.float32):
    """An Upload stream that sends every chunk but the last, then waits for ``release``."""
    upload_id = uuid.uuid4().hex

    def chunks():
        for start in range(0, total_tokens - chunk_tokens, chunk_tokens):
            message = pb.UploadChunk(sequence_id=sequence, profile="narrow", upload_id=upload_id,
                                     total_tokens=total_tokens, token_start=start)
            tensor_to_pb(torch.ones(1, chunk_tokens, 1, 16, dtype=dtype), message.keys)
            yield message
        release.wait(120)

    return stub.Upload.future(chunks(), timeout=120)


def test_abandoned_uploads_are_bounded_by_the_staging_budget_and_freed_on_disconnect(server, stub):
    """The issue's reproduction: six streams of total_tokens=131000 float32 chunks, last chunk
    never sent, --store-bytes 16MiB (staging 32 MiB, 16 MiB for the one tenant)."""
    before, peak_before = rss_bytes(server), rss_bytes(server, "VmHWM")
    release = threading.Event()
    calls = [held_upload(stub, f"abandoned-{index}", 131000, 8192, release) for index in range(6)]
    time.sleep(3)  # every stream has sent what it will send
    held = rss_bytes(server)
    refused = [call for call in calls if call.done()]
    assert refused, "some of the six streams must be refused: their data cannot all fit"
    for call in refused:
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
        assert "staging" in call.details() and "--staging-bytes" in call.details()
    # Six streams used to take the process from 281 MB to 1,161 MB; the budget is 32 MiB.
    assert held - before < 96 << 20, (before, held)
    assert rss_bytes(server, "VmHWM") - max(peak_before, before) < 96 << 20
    for call in calls:
        call.cancel()
    release.set()
    # Everything was freed on disconnect: one upload that needs the tenant's whole share fits.
    tokens = (16 << 20) // 32 - 1024
    keys = torch.zeros(1, tokens, 1, 16, dtype=torch.float16)
    deadline = time.monotonic() + 15
    with KVCacheClient(server.address) as client:
        while True:
            try:
                assert client.upload("whole-share", "narrow", keys).num_tokens == tokens
                break
            except Exception:  # noqa: BLE001 - the server may still be noticing the disconnects
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        client.delete("whole-share")


def test_a_stalled_upload_stream_is_closed_and_its_data_dropped(tmp_path):
    from conftest import ServerProcess

    # The whole staging budget (2 x 64 KiB, one tenant's half) fits exactly one of these uploads.
    process = ServerProcess(tmp_path, ["--store-bytes", "64KiB", "--upload-idle-seconds", "2"]).start()
    try:
        with KVCacheClient(process.address) as client, process.channel() as channel:
            client.register_profile(NARROW)
            release = threading.Event()
            call = held_upload(pb_grpc.KVCacheStub(channel), "stalled", 2000, 500, release, dtype=torch.float16)
            time.sleep(0.5)
            with pytest.raises(Exception, match="staging"):  # the stalled upload holds the budget
                client.upload("other", "narrow", torch.zeros(1, 2000, 1, 16).half())
            with pytest.raises(grpc.RpcError) as raised:
                call.result(timeout=30)
            release.set()
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the server closed it (the client's own deadline is 120 s and says nothing of the sort)
            assert "no chunk for 2 s (--upload-idle-seconds)" in raised.value.details()
            # Its data was dropped with it: the budget is free again.
            assert client.upload("other", "narrow", torch.zeros(1, 2000, 1, 16).half()).num_tokens == 2000
    finally:
        process.stop()


def test_connection_age_closes_a_stream_that_never_finishes(tmp_path):
    from conftest import ServerProcess

    process = ServerProcess(tmp_path, ["--max-connection-age-seconds", "1", "--connection-age-grace-seconds", "1",
                                       "--upload-idle-seconds", "600"]).start()
    try:
        never = threading.Event()

        def silent():
            never.wait(60)
            yield from ()

        with process.channel() as channel:
            call = pb_grpc.KVCacheStub(channel).Upload.future(silent(), timeout=60)
            with pytest.raises(grpc.RpcError) as raised:
                call.result(timeout=30)
            never.set()
            # closed by the server at age + grace, not by the client's 60 s deadline (DEADLINE_EXCEEDED)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
        assert process.health() == 1  # SERVING
    finally:
        process.stop()


def test_one_connection_cannot_open_streams_without_bound(tmp_path):
    from conftest import ServerProcess

    process = ServerProcess(tmp_path, ["--max-concurrent-streams", "2"]).start()
    try:
        with KVCacheClient(process.address) as client:
            client.register_profile(NARROW)
        release = threading.Event()
        with process.channel() as channel:
            stub = pb_grpc.KVCacheStub(channel)
            held = [held_upload(stub, f"held-{index}", 4096, 1024, release, dtype=torch.float16) for index in range(2)]
            time.sleep(1)
            with pytest.raises(grpc.RpcError) as raised:  # a third call on this connection has to wait
                stub.GetServerInfo(pb.ServerInfoRequest(), timeout=2)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with KVCacheClient(process.address) as other:  # another connection is not affected
                assert other.server_info().store_budget_bytes > 0
            for call in held:
                call.cancel()
            release.set()
            deadline = time.monotonic() + 15
            while True:  # the freed slots serve new calls on the same connection
                try:
                    stub.GetServerInfo(pb.ServerInfoRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
    finally:
        process.stop()


def test_help_documents_the_limits():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "-m", "svdq_server.cli", "--help"], capture_output=True, text=True,
                          check=True).stdout
    for option in ("--staging-bytes", "--staging-tenant-share", "--max-open-uploads", "--upload-idle-seconds",
                   "--max-channels", "--max-work-bytes", "--max-concurrent-streams", "--max-connection-idle-seconds",
                   "--max-connection-age-seconds", "--connection-age-grace-seconds"):
        assert option in text


def crafted_blob(tokens):
    header = _HEADER.pack(b"SVDQ", 1, 0, 0, 0x00, tokens, 1, 2, 64, 0, 0)
    body = header + bytes(1) + bytes(8)  # one widths byte (both 0), a zero float32 mean [2]
    return seal(body)


def test_crafted_blobs_and_oversized_keys_get_invalid_argument_or_resource_exhausted(server, stub):
    peak_before = rss_bytes(server, "VmHWM")
    for tokens in (1 << 26, (1 << 32) - 1):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Decompress(pb.DecompressRequest(blob=crafted_blob(tokens)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert f"{tokens} tokens is more than the limit of 1048576 (max_tokens)" in raised.value.details()
    for keys, code, message in (
        (torch.zeros(3, 1000, 64), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "64000 channels is more than the limit of 1024 (max_channels); keys [3, 1000, 64] read as 3 tokens of "
         "1000 kv_heads"),
        (torch.zeros(16, 1, 4096), grpc.StatusCode.RESOURCE_EXHAUSTED, "4096 channels is more than the limit of 1024"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Compress(pb.CompressRequest(keys=tensor_to_pb(keys)), timeout=30)
        assert raised.value.code() == code and message in raised.value.details(), raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Compress(pb.CompressRequest(keys=tensor_to_pb(torch.ones(8, 2, 32)), key_space=pb.POST_ROPE,
                                         rope=pb.Rope(theta=10000.0)), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "post-RoPE keys need their positions" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.RegisterProfile(pb.RegisterProfileRequest(profile=Profile("wide", 1, 16, 128).to_pb()), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_channels" in raised.value.details()
    # The 2^26-token blob alone would decode to 512 MiB, the transposed keys to a 16 GB covariance.
    assert rss_bytes(server, "VmHWM") - peak_before < 200 << 20


def test_zero_dimension_tensors_get_invalid_argument_naming_the_limit(server, stub):
    with KVCacheClient(server.address) as client:
        client.upload("zero-dims", "raw", torch.ones(2, 8, 2, 32), torch.ones(2, 8, 2, 32), key_space="pre_rope")
    for shape in ([2, 0, 2**62, 2**62], [2, 0, 2**30, 2**30]):
        request = pb.AppendRequest(sequence_id="zero-dims", expected_tokens=8,
                                   keys=pb.Tensor(dtype=pb.FLOAT16, shape=shape, data=b""))
        with pytest.raises(grpc.RpcError) as raised:
            stub.Append(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert "each dimension may be at most 2147483647" in raised.value.details()


def test_large_magnitude_keys_are_refused_at_upload_or_served_and_never_break_a_sequence(server):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 32, generator=generator)
    with KVCacheClient(server.address) as client:
        for magnitude in (6e4, 1e5, 1e6):
            keys = torch.randn(2, 200, 2, 32, generator=generator) * magnitude
            values = torch.randn(2, 200, 2, 32, generator=generator)
            with pytest.raises(Exception, match="too large in magnitude.*stay within 65504") as raised:
                client.upload(f"big-{int(magnitude)}", "tiny-svdq", keys, values, positions=torch.arange(200),
                              key_space="post_rope")
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(Exception, match="not found"):
                client.describe(f"big-{int(magnitude)}")
            # The documented way to keep such keys: a profile that stores them as they are.
            client.upload(f"raw-{int(magnitude)}", "raw", keys, values, positions=torch.arange(200), key_space="post_rope")
            result = client.attend(queries * 1e-6, [(f"raw-{int(magnitude)}", 1)])
            assert torch.isfinite(result.output).all() and torch.isfinite(result.lse).all()
        # An svdq sequence with ordinary keys refuses a huge append and stays usable.
        keys = torch.randn(2, 200, 2, 32, generator=generator)
        client.upload("ordinary", "tiny-svdq", keys, keys, positions=torch.arange(200), key_space="post_rope")
        before = client.attend(queries, [("ordinary", 0)])
        with pytest.raises(Exception, match="too large in magnitude"):
            client.append("ordinary", torch.full((2, 40, 2, 32), 3e4), torch.zeros(2, 40, 2, 32))
        after = client.attend(queries, [("ordinary", 0)])
        assert torch.equal(before.output, after.output) and client.describe("ordinary").num_tokens == 200


def test_attention_never_returns_non_finite_output_with_ok(server, stub):
    with KVCacheClient(server.address) as client:
        client.upload("finite", "raw", torch.ones(2, 64, 2, 32), torch.ones(2, 64, 2, 32), key_space="pre_rope")
    for scale, queries, message in ((1e38, torch.ones(1, 2, 32), "scale must be in (0, 16]"),
                                    (16.0, torch.full((1, 2, 32), 3e37), "attention overflowed")):
        request = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id="finite", layer=0)], scale=scale)
        tensor_to_pb(queries, request.queries)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Attend(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert message in raised.value.details()
    request = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id="finite", layer=0)], scale=16.0)
    tensor_to_pb(torch.ones(1, 2, 32), request.queries)
    response = stub.Attend(request, timeout=30)
    assert response.output.shape == [1, 2, 32]
