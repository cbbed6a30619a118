"""The engine as a library (no gRPC): results equal the svdq library's own, uploads are
idempotent and ordered, failures leave stored data byte-for-byte unchanged, the store keeps
its budget, tenants are isolated."""

import logging
import threading

import pytest
import torch
from svdq_client.types import Profile
from svdq_server.engine import Engine, EngineConfig, UploadChunkData, UploadHeader
from svdq_server.metrics import Metrics
from svdq_server.store import SequenceState, SequenceStore, StoredSequence, StorePolicy, fp16_bytes

import svdq.quant
from svdq import CodecConfig, RopeConfig, apply_rope, compress, decompress, fit_layer_basis, relative_error, to_bytes
from svdq import append as codec_append
from svdq.attention import SparsityConfig, attend, select_precision
from svdq.errors import ConflictError, InvalidInputError, NotFoundError, ResourceExhaustedError
from svdq.values import compress_values, values_to_bytes

LAYERS, HEADS, DIM, TOKENS = 2, 2, 32, 100
ROPE = RopeConfig(theta=10000.0)
CODEC = CodecConfig(method="svdq", bits_per_element=2.0, group_size=32)


def make_profile(name="tiny", **overrides):
    fields = {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "rope": ROPE, "codec": CODEC}
    return Profile(name, **{**fields, **overrides})


