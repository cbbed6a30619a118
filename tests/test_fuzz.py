"""Seeded, bounded fuzzing of every RPC against a real server process.

Valid serialized requests of every method (crafted tensors and blobs among them) are sent
random, truncated, bit-flipped, spliced and structurally mutated (field values set to
extremes, shapes to odd sizes, sub-messages cleared or repeated) through raw generic calls,
so malformed bytes reach the server exactly as a hostile client would send them. The server
must answer every one with a status that is not INTERNAL or UNKNOWN, stay alive and SERVING,
keep another tenant's canary sequence byte-identical with identical attention output, and
keep its memory bounded.

``SVDQ_FUZZ_CASES`` (default 3000) and ``SVDQ_FUZZ_SEED`` (default 13) set the run; release
checks run e.g. ``SVDQ_FUZZ_CASES=50000``.

Any INTERNAL or UNKNOWN answer, or an OK answer with NaN/Inf, fails the test and prints the
request that caused it.
"""

from __future__ import annotations

import os
import random
import struct
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerProcess
from google.protobuf import text_format
from grpc_health.v1 import health_pb2
from helpers import seal
from svdq_client import KVCacheClient, Profile
from svdq_client.types import profile_pieces
from svdq_client.wire import tensor_from_pb, tensor_to_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb

