"""Quality of the SVDq key codec on a real model (SmolLM2-135M-Instruct), against baselines.

For each method, every layer's prefix keys are replaced by the codec's output
(``decompress(from_bytes(to_bytes(compress(keys, post-RoPE))), "post_rope")``, values
untouched) and the model continues from that cache. Printed per method:

* true bits per key element and compression ratio vs fp16, both from the serialized blobs of
  every layer (header, scales, minimums, basis, mean, sinks, tail, checksum: everything);
* relative K reconstruction error over all layers (Frobenius, post-RoPE);
* dNLL: mean NLL of the continuation tokens with the method's cache minus the NLL with the
  unmodified float32 cache (nats per token);
* needle accuracy: RULER-style 7-digit numbers hidden at several depths of ~4k-token prose,
  answered greedily from the method's cache.

Then compress / decompress throughput on a Llama-3-8B-like layer (8 KV heads x 128) beside a
plain copy of the same fp16 tensor, medians of several runs in the same process.

Run: ``python bench/quality.py`` (full, about 20-30 minutes on 2 CPU cores) or
``python bench/quality.py --smoke`` (short prefix, few methods). ``--help`` lists options.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from svdq_client import evaluation as harness
from svdq_client.hf import calibrate_bases

import svdq
from svdq.rope import apply_rope

LOGGER = logging.getLogger("bench.quality")

PAPER_SCHEDULE = (8, 4, 2, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Method:
    """A row of the table: a codec configuration, optionally with a shared calibrated basis."""

    name: str
    config: svdq.CodecConfig
    shared_basis: bool = False


def main_methods() -> list[Method]:
    """The methods of the headline table: fp16, KIVI-like baselines, SVDq at several budgets."""
    C = svdq.CodecConfig
    return [
        Method("fp16", C(method="fp16")),
        Method("kivi 2-bit g32", C(method="kivi", bits=2, group_size=32)),
        Method("kivi 2-bit g128", C(method="kivi", bits=2, group_size=128)),
        Method("kivi 4-bit g32", C(method="kivi", bits=4, group_size=32)),
        Method("kivi 4-bit g128", C(method="kivi", bits=4, group_size=128)),
        Method("svdq 1.25 bits", C(bits_per_element=1.25)),
        Method("svdq 1.5 bits", C(bits_per_element=1.5)),
        Method("svdq 2.0 bits", C(bits_per_element=2.0)),
        Method("svdq 3.0 bits", C(bits_per_element=3.0)),
        Method("svdq paper (8,4,2,1,1,0,0,0)", C(schedule=PAPER_SCHEDULE)),
    ]


def explore_methods() -> list[Method]:
    """Settings explored at 1.5 bits for the defaults: group size, sinks, shared basis."""
    C = svdq.CodecConfig
    methods = [
        Method(f"svdq 1.5 g{group} sinks{sinks}", C(bits_per_element=1.5, group_size=group, num_sinks=sinks))
        for group in (32, 64, 128)
        for sinks in (0, 4, 16)
        if (group, sinks) != (svdq.codec.DEFAULT_GROUP_SIZE, svdq.codec.DEFAULT_SINKS)  # = "svdq 1.5 bits"
    ]
    methods.append(Method("svdq 1.5 shared basis", C(bits_per_element=1.5), shared_basis=True))
    methods.append(Method("svdq 1.25 shared basis", C(bits_per_element=1.25), shared_basis=True))
    return methods


#: Methods that also answer the needle cases (each case costs one compression per method).
NEEDLE_METHODS = ("fp16", "kivi 2-bit g32", "svdq 1.25 bits", "svdq 1.5 bits", "svdq 2.0 bits")


@dataclass
class KeyStats:
    """Byte and error accounting of one method over the layers of one prefix."""

    serialized_bytes: int = 0
    elements: int = 0
    error_sq: float = 0.0
    reference_sq: float = 0.0
    layer_errors: list[float] = field(default_factory=list)
    blobs_checked: int = 0

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.serialized_bytes / max(1, self.elements)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes of the keys over their serialized bytes."""
        return 16.0 / self.bits_per_element

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / max(self.reference_sq, 1e-300))