def cache(tokens=TOKENS, seed=0, layers=LAYERS):
    """Post-RoPE keys (positions 0..tokens-1) whose pre-RoPE form is nearly low-rank, as real
    keys are, and values; float16 [layers, tokens, heads, dim]."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(layers, tokens, 6, generator=generator) * torch.tensor([8.0, 6, 4, 3, 2, 1])
    directions = torch.randn(layers, 6, HEADS * DIM, generator=generator)
    pre = latent @ directions + 0.05 * torch.randn(layers, tokens, HEADS * DIM, generator=generator)
    pre = pre.reshape(layers, tokens, HEADS, DIM)
    keys = torch.stack([apply_rope(pre[layer], torch.arange(tokens), ROPE) for layer in range(layers)])
    values = torch.randn(layers, tokens, HEADS, DIM, generator=generator)
    return keys.half(), values.half()


def header(sequence_id="s", upload_id="u1", tokens=TOKENS, key_space="post_rope", replace=False, has_values=True,
           profile="tiny"):
    return UploadHeader(sequence_id, profile, upload_id, tokens, key_space, replace, has_values)


def snapshot(engine, tenant, sequence_id):
    """Every stored byte of a sequence."""
    state = engine.store.get(tenant, sequence_id).state
    return ([to_bytes(layer) for layer in state.keys], [values_to_bytes(layer) for layer in state.values or ()])


@pytest.fixture
def engine():
    return Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()])


def test_upload_and_fetch_equal_the_library(engine):
    keys, values = cache()
    positions = torch.arange(TOKENS) + 7
    info = engine.upload("t", header(), keys, values, positions)
    expected = [compress(keys[layer], CODEC, positions=positions, rope=ROPE, key_space="post_rope")
                for layer in range(LAYERS)]
    assert snapshot(engine, "t", "s")[0] == [to_bytes(layer) for layer in expected]
    assert info.num_tokens == TOKENS and info.num_layers == LAYERS
    assert info.key_bytes == sum(layer.nbytes for layer in expected)
    assert info.fp16_key_bytes == keys.numel() * 2
    assert info.key_compression_ratio == pytest.approx(info.fp16_key_bytes / info.key_bytes)
    assert info.value_bytes == sum(compress_values(values[layer]).nbytes for layer in range(LAYERS))
    pieces = list(engine.fetch("t", "s", max_chunk_bytes=3000))
    assert len(pieces) > LAYERS  # really chunked
    for layer in range(LAYERS):
        fetched = torch.cat([piece.keys for piece in pieces if piece.layer == layer])
        assert torch.equal(fetched, decompress(expected[layer]))
        fetched_values = torch.cat([piece.values for piece in pieces if piece.layer == layer])
        assert torch.equal(fetched_values, values[layer])
    assert torch.equal(torch.cat([piece.positions for piece in pieces if piece.layer == 0]), positions)


def test_chunked_upload_with_resent_chunks_equals_one_chunk(engine):
    keys, values = cache()
    positions = torch.arange(TOKENS)
    engine.upload("t", header("whole"), keys, values, positions)
    split = header("chunked")
    assert engine.begin_upload("t", split) is None
    chunks = [(layer, start, stop) for start, stop in ((0, 30), (30, 64), (64, TOKENS)) for layer in range(LAYERS)]
    for layer, start, stop in chunks:
        chunk = UploadChunkData(layer, start, keys[layer:layer + 1, start:stop], values[layer:layer + 1, start:stop],
                                positions[start:stop])
        engine.add_chunk("t", split, chunk)
        engine.add_chunk("t", split, chunk)  # a retried chunk is recognised
    engine.finish_upload("t", split)
    assert snapshot(engine, "t", "chunked") == snapshot(engine, "t", "whole")


def test_a_layer_is_compressed_when_its_last_chunk_arrives_and_its_raw_chunks_go():
    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()], metrics=metrics)
    metrics.bind_engine(engine, "test")
    keys, values = cache()
    positions = torch.arange(TOKENS) + 2
    engine.upload("t", header("whole"), keys, values, positions)
    upload = header("layerwise")
    engine.begin_upload("t", upload)
    staging = engine._uploads[("t", "layerwise")]
    engine.add_chunk("t", upload, UploadChunkData(0, 0, keys[:1, :60], values[:1, :60], positions[:60]))
    assert staging.compressed == [None, None] and len(staging.keys[0]) == 1
    engine.add_chunk("t", upload, UploadChunkData(0, 60, keys[:1, 60:], values[:1, 60:], positions[60:]))
    # layer 0 is done while layer 1 has not started: compressed, its raw chunks released
    assert staging.compressed[0] is not None and staging.compressed[1] is None
    assert staging.keys[0] == [] and staging.values[0] == []
    engine.add_chunk("t", upload, UploadChunkData(1, 0, keys[1:], values[1:], positions))
    engine.finish_upload("t", upload)
    assert snapshot(engine, "t", "layerwise") == snapshot(engine, "t", "whole")
    # one error sample per upload, measured when the sampled layer was compressed
    assert metrics.registry.get_sample_value("svdq_reconstruction_relative_error_count", {"profile": "tiny"}) == 2
    assert engine.staging_totals() == (0, 0)


def test_the_metrics_error_sample_is_the_codecs_relative_error_in_float32():
    """The upload's error sample (float32 norms) is svdq's float64 relative_error to float32's
    digits, for the keys' own dtypes, and falls back to it where float32's squares overflow."""
    from svdq_server.engine import _sampled_relative_error

    from svdq import relative_error

    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()], metrics=metrics)
    metrics.bind_engine(engine, "test")
    keys, values = cache()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layer = keys[0].to(dtype)
        restored = decompress(compress(layer, CODEC, positions=torch.arange(TOKENS), rope=ROPE,
                                       key_space="post_rope"))
        exact = relative_error(layer, restored)
        assert 0 < exact < 1 and abs(_sampled_relative_error(layer, restored) - exact) <= 1e-5 * exact
    engine.upload("t", header("sampled"), keys, values, torch.arange(TOKENS))  # an engine's first upload samples layer 0
    exact = relative_error(keys[0], decompress(engine.store.get("t", "sampled").state.keys[0]))
    observed = metrics.registry.get_sample_value("svdq_reconstruction_relative_error_sum", {"profile": "tiny"})
    assert abs(observed - exact) <= 1e-5 * exact
    huge = torch.full((4, 8), 3e30)
    assert _sampled_relative_error(huge, huge * (1 + 1e-3)) == pytest.approx(relative_error(huge, huge * (1 + 1e-3)))


def test_out_of_order_and_incomplete_uploads_are_refused_and_resumable(engine):
    keys, values = cache()
    upload = header()
    engine.begin_upload("t", upload)
    engine.add_chunk("t", upload, UploadChunkData(0, 0, keys[:, :50], values[:, :50], None))
    with pytest.raises(ConflictError, match=r"out-of-order upload chunk: layer 0 has received tokens \[0, 50\) but "
                                            r"the chunk starts at token 60"):
        engine.add_chunk("t", upload, UploadChunkData(0, 60, keys[:, 60:], values[:, 60:], None))
    with pytest.raises(ConflictError, match=r"upload incomplete: layer 0 has 50 of 100 tokens"):
        engine.finish_upload("t", upload)
    with pytest.raises(NotFoundError):
        engine.describe("t", "s")
    # the same upload resumes where it stopped
    assert engine.begin_upload("t", upload) is None
    engine.add_chunk("t", upload, UploadChunkData(0, 50, keys[:, 50:], values[:, 50:], None))
    assert engine.finish_upload("t", upload).num_tokens == TOKENS


def test_retried_upload_is_idempotent_and_a_second_upload_needs_replace(engine):
    keys, values = cache()
    first = engine.upload("t", header(), keys, values)
    before = snapshot(engine, "t", "s")
    assert engine.upload("t", header(), keys, values) == first
    assert snapshot(engine, "t", "s") == before
    other_keys, other_values = cache(seed=5)
    with pytest.raises(ConflictError, match="already exists"):
        engine.upload("t", header(upload_id="u2"), other_keys, other_values)
    assert snapshot(engine, "t", "s") == before
    engine.upload("t", header(upload_id="u3", replace=True), other_keys, other_values)
    assert snapshot(engine, "t", "s") != before
    assert engine.store.count() == 1


def test_append_equals_the_library_and_is_ordered(engine):
    keys, values = cache(tokens=TOKENS + 3)
    engine.upload("t", header(), keys[:, :TOKENS], values[:, :TOKENS])
    step = keys[:, TOKENS:TOKENS + 2]
    assert engine.append("t", "s", step, values[:, TOKENS:TOKENS + 2], expected_tokens=TOKENS).num_tokens == TOKENS + 2
    # a retry of the same append (same expected count and bytes) is not applied twice
    assert engine.append("t", "s", step, values[:, TOKENS:TOKENS + 2], expected_tokens=TOKENS).num_tokens == TOKENS + 2
    before = snapshot(engine, "t", "s")
    with pytest.raises(ConflictError, match=r"out-of-order append .* has 102 tokens but the request expects 100"):
        engine.append("t", "s", keys[:, -1:], values[:, -1:], expected_tokens=TOKENS)
    assert snapshot(engine, "t", "s") == before
    for layer in range(LAYERS):
        reference = compress(keys[layer, :TOKENS], CODEC, rope=ROPE, key_space="post_rope")
        reference = codec_append(reference, step[layer])
        assert to_bytes(engine.store.get("t", "s").state.keys[layer]) == to_bytes(reference)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"keys": "nan"}, InvalidInputError, "keys contains NaN or Inf"),
        ({"keys": "wrong_heads"}, InvalidInputError, r"keys must have shape \[layers, tokens, 2, 32\]"),
        ({"keys": "one_layer"}, InvalidInputError, r"keys must cover every layer"),
        ({"values": None}, InvalidInputError, r"stores values: values must be given"),
        ({"positions": "float"}, InvalidInputError, r"positions must be int64 \[1\]"),
        ({"positions": "negative"}, InvalidInputError, "positions must be >= 0"),
        ({"sequence_id": "missing"}, NotFoundError, "sequence 'missing' not found"),
    ],
)
def test_bad_appends_leave_the_sequence_unchanged(engine, change, error, match):
    keys, values = cache(tokens=TOKENS + 1)
    engine.upload("t", header(), keys[:, :TOKENS], values[:, :TOKENS])
    before = snapshot(engine, "t", "s")
    arguments = {"sequence_id": "s", "keys": keys[:, TOKENS:], "values": values[:, TOKENS:], "positions": None}
    for name, kind in change.items():
        if kind == "nan":
            arguments["keys"] = arguments["keys"].clone()
            arguments["keys"][0, 0, 0, 0] = float("nan")
        elif kind == "wrong_heads":
            arguments["keys"] = torch.zeros(LAYERS, 1, HEADS + 1, DIM)
        elif kind == "one_layer":
            arguments["keys"] = arguments["keys"][:1]
            arguments["values"] = arguments["values"][:1]
        elif kind == "float":
            arguments["positions"] = torch.tensor([1.0])
        elif kind == "negative":
            arguments["positions"] = torch.tensor([-1])
        else:
            arguments[name] = kind
    with pytest.raises(error, match=match):
        engine.append("t", **arguments)
    assert snapshot(engine, "t", "s") == before


@pytest.mark.parametrize("sparsity", [None, SparsityConfig(keep_fraction=0.5, chunk_size=8, num_recent=8)])
def test_attend_equals_the_library_on_the_stored_sequences(engine, sparsity):
    keys_a, values_a = cache(seed=1)
    keys_b, values_b = cache(seed=2, tokens=70)
    engine.upload("t", header("a"), keys_a, values_a)
    engine.upload("t", header("b", tokens=70), keys_b, values_b)
    entries = [("a", 0), ("b", 1), ("a", 1)]
    queries = torch.randn(3, 2 * HEADS, DIM, generator=torch.Generator().manual_seed(3))  # GQA: 2 query heads per KV
    result = engine.attend("t", entries, queries, sparsity=sparsity, scale=0.2)
    stored = {name: engine.store.get("t", name).state for name in ("a", "b")}
    expected = attend(queries, [stored[name].keys[layer] for name, layer in entries],
                      [stored[name].values[layer] for name, layer in entries], scale=0.2, sparsity=sparsity)
    torch.testing.assert_close(result.output, expected.output, rtol=0, atol=0)
    torch.testing.assert_close(result.lse, expected.lse, rtol=0, atol=0)
    assert [s.tokens_total for s in result.stats] == [TOKENS, 70, TOKENS]
    if sparsity is not None:
        assert result.stats[0].tokens_attended < TOKENS


@pytest.mark.parametrize(
    "entries, queries_shape, error, match",
    [
        ([], (0, 2, DIM), InvalidInputError, "entries must name at least one"),
        ([("a", 0)], (2, 2, DIM), InvalidInputError, r"queries must have shape \[1, q_heads, head_dim\]"),
        ([("a", 2)], (1, 2, DIM), InvalidInputError, r"entries\[0\].layer must be in 0..1"),
        ([("a", 0)], (1, 3, DIM), InvalidInputError, r"a multiple of 2 heads"),
        ([("a", 0)], (1, 2, 16), InvalidInputError, "head_dim 32"),
        ([("a", 0), ("zzz", 0)], (2, 2, DIM), NotFoundError, "sequence 'zzz' not found"),
    ],
)
def test_bad_attention_requests(engine, entries, queries_shape, error, match):
    keys, values = cache()
    engine.upload("t", header("a"), keys, values)
    with pytest.raises(error, match=match):
        engine.attend("t", entries, torch.zeros(queries_shape))


def test_keys_only_sequences_refuse_attention(engine):
    keys, _ = cache()
    engine.upload("t", header(has_values=False), keys)
    with pytest.raises(ConflictError, match="stores no values"):
        engine.attend("t", [("s", 0)], torch.zeros(1, HEADS, DIM))


def test_tenants_are_isolated(engine):
    keys, values = cache()
    engine.upload("alice", header(), keys, values)
    for call in (lambda: engine.describe("bob", "s"), lambda: engine.delete("bob", "s"),
                 lambda: list(engine.fetch("bob", "s")), lambda: engine.attend("bob", [("s", 0)], torch.zeros(1, 2, DIM))):
        with pytest.raises(NotFoundError, match="sequence 's' not found"):
            call()
    other_keys, other_values = cache(seed=9)
    engine.upload("bob", header(), other_keys, other_values)  # same id, other tenant: independent
    assert snapshot(engine, "alice", "s") != snapshot(engine, "bob", "s")
    assert engine.server_info("alice").tenant_sequences == 1 and engine.server_info("alice").sequences == 1  # own only


def test_lru_eviction_keeps_the_budget_and_spares_recent_sequences():
    keys, values = cache()
    probe = Engine(EngineConfig(device="cpu"), [make_profile()])
    size = probe.upload("t", header(), keys, values).key_bytes + probe.describe("t", "s").value_bytes
    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu", store_bytes=int(size * 3.5)), [make_profile()], metrics=metrics)
    for name in ("a", "b", "c"):
        engine.upload("t", header(name), keys, values)
    engine.describe("t", "a")  # a is now more recent than b
    engine.upload("t", header("d"), keys, values)
    assert engine.store.peek("t", "b") is None
    assert all(engine.store.peek("t", name) is not None for name in ("a", "c", "d"))
    totals = engine.store.totals()
    assert totals["keys"] + totals["values"] <= engine.store.policy.budget_bytes
    assert metrics.registry.get_sample_value("svdq_evictions_total", {"reason": "lru"}) == 1


def test_no_eviction_refuses_with_resource_exhausted_and_changes_nothing():
    keys, values = cache()
    probe = Engine(EngineConfig(device="cpu"), [make_profile()])
    size = probe.upload("t", header(), keys, values).key_bytes + probe.describe("t", "s").value_bytes
    engine = Engine(EngineConfig(device="cpu", store_bytes=int(size * 1.5), eviction="none", staging_bytes=1 << 20),
                    [make_profile()])
    engine.upload("t", header("a"), keys, values)
    before = snapshot(engine, "t", "a")
    with pytest.raises(ResourceExhaustedError, match="eviction is 'none'"):
        engine.upload("t", header("b"), keys, values)
    with pytest.raises(NotFoundError):
        engine.describe("t", "b")
    grow_keys, grow_values = cache(tokens=TOKENS)
    with pytest.raises(ResourceExhaustedError, match="store budget"):
        engine.append("t", "a", grow_keys, grow_values)  # +100 tokens does not fit
    assert snapshot(engine, "t", "a") == before
    # Staging room for the raw upload, so that the store's own check is the one that refuses it.
    small = Engine(EngineConfig(device="cpu", store_bytes=size // 2, staging_bytes=1 << 20), [make_profile()])
    with pytest.raises(ResourceExhaustedError, match="more than the whole store budget"):
        small.upload("t", header(), keys, values)
    tiny = Engine(EngineConfig(device="cpu", store_bytes=1000), [make_profile()])
    with pytest.raises(ResourceExhaustedError, match=r"needs 51200 bytes of staging .* more than one tenant's share "
                                                     r"of the staging budget, 1000 bytes \(--staging-bytes 2000"):
        tiny.upload("t", header(), keys, values)
    assert tiny.staging_totals() == (0, 0)


def test_ttl_expires_idle_sequences():
    now = [0.0]
    reasons = []
    store = SequenceStore(StorePolicy(1 << 20, ttl_seconds=10), on_evict=reasons.append, clock=lambda: now[0])
    keys, _ = cache(tokens=40)
    state = SequenceState(tuple(compress(keys[layer], CODEC) for layer in range(LAYERS)), None)
    for name in ("old", "fresh"):
        store.insert(StoredSequence("t", name, make_profile(), "pre_rope", "u", state, last_access=now[0]),
                     replace=False)
    now[0] = 6.0
    store.get("t", "fresh")
    now[0] = 12.0
    with pytest.raises(NotFoundError):
        store.get("t", "old")
    assert store.get("t", "fresh").sequence_id == "fresh"
    assert reasons == ["ttl"] and store.totals()["sequences"] == 1


def test_totals_are_reads_and_tenant_counters_match_a_recount():
    """Reading totals never expires (the server's periodic job and every access do); the
    per-tenant figures kept beside the totals equal a recount through inserts, replacements,
    updates, evictions, deletes and expiry."""
    now = [0.0]
    profile = make_profile()
    states = {tokens: SequenceState(tuple(compress(cache(tokens)[0][layer], CODEC) for layer in range(LAYERS)),
                                    tuple(compress_values(cache(tokens)[1][layer]) for layer in range(LAYERS)))
              for tokens in (40, 64)}
    store = SequenceStore(StorePolicy(10 * states[64].nbytes, ttl_seconds=10), clock=lambda: now[0])

    def recount(tenant):
        entries = [store.peek(*key) for key in list(store._sequences) if key[0] == tenant]
        return {"bytes": sum(entry.state.nbytes for entry in entries),
                "fp16_bytes": sum(2 * fp16_bytes(profile, entry.state.num_tokens) for entry in entries),
                "sequences": len(entries)}

    def insert(tenant, name, tokens, replace=False):
        store.insert(StoredSequence(tenant, name, profile, "pre_rope", "u", states[tokens]), replace=replace)

    insert("t", "a", 40)
    insert("t", "b", 40)
    insert("u", "c", 64)
    insert("t", "a", 64, replace=True)
    entry = store.get("t", "b")
    with entry.write_lock:
        store.update(entry, states[64])
    store.delete("u", "c")
    for tenant in ("t", "u"):
        counted = store.tenant_totals(tenant)
        assert {name: counted[name] for name in ("bytes", "fp16_bytes", "sequences")} == recount(tenant)
    assert store.count("t") == 2 and store.count("u") == 0
    now[0] = 5.0
    store.get("t", "a")
    now[0] = 12.0  # b idle for 12 s, a for 7 s
    assert store.totals()["sequences"] == 2 and store.tenant_totals("t")["sequences"] == 2  # reads expire nothing
    assert store.expire() == 1 and store.count("t") == 1
    counted = store.tenant_totals("t")
    assert {name: counted[name] for name in ("bytes", "fp16_bytes", "sequences")} == recount("t")
    assert counted["evictions"] == 1 and store.totals()["sequences"] == 1


def test_compression_off_and_kivi_profiles():
    keys, values = cache()
    engine = Engine(EngineConfig(device="cpu"), [
        make_profile("off", codec=CodecConfig(method="fp16")),
        make_profile("kivi", codec=CodecConfig(method="kivi", bits=2, group_size=32), value_bits=2, value_group_size=32),
    ])
    off = engine.upload("t", header("off", profile="off"), keys, values)
    assert torch.equal(torch.cat([p.keys for p in engine.fetch("t", "off", layers=[1])]), keys[1])
    assert 0.95 < off.key_compression_ratio <= 1.0  # only header, rope and checksum on top of fp16
    kivi = engine.upload("t", header("kivi", profile="kivi"), keys, values)
    assert kivi.key_compression_ratio > 3 and kivi.value_bytes < off.value_bytes / 3


def test_shared_basis_profile_stores_only_the_fingerprint():
    keys, values = cache(tokens=200)
    positions = torch.arange(200)
    bases = tuple(fit_layer_basis(keys[layer], positions, ROPE) for layer in range(LAYERS))
    engine = Engine(EngineConfig(device="cpu"), [make_profile(), make_profile("shared", bases=bases)])
    engine.upload("t", header("shared", tokens=200, profile="shared"), keys, values)
    stored = engine.store.get("t", "shared").state.keys
    assert [layer.shared_basis for layer in stored] == [basis.fingerprint for basis in bases]
    assert all(layer.basis.numel() and not to_bytes(layer).count(layer.basis.numpy().tobytes()) for layer in stored)
    blob, stats = engine.compress_keys(keys[1].float(), profile_name="shared", layer=1, positions=positions,
                                       key_space="post_rope")
    assert stats.nbytes == len(blob) and stats.relative_error < 0.5
    restored = engine.decompress_keys(blob, profile_name="shared", layer=1)
    # the reported error is taken in float32: the float64 one to float32's digits
    exact = relative_error(keys[1].float(), engine.decompress_keys(blob, profile_name="shared", layer=1,
                                                                   dtype=torch.float32))
    assert stats.relative_error == pytest.approx(exact, rel=1e-5)
    assert restored.shape == keys[1].shape
    with pytest.raises(Exception, match="shared basis"):
        engine.decompress_keys(blob)


def test_profiles_register_idempotently_and_conflicts_need_replace(engine):
    engine.register_profile(make_profile())
    with pytest.raises(ConflictError, match="already exists with different settings"):
        engine.register_profile(make_profile(num_layers=3))
    assert engine.register_profile(make_profile(num_layers=3), replace=True).num_layers == 3
    with pytest.raises(NotFoundError, match="profile 'nope' not found"):
        engine.get_profile("nope")


def test_profiles_belong_to_the_tenant_that_registers_them(engine):
    # "tiny" came with the engine, as from --profiles-file: every tenant sees it
    engine.register_profile(make_profile("mine", codec=CodecConfig(method="fp16")), tenant="alpha")
    assert [p.name for p in engine.list_profiles("alpha")] == ["mine", "tiny"]
    assert [p.name for p in engine.list_profiles("beta")] == ["tiny"]
    with pytest.raises(NotFoundError, match=r"profile 'mine' not found; known profiles: \['tiny'\]"):
        engine.get_profile("mine", "beta")
    keys, values = cache()
    with pytest.raises(NotFoundError, match="profile 'mine' not found"):
        engine.begin_upload("beta", UploadHeader("s", "mine", "u", TOKENS, "post_rope", True, True))
    with pytest.raises(NotFoundError, match="profile 'mine' not found"):
        engine.compress_keys(keys[0], tenant="beta", profile_name="mine")
    # beta's own "mine" is a different profile and leaves alpha's alone, even with replace
    engine.register_profile(make_profile("mine", num_layers=1), replace=True, tenant="beta")
    assert engine.get_profile("mine", "alpha").codec.method == "fp16"
    assert engine.get_profile("mine", "beta").num_layers == 1
    # an operator profile cannot be changed over RPC; registering an identical one is a no-op
    assert engine.register_profile(make_profile(), tenant="alpha").same_as(make_profile())
    with pytest.raises(ConflictError, match="set by the server's operator"):
        engine.register_profile(make_profile(num_layers=1), replace=True, tenant="alpha")
    assert engine.get_profile("tiny", "alpha").num_layers == LAYERS
    assert engine.server_info("alpha").profiles == ("mine", "tiny")


def test_bad_uploads_are_refused_before_anything_is_stored(engine):
    keys, values = cache()
    with pytest.raises(NotFoundError, match="profile 'nope'"):
        engine.upload("t", header(profile="nope"), keys, values)
    with pytest.raises(InvalidInputError, match=r"total_tokens must be in 1\.\."):
        engine.upload("t", header(tokens=0), keys, values)
    with pytest.raises(InvalidInputError, match="token_start 0 \\+ 100 tokens exceeds total_tokens 50"):
        engine.upload("t", header(tokens=50), keys, values)
    with pytest.raises(InvalidInputError, match="values must be present in every chunk exactly when has_values"):
        engine.upload("t", header("v"), keys, None)
    with pytest.raises(InvalidInputError, match="sequence_id must be"):
        engine.upload("t", header(sequence_id="bad id"), keys, values)
    assert engine.store.count() == 0


def test_concurrent_appends_to_one_sequence_are_serialised(engine):
    keys, values = cache(tokens=TOKENS + 16)
    engine.upload("t", header(), keys[:, :TOKENS], values[:, :TOKENS])
    errors = []

    def step(index):
        try:
            engine.append("t", "s", keys[:, TOKENS + index:TOKENS + index + 1],
                          values[:, TOKENS + index:TOKENS + index + 1])
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=step, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    state = engine.store.get("t", "s").state
    assert state.num_tokens == TOKENS + 16
    assert all(layer.num_tokens == TOKENS + 16 for layer in state.keys + state.values)


def test_metrics_observe_uploads_and_attention():
    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu"), [make_profile()], metrics=metrics)
    metrics.bind_engine(engine, "test")
    keys, values = cache()
    info = engine.upload("t", header(), keys, values)
    engine.attend("t", [("s", 0), ("s", 1)], torch.randn(2, HEADS, DIM))
    sample = metrics.registry.get_sample_value
    assert sample("svdq_compression_ratio_count", {"profile": "tiny", "kind": "keys"}) == 1
    assert sample("svdq_compression_ratio_sum", {"profile": "tiny", "kind": "keys"}) == pytest.approx(
        info.key_compression_ratio)
    assert sample("svdq_compression_ratio_sum", {"profile": "tiny", "kind": "total"}) == pytest.approx(
        info.compression_ratio)
    value_ratio = info.fp16_value_bytes / info.value_bytes
    assert sample("svdq_compression_ratio_sum", {"profile": "tiny", "kind": "values"}) == pytest.approx(value_ratio)
    assert sample("svdq_reconstruction_relative_error_count", {"profile": "tiny"}) == 1
    assert 0 < sample("svdq_reconstruction_relative_error_sum", {"profile": "tiny"}) < 0.5
    assert sample("svdq_attention_batch_size_sum") == 2
    assert sample("svdq_attention_dense_fp16_key_bytes_total", {"mode": "dense"}) == 2 * 2 * TOKENS * HEADS * DIM
    assert sample("svdq_stored_bytes", {"kind": "keys"}) == info.key_bytes
    assert sample("svdq_stored_fp16_bytes", {"kind": "values"}) == info.fp16_value_bytes
    assert sample("svdq_sequences") == 1
    assert sample("svdq_device_memory_bytes", {"device": "cpu", "kind": "store_tensors"}) > 0


def test_layers_may_be_chunked_differently_but_positions_must_agree(engine):
    keys, values = cache()
    positions = torch.arange(TOKENS) + 3
    engine.upload("t", header("whole"), keys, values, positions)
    mixed = header("mixed")
    engine.begin_upload("t", mixed)
    engine.add_chunk("t", mixed, UploadChunkData(1, 0, keys[1:, :], values[1:, :], positions))
    with pytest.raises(InvalidInputError, match=r"positions of tokens \[0, 50\) differ"):
        engine.add_chunk("t", mixed, UploadChunkData(0, 0, keys[:1, :50], values[:1, :50], positions[:50] + 1))
    for start, stop in ((0, 50), (50, TOKENS)):
        engine.add_chunk("t", mixed, UploadChunkData(0, start, keys[:1, start:stop], values[:1, start:stop],
                                                     positions[start:stop]))
    engine.finish_upload("t", mixed)
    assert snapshot(engine, "t", "mixed") == snapshot(engine, "t", "whole")


def test_whole_cache_profile_stores_latent_values_under_one_budget_and_attends_them():
    from svdq.kv import CacheBudget, compress_kv
    from svdq.values import DEFAULT_VALUE_CODEC, decompress_values

    tokens = 600
    profile = make_profile(value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=2.0)
    assert Profile.from_pb(profile.to_pb()).same_as(profile)
    assert Profile.from_pb(profile.to_pb()).value_codec == DEFAULT_VALUE_CODEC
    engine = Engine(EngineConfig(device="cpu"), [profile])
    keys, values = cache(tokens)
    info = engine.upload("t", header(tokens=tokens), keys, values)
    state = engine.store.get("t", "s").state
    assert all(layer.method == "svdq" for layer in state.values)
    # What compress_kv makes of each layer, byte for byte: the engine adds nothing of its own.
    budget = CacheBudget(2.0, key_codec=CODEC, value_codec=DEFAULT_VALUE_CODEC)
    for layer in range(LAYERS):
        expected = compress_kv(keys[layer], values[layer], budget, positions=torch.arange(tokens), rope=ROPE,
                               key_space="post_rope")
        assert to_bytes(state.keys[layer]) == to_bytes(expected.keys)
        assert values_to_bytes(state.values[layer]) == values_to_bytes(expected.values)
    assert 8 * (info.key_bytes + info.value_bytes) / (2 * keys.numel()) == pytest.approx(2.0, abs=0.15)
    # Attention over the stored latent values equals attention over their reconstruction.
    queries = torch.randn(1, HEADS, DIM)
    result = engine.attend("t", [("s", 1)], queries)
    plain_values = compress_values(decompress_values(state.values[1], torch.float32))
    expected = attend(queries, [state.keys[1]], [plain_values])
    assert torch.allclose(result.output, expected.output, atol=2e-3)
    engine.append("t", "s", keys[:, :40], values[:, :40])
    assert engine.store.get("t", "s").state.values[0].num_tokens == tokens + 40


def test_whole_cache_profile_rejects_settings_it_cannot_split():
    from svdq.values import DEFAULT_VALUE_CODEC

    with pytest.raises(InvalidInputError, match="needs an svdq codec with a bit budget and profile.value_codec"):
        make_profile(cache_bits_per_element=2.0)
    with pytest.raises(InvalidInputError, match="needs an svdq codec"):
        make_profile(codec=CodecConfig(method="kivi"), value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=2.0)
    with pytest.raises(InvalidInputError, match="profile.cache_bits_per_element: cache bits_per_element"):
        make_profile(value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=40.0)
    with pytest.raises(InvalidInputError, match="value_bases only apply"):
        make_profile(value_bases=(None, None))
    with pytest.raises(InvalidInputError, match="not both"):
        make_profile(value_codec=DEFAULT_VALUE_CODEC, value_bits=2)


def test_calibrated_key_shares_compress_each_layer_once_with_its_share():
    from svdq.kv import CacheBudget, compress_kv, measure_key_shares
    from svdq.values import DEFAULT_VALUE_CODEC

    budget = CacheBudget(2.0, key_codec=CODEC, value_codec=DEFAULT_VALUE_CODEC)
    calibration_keys, calibration_values = cache(600, seed=4)
    shares = measure_key_shares(list(calibration_keys), list(calibration_values), budget,
                                positions=torch.arange(600), rope=ROPE, key_space="post_rope")
    assert shares == tuple(compress_kv(calibration_keys[layer], calibration_values[layer], budget,
                                       positions=torch.arange(600), rope=ROPE, key_space="post_rope").key_share
                           for layer in range(LAYERS))
    # Another share than the measured one, so the test sees the profile's share being used.
    shares = (budget.key_shares[0],) + shares[1:]
    profile = make_profile(value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=2.0, cache_key_shares=shares)
    assert Profile.from_pb(profile.to_pb()).cache_key_shares == shares
    assert Profile.from_pb(profile.to_pb()).same_as(profile)
    engine = Engine(EngineConfig(device="cpu"), [profile])
    keys, values = cache(500)
    engine.upload("t", header(tokens=500), keys, values)
    state = engine.store.get("t", "s").state
    for layer in range(LAYERS):
        one = CacheBudget(2.0, key_shares=(shares[layer],), key_codec=CODEC, value_codec=DEFAULT_VALUE_CODEC)
        expected = compress_kv(keys[layer], values[layer], one, positions=torch.arange(500), rope=ROPE,
                               key_space="post_rope")
        assert to_bytes(state.keys[layer]) == to_bytes(expected.keys)
        assert values_to_bytes(state.values[layer]) == values_to_bytes(expected.values)


def test_bad_calibrated_key_shares_are_refused():
    from svdq.values import DEFAULT_VALUE_CODEC

    whole = {"value_codec": DEFAULT_VALUE_CODEC, "cache_bits_per_element": 2.0}
    with pytest.raises(InvalidInputError, match="cache_key_shares need profile.cache_bits_per_element"):
        make_profile(value_codec=DEFAULT_VALUE_CODEC, cache_key_shares=(0.3,) * LAYERS)
    with pytest.raises(InvalidInputError, match=f"one share per layer \\({LAYERS}\\), got 1"):
        make_profile(cache_key_shares=(0.3,), **whole)
    with pytest.raises(InvalidInputError, match=r"cache_key_shares\[1\]: key_shares must be fractions in \(0, 1\)"):
        make_profile(cache_key_shares=(0.3, 1.5) + (0.3,) * (LAYERS - 2), **whole)
    with pytest.raises(InvalidInputError, match=r"cache_key_shares\[0\]: key share 0.9 gives keys 18.00 bits"):
        make_profile(codec=CODEC, value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=10.0,
                     cache_key_shares=(0.9,) * LAYERS)


def test_state_sizes_are_the_serialized_bytes_computed_once(monkeypatch):
    import svdq.format

    keys, values = cache(tokens=70)
    state = SequenceState(tuple(compress(keys[layer], CODEC) for layer in range(LAYERS)),
                          tuple(compress_values(values[layer]) for layer in range(LAYERS)))
    calls = []
    original = svdq.format.serialized_size
    monkeypatch.setattr(svdq.format, "serialized_size", lambda blob: calls.append(1) or original(blob))
    assert state.key_bytes == sum(len(to_bytes(layer)) for layer in state.keys)
    assert state.value_bytes == sum(len(values_to_bytes(layer)) for layer in state.values)
    counted = len(calls)
    assert state.nbytes == state.key_bytes + state.value_bytes and len(calls) == counted  # read again: kept


@pytest.mark.parametrize("precision", [None, "float32", "bfloat16"])
def test_attend_uses_the_configured_attention_precision(precision, monkeypatch):
    import svdq_server.engine as engine_module

    chosen = []

    def recorded(*args, **kwargs):
        chosen.append(kwargs["precision"])
        return attend(*args, **kwargs)

    monkeypatch.setattr(engine_module, "attend_compressed", recorded)
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 22, attention_precision=precision), [make_profile()])
    keys, values = cache(seed=1)
    engine.upload("t", header("a"), keys, values)
    queries = torch.randn(2, 2 * HEADS, DIM, generator=torch.Generator().manual_seed(3))
    result = engine.attend("t", [("a", 0), ("a", 1)], queries, scale=0.2)
    state = engine.store.get("t", "a").state
    expected = attend(queries, state.keys[:2], state.values[:2], scale=0.2, precision=precision)
    assert chosen == [precision or select_precision("cpu")] and torch.equal(result.output, expected.output)


def test_the_auto_attention_precision_is_decided_once_when_the_engine_starts(monkeypatch, caplog):
    """The device's choice (or $SVDQ_ATTENTION_PRECISION as it was at start) holds for every
    call, and the engine's start logs it once."""
    import svdq_server.engine as engine_module

    chosen = []

    def recorded(*args, **kwargs):
        chosen.append(kwargs["precision"])
        return attend(*args, **kwargs)

    monkeypatch.setattr(engine_module, "attend_compressed", recorded)
    monkeypatch.setenv("SVDQ_ATTENTION_PRECISION", "float32")
    caplog.set_level(logging.INFO, logger="svdq_server.engine")
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()])
    assert engine.attention_precision == "float32"
    keys, values = cache(seed=1)
    engine.upload("t", header("a"), keys, values)
    queries = torch.randn(1, 2 * HEADS, DIM, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("SVDQ_ATTENTION_PRECISION", "bfloat16")  # read at start only
    engine.attend("t", [("a", 0)], queries, scale=0.2)
    monkeypatch.delenv("SVDQ_ATTENTION_PRECISION")
    engine.attend("t", [("a", 1)], queries, scale=0.2)
    assert chosen == ["float32", "float32"]
    logged = [record.getMessage() for record in caplog.records if "attention precision" in record.getMessage()]
    assert len(logged) == 1 and "attention precision float32 ($SVDQ_ATTENTION_PRECISION)" in logged[0], logged
    assert Engine(EngineConfig(device="cpu")).attention_precision == select_precision("cpu")  # auto: the device's


def test_an_unknown_attention_precision_is_refused_when_the_engine_starts():
    with pytest.raises(InvalidInputError, match=r"precision must be one of \('float32', 'bfloat16', 'float16'\), got 'fp8'"):
        Engine(EngineConfig(device="cpu", attention_precision="fp8"))


def test_the_cpu_bfloat16_choice_is_logged_at_start_and_a_bad_one_refused(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="svdq_server.engine")
    monkeypatch.setenv("SVDQ_CPU_BFLOAT16", "off")
    engine = Engine(EngineConfig(device="cpu"))
    expected = ("CPU bfloat16 products off ($SVDQ_CPU_BFLOAT16)" if svdq.quant.cpu_bfloat16_is_native()
                else "CPU bfloat16 products off (not native on this CPU)")
    assert engine.cpu_bfloat16 == expected
    assert any(expected in record.getMessage() for record in caplog.records if "engine on" in record.getMessage())
    monkeypatch.setenv("SVDQ_CPU_BFLOAT16", "fast")
    with pytest.raises(InvalidInputError, match=r"SVDQ_CPU_BFLOAT16 must be one of \('auto', 'on', 'off'\), got 'fast'"):
        Engine(EngineConfig(device="cpu"))


def test_a_layer_whose_compression_failed_is_compressed_again_when_the_upload_finishes(monkeypatch):
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()])
    keys, values = cache()
    engine.upload("t", header("whole"), keys, values)
    upload = header("retried")
    engine.begin_upload("t", upload)
    real, failures = engine._compress_one, []

    def fails_once(*args):
        if not failures:
            failures.append(args[2])
            raise ResourceExhaustedError("out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(engine, "_compress_one", fails_once)
    with pytest.raises(ResourceExhaustedError, match="injected"):
        engine.add_chunk("t", upload, UploadChunkData(0, 0, keys, values, None))  # both layers in one chunk
    # The chunk counts as arrived (a resent one is skipped), so finishing compresses both layers now.
    engine.add_chunk("t", upload, UploadChunkData(0, 0, keys, values, None))
    engine.finish_upload("t", upload)
    assert failures == [0] and snapshot(engine, "t", "retried") == snapshot(engine, "t", "whole")


def test_pooled_compression_stores_the_inline_bytes_and_reports_a_failure_at_the_next_chunk(monkeypatch):
    inline = Engine(EngineConfig(device="cpu", store_bytes=1 << 22), [make_profile()])
    pooled = Engine(EngineConfig(device="cpu", store_bytes=1 << 22, compress_threads=2), [make_profile()])
    keys, values = cache()
    inline.upload("t", header("s"), keys, values)
    upload = header("s")
    pooled.begin_upload("t", upload)
    for layer in range(LAYERS):  # a layer per chunk, as a client sends them
        pooled.add_chunk("t", upload, UploadChunkData(layer, 0, keys[layer:layer + 1], values[layer:layer + 1], None))
    pooled.finish_upload("t", upload)
    assert snapshot(pooled, "t", "s") == snapshot(inline, "t", "s")
    assert pooled.staging_totals() == (0, 0)

    failing = header("failing")
    pooled.begin_upload("t", failing)
    real = pooled._compress_one

    def fails_on_layer_0(*args):
        if args[2] == 0:
            raise ResourceExhaustedError("out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(pooled, "_compress_one", fails_on_layer_0)
    pooled.add_chunk("t", failing, UploadChunkData(0, 0, keys[:1], values[:1], None))  # compresses in the pool
    pooled._uploads[("t", "failing")].pending[0].exception()  # wait for it
    with pytest.raises(ResourceExhaustedError, match="injected"):
        pooled.add_chunk("t", failing, UploadChunkData(1, 0, keys[1:], values[1:], None))
    pooled.abort_upload("t", failing)
    assert pooled.staging_totals() == (0, 0)
    # a failure nobody reported is compressed again when the upload finishes, as an inline one
    monkeypatch.setattr(pooled, "_compress_one", real)
    retried, failures = header("retried"), []

    def fails_once(*args):
        if not failures:
            failures.append(args[2])
            raise ResourceExhaustedError("out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(pooled, "_compress_one", fails_once)
    pooled.begin_upload("t", retried)
    pooled.add_chunk("t", retried, UploadChunkData(0, 0, keys, values, None))  # both layers in one chunk
    pooled.finish_upload("t", retried)
    assert failures == [0] and snapshot(pooled, "t", "retried") == snapshot(inline, "t", "s")


def test_compress_threads_must_be_a_small_count():
    with pytest.raises(InvalidInputError, match=r"compress_threads must be an integer in 0\.\.64"):
        Engine(EngineConfig(device="cpu", compress_threads=-1))
