"""One table of the GPU numbers issue 12 asks for, measured in one process on one device.

Rows, each beside the target it is checked against:

* decode attention at ``--tokens`` (default 32k) with Llama-3-8B shapes (32 query heads,
  8 KV heads x 128), batch 1 and 16: dense fp16 SDPA over uncompressed keys and values, then
  :func:`svdq.attention.attend` dense and sparse 1/32 over SVDq keys (1.5 bits) with 16-bit
  values, the same keys with SVDq latent values (the default value codec, 2.5 bits: 2.0 bits
  per KV element together), which the kernels sum over their codes, and the whole cache
  compressed by :func:`svdq.kv.compress_kv` at 2.0 bits per KV element; ratios against SDPA
  fp16 of the same batch (targets: dense <= 1.2x, sparse >= 5x faster, i.e. <= 0.2x), the
  latent-value row also against the 16-bit-value row of the same path and keys (issue 14: no
  slower than over 16-bit values);
* compress of one layer's fp16 keys (8 x 128, ``--tokens``), with the sequence's own basis
  and with a shared basis: GB/s of fp16 keys read, against the device's memory bandwidth
  measured here with a copy (bytes read + written per second) (target: >= 50%); and
  ``compress_kv`` of the layer's keys and values at 2.0 bits (every candidate split of the
  budget compressed and scored): GB/s of fp16 keys + values read (no target set).

Values are synthetic like the keys (a decaying spectrum, no RoPE), so the latent keeps a
realistic number of channels; their content does not change the 16-bit rows' timing.

``--device cpu --tokens 512 --repeats 1`` runs the same code on the CPU in seconds (the
attend rows then take the torch backend), so the script can be checked without a GPU;
``bench/gpu_check.sh --dry-run`` does exactly that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from svdq import Basis, CodecConfig, compress, fit_layer_basis, to_bytes
from svdq.attention import SparsityConfig, attend, select_backend
from svdq.kv import CacheBudget, CompressedCache, compress_kv
from svdq.rope import apply_rope
from svdq.values import DEFAULT_VALUE_CODEC, ValueConfig, compress_values, values_to_bytes

#: the whole-cache budget of the rows (issue 14's target: 8x smaller than fp16)
CACHE_BITS = 2.0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import HEAD_DIM, KV_HEADS, LLAMA3_ROPE, Q_HEADS, emit, medians_in_turns, synthetic_keys  # noqa: E402


def median_seconds(call, device: torch.device, repeats: int) -> float:
    """Median seconds of one call, timed as bench/attention.py times its rows."""
    return medians_in_turns({"call": call}, device, repeats)["call"]


def copy_bandwidth(device: torch.device, repeats: int, megabytes: int = 1024) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() / seconds


def layer(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, post-RoPE keys, values) float32 [tokens, 8, 128] of one synthetic layer."""
    positions = torch.arange(tokens)
    return positions, apply_rope(synthetic_keys(tokens), positions, LLAMA3_ROPE), synthetic_keys(tokens, seed=5) - 0.3


def attention_rows(tokens: int, batches: list[int], device: torch.device, repeats: int,
                   cache: CompressedCache) -> list[str]:
    """``cache``: the layer's whole cache from :func:`svdq.kv.compress_kv` (timed in :func:`compress_rows`)."""
    positions, post, values = (tensor.to(device) for tensor in layer(tokens))
    # Compressed on the device: at 32k tokens the CPU codec would take seconds of the check.
    compressed = compress(post.half(), CodecConfig(), rope=LLAMA3_ROPE, key_space="post_rope", positions=positions)
    stored_values = compress_values(values.half())
    latent_values = compress_values(values.half(), ValueConfig(codec=DEFAULT_VALUE_CODEC))
    # (label, keys, values, compared with the 16-bit-V row of the same path)
    caches = [
        ("keys 1.5 bits, 16-bit V", compressed, stored_values, False),
        (f"keys 1.5 bits, latent V {latent_values.bits_per_element:.2f} bits", compressed, latent_values, True),
        (f"compress_kv whole cache {cache.bits_per_element:.2f} bits/KV element (keys "
         f"{cache.keys.bits_per_element:.2f}, latent V {cache.values.bits_per_element:.2f})", cache.keys, cache.values,
         False),
    ]
    paths = [("dense", None, "<= 1.2x", 1.2),
             ("sparse 1/32", SparsityConfig(keep_fraction=1 / 32), "<= 0.2x (5x faster)", 0.2)]
    backend = select_backend(device)
    rows = []
    for batch in batches:
        queries = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device)
        k = post.half().transpose(0, 1)[None].expand(batch, -1, -1, -1)
        v = values.half().transpose(0, 1)[None].expand(batch, -1, -1, -1)
        q = queries.half()[:, :, None, :]
        calls = {"sdpa": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True)}
        for name, sparsity, _, _ in paths:
            for label, keys, value_cache, _ in caches:
                calls[name, label] = (lambda queries=queries, keys=keys, value_cache=value_cache, sparsity=sparsity,
                                      batch=batch: attend(queries, [keys] * batch, [value_cache] * batch,
                                                          sparsity=sparsity))
        # All rows of a batch timed in turns, so that their ratios share the device's state.
        seconds = medians_in_turns(calls, device, repeats)
        sdpa = seconds["sdpa"]
        rows.append(f"| attention {tokens} tok, batch {batch} | SDPA fp16 keys/values (baseline) | "
                    f"{sdpa * 1e3:.3f} ms | 1.00x | - | - |")
        for name, _, target, limit in paths:
            plain = seconds[name, caches[0][0]]
            for label, _, _, against_plain in caches:
                took = seconds[name, label]
                result, wanted, met = f"{took / sdpa:.2f}x", target, took / sdpa <= limit
                if against_plain:
                    result += f"; {took / plain:.2f}x the 16-bit V row"
                    wanted += "; <= 1.0x the 16-bit V row"
                    met = met and took <= plain
                rows.append(f"| attention {tokens} tok, batch {batch} | attend svdq {name}, {label} ({backend}) | "
                            f"{took * 1e3:.3f} ms | {result} | {wanted} | {'met' if met else 'MISSED'} |")
    return rows


