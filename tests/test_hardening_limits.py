"""Hostile and careless input to the codec library: the cost check before work, crafted
blobs, zero-dimension wire tensors, keys too large for the float16 metadata, zero-rank
sequences, non-finite outputs and the codec config's silent surprises (issue 13)."""

from __future__ import annotations

import logging
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import seal
from svdq_client.wire import MAX_DIM_SIZE, tensor_from_pb
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from test_attention import naive_attention

from svdq import CodecConfig, RopeConfig, append, compress, decompress, from_bytes, to_bytes
from svdq.attention import SparsityConfig, attend
from svdq.codec import CostLimits, check_cost
from svdq.errors import FormatError, InvalidInputError, ResourceExhaustedError
from svdq.format import _HEADER
from svdq.values import ValueConfig, compress_values

ROPE = RopeConfig(theta=10000.0)


def peak_growth_bytes(statement: str) -> int:
    """How far ``statement`` raises the peak RSS of a fresh interpreter (this process's peak
    is a high-water mark that earlier tests may have set far above)."""
    script = (
        "import resource, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from svdq import compress, from_bytes\n"
        "from test_hardening_limits import crafted_blob\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    {statement}\n"
        "except Exception:\n"
        "    pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def keys_of(tokens, kv_heads=2, head_dim=32, scale=1.0, seed=0):
    return torch.randn(tokens, kv_heads, head_dim, generator=torch.Generator().manual_seed(seed)) * scale


# -- the cost check -------------------------------------------------------------------------

def test_transposed_keys_are_refused_before_any_work_with_a_hint():
    keys = torch.zeros(3, 1000, 64)  # [kv_heads, tokens, head_dim]: read as 3 tokens x 1000 heads
    with pytest.raises(ResourceExhaustedError, match=r"64000 channels is more than the limit of 4096 "
                                                     r"\(max_channels\).*transpose\(0, 1\)"):
        compress(keys)
    # no 16 GB covariance is attempted (the input itself is 768 KB)
    assert peak_growth_bytes("compress(torch.zeros(3, 1000, 64))") < 64 << 20


def test_tiny_sequences_with_many_channels_skip_the_unused_basis_fit(monkeypatch):
    import svdq.codec

    def no_fit(keys):
        raise AssertionError("fit_basis ran although no channel can be kept")

    monkeypatch.setattr(svdq.codec, "fit_basis", no_fit)  # [16, 1, 4096] spent 20 s in its eigh
    keys = keys_of(16, 1, 4096)
    compressed = compress(keys)
    assert compressed.kept_bits.numel() == 0 and compressed.num_groups == 0
    torch.testing.assert_close(decompress(from_bytes(to_bytes(compressed))), keys, atol=2e-3, rtol=1e-3)


def test_cost_check_names_each_limit():
    limits = CostLimits(max_tokens=1000, max_channels=256, max_work_bytes=2 << 20)
    with pytest.raises(ResourceExhaustedError, match=r"2000 tokens is more than the limit of 1000 \(max_tokens\)"):
        check_cost(2000, 2, 64, limits)
    with pytest.raises(ResourceExhaustedError, match=r"1 \* 4096 = 4096 channels is more than the limit of 256"):
        compress(torch.zeros(16, 1, 4096), limits=limits)
    with pytest.raises(ResourceExhaustedError, match=r"about \d+ bytes of working memory, more than the limit of "
                                                     r"2097152 \(max_work_bytes\)"):
        compress(keys_of(900, 2, 64), limits=limits)
    assert check_cost(900, 2, 64) > 0  # the default limits take it
    base = compress(keys_of(64))
    with pytest.raises(ResourceExhaustedError, match="appended keys: 1064 tokens is more than the limit of 1000"):
        append(base, keys_of(1000), limits=limits)
    with pytest.raises(InvalidInputError):
        CostLimits(max_tokens=0)


# -- crafted blobs ---------------------------------------------------------------------------

def crafted_blob(tokens, kv_heads=1, head_dim=2, method=0, flags=0, tail=b"", widths=None, mean=None):
    channels = kv_heads * head_dim
    header = _HEADER.pack(b"SVDQ", 1, method, flags, 0x00, tokens, kv_heads, head_dim, 64, 0, 0)
    body = header + (bytes((channels + 1) // 2) if widths is None else widths)
    body += struct.pack(f"<{channels}f", *([0.0] * channels if mean is None else mean)) + tail
    return seal(body)


@pytest.mark.parametrize("tokens", [1 << 26, (1 << 32) - 1])
def test_a_tiny_blob_claiming_huge_token_counts_fails_fast(tokens):
    blob = crafted_blob(tokens)  # every channel width 0: the body would cost no bytes at all
    assert len(blob) == 41  # the size
    with pytest.raises(FormatError, match=rf"{tokens} tokens is more than the limit of 1048576 \(max_tokens\)"):
        from_bytes(blob)
    # refused from the header: nothing allocated (the output alone would be >= 512 MiB)
    assert peak_growth_bytes(f"from_bytes(crafted_blob({tokens}))") < 32 << 20


def test_blob_header_fields_are_checked_against_the_blob_size_and_limits():
    with pytest.raises(FormatError, match="invalid shape in header"):
        from_bytes(crafted_blob(64, head_dim=3))
    with pytest.raises(FormatError, match="blob is 41 bytes but its header and channel widths describe 185"):
        from_bytes(crafted_blob(64, widths=bytes([0x88])))  # two 8-bit channels need codes, scales, mins
    with pytest.raises(FormatError, match=r"4096 tokens is more than the limit of 1000"):
        from_bytes(crafted_blob(4096), limits=CostLimits(max_tokens=1000))
    with pytest.raises(FormatError, match="NaN or Inf in its mean"):
        from_bytes(crafted_blob(64, mean=[float("nan"), 0.0]))
    with pytest.raises(FormatError, match="blob mean reaches 3e\\+38"):
        from_bytes(crafted_blob(64, mean=[3e38, 0.0]))
    # The same layout with sane fields loads: 64 tokens, every channel dropped -> the mean.
    assert torch.equal(decompress(from_bytes(crafted_blob(64, mean=[1.0, 2.0]))),
                       torch.tensor([[[1.0, 2.0]]]).expand(64, 1, 2))


def test_blob_sections_with_inf_are_refused_and_no_decompress_returns_inf():
    compressed = compress(keys_of(200))
    blob = bytearray(to_bytes(compressed))
    # The first float16 scale sits right after mean, basis and sinks: make it +Inf.
    channels, kept = compressed.channels, compressed.kept_bits.numel()
    at = _HEADER.size + (channels + 1) // 2 + 4 * channels + 2 * channels * kept + 2 * channels * 4
    blob[at:at + 2] = struct.pack("<e", math.inf)
    with pytest.raises(FormatError, match="NaN or Inf in its scales"):
        from_bytes(seal(blob[:-4]))
    # Finite float32 keys beyond float16's range cannot be read back as float16.
    big = compress(keys_of(8) * 1e5, CodecConfig(method="fp16"))
    with pytest.raises(InvalidInputError, match="do not fit torch.float16"):
        decompress(big, dtype=torch.float16)
    assert torch.isfinite(decompress(big, dtype=torch.float32)).all()


# -- zero-dimension wire tensors --------------------------------------------------------------

@pytest.mark.parametrize("shape", [[2, 0, 2**62, 2**62], [2, 0, 2**30, 2**30], [0, MAX_DIM_SIZE + 1]])
def test_zero_dimension_wire_tensors_with_huge_others_are_refused(shape):
    with pytest.raises(InvalidInputError, match=r"keys.shape .* is too large: each dimension may be at most "
                                                r"2147483647 and their product .* at most 1099511627776"):
        tensor_from_pb(pb.Tensor(dtype=pb.FLOAT16, shape=shape, data=b""), "keys")
    assert tensor_from_pb(pb.Tensor(dtype=pb.FLOAT16, shape=[2, 0, 3], data=b""), "keys").shape == (2, 0, 3)


# -- large magnitudes and zero rank -------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [6e4, 1e5, 1e6])
def test_keys_too_large_for_float16_metadata_are_refused_with_the_rule(magnitude):
    keys = keys_of(200, scale=magnitude)
    for config in (CodecConfig(), CodecConfig(schedule=(8, 4, 0)), CodecConfig(method="kivi")):
        with pytest.raises(InvalidInputError, match="group minimums and steps are stored as float16, so both must "
                                                    "stay within 65504"):
            compress(keys, config)
    stored = compress(keys, CodecConfig(method="fp16"))  # the documented way to keep them
    assert torch.equal(decompress(stored, dtype=torch.float32), keys.to(torch.bfloat16).float())


def test_append_of_too_large_keys_is_refused_and_leaves_the_state():
    base = compress(keys_of(100, scale=100.0), CodecConfig(group_size=16))
    with pytest.raises(InvalidInputError, match="too large in magnitude"):
        append(base, keys_of(40, scale=1e5)[:, :, :].clamp(-6e4, 6e4))
    assert base.num_tokens == 100


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_over_a_sequence_with_every_channel_dropped(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    keys = keys_of(150, 2, 32, seed=1)
    compressed = compress(keys, CodecConfig(schedule=(0,), group_size=32), rope=ROPE)
    assert compressed.kept_bits.numel() == 0 and compressed.num_groups == 4
    values = torch.randn(150, 2, 32, generator=torch.Generator().manual_seed(2))
    queries = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3))
    expected, expected_lse = naive_attention(queries[0], decompress(compressed, "post_rope", torch.float32), values,
                                             1 / math.sqrt(32))
    for sparsity in (None, SparsityConfig()):
        result = attend(queries, [compressed], [compress_values(values, ValueConfig())], sparsity=sparsity,
                        backend=backend)
        assert torch.isfinite(result.output).all()
        if sparsity is None:
            torch.testing.assert_close(result.output[0].double(), expected, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(result.lse[0].double(), expected_lse, atol=2e-3, rtol=2e-3)


# -- the codec config's surprises -----------------------------------------------------------------

def test_bits_per_element_and_schedule_together_is_an_error():
    with pytest.raises(InvalidInputError, match="give either bits_per_element .* or schedule .*, not both"):
        CodecConfig(bits_per_element=2.0, schedule=(8, 4, 0))
    assert CodecConfig(schedule=(8, 4, 0)).bits_per_element is None
    assert CodecConfig().bits_per_element == 1.5


@pytest.fixture
def fresh_warnings(monkeypatch):
    import svdq.codec

    monkeypatch.setattr(svdq.codec, "_WARNED", set())  # other tests may have warned already


def test_a_budget_below_the_fixed_costs_warns_with_the_bits_stored(caplog, fresh_warnings):
    with caplog.at_level(logging.WARNING, logger="svdq.codec"):
        compressed = compress(keys_of(300), CodecConfig(bits_per_element=0.1))
    assert compressed.bits_per_element > 0.5
    assert f"asked for 0.1 bits per element, stored {compressed.bits_per_element:.3f}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svdq.codec"):
        compress(keys_of(4096, seed=4), CodecConfig(bits_per_element=3.0, group_size=32))
    assert "asked for" not in caplog.text  # long sequences meet the budget: no warning
    with caplog.at_level(logging.WARNING, logger="svdq.codec"):
        compress(keys_of(300, seed=5), CodecConfig(bits_per_element=0.1))
    assert "asked for" not in caplog.text  # said once per budget and geometry, not per call


def test_post_rope_keys_without_positions_warn(caplog, fresh_warnings):
    with caplog.at_level(logging.WARNING, logger="svdq.codec"):
        compress(keys_of(77), rope=ROPE, key_space="post_rope")
    assert "post-RoPE keys came without positions: assuming positions 0..76" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svdq.codec"):
        compress(keys_of(78), rope=ROPE, key_space="post_rope", positions=torch.arange(78))
    assert "without positions" not in caplog.text


# -- the engine's staging budget ------------------------------------------------------------

def staging_engine(**config):
    from svdq_client.types import Profile
    from svdq_server.engine import Engine, EngineConfig

    profile = Profile("narrow", 1, 1, 16, codec=CodecConfig(method="fp16"))
    return Engine(EngineConfig(device="cpu", store_bytes=1 << 20, **config), [profile])


def upload_header(sequence, tokens, upload_id="u1"):
    from svdq_server.engine import UploadHeader

    return UploadHeader(sequence, "narrow", upload_id, tokens, "pre_rope", False, False)


def chunk(start, tokens, dtype=torch.float16):
    from svdq_server.engine import UploadChunkData

    return UploadChunkData(0, start, torch.ones(1, tokens, 1, 16, dtype=dtype), None, None)


def test_staging_reserves_the_declared_size_and_frees_it_on_abort():
    engine = staging_engine(staging_bytes=100_000, staging_tenant_share=0.5)  # 50,000 per tenant
    engine.begin_upload("a", upload_header("s1", 1000), owner="stream-1")  # 32,000 bytes in 16-bit
    assert engine.staging_totals("a") == (32_000, 1)
    with pytest.raises(ResourceExhaustedError, match=r"needs 32000 bytes of staging, but uploads in progress hold "
                                                     r"32000 of the 100000-byte budget \(--staging-bytes\), 32000 of "
                                                     r"this tenant's 50000"):
        engine.begin_upload("a", upload_header("s2", 1000), owner="stream-2")
    with pytest.raises(ResourceExhaustedError, match=r"more than one tenant's share of the staging budget, 50000 "
                                                     r"bytes \(--staging-bytes 100000 x --staging-tenant-share 0.5\)"):
        engine.begin_upload("b", upload_header("s3", 2000), owner="stream-3")
    engine.begin_upload("b", upload_header("s2", 1000), owner="stream-4")  # another tenant still has its share
    engine.abort_upload("a", upload_header("s1", 1000), owner="someone-else")  # not the owner: kept
    assert engine.staging_totals("a") == (32_000, 1)
    engine.abort_upload("a", upload_header("s1", 1000), owner="stream-1")
    assert engine.staging_totals("a") == (0, 0) and engine.staging_totals() == (32_000, 1)
    with pytest.raises(Exception, match="no upload 'u1' in progress"):
        engine.add_chunk("a", upload_header("s1", 1000), chunk(0, 10))


def test_float32_chunks_are_charged_at_their_real_size():
    engine = staging_engine(staging_bytes=100_000, staging_tenant_share=0.5)
    header = upload_header("s", 1000)
    engine.begin_upload("a", header, owner="stream")
    engine.add_chunk("a", header, chunk(0, 500, torch.float32))  # 32,000 bytes: within the reservation
    assert engine.staging_totals("a") == (32_000, 1)
    engine.add_chunk("a", header, chunk(500, 250, torch.float32))  # +16,000 beyond it
    assert engine.staging_totals("a") == (48_000, 1)
    with pytest.raises(ResourceExhaustedError, match=r"upload chunk of 16000 bytes \(torch.float32\) does not fit the "
                                                     r"staging budget: .* this tenant 48000 of 50000"):
        engine.add_chunk("a", header, chunk(750, 250, torch.float32))
    assert engine.staging_totals("a") == (48_000, 1)  # the refused chunk was neither staged nor charged
    engine.abort_upload("a", header, owner="stream")
    assert engine.staging_totals() == (0, 0)
    complete = upload_header("t", 1000)
    engine.begin_upload("a", complete, owner="stream")
    engine.add_chunk("a", complete, chunk(0, 1000))  # 16-bit: exactly the reservation
    assert engine.staging_totals("a") == (32_000, 1)
    assert engine.finish_upload("a", complete).num_tokens == 1000
    assert engine.staging_totals() == (0, 0)


def test_open_uploads_are_bounded_per_tenant_and_in_all():
    engine = staging_engine(max_open_uploads=4, staging_tenant_share=0.5)
    for index in range(2):
        engine.begin_upload("a", upload_header(f"a{index}", 10), owner=index)
    with pytest.raises(ResourceExhaustedError, match=r"too many uploads in progress: 2 open \(2 of this tenant\); at "
                                                     r"most 4 \(--max-open-uploads\), 2 per tenant"):
        engine.begin_upload("a", upload_header("a2", 10))
    for index in range(2):
        engine.begin_upload("b", upload_header(f"b{index}", 10), owner=index)
    with pytest.raises(ResourceExhaustedError, match="4 open"):
        engine.begin_upload("c", upload_header("c0", 10))


def test_failed_library_upload_and_idle_uploads_free_their_staging():
    engine = staging_engine(upload_idle_seconds=0.05)
    bad = torch.full((1, 10, 1, 16), float("nan"))
    with pytest.raises(InvalidInputError, match="NaN"):
        engine.upload("a", upload_header("s", 10), bad)
    assert engine.staging_totals() == (0, 0)
    engine.begin_upload("a", upload_header("idle", 10), owner="gone")
    time.sleep(0.1)
    engine.begin_upload("a", upload_header("next", 10), owner="new")  # sweeps the idle one
    assert engine.staging_totals() == (320, 1)


def test_engine_refuses_oversized_profiles_transposed_compress_and_post_rope_without_positions():
    from svdq_client.types import Profile
    from svdq_server.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", max_channels=1024))
    with pytest.raises(ResourceExhaustedError, match=r"profile 'big': kv_heads \* head_dim = 16 \* 128 = 2048 "
                                                     r"channels is more than the limit of 1024"):
        engine.register_profile(Profile("big", 1, 16, 128), tenant="a")
    with pytest.raises(ResourceExhaustedError, match=r"keys \[3, 1000, 64\] read as 3 tokens of 1000 kv_heads"):
        engine.compress_keys(torch.zeros(3, 1000, 64))
    with pytest.raises(InvalidInputError, match="post-RoPE keys need their positions"):
        engine.compress_keys(keys_of(20), rope=ROPE, key_space="post_rope")
    blob, _ = engine.compress_keys(keys_of(20), rope=ROPE, key_space="post_rope", positions=torch.arange(20))
    assert engine.decompress_keys(blob).shape == (20, 2, 32)


def test_engine_refuses_large_magnitude_keys_at_upload_and_append_and_keeps_the_sequence():
    from svdq_client.types import Profile
    from svdq_server.engine import Engine, EngineConfig, UploadHeader

    engine = Engine(EngineConfig(device="cpu"), [Profile("p", 1, 2, 32, rope=ROPE, codec=CodecConfig(group_size=32)),
                                                 Profile("q4", 1, 2, 32, value_bits=4, value_group_size=32),
                                                 Profile("raw", 1, 2, 32, codec=CodecConfig(method="fp16"))])
    big = keys_of(200, scale=1e5)[None]
    ordinary = keys_of(200, seed=1)[None]
    with pytest.raises(InvalidInputError, match="too large in magnitude to quantize"):
        engine.upload("t", UploadHeader("big", "p", "u", 200, "pre_rope", False, True), big, ordinary)
    with pytest.raises(InvalidInputError, match="too large in magnitude to quantize"):  # 4-bit values, same rule
        engine.upload("t", UploadHeader("v", "q4", "u", 200, "pre_rope", False, True), ordinary, big)
    assert engine.store.count("t") == 0 and engine.staging_totals() == (0, 0)
    engine.upload("t", UploadHeader("s", "p", "u", 200, "pre_rope", False, True), ordinary, ordinary)
    queries = keys_of(1, 4, 32, seed=2)
    before = engine.attend("t", [("s", 0)], queries)
    with pytest.raises(InvalidInputError, match="too large in magnitude"):
        engine.append("t", "s", keys_of(40, scale=3e4, seed=3).clamp(-6e4, 6e4)[None], ordinary[:, :40])
    after = engine.attend("t", [("s", 0)], queries)
    assert torch.equal(before.output, after.output) and engine.describe("t", "s").num_tokens == 200
    engine.upload("t", UploadHeader("r", "raw", "u", 200, "pre_rope", False, True), big, ordinary)
    assert torch.isfinite(engine.attend("t", [("r", 0)], queries * 1e-6).output).all()
    with pytest.raises(InvalidInputError, match="do not fit torch.float16"):
        next(engine.fetch("t", "r", dtype=torch.float16))
    assert torch.isfinite(next(engine.fetch("t", "r", dtype=torch.float32)).keys).all()


def test_appends_are_costed_by_their_new_tokens_and_limited_by_the_total():
    limits = CostLimits(max_tokens=5000, max_work_bytes=4 << 20)
    grown = compress(keys_of(600), limits=limits)  # 32 * 600 * 64 + 24 * 64 * 64 bytes: within 4 MiB
    for _ in range(7):
        grown = append(grown, keys_of(600), limits=limits)  # 4800 tokens: a compress of them would not fit
    assert grown.num_tokens == 4800
    with pytest.raises(ResourceExhaustedError, match="5400 tokens is more than the limit of 5000"):
        append(grown, keys_of(600), limits=limits)
