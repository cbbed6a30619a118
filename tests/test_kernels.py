"""Triton decode-attention kernels against the torch reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (scripts/test.sh sets it when there
is no GPU); the ``gpu``-marked copies run the same cases on a CUDA device. Shapes are small
and odd (67 tokens, 3 KV heads, GQA 3). Every triton call is checked to have run the kernels:
the torch path is made to fail while it runs. Tolerance is tied to the dtype: the kernel's error
against the float32 reference may be at most twice the error of plain PyTorch attention
computed in float16 on the same reconstructed keys, plus a floor for float32 rounding.
The launcher fills every output and partial buffer with NaN before the kernels run, so an
element a kernel forgot to write shows up as NaN here.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import allowed_mask

import svdq.attention as attention_module
from svdq import CodecConfig, RopeConfig, apply_rope, compress, decompress
from svdq.attention import (
    SparsityConfig,
    attend,
    body_range,
    rotates,
    score_latent,
    select_body_tokens,
    select_body_tokens_many,
    token_scores,
)
from svdq.rope import inverse_frequencies
from svdq.values import ValueConfig, compress_values, decompress_values

# Oracles at float32 tolerances: the float32 products (conftest.exact_attention).
pytestmark = pytest.mark.usefixtures("exact_attention")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def bundled_cuda_tools() -> bool:
    """Whether the installed triton ships ptxas and cuobjdump (found without importing it)."""
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                                   reason="needs a CUDA device (without the interpreter)")]),
]
ALL_WIDTHS = (8, 7, 6, 5, 4, 3, 2, 1)  # one channel group at every width the codec allows
ROPE = RopeConfig(theta=10000.0)


def structured_keys(tokens, kv_heads, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = kv_heads * head_dim
    factors = torch.randn(tokens, 6, generator=generator) * torch.linspace(4, 1, 6)
    keys = factors @ torch.randn(6, channels, generator=generator) + 0.05 * torch.randn(tokens, channels, generator=generator)
    return keys.reshape(tokens, kv_heads, head_dim)


#: SVDq latent values: sinks, token group and tail differ from the keys' (3 sinks, groups of
#: 16), so key tokens of the body have 16-bit values and the other way round.
LATENT_VALUES = CodecConfig(bits_per_element=3.0, group_size=8, num_sinks=2)


def make_sequence(tokens=67, kv_heads=3, head_dim=64, method="svdq", schedule=ALL_WIDTHS, value_bits=None,
                  rope=ROPE, key_space="pre_rope", dtype=torch.float16, seed=0, group_size=16, value_codec=None,
                  exact_tokens=0):
    pre = structured_keys(tokens, kv_heads, head_dim, seed)
    keys = apply_rope(pre, torch.arange(tokens), rope) if key_space == "post_rope" else pre
    extra = {"schedule": schedule, "exact_tokens": exact_tokens} if method == "svdq" else {}
    compressed = compress(keys.to(dtype), CodecConfig(method=method, group_size=group_size, num_sinks=3, **extra),
                          rope=rope, key_space=key_space)
    if value_codec is not None:
        # Values with a decaying spectrum, as real ones have: the latent keeps a few channels.
        values = structured_keys(tokens, kv_heads, head_dim, seed + 11).to(dtype)
        return compressed, compress_values(values, ValueConfig(codec=value_codec))
    generator = torch.Generator().manual_seed(seed + 11)
    values = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype)
    return compressed, compress_values(values, ValueConfig(bits=value_bits, group_size=32))


def kernel_operand_keys(key):
    """float32 post-RoPE keys as the kernel's operands make them: each body token rebuilt from
    its dequantized latent rounded to float16 (``latent.to(tl.float16)`` times the float16
    basis, float32 sums), exact tokens and the 16-bit sinks and tail as stored. A large
    latent channel's float16 rounding moves a score more than rounding the key itself."""
    keys = decompress(key, "pre_rope", torch.float32).reshape(key.num_tokens, -1)
    start, n_body = body_range(key)
    if key.method != "fp16" and n_body:
        exact = keys[key.exact_index].clone()
        latent = attention_module._dequantized(key, None).half().float()
        keys[start:start + n_body] = latent @ key.basis.float().T + key.mean.float()
        keys[key.exact_index] = exact
    keys = keys.view(key.num_tokens, key.kv_heads, key.head_dim)
    return apply_rope(keys, key.token_positions(), key.rope) if rotates(key) else keys


