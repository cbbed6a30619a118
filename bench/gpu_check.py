"""One table of the GPU numbers issue 12 asks for, measured in one process on one device.

Rows, each beside the target it is checked against:

* decode attention at ``--tokens`` (default 32k) with Llama-3-8B shapes (32 query heads,
  8 KV heads x 128), batch 1 and 16: dense fp16 SDPA over uncompressed keys and values, then
  :func:`svdq.attention.attend` dense and sparse 1/32 over SVDq keys (1.5 bits) with 16-bit
  values; ratios against SDPA fp16 of the same batch (targets: dense <= 1.2x, sparse
  >= 5x faster, i.e. <= 0.2x);
* compress of one layer's fp16 keys (8 x 128, ``--tokens``), with the sequence's own basis
  and with a shared basis: GB/s of fp16 keys read, against the device's memory bandwidth
  measured here with a copy (bytes read + written per second) (target: >= 50%).

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
from svdq.rope import apply_rope
from svdq.values import compress_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import HEAD_DIM, KV_HEADS, LLAMA3_ROPE, Q_HEADS, medians_in_turns, synthetic_keys  # noqa: E402


def median_seconds(call, device: torch.device, repeats: int) -> float:
    """Median seconds of one call, timed as bench/attention.py times its rows."""
    return medians_in_turns({"call": call}, device, repeats)["call"]


def copy_bandwidth(device: torch.device, repeats: int, megabytes: int = 1024) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() / seconds


def attention_rows(tokens: int, batches: list[int], device: torch.device, repeats: int) -> list[str]:
    positions = torch.arange(tokens)
    post = apply_rope(synthetic_keys(tokens), positions, LLAMA3_ROPE)
    values = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).half()
    compressed = compress(post.half(), CodecConfig(), rope=LLAMA3_ROPE, key_space="post_rope",
                          positions=positions).to(device)
    stored_values = compress_values(values).to(device)
    rows = []
    for batch in batches:
        queries = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device)
        k = post.to(device, torch.float16).transpose(0, 1)[None].expand(batch, -1, -1, -1)
        v = values.to(device).transpose(0, 1)[None].expand(batch, -1, -1, -1)
        q = queries.half()[:, :, None, :]
        sdpa = median_seconds(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True), device, repeats)
        rows.append(f"| attention {tokens} tok, batch {batch} | SDPA fp16 keys/values (baseline) | "
                    f"{sdpa * 1e3:.3f} ms | 1.00x | - | - |")
        for label, sparsity, target, limit in [("attend svdq dense", None, "<= 1.2x", 1.2),
                                               ("attend svdq sparse 1/32", SparsityConfig(keep_fraction=1 / 32),
                                                "<= 0.2x (5x faster)", 0.2)]:
            def run(queries=queries, sparsity=sparsity, batch=batch):
                return attend(queries, [compressed] * batch, [stored_values] * batch, sparsity=sparsity)

            seconds = median_seconds(run, device, repeats)
            ratio = seconds / sdpa
            rows.append(f"| attention {tokens} tok, batch {batch} | {label} ({select_backend(device)}) | "
                        f"{seconds * 1e3:.3f} ms | {ratio:.2f}x | {target} | {'met' if ratio <= limit else 'MISSED'} |")
    return rows


def compress_rows(tokens: int, device: torch.device, repeats: int, bandwidth: float) -> list[str]:
    positions = torch.arange(tokens, device=device)
    keys = apply_rope(synthetic_keys(tokens), positions.cpu(), LLAMA3_ROPE).half().to(device)
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
    return rows


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
    lines += attention_rows(args.tokens, args.batches, device, args.repeats)
    lines += compress_rows(args.tokens, device, args.repeats, bandwidth)
    lines.append(f"\n(measured in {time.perf_counter() - started:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