def compress_rows(tokens: int, device: torch.device, repeats: int, bandwidth: float) -> tuple[list[str], CompressedCache]:
    """The compress rows and the last whole cache ``compress_kv`` made (the attention rows use it)."""
    positions, keys, values = layer(tokens)
    positions, keys, values = positions.to(device), keys.half().to(device), values.half().to(device)
    calibration = apply_rope(synthetic_keys(tokens, seed=3), positions.cpu() + tokens, LLAMA3_ROPE).half()
    fitted = fit_layer_basis(calibration, positions.cpu() + tokens, LLAMA3_ROPE)
    # Held on the device, as a server keeps a profile's bases: the rows time the codec, not a
    # 4 MB host-to-device copy of the basis per call.
    shared = Basis(fitted.mean.to(device), fitted.components.to(device), fitted.singular_values.to(device))
    rows = []
    for label, basis in [("own basis", None), ("shared basis", shared)]:
        def run(basis=basis):
            return to_bytes(compress(keys, CodecConfig(), positions=positions, rope=LLAMA3_ROPE,
                                     key_space="post_rope", basis=basis))

        seconds = median_seconds(run, device, repeats)
        rate = keys.numel() * 2 / seconds
        share = rate / bandwidth
        rows.append(f"| compress {tokens} x {KV_HEADS} x {HEAD_DIM} fp16 keys | svdq 1.5 bits, {label}, to bytes | "
                    f"{seconds * 1e3:.3f} ms | {rate / 1e9:.3g} GB/s = {100 * share:.2g}% of the copy bandwidth | "
                    f">= 50% | {'met' if share >= 0.5 else 'MISSED'} |")
    budget = CacheBudget(bits_per_element=CACHE_BITS)
    made = []

    def run_kv():
        made[:] = [compress_kv(keys, values, budget, positions=positions, rope=LLAMA3_ROPE, key_space="post_rope")]
        return to_bytes(made[0].keys), values_to_bytes(made[0].values)

    # Each call compresses every candidate split (len(key_shares) key and value codecs): a
    # quarter of the repeats keeps the row's share of the check's time in line with the others.
    seconds = median_seconds(run_kv, device, max(1, repeats // 4))
    rate = (keys.numel() + values.numel()) * 2 / seconds
    rows.append(f"| compress_kv {tokens} x {KV_HEADS} x {HEAD_DIM} fp16 keys + values | whole cache {CACHE_BITS} "
                f"bits/KV element ({len(budget.key_shares)} candidate splits), to bytes | {seconds * 1e3:.3f} ms | "
                f"{rate / 1e9:.3g} GB/s = {100 * rate / bandwidth:.2g}% of the copy bandwidth | - (none set) | - |")
    return rows, made[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a quick run of the same code)")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tests", default="", help="summary line of the GPU test run, printed above the table")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a quick check of the script")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the quick CPU run: threaded LAPACK (eigh) stalls on a busy machine
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device, args.repeats, 1024 if device.type == "cuda" else 64)
    lines = [f"device {name}, torch {torch.__version__}, attend backend {select_backend(device)}, "
             f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), medians of {args.repeats}"]
    if args.tests:
        lines.append(f"GPU tests: {args.tests}")
    lines += ["", "| check | path | median | result | target | verdict |", "| --- | --- | ---: | --- | --- | --- |"]
    compressing, cache = compress_rows(args.tokens, device, args.repeats, bandwidth)
    lines += attention_rows(args.tokens, args.batches, device, args.repeats, cache)
    lines += compressing
    lines.append(f"\n(measured in {time.perf_counter() - started:.0f} s)")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