from svdq import CodecConfig, RopeConfig, apply_rope, compress, fit_basis, to_bytes
from svdq.attention import SparsityConfig
from svdq.format import _HEADER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = int(os.environ.get("SVDQ_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("SVDQ_FUZZ_SEED", "13"))
CALL_TIMEOUT_S = 60.0
#: growth of the server's peak resident memory the run may cause
RSS_BOUND_BYTES = 1536 << 20

LAYERS, HEADS, DIM = 2, 2, 32
ROPE = RopeConfig(theta=10000.0)
TOKENS = {"keeper": "token-keeper-0123456789", "fuzzer": "token-fuzzer-0123456789"}
METHODS = {method.name: method for method in pb.DESCRIPTOR.services_by_name["KVCache"].methods}

# -- valid requests of every method ------------------------------------------------------------

def _cache(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(LAYERS, tokens, 4, generator=generator) * torch.tensor([8.0, 4, 2, 1])
    pre = (latent @ torch.randn(LAYERS, 4, HEADS * DIM, generator=generator)).reshape(LAYERS, tokens, HEADS, DIM)
    keys = torch.stack([apply_rope(pre[layer], torch.arange(tokens), ROPE) for layer in range(LAYERS)])
    return keys.half(), torch.randn(LAYERS, tokens, HEADS, DIM, generator=generator).half()


def seed_requests() -> dict[str, list[list[pb.Message]]]:
    """Per method, a few valid requests (for Upload: streams of chunks)."""
    keys, values = _cache(70, seed=1)
    blob_codecs = (CodecConfig(bits_per_element=2.0, group_size=32), CodecConfig(method="kivi", bits=2, group_size=32),
                   CodecConfig(method="fp16"))
    blobs = [to_bytes(compress(keys[0, :40].float(), codec, positions=torch.arange(40), rope=ROPE,
                               key_space="post_rope")) for codec in blob_codecs]

    def tensor(value):
        return tensor_to_pb(value)

    def upload(sequence, tokens, with_values=True, chunk=32):
        chunks = []
        for start in range(0, tokens, chunk):
            message = pb.UploadChunk(sequence_id=sequence, profile="fz", upload_id=f"{sequence}-u", total_tokens=tokens,
                                     key_space=pb.POST_ROPE, has_values=with_values, token_start=start)
            tensor_to_pb(keys[:, start:start + chunk], message.keys)
            if with_values:
                tensor_to_pb(values[:, start:start + chunk], message.values)
            tensor_to_pb(torch.arange(start, min(tokens, start + chunk)), message.positions)
            chunks.append(message)
        return chunks

    profile = Profile("fzp", 1, 1, 16, codec=CodecConfig(method="kivi", bits=4, group_size=16)).to_pb()
    generator = torch.Generator().manual_seed(3)
    with_bases = Profile("fzb", 2, 1, 16, bases=tuple(fit_basis(torch.randn(40, 16, generator=generator))
                                                      for _ in range(2)))
    queries = torch.randn(2, 2 * HEADS, DIM, generator=torch.Generator().manual_seed(2))
    return {
        "RegisterProfile": [[pb.RegisterProfileRequest(profile=profile, replace=True)],
                            [pb.RegisterProfileRequest(profile=Profile("fz", LAYERS, HEADS, DIM).to_pb())]],
        "GetProfile": [[pb.GetProfileRequest(name="fz")]],
        "RegisterProfileStream": [list(profile_pieces(with_bases, True)),
                                  list(profile_pieces(Profile("fz", LAYERS, HEADS, DIM)))],
        "GetProfileStream": [[pb.GetProfileRequest(name="fz")], [pb.GetProfileRequest(name="fzb")]],
        "ListProfiles": [[pb.ListProfilesRequest()]],
        "Compress": [[pb.CompressRequest(profile="fz", keys=tensor(keys[0, :40]), key_space=pb.POST_ROPE,
                                         positions=tensor(torch.arange(40)))],
                     [pb.CompressRequest(keys=tensor(keys[1, :40]), codec=pb.Codec(method="kivi", bits=2, group_size=32))]],
        "Decompress": [[pb.DecompressRequest(blob=blob, dtype=pb.FLOAT32)] for blob in blobs]
                      + [[pb.DecompressRequest(blob=blobs[0], profile="fz", key_space=pb.PRE_ROPE)]],
        "Upload": [upload("f-up", 64), upload("f-up2", 40, with_values=False, chunk=16)],
        "Append": [[pb.AppendRequest(sequence_id="f-seq", keys=tensor(keys[:, 64:66]), values=tensor(values[:, 64:66]),
                                     positions=tensor(torch.arange(64, 66)))]],
        "Attend": [[pb.AttendRequest(entries=[pb.AttendEntry(sequence_id="f-seq", layer=0),
                                              pb.AttendEntry(sequence_id="f-seq", layer=1)], queries=tensor(queries))],
                   [pb.AttendRequest(entries=[pb.AttendEntry(sequence_id="f-seq", layer=1)],
                                     queries=tensor(queries[:1]), scale=0.2,
                                     sparsity=pb.Sparsity(keep_fraction=0.5, chunk_size=8, num_recent=8))]],
        "Fetch": [[pb.FetchRequest(sequence_id="f-seq", layers=[1], include_values=True, max_chunk_bytes=4096)]],
        "Delete": [[pb.DeleteRequest(sequence_id="f-up2")]],
        "Describe": [[pb.DescribeRequest(sequence_id="f-seq")]],
        "GetServerInfo": [[pb.ServerInfoRequest()]],
    }


# -- mutations -----------------------------------------------------------------------------------

_INT_RANGES = {
    "int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
}
_FLOATS = (0.0, -0.0, -1.0, 1e-45, 1e38, -1e38, 6.5e4, float("nan"), float("inf"), float("-inf"), 0.5, 3.0)
_STRINGS = ("", "dup\n", "a" * 5000, "../../etc/passwd", "fz", "f-seq", "\x00", "caf\u00e9", "svdq", "kivi", "fp16",
            "half", "interleaved", "llama3", "linear", "none", "x" * 129)
_SHAPES = ([], [0], [2, 0, 2**62, 2**62], [0, 2, 32], [1, 1, 1], [2**31, 2, 32], [-1, 2, 32], [2, 1, 2, 32],
           [1] * 9, [70, 2, 32], [2, 70, 2, 32], [64, 1, 1])


def _type_name(field) -> str:
    names = {field.TYPE_INT32: "int32", field.TYPE_SINT32: "int32", field.TYPE_SFIXED32: "int32",
             field.TYPE_INT64: "int64", field.TYPE_SINT64: "int64", field.TYPE_SFIXED64: "int64",
             field.TYPE_UINT32: "uint32", field.TYPE_FIXED32: "uint32", field.TYPE_UINT64: "uint64",
             field.TYPE_FIXED64: "uint64", field.TYPE_FLOAT: "float", field.TYPE_DOUBLE: "float",
             field.TYPE_BOOL: "bool", field.TYPE_STRING: "string", field.TYPE_BYTES: "bytes",
             field.TYPE_ENUM: "enum", field.TYPE_MESSAGE: "message"}
    return names[field.type]


def _scalar(rng: random.Random, kind: str):
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return rng.choice([low, high, 0, 1, -1 if low < 0 else 2, 2**31 - 1, 4096, 65, rng.randint(low, high)])
    if kind == "float":
        return rng.choice(_FLOATS)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "string":
        return rng.choice(_STRINGS)
    if kind == "enum":
        return rng.choice([0, 1, 2, 3, 4, 5, 99, 2**31 - 1, -1])
    raise AssertionError(kind)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One byte-level mutation: truncation, bit flips, splices, or random bytes."""
    data = bytearray(data)
    choice = rng.random()
    if choice < 0.1 or not data:
        return rng.randbytes(rng.randint(0, 80))
    if choice < 0.35:
        return bytes(data[:rng.randint(0, len(data) - 1)])
    if choice < 0.75:
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        return bytes(data)
    start = rng.randrange(len(data))
    stop = min(len(data), start + rng.randint(1, 32))
    if rng.random() < 0.5:
        del data[start:stop]
    else:
        data[start:start] = data[start:stop] if rng.random() < 0.5 else rng.randbytes(stop - start)
    return bytes(data)


def _fields(message) -> list[tuple[object, object]]:
    """(parent, field) of every field reachable through set sub-messages."""
    found = []
    for field in message.DESCRIPTOR.fields:
        found.append((message, field))
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            for item in getattr(message, field.name):
                found += _fields(item)
        elif message.HasField(field.name):
            found += _fields(getattr(message, field.name))
    return found


def mutate_message(rng: random.Random, message) -> None:
    """One structural mutation in place: a field set to an extreme, cleared or repeated; a
    tensor given an odd shape, dtype or data length; a blob's header rewritten under a valid CRC."""
    fields = _fields(message)
    if not fields:
        return  # ListProfilesRequest, ServerInfoRequest: only byte mutations reach them
    parent, field = rng.choice(fields)
    kind = _type_name(field)
    repeated = field.is_repeated
    if parent.DESCRIPTOR.name == "Tensor" and rng.random() < 0.6:
        if rng.random() < 0.5:
            parent.shape[:] = rng.choice(_SHAPES)
            if rng.random() < 0.5:
                parent.data = b"" if 0 in parent.shape else parent.data
        else:
            parent.dtype = rng.choice([0, 1, 2, 3, 4, 7])
        return
    if field.name == "blob" and rng.random() < 0.7:
        parent.blob = craft_blob(rng, parent.blob)
        return
    if kind == "message":
        if repeated:
            items = getattr(parent, field.name)
            if len(items) and rng.random() < 0.5:
                for _ in range(rng.choice([1, 5, 100])):
                    items.add().CopyFrom(items[rng.randrange(len(items))])
            else:
                del items[:]
        elif rng.random() < 0.5:
            parent.ClearField(field.name)
        else:
            getattr(parent, field.name).SetInParent()
        return
    if repeated:
        values = getattr(parent, field.name)
        if rng.random() < 0.3:
            del values[:]
        else:
            for _ in range(rng.choice([1, 3, 70])):
                values.append(_scalar(rng, kind) if kind != "bytes" else rng.randbytes(4))
        return
    if kind == "bytes":
        setattr(parent, field.name, mutate_bytes(rng, getattr(parent, field.name)))
    else:
        setattr(parent, field.name, _scalar(rng, kind))


def craft_blob(rng: random.Random, blob: bytes) -> bytes:
    """A blob whose header fields (tokens, heads, head_dim, group size, sinks, flags, widths)
    are rewritten and whose CRC is recomputed, so that only the header checks stand between it
    and the decoder (token counts up to the issue's 2**26 and 2**32-1)."""
    data = bytearray(blob[:-4])
    if len(data) < _HEADER.size:
        return blob
    field = rng.choice(["tokens", "kv_heads", "head_dim", "group_size", "num_sinks", "flags", "widths", "method"])
    if field == "tokens":
        struct.pack_into("<I", data, 8, rng.choice([0, 1, 39, 41, 64, 1000, 2**14, 2**26, 2**32 - 1]))
    elif field == "kv_heads":
        struct.pack_into("<H", data, 12, rng.choice([0, 1, 3, 64, 65535]))
    elif field == "head_dim":
        struct.pack_into("<H", data, 14, rng.choice([0, 1, 31, 64, 65535]))
    elif field == "group_size":
        struct.pack_into("<H", data, 16, rng.choice([0, 1, 7, 33, 65535]))
    elif field == "num_sinks":
        struct.pack_into("<H", data, 18, rng.choice([0, 39, 40, 65535]))
    elif field == "flags":
        data[6] = rng.randrange(256)
    elif field == "method":
        data[5] = rng.randrange(5)
    else:
        start = _HEADER.size + (28 if data[6] & 4 else 0) + (8 if data[6] & 8 else 0)
        for index in range(start, min(len(data), start + 32)):
            data[index] = rng.choice([0, 0x11, 0x88, 0xFF, data[index]])
    return seal(data)


# -- classification of a failed case --------------------------------------------------------------

def _tensors(message):
    for parent, field in _fields(message):
        if parent.DESCRIPTOR.name == "Tensor" and field.name == "shape":
            yield parent


def _describe(method: str, payloads: list[bytes]) -> str:
    """A failing request for the log: its text form with tensor data cut short."""
    shown = []
    for data in payloads:
        try:
            message = getattr(pb, METHODS[method].input_type.name).FromString(data)
        except Exception:  # noqa: BLE001
            shown.append(data.hex()[:200])
            continue
        for tensor in _tensors(message):
            tensor.data = tensor.data[:8]
        shown.append(text_format.MessageToString(message, as_one_line=True)[:600])
    return f"{method} {shown}"


def _finite_response(method: str, payload: bytes) -> bool:
    if method == "Attend":
        response = pb.AttendResponse.FromString(payload)
        return bool(torch.isfinite(tensor_from_pb(response.output, "output")).all()
                    and torch.isfinite(tensor_from_pb(response.lse, "lse")).all())
    if method == "Decompress":
        keys = tensor_from_pb(pb.DecompressResponse.FromString(payload).keys, "keys")
        return bool(torch.isfinite(keys.float()).all())
    return True


# -- the run -------------------------------------------------------------------------------------

def _reset_peak(pid: int) -> None:
    """Restart the kernel's peak-RSS count (VmHWM) of the server process."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "tokens.yaml").write_text("tenants:\n" + "".join(f"  {t}: [{k}]\n" for t, k in TOKENS.items()))
    (folder / "profiles.yaml").write_text(
        "profiles:\n"
        f"  - {{name: fz, num_layers: {LAYERS}, kv_heads: {HEADS}, head_dim: {DIM}, rope: {{theta: 10000.0}},\n"
        "     codec: {method: svdq, bits_per_element: 2.0, group_size: 32}}\n")
    server = ServerProcess(folder, ["--tokens-file", str(folder / "tokens.yaml"), "--profiles-file",
                                    str(folder / "profiles.yaml"), "--store-bytes", "64MiB", "--max-message-bytes",
                                    "1MiB", "--max-tokens", "4096", "--max-batch", "64", "--workers", "2",
                                    "--torch-threads", "1", "--log-level", "WARNING"]).start()
    yield server
    server.stop()


#: The canary's sparse attention: 1 of its 8 body chunks selected by score (nothing forced).
CANARY_SPARSITY = SparsityConfig(keep_fraction=1 / 16, chunk_size=4, num_recent=0)


def _canary(client: KVCacheClient):
    """The canary as fetched, its dense attention, and its sparse attention before and after
    the dense calls (which keep its float16 keys in the attention cache)."""
    fetched = client.fetch("canary")
    queries = torch.randn(2, 2 * HEADS, DIM, generator=torch.Generator().manual_seed(7))
    entries = [("canary", 0), ("canary", 1)]
    sparse_before = client.attend(queries, entries, sparsity=CANARY_SPARSITY)
    attended = client.attend(queries, entries)
    client.attend(queries, entries)  # dense calls keep the float16 keys from the second on
    sparse_after = client.attend(queries, entries, sparsity=CANARY_SPARSITY)
    return fetched, attended, sparse_before, sparse_after


def test_fuzz_every_rpc(fuzz_server):
    rng = random.Random(SEED)
    seeds = seed_requests()
    keeper = KVCacheClient(fuzz_server.address, token=TOKENS["keeper"], timeout=CALL_TIMEOUT_S)
    fuzzer = KVCacheClient(fuzz_server.address, token=TOKENS["fuzzer"], timeout=CALL_TIMEOUT_S)
    keys, values = _cache(70, seed=3)
    keeper.upload("canary", "fz", keys[:, :64], values[:, :64], positions=torch.arange(64), key_space="post_rope")
    canary_before = _canary(keeper)
    # Sparse attention gives the same bits whether the canary's keys were kept or not (the
    # first call finds nothing kept; the dense calls keep them).
    cold, kept = canary_before[2], canary_before[3]
    assert torch.equal(cold.output, kept.output) and torch.equal(cold.lse, kept.lse)

    def fresh_fuzz_sequence():
        fuzzer.upload("f-seq", "fz", keys[:, :64], values[:, :64], positions=torch.arange(64), key_space="post_rope",
                      replace=True)

    fresh_fuzz_sequence()
    _reset_peak(fuzz_server.process.pid)
    memory_before = _rss(fuzz_server.process.pid)
    authorized = (("authorization", f"Bearer {TOKENS['fuzzer']}"),)
    codes: Counter = Counter()
    unexpected: list[str] = []
    with fuzz_server.channel() as channel:
        calls = {name: (channel.stream_unary if method.client_streaming else
                        channel.unary_stream if method.server_streaming else channel.unary_unary)(
                            f"/svdq.v1.KVCache/{name}") for name, method in METHODS.items()}
        for case in range(CASES):
            method = rng.choice(sorted(seeds))
            template = rng.choice(seeds[method])
            messages = [message.__class__.FromString(message.SerializeToString()) for message in template]
            payloads = []
            for message in messages:
                if rng.random() < 0.55:
                    mutate_message(rng, message)
                    if rng.random() < 0.2:
                        mutate_message(rng, message)
                data = message.SerializeToString()
                if rng.random() < 0.3:
                    data = mutate_bytes(rng, data)
                payloads.append(data)
            if method == "Upload" and rng.random() < 0.3:
                payloads = payloads[:rng.randint(0, len(payloads))]  # a stream that ends early (or empty)
            metadata = authorized if rng.random() > 0.03 else (("authorization", rng.choice(["", "Bearer x", "Basic"])),)
            code, answer = None, b""
            try:
                if METHODS[method].client_streaming:
                    answer = calls[method](iter(payloads), metadata=metadata, timeout=CALL_TIMEOUT_S)
                elif METHODS[method].server_streaming:
                    list(calls[method](payloads[0], metadata=metadata, timeout=CALL_TIMEOUT_S))
                else:
                    answer = calls[method](payloads[0], metadata=metadata, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                code = error.code()
            codes[code.name if code else "OK"] += 1
            failed = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            not_finite = code is None and not _finite_response(method, answer)
            if failed or not_finite:
                unexpected.append(f"case {case}: {method} -> {code.name if code else 'OK with NaN/Inf'}: "
                                  f"{_describe(method, payloads)}")
            if case % 200 == 199:
                assert fuzz_server.process.poll() is None, fuzz_server.log()
                if rng.random() < 0.5:
                    fresh_fuzz_sequence()
    memory_after = _rss(fuzz_server.process.pid)
    print(f"\nfuzz: {CASES} cases, seed {SEED}; answers {dict(codes)}")
    assert fuzz_server.process.poll() is None, fuzz_server.log()
    assert fuzz_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert not unexpected, "\n".join(unexpected[:20])
    canary_after = _canary(keeper)
    assert torch.equal(canary_after[0].keys, canary_before[0].keys)
    assert torch.equal(canary_after[0].values, canary_before[0].values)
    assert torch.equal(canary_after[0].positions, canary_before[0].positions)
    # Dense and sparse attention, whatever the fuzz left in (or evicted from) the attention cache.
    for after, before in zip(canary_after[1:], canary_before[1:], strict=True):
        assert torch.equal(after.output, before.output) and torch.equal(after.lse, before.lse)
    assert memory_after["VmHWM"] - memory_before["VmRSS"] < RSS_BOUND_BYTES, (memory_before, memory_after)
    assert sum(codes.values()) == CASES and codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > CASES // 10
    keeper.close()
    fuzzer.close()


# -- the reproductions, one each (the fuzz run draws them only by chance) ----------------

def _raw(server, method: str, message) -> tuple[grpc.StatusCode, bytes]:
    metadata = (("authorization", f"Bearer {TOKENS['fuzzer']}"),)
    with server.channel() as channel:
        try:
            return grpc.StatusCode.OK, channel.unary_unary(f"/svdq.v1.KVCache/{method}")(
                message.SerializeToString(), metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code(), b""


def test_zero_dim_tensor_with_huge_dims(fuzz_server):
    request = pb.AppendRequest(sequence_id="f-seq", keys=pb.Tensor(dtype=pb.FLOAT16, shape=[2, 0, 2**62, 2**62]))
    assert _raw(fuzz_server, "Append", request)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_large_magnitude_keys_keep_their_sequence_usable(fuzz_server):
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(LAYERS, 200, HEADS, DIM, generator=generator) * 6e4  # finite float32
    values = torch.randn(LAYERS, 200, HEADS, DIM, generator=generator)
    with KVCacheClient(fuzz_server.address, token=TOKENS["fuzzer"], timeout=CALL_TIMEOUT_S) as client:
        try:
            client.upload("f-large", "fz", keys, values, replace=True)
        except Exception as error:  # noqa: BLE001 - refusing at upload is the other allowed answer
            assert getattr(error, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
            return
        result = client.attend(torch.randn(1, 2 * HEADS, DIM), [("f-large", 0)])
        assert bool(torch.isfinite(result.output).all())


def test_crafted_blob_header_is_refused_before_allocation(fuzz_server):
    # The 41-byte blob at 2**24 tokens: svdq, 1 head x 2 dims, no sinks, every
    # channel width 0 (so the token groups take no bytes), a float32 mean, a valid CRC.
    header = _HEADER.pack(b"SVDQ", 1, 0, 0, 0, 2**24, 1, 2, 64, 0, 0) + b"\x00" + struct.pack("<2f", 0.0, 0.0)
    blob = seal(header)
    assert len(blob) == 41
    _reset_peak(fuzz_server.process.pid)
    before = _rss(fuzz_server.process.pid)["VmRSS"]
    code, _ = _raw(fuzz_server, "Decompress", pb.DecompressRequest(blob=blob))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _rss(fuzz_server.process.pid)["VmHWM"] - before < 64 << 20


def test_huge_scale_gives_no_non_finite_ok(fuzz_server):
    request = pb.AttendRequest(entries=[pb.AttendEntry(sequence_id="f-seq", layer=0)], scale=1e38,
                               queries=tensor_to_pb(torch.randn(1, 2 * HEADS, DIM) * 100))
    code, answer = _raw(fuzz_server, "Attend", request)
    assert code != grpc.StatusCode.OK or _finite_response("Attend", answer)
