"""Shared bases by default in the transformers integration: SvdqOffloadCache fits key (and
latent value) bases on the shipped calibration text once per model, unless told not to.

Small random models (tests/hf_tiny.py) and a byte tokenizer: the calibration is a prefill of
a few dozen tokens, so these run in seconds. SmolLM2 through the demo is in tests/test_hf.py.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import VOCAB, ByteTokenizer, tiny_config, tiny_model
from svdq_client import KVCacheClient, evaluation, hf
from svdq_client.hf import (
    LocalOffload,
    RemoteOffload,
    SvdqOffloadCache,
    calibrate_cache_bases,
    calibrate_key_shares,
    default_calibrated_bases,
    default_calibrated_key_shares,
)

from svdq import from_bytes, to_bytes
from svdq.codec import CodecConfig
from svdq.errors import FormatError, InvalidInputError
from svdq.kv import DEFAULT_CACHE_KEY_CODEC, DEFAULT_KEY_SHARES, DEFAULT_TOTAL_BITS, CacheBudget
from svdq.values import DEFAULT_VALUE_CODEC, values_from_bytes, values_to_bytes

# >= kv_heads * head_dim = 32 of the tiny llama; small enough to keep the calibration prefill cheap
TOKENS = 64


@pytest.fixture
def calibration_runs(monkeypatch):
    """How many calibration prefills ran (each a call of hf.calibrate_cache_bases)."""
    runs = []

    def counted(model, input_ids):
        runs.append(input_ids.shape[1])
        return calibrate_cache_bases(model, input_ids)

    monkeypatch.setattr(hf, "calibrate_cache_bases", counted)
    return runs


def _offload(model, backend, tokens=80, **options):
    """Run ``tokens`` through a cache of window 4: 4 sinks, a group of 64 and a tail are offloaded."""
    cache = SvdqOffloadCache(model, backend, window=4, **options)
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    hf.enable_offload(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
    finally:
        hf.disable_offload(model)
    return cache


def test_default_cache_fits_shared_bases_on_the_shipped_text_once_per_model(calibration_runs):
    model, tokenizer = tiny_model("llama"), ByteTokenizer()
    backend = LocalOffload()  # the default: the whole cache at 2.0 bits, no bases given
    cache = _offload(model, backend, tokenizer=tokenizer, calibration_tokens=TOKENS)
    assert calibration_runs == [TOKENS] and cache.calibration_seconds > 0
    assert backend.cache_budget == CacheBudget() and backend.value_bases is not None
    # Fitted on the end of the shipped prose, never on what was offloaded.
    expected = calibrate_cache_bases(model, evaluation.calibration_tokens(tokenizer, TOKENS))[0]
    assert [b.fingerprint for b in backend.bases] == [b.fingerprint for b in expected]
    for layer, keys in enumerate(backend.keys[0]):
        assert keys.shared_basis == expected[layer].fingerprint
        # The blob references the basis by fingerprint: it cannot be read without it.
        blob = to_bytes(keys)
        with pytest.raises(FormatError, match="basis"):
            from_bytes(blob)
        assert from_bytes(blob, basis=backend.bases[layer]).shared_basis == keys.shared_basis
    # A second cache on the same model reuses the bases: no second calibration run.
    again = LocalOffload()
    _offload(model, again, tokenizer=tokenizer, calibration_tokens=TOKENS)
    assert calibration_runs == [TOKENS] and again.bases is backend.bases
    assert [keys.shared_basis for keys in again.keys[0]] == [keys.shared_basis for keys in backend.keys[0]]
    # Another token count is another calibration; another model object too.
    _offload(model, LocalOffload(), tokenizer=tokenizer, calibration_tokens=TOKENS + 16)
    _offload(tiny_model("llama"), LocalOffload(), tokenizer=tokenizer, calibration_tokens=TOKENS)
    assert calibration_runs == [TOKENS, TOKENS + 16, TOKENS]


def test_calibration_tokens_0_keeps_a_basis_per_sequence(calibration_runs):
    model = tiny_model("llama")
    backend = LocalOffload()
    _offload(model, backend, tokenizer=ByteTokenizer(), calibration_tokens=0)
    assert calibration_runs == [] and backend.bases is None
    for keys in backend.keys[0]:
        assert keys.shared_basis is None and keys.basis.numel() > 0
        from_bytes(to_bytes(keys))  # self-contained


def test_given_bases_and_codecs_without_bases_need_no_calibration(calibration_runs, split_runs):
    model = tiny_model("llama")
    bases, value_bases = default_calibrated_bases(model, ByteTokenizer(), TOKENS)
    shares = default_calibrated_key_shares(model, ByteTokenizer(), CacheBudget(), bases, value_bases, TOKENS)
    assert calibration_runs == [TOKENS] and len(split_runs) == 1
    calibration_runs.clear()
    split_runs.clear()
    for backend in (LocalOffload(bases=bases, value_bases=value_bases),  # the split measured per upload
                    LocalOffload(bases=bases, value_bases=value_bases, cache_key_shares=shares),
                    LocalOffload(CodecConfig(), bases=bases),
                    LocalOffload(CodecConfig(method="fp16")),
                    LocalOffload(CodecConfig(method="kivi", bits=2))):
        _offload(model, backend)  # no tokenizer needed
    assert calibration_runs == [] and split_runs == []


def test_whole_cache_default_calibrates_the_value_bases_too(calibration_runs):
    model = tiny_model("llama")
    backend = LocalOffload(cache_budget=CacheBudget(3.0, key_codec=CodecConfig(group_size=8)))
    _offload(model, backend, tokens=56, tokenizer=ByteTokenizer(), calibration_tokens=TOKENS)
    key_bases, value_bases = default_calibrated_bases(model, ByteTokenizer(), TOKENS)
    assert calibration_runs == [TOKENS]  # keys and values from one prefill
    assert backend.bases == key_bases and backend.value_bases == value_bases
    for layer, values in enumerate(backend.values[0]):
        assert values.method == "svdq" and values.latent.shared_basis == value_bases[layer].fingerprint
        with pytest.raises(FormatError, match="basis"):
            values_from_bytes(values_to_bytes(values))


@pytest.fixture
def split_runs(monkeypatch):
    """The budgets of the key/value split calibrations that ran (hf.calibrate_key_shares)."""
    runs = []

    def counted(model, input_ids, budget, key_bases=None, value_bases=None):
        runs.append(budget)
        return calibrate_key_shares(model, input_ids, budget, key_bases, value_bases)

    monkeypatch.setattr(hf, "calibrate_key_shares", counted)
    return runs


@pytest.fixture
def stored_budgets(monkeypatch):
    """The budget of every layer LocalOffload compressed (hf.compress_kv)."""
    budgets = []
    compress_kv = hf.compress_kv

    def recorded(keys, values, budget, **options):
        budgets.append(budget)
        return compress_kv(keys, values, budget, **options)

    monkeypatch.setattr(hf, "compress_kv", recorded)
    return budgets


def test_calibrate_split_measures_the_split_once_on_the_calibration_text(split_runs, stored_budgets):
    model, tokenizer = tiny_model("llama"), ByteTokenizer()
    backend = LocalOffload()  # the whole cache at 2.0 bits, no bases, no shares
    cache = _offload(model, backend, tokenizer=tokenizer, calibration_tokens=TOKENS, calibrate_split=True)
    # Measured on the shipped calibration text with the calibrated bases, as a caller would.
    expected = calibrate_key_shares(model, evaluation.calibration_tokens(tokenizer, TOKENS), CacheBudget(),
                                    *default_calibrated_bases(model, tokenizer, TOKENS))
    assert split_runs == [CacheBudget()] and backend.cache_key_shares == expected
    assert len(expected) == 2 and all(share in DEFAULT_KEY_SHARES for share in expected)
    assert cache.calibration_seconds > 0
    # Every layer was compressed once, at its calibrated share, not at every candidate.
    assert [budget.key_shares for budget in stored_budgets] == [(share,) for share in expected]
    assert [keys.shared_basis for keys in backend.keys[0]] == [basis.fingerprint for basis in backend.bases]
    # A second cache on the same model reuses the split: no second measurement.
    again = LocalOffload()
    _offload(model, again, tokenizer=tokenizer, calibration_tokens=TOKENS, calibrate_split=True)
    assert len(split_runs) == 1 and again.cache_key_shares == expected
    # Another budget is another split.
    other = LocalOffload(cache_budget=CacheBudget(3.0))
    _offload(model, other, tokenizer=tokenizer, calibration_tokens=TOKENS, calibrate_split=True)
    assert split_runs == [CacheBudget(), CacheBudget(3.0)] and other.cache_key_shares is not None


def test_by_default_the_split_is_measured_on_every_upload(split_runs, stored_budgets):
    model = tiny_model("llama")
    backend = LocalOffload()
    _offload(model, backend, tokenizer=ByteTokenizer(), calibration_tokens=TOKENS)
    assert split_runs == [] and backend.cache_key_shares is None and backend.bases is not None
    assert [budget.key_shares for budget in stored_budgets] == [DEFAULT_KEY_SHARES] * 2
    # calibration_tokens=0 calibrates nothing: per-sequence bases, the split per upload.
    stored_budgets.clear()
    own = LocalOffload()
    _offload(model, own, tokenizer=ByteTokenizer(), calibration_tokens=0)
    assert split_runs == [] and own.cache_key_shares is None and own.bases is None
    assert [budget.key_shares for budget in stored_budgets] == [DEFAULT_KEY_SHARES] * 2


def test_split_calibration_needs_the_tokenizer_and_wrong_shares_are_refused_first(calibration_runs, split_runs):
    model = tiny_model("llama")
    bases, value_bases = default_calibrated_bases(model, ByteTokenizer(), TOKENS)
    calibration_runs.clear()
    # Bases given, split not: calibrate_split calibrates it, which needs the text's tokenizer.
    with pytest.raises(InvalidInputError, match=r"calibrates the key/value split on shipped calibration text .*"
                       r"cache_key_shares= \(calibrate_key_shares\), or leave calibrate_split False"):
        SvdqOffloadCache(model, LocalOffload(bases=bases, value_bases=value_bases), calibrate_split=True)
    with pytest.raises(InvalidInputError, match="calibrates shared bases and the key/value split"):
        SvdqOffloadCache(model, LocalOffload(), calibrate_split=True)
    with pytest.raises(InvalidInputError, match="calibrates shared bases on shipped"):
        SvdqOffloadCache(model, LocalOffload())
    with pytest.raises(InvalidInputError, match=r"calibrate_split=True .* needs calibration_tokens > 0"):
        SvdqOffloadCache(model, LocalOffload(), tokenizer=ByteTokenizer(), calibration_tokens=0, calibrate_split=True)
    for wrong in ((0.375,), (0.375,) * 3):
        for backend in (LocalOffload(cache_key_shares=wrong), RemoteOffload(None, cache_key_shares=wrong)):
            with pytest.raises(InvalidInputError, match=rf"one share per offloaded layer \(2\), got {len(wrong)}"):
                SvdqOffloadCache(model, backend, tokenizer=ByteTokenizer(), calibration_tokens=TOKENS,
                                 calibrate_split=True)
    with pytest.raises(InvalidInputError, match="cache_key_shares need cache_bits_per_element"):
        SvdqOffloadCache(model, RemoteOffload(None, CodecConfig(), cache_key_shares=(0.375, 0.375)),
                         tokenizer=ByteTokenizer(), calibration_tokens=TOKENS)
    with pytest.raises(InvalidInputError, match="calibrate_split must be True or False, got 'no'"):
        SvdqOffloadCache(model, LocalOffload(), tokenizer=ByteTokenizer(), calibrate_split="no")
    assert calibration_runs == [] and split_runs == []


@pytest.mark.integration
def test_remote_sends_the_calibrated_bases_and_with_calibrate_split_the_split_in_the_profile(shared_server):
    from conftest import TENANT_TOKENS

    model, tokenizer = tiny_model("llama"), ByteTokenizer()
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], timeout=120.0) as client:
        backend = RemoteOffload(client)
        cache = _offload(model, backend, tokenizer=tokenizer, calibration_tokens=TOKENS, calibrate_split=True)
        try:
            profile = client.get_profile(backend.profile_name)
            expected = default_calibrated_bases(model, tokenizer, TOKENS)[0]
            assert [b.fingerprint for b in profile.bases] == [b.fingerprint for b in expected]
            assert profile.cache_bits_per_element == DEFAULT_TOTAL_BITS and profile.codec == DEFAULT_CACHE_KEY_CODEC
            assert profile.value_codec == DEFAULT_VALUE_CODEC
            # The split calibrated on the same text with those bases reached the profile.
            shares = calibrate_key_shares(model, evaluation.calibration_tokens(tokenizer, TOKENS), profile.cache_budget,
                                          profile.bases, profile.value_bases)
            assert profile.cache_key_shares == backend.cache_key_shares == shares and len(shares) == 2
            assert client.describe(backend.sequence_id).num_tokens == cache.offloaded_tokens > 0
        finally:
            cache.close()
        # The default: no shares in the profile, the server measures the split on every upload.
        per_upload = RemoteOffload(client)
        cache = _offload(model, per_upload, tokenizer=tokenizer, calibration_tokens=TOKENS)
        try:
            profile = client.get_profile(per_upload.profile_name)
            assert profile.cache_key_shares is None and profile.cache_bits_per_element == DEFAULT_TOTAL_BITS
            assert per_upload.profile_name != backend.profile_name
            assert client.describe(per_upload.sequence_id).num_tokens == cache.offloaded_tokens
        finally:
            cache.close()


class _ShortTokenizer(ByteTokenizer):
    """Gives only the first 100 tokens of any text."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return super().__call__(text[:100], return_tensors, add_special_tokens)


