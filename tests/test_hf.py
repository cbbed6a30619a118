"""The transformers integration (svdq_client.hf): generation with the KV prefix offloaded.

Exactness: with the fp16 passthrough codec the offloaded path must give exactly the greedy
tokens of the plain model (SmolLM2, several prompts, in-process and through a real server).
Batches are in tests/test_hf_batch.py; the other model families, at the logits level with
small random models, in tests/test_hf_families.py.
Misuse must fail with a typed error.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hf_tiny import tiny_model
from svdq_client import KVCacheClient, evaluation
from svdq_client.hf import (
    LocalOffload,
    ModelShape,
    RemoteOffload,
    SvdqOffloadCache,
    calibrate_bases,
    calibrate_cache_bases,
    calibrate_key_shares,
    disable_offload,
    enable_offload,
)
from transformers import LlamaConfig

from svdq.attention import SparsityConfig
from svdq.codec import CodecConfig, fit_layer_basis, relative_error
from svdq.errors import InvalidInputError, NotFoundError

PASSTHROUGH = CodecConfig(method="fp16")
NEW_TOKENS = 10
# Compressing a prefix of 30 layers can take tens of seconds on a loaded shared CPU; the
# tests check results, not latency.
RPC_TIMEOUT_S = 300.0

PROMPTS = [
    "The history of the Roman Empire begins with",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Here is a list of the planets of the solar system, in order from the Sun: Mercury,",
]


@pytest.fixture(scope="module")
def smollm2():
    from svdq_client.models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    yield model, tokenizer
    disable_offload(model)


def _plain_greedy(model, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    disable_offload(model)
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)


def _offloaded_greedy(model, input_ids: torch.Tensor, cache: SvdqOffloadCache, prefill_tokens: int = 0,
                      new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """Greedy generation through the cache; ``prefill_tokens`` > 0 first runs that many tokens
    alone, so the rest of the prompt runs as a multi-token chunk over an offloaded prefix."""
    enable_offload(model)
    with torch.no_grad():
        if prefill_tokens:
            model(input_ids=input_ids[:, :prefill_tokens], cache=cache, use_cache=True)
            assert cache.offloaded_tokens > 0
        return model.generate(input_ids, cache=cache, max_new_tokens=new_tokens, do_sample=False)


@pytest.mark.model
def test_passthrough_in_process_gives_the_plain_greedy_tokens(smollm2):
    model, tokenizer = smollm2
    for index, prompt in enumerate(PROMPTS):
        if index == 1:
            continue  # runs through the server in the next test
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = _plain_greedy(model, input_ids)
        backend = LocalOffload(PASSTHROUGH)
        cache = SvdqOffloadCache(model, backend, window=6, spill_block=4)
        # The last prompt runs its tail as one chunk of queries over the offloaded prefix.
        prefill = input_ids.shape[1] - 7 if index == len(PROMPTS) - 1 else 0
        produced = _offloaded_greedy(model, input_ids, cache, prefill_tokens=prefill)
        assert torch.equal(produced, expected), (tokenizer.decode(expected[0]), tokenizer.decode(produced[0]))
        # The prefix really lived in the backend and every decode step asked it for attention.
        total = produced.shape[1] - 1  # the last token is sampled, never fed back
        assert cache.offloaded_tokens + cache.layers[0].keys.shape[-2] == total
        assert cache.offloaded_tokens >= total - 6 - 4
        assert backend.stats.tokens_offloaded == cache.offloaded_tokens
        assert backend.stats.attend_calls >= (produced.shape[1] - input_ids.shape[1] - 1) * 30
        assert backend.stats.fp16_key_bytes_stored == 2 * cache.offloaded_tokens * 3 * 64 * 30
        cache.close()


@pytest.mark.model
@pytest.mark.integration
def test_remote_passthrough_against_a_server_gives_the_plain_greedy_tokens(smollm2, shared_server):
    from conftest import TENANT_TOKENS

    model, tokenizer = smollm2
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], chunk_bytes=1 << 20,
                      timeout=RPC_TIMEOUT_S) as client:
        for prompt in PROMPTS[1:2]:  # the in-process test covers the others
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected = _plain_greedy(model, input_ids)
            backend = RemoteOffload(client, PASSTHROUGH)
            cache = SvdqOffloadCache(model, backend, window=6, spill_block=4)
            produced = _offloaded_greedy(model, input_ids, cache)
            assert torch.equal(produced, expected), (tokenizer.decode(expected[0]), tokenizer.decode(produced[0]))
            info = client.describe(backend.sequence_id)
            assert info.num_tokens == cache.offloaded_tokens > 0
            assert info.num_layers == 30 and info.key_space == "post_rope" and info.has_values
            assert backend.stats.key_bytes_stored == info.key_bytes
            assert backend.stats.attend_calls > 0 and backend.stats.backend_seconds > 0
            cache.close()
            with pytest.raises(NotFoundError):
                client.describe(backend.sequence_id)


@pytest.mark.model
@pytest.mark.integration
def test_remote_svdq_with_sparsity_stores_fewer_bytes_and_reads_fewer(smollm2, shared_server):
    """SVDq on the server: the prefix is stored compressed and sparse attention reads less."""
    from conftest import TENANT_TOKENS

    model, tokenizer = smollm2
    input_ids = evaluation.text_tokens(tokenizer, 600)
    sparsity = SparsityConfig(keep_fraction=1 / 8, chunk_size=16, num_recent=32)
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], chunk_bytes=1 << 20,
                      timeout=RPC_TIMEOUT_S) as client:
        backend = RemoteOffload(client, CodecConfig(method="svdq", bits_per_element=1.5), sparsity=sparsity)
        cache = SvdqOffloadCache(model, backend, window=32, spill_block=16, tokenizer=tokenizer)  # default bases
        assert backend.bases is not None
        produced = _offloaded_greedy(model, input_ids, cache, new_tokens=4)
        stats = backend.stats
        assert produced.shape[1] > input_ids.shape[1]
        assert cache.offloaded_tokens == input_ids.shape[1] - 32
        # Short sequences pay relatively more for the basis; still far below 16 bits.
        assert stats.key_bits_per_element < 4.0, stats
        assert stats.key_compression_ratio > 4.0, stats
        assert 0 < stats.key_bytes_read < stats.dense_fp16_key_bytes_read / 4, stats
        cache.close()


@pytest.mark.model
@pytest.mark.integration
def test_remote_shared_bases_travel_with_the_profile_and_beat_per_sequence_bases(smollm2, shared_server):
    """Calibrated bases go to the server once, in the profile; at the same 1.5 stored bits the
    keys come back closer to the model's than with a basis fitted on (and stored with) the
    sequence itself (in-process with LocalOffload: mean relative error 0.156 vs 0.232 over the 30
    layers)."""
    from conftest import TENANT_TOKENS

    model, tokenizer = smollm2
    disable_offload(model)
    bases = calibrate_bases(model, evaluation.text_tokens(tokenizer, 512, start=2048))
    input_ids = evaluation.text_tokens(tokenizer, 420)  # 388 offloaded: 4 sinks + 6 whole groups of 64, no tail
    exact = evaluation.prefill(model, input_ids[:, :388]).keys
    codec = CodecConfig(method="svdq", bits_per_element=1.5)
    errors = {}
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], chunk_bytes=1 << 20,
                       timeout=RPC_TIMEOUT_S) as client:
        for name, backend in (("own", RemoteOffload(client, codec)), ("shared", RemoteOffload(client, codec, bases=bases))):
            cache = SvdqOffloadCache(model, backend, window=32, calibration_tokens=0)  # "own": per-sequence
            enable_offload(model)
            with torch.no_grad():
                model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            disable_offload(model)
            assert cache.offloaded_tokens == 388 and 1.4 < backend.stats.key_bits_per_element <= 1.501, backend.stats
            fetched = client.fetch(backend.sequence_id, dtype=torch.float32, include_values=False).keys
            errors[name] = sum(relative_error(exact[layer], fetched[layer]) for layer in range(len(exact))) / len(exact)
            cache.close()
        profile = client.get_profile(backend.profile_name)
        assert [basis.fingerprint for basis in profile.bases] == [basis.fingerprint for basis in bases]
    assert errors["shared"] < 0.8 * errors["own"], errors


def test_calibrated_bases_are_the_models_pre_rope_key_bases_and_feed_local_offload():
    model = tiny_model("llama")
    tokens = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    pre_rope = evaluation.prefill(model, tokens, capture_pre_rope=True).pre_rope_keys  # k_proj outputs
    enable_offload(model)  # calibration switches the offload attention off for its own run and back on
    bases = calibrate_bases(model, tokens)
    assert model.config._attn_implementation == "svdq_offload"
    assert len(bases) == 2
    for index, basis in enumerate(bases):
        # RoPE undone exactly: the same basis as fitted on the model's own pre-RoPE keys.
        expected = fit_layer_basis(pre_rope[index])
        torch.testing.assert_close(basis.mean, expected.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(basis.singular_values, expected.singular_values, atol=1e-3, rtol=1e-4)
    backend = LocalOffload(CodecConfig(method="svdq", bits_per_element=3.0), bases=bases)
    cache = SvdqOffloadCache(model, backend, window=4)
    with torch.no_grad():
        model(input_ids=tokens[:, :40], cache=cache, use_cache=True)
    disable_offload(model)
    assert [keys.shared_basis for keys in backend.keys[0]] == [basis.fingerprint for basis in bases]
    with pytest.raises(InvalidInputError, match=r"tokens >= kv_heads\*head_dim = 32"):
        calibrate_bases(model, tokens[:, :31])
    with pytest.raises(InvalidInputError, match="one basis of kv_heads\\*head_dim = 32 channels per offloaded layer"):
        SvdqOffloadCache(model, LocalOffload(bases=bases[:1]))
    with pytest.raises(InvalidInputError, match="shared bases apply to codec method 'svdq', not 'fp16'"):
        SvdqOffloadCache(model, LocalOffload(PASSTHROUGH, bases=bases))


def whole_cache_setup(model):
    """Shared key and value bases, a 3-bit whole-cache budget (2 exact key tokens) and its
    calibrated key/value split, all from one calibration text."""
    from svdq.kv import CacheBudget
    from svdq.values import DEFAULT_VALUE_CODEC

    calibration = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(5))
    key_bases, value_bases = calibrate_cache_bases(model, calibration)
    budget = CacheBudget(3.0, key_codec=CodecConfig(group_size=8, exact_tokens=2),
                         value_codec=replace(DEFAULT_VALUE_CODEC, group_size=8))
    shares = calibrate_key_shares(model, calibration, budget, key_bases, value_bases)
    return key_bases, value_bases, budget, shares


def test_local_offload_stores_the_whole_cache_under_one_budget_with_calibrated_bases_and_split():
    from svdq import to_bytes
    from svdq.kv import compress_kv
    from svdq.values import DEFAULT_VALUE_CODEC, ValueConfig, values_to_bytes

    model = tiny_model("llama")
    tokens = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    key_bases, value_bases, budget, shares = whole_cache_setup(model)
    assert len(shares) == 2 and all(share in budget.key_shares for share in shares)
    backend = LocalOffload(bases=key_bases, value_bases=value_bases, cache_budget=budget, cache_key_shares=shares)
    enable_offload(model)
    cache = SvdqOffloadCache(model, backend, window=4)
    with torch.no_grad():
        model(input_ids=tokens, cache=cache, use_cache=True)
    disable_offload(model)
    stored_keys, stored_values = backend.keys[0][0], backend.values[0][0]
    assert stored_values.method == "svdq" and stored_keys.num_exact == 2
    # Layer 0's keys and values come from the embeddings alone: the plain prefill has them exactly.
    prefix = evaluation.prefill(model, tokens[:, :stored_keys.num_tokens])
    expected = compress_kv(prefix.keys[0], prefix.values[0], budget.with_share(shares[0]), positions=prefix.positions,
                           rope=ModelShape.from_config(model.config).rope, key_space="post_rope",
                           key_basis=key_bases[0], value_basis=value_bases[0])
    assert to_bytes(stored_keys) == to_bytes(expected.keys)
    assert values_to_bytes(stored_values) == values_to_bytes(expected.values)
    assert backend.stats.value_bytes_stored < backend.stats.fp16_key_bytes_stored / 2
    with pytest.raises(InvalidInputError, match="value_bases apply to SVDq latent values"):
        SvdqOffloadCache(model, LocalOffload(CodecConfig(), value_bases=value_bases))
    with pytest.raises(InvalidInputError, match=r"cache_key_shares need cache_budget and one share per offloaded"):
        SvdqOffloadCache(model, LocalOffload(cache_budget=budget, cache_key_shares=shares[:1]))
    latent = LocalOffload(values=ValueConfig(codec=replace(DEFAULT_VALUE_CODEC, group_size=8)),
                          value_bases=value_bases)
    SvdqOffloadCache(model, latent, calibration_tokens=0)  # latent values with shared bases, keys their own


@pytest.mark.integration
def test_remote_whole_cache_with_calibrated_split_answers_as_local_offload(shared_server):
    from conftest import TENANT_TOKENS

    model = tiny_model("llama")
    tokens = torch.randint(0, 97, (1, 56), generator=torch.Generator().manual_seed(6))
    key_bases, value_bases, budget, shares = whole_cache_setup(model)
    logits = {}
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=RPC_TIMEOUT_S) as client:
        backends = {
            "local": LocalOffload(bases=key_bases, value_bases=value_bases, cache_budget=budget,
                                  cache_key_shares=shares),
            "remote": RemoteOffload(client, budget.key_codec, bases=key_bases, value_codec=budget.value_codec,
                                    value_bases=value_bases, cache_bits_per_element=3.0, cache_key_shares=shares),
        }
        enable_offload(model)
        for name, backend in backends.items():
            cache = SvdqOffloadCache(model, backend, window=4)
            with torch.no_grad():
                model(input_ids=tokens[:, :48], cache=cache, use_cache=True)
                logits[name] = model(input_ids=tokens[:, 48:], cache=cache, use_cache=True).logits
            if name == "remote":
                profile = client.get_profile(backend.profile_name)
                assert profile.cache_key_shares == shares and profile.codec.exact_tokens == 2
                assert backend.stats.value_bytes_stored == backends["local"].stats.value_bytes_stored
                assert backend.stats.key_bytes_stored == backends["local"].stats.key_bytes_stored
            cache.close()
        disable_offload(model)
    torch.testing.assert_close(logits["remote"], logits["local"], atol=1e-4, rtol=0)


def test_shape_is_read_from_the_config():
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    shape = ModelShape.from_config(config)
    assert (shape.num_layers, shape.num_query_heads, shape.kv_heads, shape.head_dim) == (3, 8, 2, 32)
    assert shape.rope.theta == 5e5 and shape.rope.scaling == "linear" and shape.rope.factor == 2.0


def test_local_offload_bounds_the_attention_cache_like_the_server():
    """LocalOffload sets the process's derived-tensor limit on open (1 GiB by default, as
    svdq-server): without one the derived tensors grow with the stored cache and the kept keys
    of later decode calls are never kept. None leaves the limit alone; bad values are refused."""
    from svdq.derived import DEFAULT_LIMIT_BYTES, DERIVED

    shape = ModelShape.from_config(tiny_model("llama").config)
    DERIVED.limit_bytes = None
    LocalOffload(PASSTHROUGH).open(shape)
    assert DERIVED.limit_bytes == DEFAULT_LIMIT_BYTES == 1 << 30
    LocalOffload(PASSTHROUGH, attention_cache_bytes=1 << 20).open(shape)
    assert DERIVED.limit_bytes == 1 << 20
    LocalOffload(PASSTHROUGH, attention_cache_bytes=None).open(shape)
    assert DERIVED.limit_bytes == 1 << 20
    for bad in (-1, 1.5, "1GiB", True):
        with pytest.raises(InvalidInputError, match="attention_cache_bytes must be a whole number of bytes >= 0"):
            LocalOffload(attention_cache_bytes=bad)


def test_misuse_gets_typed_errors():
    model = tiny_model("llama")
    tokens = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(InvalidInputError, match="window must be an integer >= 1"):
        SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), window=0)
    with pytest.raises(InvalidInputError, match="spill_block must be an integer >= 1"):
        SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), spill_block=-1)
    with pytest.raises(InvalidInputError, match="backend must implement OffloadBackend"):
        SvdqOffloadCache(model, object())
    enable_offload(model)
    try:
        with torch.no_grad():
            batched = SvdqOffloadCache(model, LocalOffload(PASSTHROUGH))
            model(input_ids=tokens, cache=batched, use_cache=True)
            with pytest.raises(InvalidInputError, match="this svdq offload cache holds 2 rows, got a forward pass of 1"):
                model(input_ids=tokens[:1, :1], cache=batched, use_cache=True)
            with pytest.raises(InvalidInputError, match="needs an SvdqOffloadCache"):
                model(input_ids=tokens[:1], use_cache=False)
            cache = SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), window=2, spill_block=2)
            model(input_ids=tokens[:1], cache=cache, use_cache=True)
            stored = cache.offloaded_tokens
            with pytest.raises(InvalidInputError, match="cropping is not supported"):
                cache.crop(-1)
            with pytest.raises(InvalidInputError, match="num_return_sequences"):
                cache.batch_repeat_interleave(2)
            # A refused operation leaves the offloaded state as it was.
            assert cache.offloaded_tokens == stored == 6
    finally:
        disable_offload(model)


@pytest.mark.model
@pytest.mark.integration
def test_demo_starts_its_server_and_reports(smollm2, capsys):
    """The README's demo end to end on a short context: its own server process, the report."""
    from svdq_client.demo import main

    assert main(["--context-tokens", "256", "--window", "16", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    report = captured.out
    # Progress on stderr: every decoder layer of the one prefill pass, in order, then the upload.
    progress = [line.split()[2] for line in captured.err.splitlines() if line.startswith("prefill  layer")]
    assert progress == [f"{layer}/30" for layer in range(1, 31)]
    upload = next(line for line in captured.err.splitlines() if line.startswith("upload "))
    assert " tokens x 30 layers to 127.0.0.1:" in upload
    assert "server            127.0.0.1:" in report
    # The default: keys and values under one 2.0-bit budget, its split measured by the server.
    assert ("keys              svdq, 1/8 as 2-bit corrections, shared bases fitted on 2048 calibration tokens; "
            "values svdq latent, whole cache 2.0 bits per KV element, key/value split measured on the upload\n"
            ) in report
    stored = next(line for line in report.splitlines() if line.startswith("stored keys"))
    ratio = float(stored.split("= ratio ")[1].split("x")[0])
    bits = float(stored.split(", ")[-1].split(" bits")[0])
    assert ratio == pytest.approx(16.0 / bits, rel=1e-2) and 0.5 < bits < 4.0
    total = next(line for line in report.splitlines() if line.startswith("stored total"))
    # every byte of both blobs; a 240-token prefix stays within 5% of the budget
    assert float(total.split(", ")[1].split(" bits")[0]) <= 2.1
    assert "needle            " in report
    timing = next(line for line in report.splitlines() if line.startswith("time "))
    assert all(part in timing for part in ("model load", "document prefill", "upload", "answer tokens", "server calls"))
    wall = next(line for line in report.splitlines() if line.startswith("wall time"))
    demo_s, plain_s, ratio = float(wall.split()[2]), float(wall.split(" = ")[0].split()[-2]), float(wall.split(" = ")[1][:-1])
    # the seconds are printed to 0.1 s: the ratio lies within what their rounding allows
    assert (demo_s - 0.05) / (plain_s + 0.05) - 0.01 <= ratio <= (demo_s + 0.05) / max(plain_s - 0.05, 1e-3) + 0.01


@pytest.mark.model
@pytest.mark.integration
def test_demo_with_shared_bases_reports_them(smollm2, capsys):
    from svdq_client.demo import main

    assert main(["--context-tokens", "256", "--window", "16", "--max-new-tokens", "2",
                 "--shared-basis-tokens", "256", "--cache-bits", "2.0", "--calibrate-split"]) == 0
    report = capsys.readouterr().out
    assert "shared bases fitted on 256 calibration tokens" in report
    assert "values svdq latent, whole cache 2.0 bits per KV element, key/value split calibrated" in report
    assert "calibration " in next(line for line in report.splitlines() if line.startswith("time"))
    lines = {line[:17].strip(): line[18:] for line in report.splitlines()}
    value_ratio = float(lines["stored values"].split("= ratio ")[1].split("x")[0])
    total_ratio = float(lines["stored total"].split("ratio ")[1].split("x")[0])
    total_bits = float(lines["stored total"].split(", ")[1].split(" bits")[0])
    key_ratio = float(lines["stored keys"].split("= ratio ")[1].split("x")[0])
    # Keys and values hold the same element count: the total ratio is their harmonic mean.
    assert total_ratio == pytest.approx(2 / (1 / key_ratio + 1 / value_ratio), rel=1e-2)
    assert total_bits == pytest.approx(16.0 / total_ratio, rel=1e-2) and value_ratio > 2.0


def test_demo_calibrates_shared_bases_by_default_for_svdq_only():
    from svdq_client.demo import parse_args

    assert parse_args([]).shared_basis_tokens == 2048
    assert parse_args(["--shared-basis-tokens", "0"]).shared_basis_tokens == 0  # a basis per sequence
    assert parse_args(["--codec", "kivi"]).shared_basis_tokens == 0  # kivi and fp16 have no basis


@pytest.mark.parametrize("argv, cache_bits, bits", [
    ([], 2.0, 1.5),                        # the default: the whole cache at 2.0 bits
    (["--cache-bits", "1.75"], 1.75, 1.5),
    (["--cache-bits", "0"], 0, 1.5),       # the way back: keys only, values 16-bit
    (["--bits", "1.25"], 0, 1.25),         # a keys-only budget means keys only
    (["--value-bits", "4"], 0, 1.5),
    (["--codec", "kivi"], 0, 1.5),
])
def test_demo_stores_the_whole_cache_by_default(argv, cache_bits, bits):
    from svdq_client.demo import parse_args

    args = parse_args(argv)
    assert (args.cache_bits, args.bits) == (cache_bits, bits)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shared-basis-tokens", "64"], "--shared-basis-tokens needs --codec svdq and 256..16384 tokens (0: a basis "
                                          "per sequence), got 64"),
        (["--shared-basis-tokens", "20000"], "--shared-basis-tokens needs --codec svdq and 256..16384 tokens"),
        (["--shared-basis-tokens", "512", "--codec", "fp16"], "--shared-basis-tokens needs --codec svdq"),
        (["--depth", "1.5"], "--depth must be in 0..1"),
        (["--context-tokens", "100"], "--context-tokens must be >= 256"),
        (["--token", "secret-token-123456"], "give --address HOST:PORT"),
        (["--address", "127.0.0.1:1", "--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (["--codec", "zip"], "invalid choice"),
        (["--cache-bits", "2", "--value-bits", "4"], "--cache-bits needs --codec svdq, no --value-bits"),
        (["--cache-bits", "-1"], "a budget in (0, 16]"),
        (["--cache-bits", "2", "--bits", "1.2"], "no --bits (keys-only)"),
        (["--cache-bits", "2", "--codec", "fp16"], "--cache-bits needs --codec svdq"),
        (["--calibrate-split", "--cache-bits", "0"], "--calibrate-split applies to the whole cache"),
        (["--calibrate-split", "--codec", "kivi"], "--calibrate-split applies to the whole cache"),
        (["--calibrate-split", "--shared-basis-tokens", "0"], "with shared bases (--shared-basis-tokens > 0)"),
    ],
)
def test_demo_rejects_bad_options(argv, message, capsys):
    from svdq_client.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