def codec_transform(method: Method, rope: svdq.RopeConfig, stats: KeyStats,
                    bases: Sequence[svdq.Basis] | None = None) -> harness.KeyTransform:
    """A key transform that round-trips each layer's post-RoPE keys through the serialized codec.

    ``stats`` accumulates the serialized size (``len(to_bytes(...))``) and the error; the keys
    the model sees are decoded from the bytes, so nothing that is not stored can leak in.
    """

    def transform(layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        basis = bases[layer] if method.shared_basis and bases is not None else None
        compressed = svdq.compress(keys, method.config, positions=positions, rope=rope, key_space="post_rope",
                                   basis=basis)
        blob = svdq.to_bytes(compressed)
        if len(blob) != compressed.nbytes:
            raise AssertionError(f"{method.name} layer {layer}: nbytes {compressed.nbytes} != {len(blob)} serialized")
        restored = svdq.decompress(svdq.from_bytes(blob, basis=basis), "post_rope", dtype=torch.float32)
        stats.serialized_bytes += len(blob)
        stats.elements += keys.numel()
        stats.blobs_checked += 1
        error = (restored.double() - keys.double()).pow(2).sum().item()
        reference = keys.double().pow(2).sum().item()
        stats.error_sq += error
        stats.reference_sq += reference
        stats.layer_errors.append(math.sqrt(error / reference))
        return restored

    return transform


@dataclass
class Row:
    """One method's results."""

    method: Method
    stats: KeyStats
    dnll: float
    needle_correct: int | None = None
    needle_total: int | None = None
    needle_bits: float | None = None


@dataclass
class RopeCheck:
    """RoPE exactness on the model's own cache (max over layers, relative to max |key|)."""

    roundtrip: float
    undo_vs_k_proj: float


def check_rope(prefix: harness.PrefixCache, rope: svdq.RopeConfig) -> RopeCheck:
    """undo+apply must give back the cached keys, and undo must give the k_proj outputs."""
    if prefix.pre_rope_keys is None:
        raise ValueError("prefill with capture_pre_rope=True to check RoPE")
    roundtrip = undo = 0.0
    for keys, pre_rope in zip(prefix.keys, prefix.pre_rope_keys, strict=True):
        unrotated = svdq.undo_rope(keys, prefix.positions, rope)
        again = apply_rope(unrotated, prefix.positions, rope)
        roundtrip = max(roundtrip, float((again - keys).abs().max() / keys.abs().max()))
        undo = max(undo, float((unrotated - pre_rope).abs().max() / pre_rope.abs().max()))
    return RopeCheck(roundtrip, undo)


@dataclass
class NllSetup:
    """The clean prefill shared by every method's continuation run."""

    prefix: harness.PrefixCache
    continuation_ids: torch.Tensor
    reference_nll: float
    rope: svdq.RopeConfig
    rope_check: RopeCheck


def prepare_nll(model, tokenizer, prefix_tokens: int = 3072, continuation_tokens: int = 512,
                text_start: int = 0) -> NllSetup:
    """Prefill ``prefix_tokens`` of the evaluation text, check RoPE, score the clean cache."""
    rope = svdq.RopeConfig.from_hf_config(model.config)
    ids = harness.text_tokens(tokenizer, prefix_tokens + continuation_tokens, start=text_start)
    prefix_ids, continuation_ids = ids[:, :prefix_tokens], ids[:, prefix_tokens:]
    prefix = harness.prefill(model, prefix_ids, capture_pre_rope=True)
    rope_check = check_rope(prefix, rope)
    prefix.pre_rope_keys = None  # only needed for the check; frees memory
    reference_nll = harness.continuation_nll(model, prefix, continuation_ids)
    return NllSetup(prefix, continuation_ids, reference_nll, rope, rope_check)


def score_nll(model, setup: NllSetup, methods: Sequence[Method], bases: Sequence[svdq.Basis] | None = None,
              progress: Callable[[str], None] = LOGGER.info) -> list[Row]:
    """One row per method: bytes, error and dNLL of the continuation over its cache."""
    rows = []
    for method in methods:
        stats = KeyStats()
        transform = codec_transform(method, setup.rope, stats, bases)
        nll = harness.continuation_nll(model, setup.prefix, setup.continuation_ids, transform)
        rows.append(Row(method, stats, nll - setup.reference_nll))
        progress(f"{method.name}: {stats.bits_per_element:.3f} bits, dNLL {nll - setup.reference_nll:+.4f}")
    return rows


def score_needles(model, tokenizer, rows: Sequence[Row], *, count: int = 12, tokens: int = 4096,
                  filler: str = "noise", bases: Sequence[svdq.Basis] | None = None,
                  progress: Callable[[str], None] = LOGGER.info) -> list[bool]:
    """Answer the needle cases with each row's method (fills ``needle_*`` of the rows).

    Every case is prefilled once without compression; each method then replaces the keys of
    that prefill. Returns whether the uncompressed float32 cache answered each case.
    """
    rope = svdq.RopeConfig.from_hf_config(model.config)
    for row in rows:
        row.needle_correct, row.needle_total = 0, 0
    needle_stats = {row.method.name: KeyStats() for row in rows}
    reference_found: list[bool] = []
    for case in harness.needle_cases(tokenizer, tokens, count=count, filler=filler):
        case_prefix = harness.prefill(model, case.prefix_ids)
        reference_found.append(harness.needle_found(
            harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids), case))
        for row in rows:
            transform = codec_transform(row.method, rope, needle_stats[row.method.name], bases)
            answer = harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids, transform)
            row.needle_correct += harness.needle_found(answer, case)
            row.needle_total += 1
        progress(f"needle depth {case.depth:.2f}: fp32 cache {'ok' if reference_found[-1] else 'miss'}, "
                 + ", ".join(f"{r.method.name} {r.needle_correct}" for r in rows))
    for row in rows:
        row.needle_bits = needle_stats[row.method.name].bits_per_element
    return reference_found


