"""Every model family the offload integration supports, with small random models (no download).

Per family: logits of a prefill, a multi-token chunk and single decode steps through the
offload cache against the plain model (passthrough codec), and exact greedy tokens. Hybrid
models: sliding-window layers stay local and never reach the backend; only full-attention
layers are offloaded, with their own RoPE. What stays unsupported fails with a typed error.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import FAMILIES, tiny_config, tiny_model
from svdq_client.hf import LocalOffload, ModelShape, SvdqOffloadCache, disable_offload, enable_offload
from transformers import GPT2Config, Phi3Config

from svdq.codec import CodecConfig
from svdq.errors import InvalidInputError
from svdq.rope import RopeConfig, inverse_frequencies, layer_ropes

PASSTHROUGH = CodecConfig(method="fp16")


class RecordingOffload(LocalOffload):
    """LocalOffload that records which backend layers were stored and attended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored_layers: set[int] = set()
        self.attended_layers: set[int] = set()
        self.softcaps: set[float | None] = set()

    def store(self, row, keys, values, positions):
        self.stored_layers.update(range(keys.shape[0]))
        super().store(row, keys, values, positions)

    def attend(self, layer, queries, rows, scale, softcap=None):
        self.attended_layers.add(layer)
        self.softcaps.add(softcap)
        return super().attend(layer, queries, rows, scale, softcap)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_plain_logits_and_offloads_only_full_attention_layers(family):
    model = tiny_model(family)
    tokens = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    backend = RecordingOffload(PASSTHROUGH)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits[0]
        expected_prefill = model(input_ids=tokens[:, :24]).logits[0]
        enable_offload(model)
        try:
            cache = SvdqOffloadCache(model, backend, window=5, spill_block=3)
            first = model(input_ids=tokens[:, :24], cache=cache, use_cache=True).logits[0]
            chunk = model(input_ids=tokens[:, 24:36], cache=cache, use_cache=True).logits[0]
            steps = [model(input_ids=tokens[:, index : index + 1], cache=cache, use_cache=True).logits[0]
                     for index in range(36, 40)]
        finally:
            disable_offload(model)
    produced = torch.cat([first, chunk, *steps])
    shape = cache.shape
    full = [index for index, kind in enumerate(shape.layer_types) if kind == "full_attention"]
    assert shape.offloaded_layers == tuple(full)
    if full:
        # Stored and attended: the full-attention layers, all of them, nothing else.
        assert backend.stored_layers == backend.attended_layers == set(range(len(full)))
        assert len(backend.keys[0]) == len(full)
        assert cache.offloaded_tokens == 34 and backend.keys[0][0].num_tokens == 34
    else:  # every layer slides (Mistral with a window): nothing to offload, the backend is unused
        assert cache.offloaded_tokens == 0 and not backend.stored_layers and not backend.attended_layers
    for index, layer in enumerate(cache.layers):
        if index not in full:  # sliding layers hold their window only
            assert layer.keys.shape[-2] < shape.sliding_window
    # The prefill is the model's own SDPA attention: bit for bit the plain model on the same
    # tokens; transformers runs Gemma 2 with eager attention, and softcapped scores take an
    # exact blocked softmax here (float32 rounding apart).
    if family.startswith("gemma2"):
        torch.testing.assert_close(first, expected_prefill, atol=1e-5, rtol=0)
    else:
        assert torch.equal(first, expected_prefill)
    # Later tokens read the offloaded prefix, whose keys and values passthrough stores as
    # float16 (relative rounding 2**-11); measured max deviation ~1e-3 at logits std ~0.8.
    torch.testing.assert_close(produced[24:], expected[24:], atol=4e-3, rtol=0)
    assert torch.equal(produced.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_tokens_equal_the_plain_model_with_passthrough(family):
    model = tiny_model(family)
    prompt = torch.randint(3, 97, (1, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        enable_offload(model)
        try:
            cache = SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), window=4, spill_block=3)
            produced = model.generate(prompt, cache=cache, max_new_tokens=16, do_sample=False, pad_token_id=0)
        finally:
            disable_offload(model)
    assert torch.equal(produced, expected)
    assert cache.offloaded_tokens >= (17 if cache.offload_layers else 0)


def test_gemma2_softcap_reaches_the_backend_and_matters():
    """Every real Gemma 2 checkpoint softcaps its attention logits: the offloaded part gets the
    model's cap, and the cap changes the logits far beyond the tolerance of the family test."""
    model = tiny_model("gemma2-softcap")
    tokens = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    backend = RecordingOffload(PASSTHROUGH)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits[0]
        uncapped = tiny_model("gemma2-softcap", attn_logit_softcapping=None)(input_ids=tokens).logits[0]
        enable_offload(model)
        try:
            cache = SvdqOffloadCache(model, backend, window=4, spill_block=2)
            first = model(input_ids=tokens[:, :20], cache=cache, use_cache=True).logits[0]
            rest = [model(input_ids=tokens[:, index : index + 1], cache=cache, use_cache=True).logits[0]
                    for index in range(20, 30)]
        finally:
            disable_offload(model)
    assert backend.softcaps == {2.0} and backend.attended_layers == {0}
    produced = torch.cat([first, *rest])
    torch.testing.assert_close(produced, expected, atol=4e-3, rtol=0)
    assert (uncapped - expected).abs().max() > 0.1


def test_gemma3_full_attention_layers_get_their_own_rope():
    config = tiny_config("gemma3")
    with pytest.raises(InvalidInputError, match="different RoPE per layer type.*pass layer_type"):
        RopeConfig.from_hf_config(config)
    full = RopeConfig.from_hf_config(config, layer_type="full_attention")
    sliding = RopeConfig.from_hf_config(config, layer_type="sliding_attention")
    assert (full.theta, full.scaling, full.factor) == (1e6, "linear", 8.0)
    assert (sliding.theta, sliding.scaling) == (1e4, "none")
    assert layer_ropes(config) == (sliding, full, sliding)
    assert ModelShape.from_config(config).rope == full
    # The same frequencies as the model's own rotary embedding, per layer type.
    rotary = tiny_model("gemma3").model.rotary_emb
    for kind, rope in (("full_attention", full), ("sliding_attention", sliding)):
        torch.testing.assert_close(inverse_frequencies(rope, 256), getattr(rotary, f"{kind}_inv_freq"), rtol=1e-6, atol=0)
    with pytest.raises(InvalidInputError, match="no entry for layer type 'chunked_attention'"):
        RopeConfig.from_hf_config(config, layer_type="chunked_attention")
    # A single RoPE for every layer answers any layer type.
    assert RopeConfig.from_hf_config(tiny_config("llama"), layer_type="sliding_attention").theta == 1e4


@pytest.mark.parametrize(
    "config, message",
    [
        (GPT2Config(n_layer=2, n_head=2, n_embd=32), "model_type 'gpt2' is not supported"),
        (Phi3Config(num_hidden_layers=2, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 48, "long_factor": [1.0] * 48,
            "original_max_position_embeddings": 4096}, max_position_embeddings=131072),
         "rope type 'longrope' is not supported"),
    ],
    ids=["gpt2", "phi3-longrope"],
)
def test_unsupported_models_are_refused(config, message):
    with pytest.raises(InvalidInputError, match=message):
        SvdqOffloadCache(config, LocalOffload(PASSTHROUGH))