@pytest.mark.parametrize("options, message", [
    (dict(calibration_tokens=-1), r"calibration_tokens must be an integer >= 0 \(0: per-sequence bases\), got -1"),
    (dict(calibration_tokens=1.5), "calibration_tokens must be an integer >= 0"),
    (dict(calibration_tokens=True), "calibration_tokens must be an integer >= 0"),
    (dict(calibration_tokens=16, tokenizer=ByteTokenizer()), r"must be an integer in 32\.\.16384 .*got 16"),
    (dict(calibration_tokens=20000, tokenizer=ByteTokenizer()), r"must be an integer in 32\.\.16384 .*got 20000"),
    (dict(), r"needs the model itself and its tokenizer for it: pass SvdqOffloadCache\(model, backend, "
             r"tokenizer=tokenizer\).*calibration_tokens=0"),
    (dict(tokenizer=ByteTokenizer(vocab=200), calibration_tokens=TOKENS), "beyond this model's vocabulary of 97"),
    (dict(tokenizer=_ShortTokenizer(), calibration_tokens=TOKENS * 2), r"calibration needs 1\.\.100 tokens of the evaluation text, got 128"),
])
def test_bad_calibration_options_are_refused_before_anything_is_stored(options, message, calibration_runs):
    model = tiny_model("llama")
    backend = LocalOffload()
    with pytest.raises(InvalidInputError, match=message):
        SvdqOffloadCache(model, backend, **options)
    assert backend.bases is None and backend.shape is None and calibration_runs == []