def format_quality_table(rows: Sequence[Row], reference_found: Sequence[bool]) -> str:
    """Markdown table of the rows; the first line is the uncompressed float32 reference."""
    lines = [
        "| method | true bits/elem | ratio vs fp16 | rel. K error | dNLL | needle |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    if reference_found:
        lines.append(f"| fp32 cache (reference) | 32 | 0.5x | 0 | 0 | {sum(reference_found)}/{len(reference_found)} |")
    for row in rows:
        needle = "-" if row.needle_total is None else f"{row.needle_correct}/{row.needle_total}"
        lines.append(
            f"| {row.method.name} | {row.stats.bits_per_element:.3f} | {row.stats.compression_ratio:.2f}x | "
            f"{row.stats.relative_error:.4f} | {row.dnll:+.4f} | {needle} |"
        )
    return "\n".join(lines)


def target_checks(rows: Sequence[Row], reference_found: Sequence[bool]) -> list[str]:
    """The issue's targets, each as a PASS/FAIL line with the numbers behind it."""
    svdq_rows = [r for r in rows if r.method.config.method == "svdq" and not r.method.shared_basis]
    kivi2 = [r for r in rows if r.method.config.method == "kivi" and r.method.config.bits == 2]
    fp16_needle = next((r.needle_correct for r in rows if r.method.config.method == "fp16"
                        and r.needle_correct is not None), sum(reference_found) if reference_found else None)
    lines = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    low = [r for r in svdq_rows if r.stats.bits_per_element <= 1.5]
    for row in low:
        needle_ok = row.needle_correct is None or fp16_needle is None or row.needle_correct >= fp16_needle
        ok = row.dnll <= 0.06 and needle_ok and row.stats.compression_ratio >= 10.6
        needle = "n/a" if row.needle_correct is None else f"{row.needle_correct} vs fp16 {fp16_needle}"
        lines.append(f"{verdict(ok)} {row.method.name}: <=1.5 bits ({row.stats.bits_per_element:.3f}, "
                     f"{row.stats.compression_ratio:.2f}x) needs dNLL <= 0.06 ({row.dnll:+.4f}) and fp16 needle "
                     f"accuracy ({needle})")
    for row in [r for r in svdq_rows if 1.5 < r.stats.bits_per_element <= 2.0]:
        lines.append(f"{verdict(row.dnll <= 0.03)} {row.method.name}: <=2.0 bits "
                     f"({row.stats.bits_per_element:.3f}) needs dNLL <= 0.03 ({row.dnll:+.4f})")
    for row in low:
        for baseline in kivi2:
            ok = baseline.stats.bits_per_element >= 2.25 and baseline.dnll >= 2 * max(row.dnll, 0.0)
            ratio = baseline.dnll / row.dnll if row.dnll > 0 else math.inf
            lines.append(f"{verdict(ok)} {row.method.name} vs {baseline.method.name} "
                         f"({baseline.stats.bits_per_element:.3f} bits): dNLL {baseline.dnll:+.4f} / "
                         f"{row.dnll:+.4f} = {ratio:.1f}x (needs >= 2x)")
    return lines


# ---------------------------------------------------------------------------------------
# Throughput on a Llama-3-8B-like layer
# ---------------------------------------------------------------------------------------

LLAMA3_ROPE = svdq.RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position=8192)