def half_precision_error(queries, keys, values, scale, sparsity, reference, softcap=None):
    """Max error of float16 PyTorch attention (same tokens, keys rebuilt from float16 latent
    operands as the kernel's are: :func:`kernel_operand_keys`) against the reference."""
    errors_out, errors_lse = [], []
    for b, (key, value) in enumerate(zip(keys, values, strict=True)):
        post = kernel_operand_keys(key).half()
        dense_values = decompress_values(value, torch.float32).half()
        ratio = queries.shape[1] // key.kv_heads
        allowed = allowed_mask(select_body_tokens(queries[b].float(), key, sparsity), key)
        scores = torch.einsum("hd,shd->hs", queries[b].half(), post.repeat_interleave(ratio, 1)) * torch.tensor(
            scale, dtype=torch.float16)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~allowed.repeat_interleave(ratio, 0), -math.inf)
        out = torch.einsum("hs,shd->hd", torch.softmax(scores, -1), dense_values.repeat_interleave(ratio, 1))
        errors_out.append((out.float() - reference.output[b].cpu()).abs().max())
        errors_lse.append((torch.logsumexp(scores.float(), -1) - reference.lse[b].cpu()).abs().max())
    return float(max(errors_out)), float(max(errors_lse))


def check_against_reference(queries, keys, values, device, scale=None, sparsity=None, softcap=None):
    # float32: the exact path on every CPU (the default precision depends on the CPU)
    reference = attend(queries, keys, values, scale=scale, sparsity=sparsity, backend="torch", softcap=softcap,
                       precision="float32")
    moved_keys = [k.to(device) for k in keys]
    moved_values = [v.to(device) for v in values]
    with mock.patch("svdq.attention._attend_torch", side_effect=AssertionError("the triton call took the torch path")):
        result = attend(queries.to(device), moved_keys, moved_values, scale=scale, sparsity=sparsity,
                        backend="triton", softcap=softcap)
    output, lse = result.output.cpu(), result.lse.cpu()
    assert not output.isnan().any() and not lse.isnan().any(), "kernel left elements unwritten"
    softmax_scale = scale or 1 / math.sqrt(queries.shape[-1])
    bound_out, bound_lse = half_precision_error(queries, keys, values, softmax_scale, sparsity, reference, softcap)
    assert (output - reference.output).abs().max() <= 2 * bound_out + 1e-5
    assert (lse - reference.lse).abs().max() <= 2 * bound_lse + 1e-5
    assert [s.key_bytes_read for s in result.stats] == [s.key_bytes_read for s in reference.stats]
    return result


