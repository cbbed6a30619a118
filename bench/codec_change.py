"""An older codec beside the current one, in one process: compress speed and key quality.

Numeric changes to the codec (lower-precision products, fewer passes) must show that they
speed compress up without moving the quality or the size. This bench imports an older
``svdq`` package under the name ``svdq_baseline`` next to the checkout's ``svdq`` and prints:

* **speed**: compress + ``to_bytes`` of bench/quality.py's synthetic post-RoPE Llama-3 layer
  (8 x 128), own and shared basis, and ``from_bytes`` + decompress of each version's blob, the
  two versions in turns (medians; MB/s of fp16 keys), beside a memory copy, with bits per
  element from the blobs, the speed-ups and whether blobs and decompressed keys are identical;
* **quality** (``--quality``): SmolLM2-135M-Instruct's post-RoPE keys of a 3072-token prefix,
  every layer, compressed by both versions (own basis float32 and float16 keys, shared bases
  fitted by each version on later text tokens): relative error of the reconstructed
  post-RoPE keys and bits per element from the serialized blobs, and how many blobs are
  byte-identical.

The baseline is an export of an older commit::

    git archive BASE svdq | tar -x -C /tmp/base
    python bench/codec_change.py --baseline /tmp/base/svdq --threads 1 --quality
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

import svdq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import load_tree, medians_in_turns  # noqa: E402  (bench/ is not a package)
from quality import LLAMA3_ROPE, synthetic_layer_keys  # noqa: E402


def speed_table(versions: dict[str, ModuleType], tokens: int, repeats: int, clock: str = "wall") -> str:
    keys = synthetic_layer_keys(tokens)
    positions = torch.arange(tokens)
    calibration = synthetic_layer_keys(2 * tokens)[tokens:]
    calls: dict[str, Callable[[], object]] = {"memory copy (keys.clone)": keys.clone}
    for label, codec in versions.items():
        shared = codec.fit_layer_basis(calibration, torch.arange(tokens, 2 * tokens), LLAMA3_ROPE)
        config = codec.CodecConfig(bits_per_element=1.5)
        for basis_name, basis in (("own", None), ("shared", shared)):
            def compress_one(codec=codec, config=config, basis=basis) -> bytes:
                return codec.to_bytes(codec.compress(keys, config, positions=positions, rope=LLAMA3_ROPE,
                                                     key_space="post_rope", basis=basis))
            calls[f"{label} {basis_name} basis"] = compress_one
            blob = compress_one()

            def decompress_one(codec=codec, blob=blob, basis=basis) -> torch.Tensor:
                return codec.decompress(codec.from_bytes(blob, basis), "post_rope")
            calls[f"{label} {basis_name} basis, decompress"] = decompress_one
    blobs = {name: call() for name, call in calls.items()}  # their sizes (medians_in_turns warms each call up itself)
    seconds = medians_in_turns(calls, torch.device("cpu"), repeats,
                               time.perf_counter if clock == "wall" else time.thread_time)
    megabytes = keys.numel() * 2 / 1e6
    lines = [f"### Compress and decompress, {tokens} tokens x 8 x 128 (synthetic post-RoPE Llama-3 layer), "
             f"{torch.get_num_threads()} torch thread(s), medians of {repeats} in turns "
             f"({'wall time' if clock == 'wall' else 'CPU time of the timing thread'})",
             "",
             "| path | median ms | MB/s of fp16 keys | bits per element (keys, whole blob) | blob sha256 |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, median in seconds.items():
        blob = blobs[name]
        # (a decompress row's result is keys, not a blob: no size of its own)
        bits = (f"{8 * len(blob) / keys.numel():.4f}" if isinstance(blob, bytes) else
                "16" if name.startswith("memory copy") else "-")
        digest = hashlib.sha256(blob).hexdigest()[:12] if isinstance(blob, bytes) else "-"
        lines.append(f"| {name} | {1e3 * median:.1f} | {megabytes / median:.1f} | {bits} | {digest} |")
    labels = list(versions)
    if len(labels) == 2:
        for basis_name in ("own", "shared"):
            ratio = seconds[f"{labels[0]} {basis_name} basis"] / seconds[f"{labels[1]} {basis_name} basis"]
            same = blobs[f"{labels[0]} {basis_name} basis"] == blobs[f"{labels[1]} {basis_name} basis"]
            lines.append(f"\nspeed-up {basis_name} basis ({labels[1]} over {labels[0]}): {ratio:.2f}x; blobs "
                         f"{'identical' if same else 'differ'}")
            name = f"{basis_name} basis, decompress"
            ratio = seconds[f"{labels[0]} {name}"] / seconds[f"{labels[1]} {name}"]
            same = torch.equal(blobs[f"{labels[0]} {name}"], blobs[f"{labels[1]} {name}"])
            lines.append(f"speed-up {name} ({labels[1]} over {labels[0]}, each from its own blob): {ratio:.2f}x; "
                         f"keys {'identical' if same else 'differ'}")
    return "\n".join(lines)


def quality_table(versions: dict[str, ModuleType], prefix_tokens: int = 3072,
                  calibration: tuple[int, int] = (3584, 5632)) -> str:
    from svdq_client import evaluation as harness
    from svdq_client.models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    rope = svdq.RopeConfig.from_hf_config(model.config)
    prefix = harness.prefill(model, harness.text_tokens(tokenizer, prefix_tokens))
    calibration_prefix = harness.prefill(model, harness.text_tokens(tokenizer, calibration[1] - calibration[0],
                                                                    start=calibration[0]))
    layers = len(prefix.keys)
    rows = {"own basis, float32 keys": (torch.float32, False), "own basis, float16 keys": (torch.float16, False),
            "shared basis, float16 keys": (torch.float16, True)}
    results: dict[tuple[str, str], tuple[float, float, list[bytes]]] = {}
    for label, codec in versions.items():
        bases = [codec.fit_layer_basis(calibration_prefix.keys[layer], calibration_prefix.positions, rope)
                 for layer in range(layers)]
        config = codec.CodecConfig(bits_per_element=1.5)
        for row, (dtype, shared) in rows.items():
            squared_error = squared_norm = 0.0
            stored_bits = elements = 0
            blobs = []
            for layer in range(layers):
                keys = prefix.keys[layer].to(dtype)
                basis = bases[layer] if shared else None
                blob = codec.to_bytes(codec.compress(keys, config, positions=prefix.positions, rope=rope,
                                                     key_space="post_rope", basis=basis))
                restored = codec.decompress(codec.from_bytes(blob, basis), "post_rope", torch.float32)
                reference = keys.double()
                squared_error += float((restored.double() - reference).pow(2).sum())
                squared_norm += float(reference.pow(2).sum())
                stored_bits += 8 * len(blob)
                elements += keys.numel()
                blobs.append(blob)
            results[(label, row)] = (stored_bits / elements, (squared_error / squared_norm) ** 0.5, blobs)
    labels = list(versions)
    header = "| rows | " + " | ".join(f"bits/element {label}" for label in labels) + " | " + \
        " | ".join(f"rel. K err {label}" for label in labels) + " | blobs identical |"
    lines = [f"### Keys of SmolLM2-135M-Instruct, {layers} layers x {prefix_tokens} tokens, 1.5 bits; shared bases "
             f"fitted on text tokens {calibration[0]}-{calibration[1]}; error of the post-RoPE reconstruction over "
             "all layers, bits from the serialized key blobs (keys only, every byte)",
             "",
             header,
             "| --- |" + " ---: |" * (2 * len(labels)) + " --- |"]
    for row in rows:
        bits = " | ".join(f"{results[(label, row)][0]:.4f}" for label in labels)
        errors = " | ".join(f"{results[(label, row)][1]:.5f}" for label in labels)
        identical = "-"
        if len(labels) == 2:
            same = sum(a == b for a, b in zip(results[(labels[0], row)][2], results[(labels[1], row)][2], strict=True))
            identical = f"{same}/{layers}"
        lines.append(f"| {row} | {bits} | {errors} | {identical} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="an older svdq package folder (git archive BASE svdq)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the synthetic speed layer")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--quality", action="store_true", help="also the SmolLM2 key-quality table")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the timing thread's CPU time (one thread on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    versions: dict[str, ModuleType] = {}
    if args.baseline is not None:
        versions["baseline"] = load_tree(args.baseline.resolve())
    versions["current"] = svdq
    if not args.no_speed:
        if args.clock == "cpu" and args.threads != 1:
            parser.error("--clock cpu times the calling thread only: use it with --threads 1")
        print(speed_table(versions, args.tokens, args.repeats, args.clock))
        print()
        sys.stdout.flush()
    if args.quality:
        print(quality_table(versions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