def test_local_attention_off_the_cpu_matches_the_fused_cpu_kernel(monkeypatch):
    """The two ways of getting the local output and log-sum-exp (fused CPU kernel; SDPA plus
    exact scores elsewhere) agree, with padding and a causal band, across query blocks."""
    import math

    import svdq_client.hf as hf

    monkeypatch.setattr(hf, "_QUERY_BLOCK", 3)
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 4, 7, 16, generator=generator)
    key, value = torch.randn(2, 4, 11, 16, generator=generator), torch.randn(2, 4, 11, 16, generator=generator)
    visible = hf._visible(None, 7, 11, torch.device("cpu")).expand(2, 1, 7, 11).clone()
    visible[1, :, :, :3] = False  # row 1: three padded slots
    fused = hf._fused_cpu_attention(query, key, value, visible, 0.25)
    blocked = hf._sdpa_attention_with_lse(query, key, value, visible, 0.25)
    scores = (query @ key.transpose(2, 3) * 0.25).masked_fill(~visible, -math.inf)
    for output, lse in (fused, blocked):
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=0)
        torch.testing.assert_close(output, torch.softmax(scores, -1) @ value, atol=1e-5, rtol=0)


def test_softcapped_local_attention_is_exact_across_query_blocks(monkeypatch):
    """The local part with softcapping: the capped softmax and its log-sum-exp in blocks of
    queries, with padding; a query that sees nothing gets output 0 and lse -inf (no NaN)."""
    import math

    import svdq_client.hf as hf

    monkeypatch.setattr(hf, "_QUERY_BLOCK", 3)
    generator = torch.Generator().manual_seed(8)
    query = 4.0 * torch.randn(2, 4, 7, 16, generator=generator)
    key, value = torch.randn(2, 4, 11, 16, generator=generator), torch.randn(2, 4, 11, 16, generator=generator)
    visible = hf._visible(None, 7, 11, torch.device("cpu")).expand(2, 1, 7, 11).clone()
    visible[1, :, :, :3] = False
    visible[1, :, 0] = False  # row 1's first query is padding: it sees no key
    output, lse = hf._softcapped_attention(query, key, value, visible, 0.25, 1.5)
    scores = (1.5 * torch.tanh(query @ key.transpose(2, 3) * 0.25 / 1.5)).masked_fill(~visible, -math.inf)
    seen = visible[:, 0].any(-1)  # [B, q]
    expected_lse = torch.logsumexp(scores, -1)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ value
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    assert torch.isneginf(lse[1, :, 0]).all() and not seen[1, 0] and torch.equal(output[1, :, 0], torch.zeros(4, 16))
    # The cap bites at these scores: without it the output differs.
    plain = torch.softmax((query @ key.transpose(2, 3) * 0.25).masked_fill(~visible, -math.inf), -1)
    assert (torch.nan_to_num(plain) @ value - expected).abs().max() > 0.05
