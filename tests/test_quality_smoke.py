"""Smoke run of bench/quality.py on the real model: short prefix, a few methods.

The full benchmark is not a unit test (about 20-30 minutes); this checks that it runs end to
end and that its numbers are sane: the fp16 passthrough leaves the NLL unchanged, bits per
element are what the serialized blobs weigh, RoPE is undone exactly, and the harness's
attention plug point really replaces the model's attention.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402
from svdq_client import evaluation as harness  # noqa: E402

import svdq  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # On a shared CI machine multi-threaded small LAPACK calls (the basis eigh) stall for
    # seconds; one thread is faster there. Restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    from svdq_client.models import load_smollm2

    return load_smollm2(torch.float32)


def _table_rows(output: str) -> dict[str, list[str]]:
    """First table's rows by method name (later tables repeat names; the first one wins)."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 9 and cells[0] != "method" and not cells[0].isdigit():
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_smoke_run_prints_sane_table(smollm2, capsys):
    assert quality.main(["--smoke", "--threads", "1"]) == 0
    output = capsys.readouterr().out
    rows = _table_rows(output)
    assert {"fp32 cache (reference)", "fp16 K and V", "kivi 2-bit K and V g32", "keys svdq 1.5, values fp16",
            "svdq cache 2.0 bits, shared"} <= set(rows)

    bases, key_bits, value_bits, total, ratio, key_error, value_error, dnll, needle = rows["fp16 K and V"]
    # fp16 passthrough: 16 bits plus a ~60-byte header per layer, NLL change only from rounding.
    assert 16.0 <= float(key_bits) < 16.05 and 16.0 <= float(value_bits) < 16.05
    assert abs(float(dnll)) < 2e-3
    assert float(key_error) < 1e-3 and float(value_error) < 1e-3
    assert needle == rows["fp32 cache (reference)"][-1]

    bases, key_bits, value_bits, total, ratio, key_error, value_error, dnll, needle = rows["svdq cache 2.0 bits, shared"]
    # Shared rows name the calibration text, which lies after the scored window.
    calibration = re.search(r"text tokens (\d+)-(\d+)", bases)
    prefix, continuation = (int(x) for x in re.search(r"prefix (\d+) tokens.*continuation (\d+)", output).groups())
    assert calibration and int(calibration.group(1)) >= prefix + continuation
    assert float(total) == pytest.approx((float(key_bits) + float(value_bits)) / 2, abs=1e-3)
    assert math.isclose(float(ratio.rstrip("x")), 16.0 / float(total), rel_tol=2e-3)
    assert 0.0 < float(key_error) < 0.6 and 0.0 < float(value_error) < 0.8
    assert math.isfinite(float(dnll)) and abs(float(dnll)) < 0.5
    # kivi 2-bit g32 keys, from the format's layout (svdq/format.py): header, RoPE, widths, 4 fp16
    # sinks, fp16 scale and min per channel and group, 2-bit codes, fp16 tail, CRC; its values
    # per token: 2-bit codes plus an fp16 scale and min per 32 channels, 22 bytes of header and CRC.
    tokens = prefix
    channels, sinks = 3 * 64, 4
    groups = (tokens - sinks) // 32
    tail = tokens - sinks - 32 * groups
    layer_bytes = (28 + 28 + channels // 2 + 2 * channels * sinks + 4 * groups * channels
                   + groups * 32 * channels * 2 // 8 + 2 * channels * tail + 4)
    kivi = rows["kivi 2-bit K and V g32"]
    assert float(kivi[1]) == pytest.approx(8 * layer_bytes / (tokens * channels), abs=1e-3)
    value_bytes = 22 + tokens * 3 * (64 * 2 // 8 + 4 * 2)
    assert float(kivi[2]) == pytest.approx(8 * value_bytes / (tokens * channels), abs=1e-3)

    match = re.search(r"undo\+apply ([0-9.e+-]+), undo vs k_proj outputs ([0-9.e+-]+)", output)
    assert match and float(match.group(1)) < 1e-5 and float(match.group(2)) < 1e-5
    assert "## Short prompt: prefix 256 tokens" in output
    for path in ("memory copy (keys.clone)", "keys fp16 passthrough", "keys svdq 1.5 bits, own basis",
                 "keys svdq 1.5 bits, shared basis", "values svdq 2.5 bits"):
        assert f"| 1024 | {path} |" in output, path


def test_bits_per_element_are_serialized_bytes(smollm2):
    model, tokenizer = smollm2
    prefix = harness.prefill(model, harness.text_tokens(tokenizer, 200, start=1000))
    rope = svdq.RopeConfig.from_hf_config(model.config)
    method = quality.Method("svdq", svdq.CodecConfig(bits_per_element=2.0, group_size=32),
                            values=quality.latent_values(2.5))
    stats = quality.KeyStats()
    transform, value_transform = quality.cache_transforms(method, rope, stats, prefix)
    outputs = []
    for layer, keys in enumerate(prefix.keys):
        outputs.append(transform(layer, keys, prefix.positions))
        value_transform(layer, prefix.values[layer], prefix.positions)

    expected_bytes = sum(
        len(svdq.to_bytes(svdq.compress(keys, method.config, positions=prefix.positions, rope=rope,
                                        key_space="post_rope")))
        for keys in prefix.keys
    )
    expected_value_bytes = sum(len(quality.values_to_bytes(quality.compress_values(values, method.values)))
                               for values in prefix.values)
    elements = sum(keys.numel() for keys in prefix.keys)
    assert stats.serialized_bytes == expected_bytes and stats.value_bytes == expected_value_bytes
    assert stats.bits_per_element == pytest.approx(8 * expected_bytes / elements)
    assert stats.total_bits_per_element == pytest.approx(4 * (expected_bytes + expected_value_bytes) / elements)
    assert stats.blobs_checked == len(prefix.keys) == model.config.num_hidden_layers
    errors = [svdq.relative_error(keys, out) for keys, out in zip(prefix.keys, outputs, strict=True)]
    assert stats.layer_errors == pytest.approx(errors, rel=1e-6)
    assert 0 < stats.value_relative_error < 1
    # The reference prefix must not be touched by a method's run.
    again = harness.prefill(model, prefix.input_ids)
    for before, after in zip(prefix.keys, again.keys, strict=True):
        assert torch.equal(before, after)


def test_attention_plug_point_replaces_attention(smollm2):
    model, tokenizer = smollm2
    ids = harness.text_tokens(tokenizer, 160, start=2000)
    prefix = harness.prefill(model, ids[:, :128])
    continuation = ids[:, 128:]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layers_seen: list[int] = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        layers_seen.append(module.layer_idx)
        assert key.shape[2] == prefix.num_tokens + continuation.shape[1]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def zero_attention(module, query, key, value, attention_mask, **kwargs):
        return torch.zeros_like(query).transpose(1, 2), None

    plain = harness.continuation_nll(model, prefix, continuation)
    plugged = harness.continuation_nll(model, prefix, continuation, attention=counting_sdpa)
    broken = harness.continuation_nll(model, prefix, continuation, attention=zero_attention)
    assert sorted(set(layers_seen)) == list(range(model.config.num_hidden_layers))
    assert plugged == pytest.approx(plain, abs=1e-4)
    assert broken > plain + 0.5
    # The override is scoped: afterwards the model runs its own attention again.
    assert harness.continuation_nll(model, prefix, continuation) == pytest.approx(plain, abs=1e-6)


def test_needle_cases_hide_the_number_at_the_requested_depth(smollm2):
    _, tokenizer = smollm2
    cases = harness.needle_cases(tokenizer, 1024, count=3)
    assert len({case.answer for case in cases}) == 3
    for case in cases:
        total = case.prefix_ids.shape[1] + case.question_ids.shape[1]
        assert abs(total - 1024) <= 2
        text = tokenizer.decode(case.prefix_ids[0])
        assert f"The special magic number for {case.key} is: {case.answer}." in text
        assert case.key in tokenizer.decode(case.question_ids[0])
        where = text.index(case.answer) / len(text)
        assert abs(where - case.depth) < 0.1
    assert harness.needle_found(f" {cases[0].answer}.", cases[0])
    wrong = str(int(cases[0].answer) % 9_000_000 + 1_000_001)
    assert not harness.needle_found(f" {wrong}.", cases[0])
    assert not harness.needle_found(" I do not know.", cases[0])


def test_shared_bases_fitted_on_evaluated_text_stop_the_run(smollm2):
    """The default calibration window is the end of the text: a prefix reaching into it is
    refused before anything is prefilled; a prose haystack from the same tokens is refused too."""
    _, tokenizer = smollm2
    stop = harness.calibration_window(tokenizer, 2048)[1]
    with pytest.raises(SystemExit, match=r"the scored prefix and continuation \(text tokens 0-\d+\) overlaps the "
                                         r"shared bases' calibration text \(text tokens \d+-\d+ \(the integration's"):
        quality.main(["--calibration", "default", "--prefix-tokens", str(stop - 1024), "--continuation-tokens", "512",
                      "--threads", "1"])
    case = harness.needle_cases(tokenizer, 512, depths=[0.0], count=1, filler="prose")[0]
    start, end = case.text_window
    # The haystack is that window of the text (the needle at depth 0 leaves its end as it was).
    assert torch.equal(case.prefix_ids[0, -32:], harness.text_tokens(tokenizer, 32, start=end - 32)[0])
    bases = quality.Bases((), (), f"text tokens {start + 10}-{start + 20}", (start + 10, start + 20))
    with pytest.raises(SystemExit, match="overlaps the shared bases' calibration text"):
        bases.refuse_overlap(start, end, "the haystack")
    bases.refuse_overlap(0, start + 10, "text before the window")  # touching is not overlapping
