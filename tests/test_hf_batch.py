"""Batched generation through the offload cache: left padding, one backend sequence per row,
one attend request per layer for all rows, finished rows stop costing, beams refused.

Exactness: with the passthrough codec, ``model.generate`` on a left-padded batch gives the
plain model's tokens for every row (small random models in-process, SmolLM2 through a server).
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import tiny_model
from svdq_client import KVCacheClient
from svdq_client.hf import (
    LocalOffload,
    RemoteOffload,
    StopFinishedRows,
    SvdqOffloadCache,
    disable_offload,
    enable_offload,
)

from svdq.codec import CodecConfig
from svdq.errors import InvalidInputError, NotFoundError

PASSTHROUGH = CodecConfig(method="fp16")
LENGTHS = (20, 13, 7, 17)  # row 2's padding (13 slots) outlasts the first spill of a window of 4


def _left_padded(lengths=LENGTHS, seed=5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 97, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _generate(model, ids, mask, cache=None, **options):
    with torch.no_grad():
        if cache is None:
            return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **options)
        enable_offload(model)
        try:
            return model.generate(ids, attention_mask=mask, cache=cache, do_sample=False, pad_token_id=0, **options)
        finally:
            disable_offload(model)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-sliding-hybrid"])
def test_left_padded_batch_gives_the_plain_tokens_of_every_row(family):
    model = tiny_model(family)
    ids, mask = _left_padded()
    expected = _generate(model, ids, mask, max_new_tokens=12)
    backend = LocalOffload(PASSTHROUGH)
    cache = SvdqOffloadCache(model, backend, window=4, spill_block=3)
    produced = _generate(model, ids, mask, cache, max_new_tokens=12)
    assert torch.equal(produced, expected)
    # Every row is its own sequence holding only its real tokens: the offloaded slots minus its padding.
    padding = [ids.shape[1] - length for length in LENGTHS]
    assert {row: stored[0].num_tokens for row, stored in backend.keys.items()} == {
        row: cache.offloaded_tokens - pad for row, pad in enumerate(padding)}
    # One attend request per offloaded layer and forward pass carried all four rows.
    layers = len(cache.shape.offloaded_layers)
    assert backend.stats.attend_entries == 4 * backend.stats.attend_calls
    assert backend.stats.attend_calls == layers * (produced.shape[1] - ids.shape[1] - 1)


def test_a_row_whose_padding_outlasts_the_first_spill_is_stored_later():
    model = tiny_model("llama")
    ids, mask = _left_padded(lengths=(16, 3))
    backend = LocalOffload(PASSTHROUGH)
    cache = SvdqOffloadCache(model, backend, window=4, spill_block=3)
    with torch.no_grad():
        enable_offload(model)
        try:
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        finally:
            disable_offload(model)
    assert cache.offloaded_tokens == 12 and cache.stored_rows == {0}  # row 1 had only padding in those slots
    produced = _generate(model, ids, mask, SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), window=4,
                                                            spill_block=3), max_new_tokens=10)
    assert torch.equal(produced, _generate(model, ids, mask, max_new_tokens=10))


def test_finished_rows_stop_costing_attention_and_uploads():
    model = tiny_model("llama")
    ids, mask = _left_padded()
    reference = _generate(model, ids, mask, max_new_tokens=12)
    new = reference[:, ids.shape[1]:]
    stop = int(new[1, 2])  # row 1 finishes at its third token (others may too, or later)
    expected = _generate(model, ids, mask, max_new_tokens=12, eos_token_id=stop)
    backend = LocalOffload(PASSTHROUGH)
    cache = SvdqOffloadCache(model, backend, window=4, spill_block=3)
    produced = _generate(model, ids, mask, cache, max_new_tokens=12, eos_token_id=stop,
                         stopping_criteria=[StopFinishedRows(cache, stop)])
    assert torch.equal(produced, expected)
    generated = produced[:, ids.shape[1]:]
    finished_at = [next((step for step, token in enumerate(row.tolist()) if token == stop), None) for row in generated]
    assert finished_at[1] is not None and cache.finished_rows == {r for r, at in enumerate(finished_at) if at is not None}
    # Forward pass j (1-based, after the prefill) feeds generated token j-1: a row that produced
    # the stop token among tokens 0..j-1 is no longer attended.
    passes = generated.shape[1] - 1
    live = [sum(1 for at in finished_at if at is None or at >= step) for step in range(1, passes + 1)]
    assert backend.stats.attend_entries == 2 * sum(live) < 2 * 4 * passes
    # A finished row's sequence no longer grows.
    assert backend.keys[1][0].num_tokens < backend.keys[0][0].num_tokens or finished_at[0] is not None


def test_beam_search_is_refused_and_sampled_return_sequences_get_a_row_each():
    model = tiny_model("llama")
    ids, mask = _left_padded()
    cache = SvdqOffloadCache(model, LocalOffload(PASSTHROUGH), window=4)
    with pytest.raises(InvalidInputError, match="beam search is not supported with the svdq offload cache"):
        _generate(model, ids, mask, cache, max_new_tokens=3, num_beams=2)
    cache.close()
    # generate repeats the prompts before the first forward pass: each copy is a row of its own.
    backend = LocalOffload(PASSTHROUGH)
    cache = SvdqOffloadCache(model, backend, window=4)
    torch.manual_seed(0)
    with torch.no_grad():
        enable_offload(model)
        try:
            produced = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=True,
                                      num_return_sequences=2, pad_token_id=0)
        finally:
            disable_offload(model)
    assert produced.shape[0] == 8 and sorted(backend.keys) == list(range(8))
    with pytest.raises(InvalidInputError, match="num_return_sequences / beams of 2 are not supported"):
        cache.batch_repeat_interleave(2)
    with pytest.raises(InvalidInputError, match="at least one stop token id"):
        StopFinishedRows(cache, [])


@pytest.mark.model
@pytest.mark.integration
def test_remote_batch_of_smollm2_prompts_gives_the_plain_tokens(shared_server):
    from conftest import TENANT_TOKENS
    from svdq_client.models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)  # shared instance: left padding by hand, not on the tokenizer
    prompts = ["The history of the Roman Empire begins with",
               "def add(a, b):",
               "Here is a list of the planets of the solar system, in order from the Sun: Mercury, Venus,"]
    rows = [tokenizer(prompt).input_ids for prompt in prompts]
    width, pad = max(map(len, rows)), tokenizer.eos_token_id
    batch = {"input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows]),
             "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])}
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    with KVCacheClient(shared_server.address, token=TENANT_TOKENS["team-a"], chunk_bytes=1 << 20,
                       timeout=300.0) as client:
        backend = RemoteOffload(client, PASSTHROUGH)
        cache = SvdqOffloadCache(model, backend, window=4, spill_block=3)
        enable_offload(model)
        try:
            with torch.no_grad():
                produced = model.generate(**batch, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        finally:
            disable_offload(model)
        assert torch.equal(produced, expected), (tokenizer.batch_decode(expected), tokenizer.batch_decode(produced))
        for row, length in enumerate(map(len, rows)):
            info = client.describe(backend.sequence_id_of(row))
            assert info.num_tokens == cache.offloaded_tokens - (width - length) > 0
        assert backend.stats.attend_entries == 3 * backend.stats.attend_calls > 0
        cache.close()
        for row in range(3):
            with pytest.raises(NotFoundError):
                client.describe(backend.sequence_id_of(row))
