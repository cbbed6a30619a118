"""What the server's malloc settings cost or save on one layer's work, in one process.

The server sets glibc malloc's trim and mapping thresholds at start (``--malloc-trim-bytes``,
:func:`svdq_server.app.tune_malloc`) so that the memory a call frees is reused by the next one
instead of being returned to the system and faulted in again, zeroed page by page. This bench
times what a server does with one Llama-3-8B-like layer (8 KV heads x 128, synthetic keys and
values of bench/attention.py) under several settings, in turns in this process
(bench/attention.py's ``medians_in_turns``; before each sample the setting is switched in with
``mallopt``, the heap's free memory returned with ``malloc_trim`` and the operation run once
untimed, as a long-running server would have, then it is timed):

* ``compress own`` / ``compress shared``: :func:`svdq.compress` + ``to_bytes`` of the layer's
  post-RoPE keys at 1.5 bits, with the sequence's own basis and with a shared one (an Upload);
* ``decompress``: ``from_bytes`` + :func:`svdq.decompress` to post-RoPE keys (a Fetch);
* ``attend cold dense`` / ``attend cold sparse``: one decode query batch over the layer as just
  read from the store (nothing derived kept), svdq keys with 16-bit values, dense and sparse
  1/32 (an Attend over a sequence the attention cache does not hold).

Settings are ``TRIM:MMAP`` byte sizes (``256MiB:32MiB``: the server before this bench's round,
whose 32 MiB mapping threshold mapped every tensor of 32 MiB or more; ``256MiB:256MiB``: its
default now); ``128KiB:128KiB`` is close to glibc's defaults without their adaptive threshold
(which a process cannot get back once it has set one). Columns: median CPU time of this thread
(one torch thread), against the first setting, and minor page faults per timed call.

Usage::

    python bench/malloc.py --tokens 8192 32768 --settings 128KiB:128KiB 256MiB:32MiB 256MiB:256MiB 1GiB:1GiB
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import SHAPES, _cached_objects, _discarder, medians_in_turns, synthetic_keys  # noqa: E402
from svdq_server.app import tune_malloc  # noqa: E402
from svdq_server.config import parse_bytes  # noqa: E402

import svdq  # noqa: E402
from svdq.attention import SparsityConfig, attend  # noqa: E402
from svdq.derived import DERIVED  # noqa: E402
from svdq.rope import apply_rope  # noqa: E402
from svdq.values import compress_values  # noqa: E402


def operations(tokens: int) -> dict[str, tuple[Callable[[], object], tuple[Callable[[], None], Callable[[], None]] | None]]:
    """name -> (call, (before, after) untimed around each call or None) for one layer."""
    shape = SHAPES["llama3-8b"]
    positions = torch.arange(tokens)
    keys = apply_rope(synthetic_keys(tokens, 0, 48, shape.kv_heads, shape.head_dim), positions, shape.rope).half()
    calibration_positions = torch.arange(tokens, 2 * tokens)
    calibration = apply_rope(synthetic_keys(tokens, 1, 48, shape.kv_heads, shape.head_dim), calibration_positions,
                             shape.rope)
    shared = svdq.fit_layer_basis(calibration, calibration_positions, shape.rope)
    config = svdq.CodecConfig(bits_per_element=1.5)

    def compress(basis: svdq.Basis | None) -> Callable[[], bytes]:
        return lambda: svdq.to_bytes(svdq.compress(keys, config, positions=positions, rope=shape.rope,
                                                   key_space="post_rope", basis=basis))

    blob = compress(None)()
    compressed = svdq.from_bytes(blob)
    values = compress_values(torch.randn(tokens, shape.kv_heads, shape.head_dim,
                                         generator=torch.Generator().manual_seed(2)).half())
    queries = torch.randn(1, shape.q_heads, shape.head_dim, generator=torch.Generator().manual_seed(3))
    cold = _discarder(DERIVED, _cached_objects([compressed], [values]))
    sparse = SparsityConfig(keep_fraction=1 / 32)
    return {
        "compress own": (compress(None), None),
        "compress shared": (compress(shared), None),
        "decompress": (lambda: svdq.decompress(svdq.from_bytes(blob), "post_rope"), None),
        "attend cold dense": (lambda: attend(queries, [compressed], [values]), cold),
        "attend cold sparse": (lambda: attend(queries, [compressed], [values], sparsity=sparse), cold),
    }


def _counting_faults(call: Callable[[], object]) -> tuple[Callable[[], object], list[int]]:
    """``call`` wrapped to append the minor page faults of each of its calls to the returned list."""
    counts: list[int] = []

    def counted() -> object:
        started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        result = call()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - started)
        return result

    return counted, counts


def _switching(trim: int, mapped: int, call: Callable[[], object],
               around: tuple[Callable[[], None], Callable[[], None]],
               release: Callable[[int], int]) -> tuple[Callable[[], None], Callable[[], None]]:
    """What runs untimed around each timed call of one setting (:func:`medians_in_turns`'
    resets): the setting switched in, the heap's free memory returned, one call as the call
    before it would have left the heap, and the operation's own before / after."""
    before, after = around

    def switch_in() -> None:
        done = tune_malloc(0, trim, mapped)
        if done.get("mmap_bytes") != mapped:
            raise SystemExit(f"glibc refused the mapping threshold {mapped} (set: {done})")
        release(0)
        before()
        call()
        after()
        before()

    return switch_in, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--settings", nargs="+", default=["256MiB:32MiB", "256MiB:256MiB"],
                        help="TRIM:MMAP byte sizes (e.g. 256MiB:256MiB), each timed in turns; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per median, per setting")
    args = parser.parse_args(argv)
    if platform.libc_ver()[0] != "glibc":
        raise SystemExit("bench/malloc.py sets glibc malloc's thresholds: this is not a glibc system")
    settings = {}
    for text in args.settings:
        trim, _, mapped = text.partition(":")
        settings[text] = (parse_bytes(trim), parse_bytes(mapped or trim))
    torch.set_num_threads(1)
    release = ctypes.CDLL(None).malloc_trim
    print(f"## Malloc settings (one torch thread, CPU time of this thread, median of {args.repeats} calls "
          "per setting in turns; Llama-3-8B layer 8 x 128, svdq keys 1.5 bits, 16-bit values)")
    print()
    print("| tokens | operation | setting TRIM:MMAP | median ms | vs first | minor faults per call |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for tokens in args.tokens:
        ops = operations(tokens)
        calls, resets, faults = {}, {}, {}
        for name, (call, around) in ops.items():
            for text, (trim, mapped) in settings.items():
                key = f"{name} {text}"
                calls[key], faults[key] = _counting_faults(call)
                resets[key] = _switching(trim, mapped, call, around or (lambda: None, lambda: None), release)
        seconds = medians_in_turns(calls, torch.device("cpu"), args.repeats, time.thread_time, resets)
        for name in ops:
            base = seconds[f"{name} {next(iter(settings))}"]
            for text in settings:
                key = f"{name} {text}"
                # (the first count is medians_in_turns' warm-up call's)
                print(f"| {tokens} | {name} | {text} | {1e3 * seconds[key]:.1f} | {seconds[key] / base:.2f}x | "
                      f"{statistics.median(faults[key][1:]):.0f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