def synthetic_layer_keys(tokens: int, kv_heads: int = 8, head_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """float16 [tokens, kv_heads, head_dim] post-RoPE keys with a decaying latent spectrum.

    Real pre-RoPE keys have a few dominant directions; i.i.d. noise has none and would make
    the allocator's work unrepresentative, so the latent channels' scales fall off
    exponentially, on top of a random rotation and a mean, and Llama-3 RoPE is applied.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = kv_heads * head_dim
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
    scales = 4.0 * torch.exp(-torch.arange(channels, dtype=torch.float32) / 48.0) + 0.05
    latent = torch.randn(tokens, channels, generator=generator) * scales
    pre_rope = (latent @ rotation.T + torch.randn(channels, generator=generator)).reshape(tokens, kv_heads, head_dim)
    return apply_rope(pre_rope, torch.arange(tokens), LLAMA3_ROPE).to(torch.float16)


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    action()  # warm-up: allocator, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput_table(token_counts: Sequence[int] = (8192, 32768), repeats: int = 5,
                     configs: Sequence[Method] | None = None) -> str:
    """Markdown table of compress / decompress MB/s (of fp16 keys) next to an fp16 copy."""
    configs = configs or [
        Method("svdq 1.5 bits", svdq.CodecConfig(bits_per_element=1.5)),
        Method("kivi 2-bit g128", svdq.CodecConfig(method="kivi", bits=2, group_size=128)),
    ]
    lines = [
        "| layer [tokens x 8 x 128] | method | compress MB/s | decompress MB/s | fp16 copy MB/s | "
        "copy / compress | copy / decompress | ratio vs fp16 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokens in token_counts:
        keys = synthetic_layer_keys(tokens)
        positions = torch.arange(tokens)
        megabytes = keys.numel() * 2 / 1e6
        copy_s = _median_seconds(keys.clone, repeats)
        for method in configs:
            compress_one = functools.partial(svdq.compress, keys, method.config, positions=positions,
                                             rope=LLAMA3_ROPE, key_space="post_rope")
            compressed = compress_one()
            compress_s = _median_seconds(compress_one, repeats)
            decompress_s = _median_seconds(functools.partial(svdq.decompress, compressed, "post_rope"), repeats)
            lines.append(
                f"| {tokens} | {method.name} | {megabytes / compress_s:.1f} | {megabytes / decompress_s:.1f} | "
                f"{megabytes / copy_s:.0f} | {compress_s / copy_s:.0f}x | {decompress_s / copy_s:.0f}x | "
                f"{compressed.compression_ratio:.2f}x |"
            )
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="short run: 384-token prefix, fp16/kivi/svdq 1.5, one needle case of 768 tokens")
    parser.add_argument("--prefix-tokens", type=int, default=3072, help="tokens whose keys are compressed")
    parser.add_argument("--continuation-tokens", type=int, default=512, help="tokens scored after the prefix")
    parser.add_argument("--needle-cases", type=int, default=12, help="needle prompts (0 = skip the needle test)")
    parser.add_argument("--needle-tokens", type=int, default=4096, help="length of every needle prompt")
    parser.add_argument("--needle-filler", choices=("noise", "prose"), default="noise",
                        help="haystack: repeated plain sentences (RULER's noise haystack) or the docs prose")
    parser.add_argument("--no-explore", action="store_true", help="skip the group size / sinks / basis sweep")
    parser.add_argument("--throughput-tokens", type=int, nargs="*", default=[8192, 32768],
                        help="token counts of the throughput layer (none = skip)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per throughput median")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default); 1 is much faster on an oversubscribed CPU, "
                             "where multi-threaded LAPACK calls such as the basis eigh stall for seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    from svdq_client.models import load_smollm2

    methods = main_methods()
    if args.smoke:
        args.prefix_tokens, args.continuation_tokens = 384, 64
        args.needle_cases, args.needle_tokens = 1, 768
        args.no_explore, args.throughput_tokens, args.repeats = True, [1024], 2
        methods = [m for m in methods if m.name in ("fp16", "kivi 2-bit g32", "svdq 1.5 bits")]
    started = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    setup = prepare_nll(model, tokenizer, args.prefix_tokens, args.continuation_tokens)
    print(f"## Key cache quality: SmolLM2-135M-Instruct (float32, CPU), text: {harness.TEXT_SOURCE}")
    print(f"prefix {args.prefix_tokens} tokens, continuation {args.continuation_tokens} tokens "
          f"(dNLL over the last {args.continuation_tokens - 1}), reference NLL {setup.reference_nll:.4f} nats/token; "
          "bits and ratio from the serialized blobs of the prefix keys, all layers, everything included")
    print(f"RoPE exactness (max over layers, relative to max |key|): undo+apply {setup.rope_check.roundtrip:.2e}, "
          f"undo vs k_proj outputs {setup.rope_check.undo_vs_k_proj:.2e}")
    sys.stdout.flush()
    rows = score_nll(model, setup, methods)
    reference_found: list[bool] = []
    needle_rows = [row for row in rows if row.method.name in NEEDLE_METHODS]
    if args.needle_cases and needle_rows:
        reference_found = score_needles(model, tokenizer, needle_rows, count=args.needle_cases,
                                        tokens=args.needle_tokens, filler=args.needle_filler)
    print(f"needle: {args.needle_cases} cases of {args.needle_tokens} tokens, {args.needle_filler} filler, "
          "depths evenly spread 0..1, greedy answer after the question; '-' = not run for that method")
    print()
    print(format_quality_table(rows, reference_found))
    print()
    for line in target_checks(rows, reference_found):
        print(line)
    focus = next((r for r in rows if r.method.name == "svdq 1.5 bits"), None)
    if focus is not None:
        print()
        print("svdq 1.5 bits, relative K error per layer: "
              + " ".join(f"{error:.3f}" for error in focus.stats.layer_errors))
    sys.stdout.flush()
    if not args.no_explore:
        explore = explore_methods()
        # One basis per layer fitted on a different window of the text (calibration).
        bases = calibrate_bases(model, harness.text_tokens(tokenizer, args.prefix_tokens,
                                                           start=args.prefix_tokens + args.continuation_tokens))
        explore_rows = score_nll(model, setup, explore, bases)
        print()
        print("## Settings at 1.5 bits (same prefix; shared basis fitted on the next "
              f"{args.prefix_tokens} tokens of the text)")
        print()
        print(format_quality_table(explore_rows, []))
        sys.stdout.flush()
    if args.throughput_tokens:
        print()
        print(f"## Throughput (CPU, {torch.get_num_threads()} threads, median of {args.repeats} runs, "
              "MB/s of fp16 keys, synthetic post-RoPE Llama-3 keys, compress = undo RoPE + fit + quantize)")
        print()
        print(throughput_table(args.throughput_tokens, args.repeats))
    LOGGER.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
