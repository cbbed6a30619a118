"""Per-layer compress time of short sequences (SmolLM2-135M shape), optionally against another tree.

The uploads inference workers make all the time (decode spills, 256-1,024-token chunks) are
short, and at that size a compress costs its fixed per-call work (small torch ops, the
192 x 192 eigh, error tables, compress_kv's five candidate splits) more than its bytes. Two
rows per token count, both post-RoPE float16 keys of SmolLM2's shape (3 KV heads x 64, RoPE
theta 1e5, synthetic keys of bench/attention.py; ``--shape llama3-8b`` for Llama-3-8B's
8 x 128, to check that long sequences did not get slower):

* ``keys own 1.5``: :func:`svdq.compress`, the sequence's own basis, 1.5 bits per element
  (the end-to-end bench's keys-only rows);
* ``kv shared 2.0``: :func:`svdq.kv.compress_kv` at 2.0 bits per KV element with shared key
  and value bases fitted on other synthetic tokens (its whole-cache rows; five key shares).

With ``--baseline-tree`` both trees run in this process, in turns, and every row's blobs are
compared byte for byte (the run stops at the first difference). CPU time of this thread
(``time.thread_time``), one torch thread: the machine may be shared.

Usage::

    git worktree add /tmp/base HEAD~3 --detach
    python bench/short_compress.py --baseline-tree /tmp/base/svdq --tokens 256 383 1024 8192 --repeats 15
    python bench/short_compress.py --baseline-tree /tmp/base/svdq --shape llama3-8b --tokens 8192
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import SHAPES, load_tree, synthetic_keys  # noqa: E402

import svdq  # noqa: E402
import svdq.format  # noqa: E402
import svdq.kv  # noqa: E402
import svdq.values  # noqa: E402
from svdq.rope import apply_rope  # noqa: E402


def layer(shape, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(post-RoPE float16 keys, float16 values [tokens, kv_heads, head_dim] of ``shape``, positions)."""
    positions = torch.arange(tokens)
    keys = apply_rope(synthetic_keys(tokens, seed, kv_heads=shape.kv_heads, head_dim=shape.head_dim), positions,
                      shape.rope).half()
    values = synthetic_keys(tokens, seed + 1000, rank=96, kv_heads=shape.kv_heads, head_dim=shape.head_dim).half()
    return keys, values, positions


def rows(tree, shape, tokens: int, bases: tuple) -> dict:
    """name -> call returning the row's serialized blobs, for the svdq package ``tree``."""
    keys, values, positions = layer(shape, tokens)
    key_basis, value_basis = (tree.codec.Basis(b.mean, b.components, b.singular_values) for b in bases)
    config = tree.codec.CodecConfig(bits_per_element=1.5)
    budget = tree.kv.CacheBudget(bits_per_element=2.0)
    options = {"positions": positions, "rope": shape.rope, "key_space": "post_rope"}

    def keys_only() -> bytes:
        return tree.format.to_bytes(tree.codec.compress(keys, config, **options))

    def whole_cache() -> tuple[bytes, bytes]:
        cache = tree.kv.compress_kv(keys, values, budget, key_basis=key_basis, value_basis=value_basis, **options)
        return tree.format.to_bytes(cache.keys), tree.values.values_to_bytes(cache.values)

    return {"keys own 1.5": keys_only, "kv shared 2.0": whole_cache}


def table(shape, token_counts: list[int], repeats: int, baseline=None) -> list[str]:
    trees = {"this tree": svdq} if baseline is None else {"baseline": baseline, "this tree": svdq}
    header = " | ".join(f"{name} ms" for name in trees)
    lines = [f"| tokens | row | {header} |" + (" this / baseline | blobs |" if baseline else ""),
             "| ---: | --- |" + " ---: |" * len(trees) + (" ---: | --- |" if baseline else "")]
    # Shared bases fitted once, on other synthetic tokens of the same shape.
    calibration_keys, calibration_values, calibration_positions = layer(shape, 2048, seed=99)
    bases = (svdq.codec.fit_layer_basis(calibration_keys, calibration_positions, shape.rope),
             svdq.codec.fit_layer_basis(calibration_values))
    for tokens in token_counts:
        calls = {name: rows(tree, shape, tokens, bases) for name, tree in trees.items()}
        for row in calls["this tree"]:
            blobs = {name: calls[name][row]() for name in trees}  # warm-up, and the bytes compared
            if baseline is not None and blobs["baseline"] != blobs["this tree"]:
                raise SystemExit(f"{tokens} tokens, {row}: the blobs differ from the baseline tree's")
            times: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(repeats):
                for name in trees:
                    started = time.thread_time()
                    calls[name][row]()
                    times[name].append(time.thread_time() - started)
            medians = {name: 1000 * statistics.median(times[name]) for name in trees}
            line = f"| {tokens} | {row} | " + " | ".join(f"{medians[name]:.2f}" for name in trees) + " |"
            if baseline is not None:
                line += f" {medians['this tree'] / medians['baseline']:.2f} | identical |"
            lines.append(line)
            print(line, file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 383, 1024, 8192])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per median, per tree")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="smollm2",
                        help="layer shape (bench/attention.py's): SmolLM2-135M's 3 x 64 KV heads, or Llama-3-8B's "
                             "8 x 128 (to check that long sequences did not get slower)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="an svdq package of another source tree (e.g. a git worktree of an earlier commit)")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # short sequences exceed their budget; the codec says so once per shape
    baseline = None
    if args.baseline_tree is not None:
        baseline = load_tree(args.baseline_tree)
        for module in ("codec", "kv", "format", "values"):
            importlib.import_module(f"svdq_baseline.{module}")
    print(f"## Per-layer compress, {shape.name} shape ({shape.kv_heads} KV heads x {shape.head_dim}), median of "
          f"{args.repeats} calls in turns, CPU time of the thread, 1 torch thread")
    print()
    print("\n".join(table(shape, args.tokens, args.repeats, baseline)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