def test_a_config_cannot_be_calibrated_and_settings_errors_come_before_calibration(calibration_runs):
    with pytest.raises(InvalidInputError, match="needs the model itself and its tokenizer"):
        SvdqOffloadCache(tiny_config("llama"), LocalOffload(), tokenizer=ByteTokenizer())
    SvdqOffloadCache(tiny_config("llama"), LocalOffload(), calibration_tokens=0)  # per-sequence: a config suffices
    model = tiny_model("llama")
    bases = default_calibrated_bases(model, ByteTokenizer(), TOKENS)[1]
    calibration_runs.clear()
    with pytest.raises(InvalidInputError, match="value_bases apply to SVDq latent values"):
        SvdqOffloadCache(model, LocalOffload(CodecConfig(), value_bases=bases), tokenizer=ByteTokenizer(),
                         calibration_tokens=TOKENS)
    assert calibration_runs == []


def test_a_remote_budget_without_a_key_codec_takes_the_budgets_own_key_default():
    # As LocalOffload(cache_budget=CacheBudget(bits)): CacheBudget's key_codec default.
    backend = RemoteOffload(None, value_codec=DEFAULT_VALUE_CODEC, cache_bits_per_element=1.75)
    assert backend.codec == CacheBudget(1.75).key_codec == DEFAULT_CACHE_KEY_CODEC
    keys_only = RemoteOffload(None, CodecConfig())
    assert keys_only.codec == CodecConfig() and keys_only.cache_bits_per_element is None
    assert keys_only.value_codec is None