SPARSE = SparsityConfig(keep_fraction=0.3, chunk_size=8, num_recent=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_bits", [None, 2, 4])
@pytest.mark.parametrize("sparsity", [None, SPARSE], ids=["dense", "sparse"])
def test_every_width_every_value_format_dense_and_sparse(device, value_bits, sparsity):
    first = make_sequence(value_bits=value_bits)
    second = make_sequence(tokens=45, value_bits=value_bits, seed=2)
    queries = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    result = check_against_reference(queries, [first[0], second[0]], [first[1], second[1]], device,
                                     sparsity=sparsity)
    if sparsity is not None:
        assert result.stats[0].tokens_attended < result.stats[0].tokens_total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,kv_heads,ratio", [(128, 2, 1), (256, 1, 8), (64, 1, 5)])
def test_head_dims_and_gqa_ratios(device, head_dim, kv_heads, ratio):
    keys, values = make_sequence(tokens=51, kv_heads=kv_heads, head_dim=head_dim, schedule=(8, 4, 2, 1, 0, 0, 0, 0))
    queries = torch.randn(1, kv_heads * ratio, head_dim, generator=torch.Generator().manual_seed(1))
    check_against_reference(queries, [keys], [values], device, scale=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_baselines_rope_styles_and_mixed_batch(device):
    sequences = [
        make_sequence(method="kivi", key_space="post_rope", value_bits=4, seed=3),
        make_sequence(method="fp16", seed=4),
        make_sequence(rope=RopeConfig(theta=500000.0, style="interleaved", rotary_dim=32), seed=6,
                      dtype=torch.bfloat16),
        make_sequence(method="kivi", seed=7),
    ]
    queries = torch.randn(len(sequences), 3, 64, generator=torch.Generator().manual_seed(2))
    for sequence in sequences:  # each layout alone
        check_against_reference(queries[:1], [sequence[0]], [sequence[1]], device)
    check_against_reference(queries[:2], [s[0] for s in sequences[:2]], [s[1] for s in sequences[:2]], device)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_uses_several_splits_and_sparse_indices(device):
    keys, values = make_sequence(tokens=700, kv_heads=1, group_size=32, schedule=(8, 4, 2, 1, 1, 0, 0, 0), seed=9)
    queries = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(3))
    check_against_reference(queries, [keys], [values], device)
    check_against_reference(queries, [keys], [values], device,
                            sparsity=SparsityConfig(keep_fraction=1 / 8, chunk_size=16, num_recent=32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,kv_heads,ratio", [(64, 3, 3), (128, 2, 2)])
@pytest.mark.parametrize("sparsity", [None, SPARSE], ids=["dense", "sparse"])
def test_latent_values_dense_and_sparse(device, head_dim, kv_heads, ratio, sparsity):
    first = make_sequence(kv_heads=kv_heads, head_dim=head_dim, value_codec=LATENT_VALUES)
    second = make_sequence(tokens=45, kv_heads=kv_heads, head_dim=head_dim, seed=2,
                           value_codec=CodecConfig(bits_per_element=2.0, group_size=16, num_sinks=5))
    assert first[1].latent.kept_bits.numel() != second[1].latent.kept_bits.numel()  # per-sequence widths
    queries = torch.randn(2, kv_heads * ratio, head_dim, generator=torch.Generator().manual_seed(6))
    check_against_reference(queries, [first[0], second[0]], [first[1], second[1]], device, sparsity=sparsity)


@pytest.mark.parametrize("device", DEVICES)
def test_latent_values_over_several_splits_and_mixed_value_formats(device):
    long = make_sequence(tokens=700, kv_heads=1, group_size=32, schedule=(8, 4, 2, 1, 1, 0, 0, 0), seed=9,
                         value_codec=LATENT_VALUES)
    queries = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(3))
    check_against_reference(queries, [long[0]], [long[1]], device)
    check_against_reference(queries, [long[0]], [long[1]], device,
                            sparsity=SparsityConfig(keep_fraction=1 / 8, chunk_size=16, num_recent=32))
    # One batch, three launches: latent values beside 16-bit values and beside bfloat16 latent
    # values (16-bit rows in bfloat16) over kivi keys.
    latent, plain = make_sequence(value_codec=LATENT_VALUES), make_sequence(tokens=45, seed=2)
    kivi = make_sequence(tokens=51, method="kivi", dtype=torch.bfloat16, seed=4, value_codec=LATENT_VALUES)
    assert kivi[1].storage_dtype == torch.bfloat16
    queries = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(7))
    check_against_reference(queries, [latent[0], plain[0], kivi[0]], [latent[1], plain[1], kivi[1]], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [None, SPARSE], ids=["dense", "sparse"])
def test_exact_key_tokens_score_with_their_rows(device, sparsity):
    exact = make_sequence(exact_tokens=6, value_codec=LATENT_VALUES)
    plain = make_sequence(tokens=45, seed=2, value_codec=LATENT_VALUES)
    assert exact[0].num_exact == 6 and not plain[0].num_exact
    queries = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(9))
    result = check_against_reference(queries, [exact[0], plain[0]], [exact[1], plain[1]], device, sparsity=sparsity)
    # The exact rows matter here: without them (their tokens' reconstruction instead) the
    # kernel's answer moves further from the reference than its tolerance.
    dropped = copy.copy(exact[0])
    dropped.exact_index, dropped.exact_rows = exact[0].exact_index[:0], exact[0].exact_rows[:0]
    dropped._cache = {}
    without = attend(queries[:1], [dropped], [exact[1]], sparsity=sparsity, backend="torch")
    assert (without.output[0] - result.output[0].cpu()).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [None, SPARSE], ids=["dense", "sparse"])
def test_softcap(device, sparsity):
    first, second = make_sequence(value_bits=4), make_sequence(tokens=45, seed=2, value_codec=LATENT_VALUES)
    queries = 4 * torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(10))
    capped = check_against_reference(queries, [first[0], second[0]], [first[1], second[1]], device,
                                     sparsity=sparsity, softcap=2.0)
    plain = attend(queries, [first[0], second[0]], [first[1], second[1]], sparsity=sparsity, backend="torch")
    assert (plain.lse - capped.lse.cpu()).abs().max() > 0.1  # the cap binds at these scores


def score_oracle(queries, keys, score_channels, tokens):
    """float64 ``q . RoPE_t(k_t)`` over the score channels' low-rank keys, written out."""
    channels, latent = score_latent(keys, score_channels)
    columns = torch.cat([keys.basis.double()[:, channels], keys.mean.double()[:, None]], dim=1).T
    low_rank = (latent[:tokens].double() @ columns).reshape(tokens, keys.kv_heads, keys.head_dim)
    if rotates(keys):
        start, _ = body_range(keys)
        positions = keys.token_positions()[start:start + tokens].double()
        rotary = keys.rope.dims(keys.head_dim)
        angles = positions[:, None] * inverse_frequencies(keys.rope, keys.head_dim).double()[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        if keys.rope.style == "half":
            first, second = slice(0, rotary // 2), slice(rotary // 2, rotary)
        else:
            first, second = slice(0, rotary, 2), slice(1, rotary, 2)
        rotated = low_rank.clone()
        rotated[..., first] = low_rank[..., first] * cos - low_rank[..., second] * sin
        rotated[..., second] = low_rank[..., second] * cos + low_rank[..., first] * sin
        low_rank = rotated
    group = queries.shape[1] // keys.kv_heads
    return torch.einsum("thd,nhd->tnh", low_rank.repeat_interleave(group, 1), queries.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(tokens=67, kv_heads=3, head_dim=64, ratio=3, queries=1, score_channels=32),
    dict(tokens=67, kv_heads=3, head_dim=64, ratio=3, queries=5, score_channels=4),
    dict(tokens=130, kv_heads=2, head_dim=128, ratio=1, queries=3, score_channels=64),
    dict(tokens=51, kv_heads=1, head_dim=256, ratio=8, queries=9, score_channels=7),
    dict(tokens=45, kv_heads=3, head_dim=64, ratio=2, queries=2, score_channels=16,
         rope=RopeConfig(theta=500000.0, style="interleaved", rotary_dim=32)),
    dict(tokens=67, kv_heads=3, head_dim=64, ratio=3, queries=2, score_channels=8, method="kivi",
         key_space="post_rope"),
], ids=["gqa3", "five-queries-4-channels", "d128", "d256-gqa8", "interleaved-partial", "kivi-post-rope"])
def test_token_scores_kernel_matches_the_torch_reference(device, case):
    from svdq.kernels.token_scores import token_scores_triton  # triton only where kernels run

    case = dict(case)
    ratio, count, score_channels = case.pop("ratio"), case.pop("queries"), case.pop("score_channels")
    keys, _ = make_sequence(**case)
    start, n_body = body_range(keys)
    tokens = n_body - 5  # a prefix of the body, as the selection scores its candidates
    queries = torch.randn(count, keys.kv_heads * ratio, keys.head_dim, generator=torch.Generator().manual_seed(8))
    oracle = score_oracle(queries, keys, score_channels, tokens)
    reference = token_scores(queries, keys, score_channels, tokens)
    kernel = token_scores_triton(queries.to(device), keys.to(device), score_channels, tokens).cpu()
    assert kernel.shape == reference.shape == (tokens, count, keys.kv_heads * ratio)
    assert not kernel.isnan().any(), "kernel left scores unwritten"
    # float32 both: the kernel may be at most twice as far from the float64 oracle as the
    # torch reference is, plus a float32 rounding floor of the scores' size.
    torch_error = (reference.double() - oracle).abs().max()
    floor = 1e-6 * oracle.abs().max()
    assert (kernel.double() - oracle).abs().max() <= 2 * torch_error + floor


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_selection_with_the_kernel_score_picks_the_reference_chunks(device):
    keys, _ = make_sequence(tokens=700, kv_heads=2, group_size=32, schedule=(8, 4, 2, 1, 1, 0, 0, 0), seed=9)
    queries = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(4))
    sparsity = SparsityConfig(keep_fraction=1 / 8, chunk_size=16, num_recent=32)
    reference = select_body_tokens_many(queries, keys, sparsity)
    kernel = select_body_tokens_many(queries.to(device), keys.to(device), sparsity, backend="triton")
    for expected, got in zip(reference, kernel, strict=True):
        assert got.token_index is not None
        assert torch.equal(got.token_index.cpu(), expected.token_index)


@pytest.mark.slow
@pytest.mark.skipif(not bundled_cuda_tools(), reason="no triton with its CUDA toolchain (ptxas, cuobjdump) installed")
def test_latent_value_kernels_compile_for_sm_90():
    """The interpreter never lowers a kernel: compile the latent-value launches (with exact key
    tokens and softcap, dense and sparse) for sm_90 as a GPU would, without one. About two
    minutes on a cold Triton cache, seconds when the kernels did not change."""
    done = subprocess.run([sys.executable, "bench/aot_compile.py", "--quick", "--values", "latent"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| _")]
    assert {row.split(" | ")[0][2:] for row in rows} == {
        "_decode_attention_kernel", "_latent_values_kernel", "_reduce_splits_kernel"}
    assert all("REG:" in row for row in rows)
