"""Quality of the SVDq cache codecs on a real model (SmolLM2-135M-Instruct), against baselines.

For each method, every layer's prefix keys and values are replaced by what their serialized
blobs decode to (keys: ``decompress(from_bytes(to_bytes(compress(keys, post-RoPE))))``;
values: ``decompress_values(values_from_bytes(values_to_bytes(compress_values(values))))``)
and the model continues from that cache. Printed per method:

* true bits per key element, per value element and per KV element (the whole cache), and
  the whole cache's ratio vs fp16, all from the serialized blobs of every layer (header,
  scales, minimums, basis, mean, sinks, tail, checksum: everything);
* relative K and V reconstruction errors over all layers (Frobenius, post-RoPE keys);
* dNLL: mean NLL of the continuation tokens with the method's cache minus the NLL with the
  unmodified float32 cache (nats per token);
* needle accuracy at each needle length: RULER-style 7-digit numbers hidden at several
  depths of a noise haystack, answered greedily from the method's cache.

Shared-basis rows use key and value bases fitted on a window of the text that the scored
window does not overlap (named in the table's calibration column), never the evaluated text.

Then compress / decompress throughput on a Llama-3-8B-like layer (8 KV heads x 128) beside a
plain copy of the same fp16 tensor, medians of several runs in the same process.

Run: ``python bench/quality.py`` (full, about 20-30 minutes on 2 CPU cores) or
``python bench/quality.py --smoke`` (short prefix, few methods). ``--help`` lists options.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from svdq_client import evaluation as harness
from svdq_client.hf import calibrate_cache_bases, calibrate_key_shares, default_calibrated_bases

import svdq
from svdq.kv import DEFAULT_CACHE_KEY_CODEC, CacheBudget, compress_kv
from svdq.rope import apply_rope
from svdq.values import (
    DEFAULT_VALUE_CODEC,
    ValueConfig,
    compress_values,
    decompress_values,
    values_from_bytes,
    values_to_bytes,
)

LOGGER = logging.getLogger("bench.quality")

PAPER_SCHEDULE = (8, 4, 2, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Method:
    """A row of the table: how keys and values are stored, optionally with shared calibrated
    bases (keys and SVDq latent values alike).

    ``budget`` (whole-cache rows) replaces ``config`` and ``values``: every layer's split
    between keys and values is measured by :func:`svdq.kv.compress_kv` on each compressed
    cache, or, with ``calibrated_split``, once per layer on the shared bases' calibration text
    (:func:`svdq_client.hf.calibrate_key_shares`, filled into ``layer_shares`` by
    :func:`calibrate_splits`), as the integration does with ``calibrate_split=True``.
    """

    name: str
    config: svdq.CodecConfig
    shared_basis: bool = False
    values: ValueConfig = ValueConfig()
    budget: CacheBudget | None = None
    calibrated_split: bool = False
    layer_shares: tuple[float, ...] | None = None

    def layer_budget(self, layer: int) -> CacheBudget:
        """The budget layer ``layer`` is compressed with: its calibrated share, or every candidate."""
        if self.budget is None:
            raise ValueError(f"{self.name} is not a whole-cache row")
        if self.calibrated_split and self.layer_shares is None:
            raise ValueError(f"{self.name}: its split was not calibrated (calibrate_splits)")
        return self.budget.with_share(self.layer_shares[layer] if self.layer_shares is not None else None)

    @property
    def whole_cache(self) -> bool:
        return self.budget is not None or self.values.method == "svdq"


def latent_values(bits: float) -> ValueConfig:
    """SVDq latent values at ``bits`` true bits per value element, otherwise the defaults."""
    return ValueConfig(codec=replace(DEFAULT_VALUE_CODEC, bits_per_element=bits))


#: Whole-cache keys that also keep their 4 worst-reconstructed quantized tokens exact.
EXACT_KEYS = svdq.CodecConfig(exact_tokens=4)


def exact_share_keys(bits: int, share: float = 0.125) -> svdq.CodecConfig:
    """Whole-cache keys that keep ``share`` of their quantized tokens (at least 4), the worst
    reconstructed, as ``bits``-bit corrections of their reconstruction: the budget's default
    :data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC` at 2 bits and 1/8."""
    return replace(DEFAULT_CACHE_KEY_CODEC, exact_share=share, exact_bits=bits)


def main_methods() -> list[Method]:
    """The headline table: fp16, keys-only SVDq, KIVI-like baselines, whole-cache SVDq.

    Whole-cache rows name their keys: ``key_codec=C()`` keeps none exact (the budget's own
    default, :data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC`, is the "1/8 exact keys 2-bit" rows')."""
    C = svdq.CodecConfig
    return [
        Method("fp16 K and V", C(method="fp16")),
        Method("keys svdq 1.5, values fp16", C(bits_per_element=1.5)),
        Method("keys svdq 1.5, values fp16, shared", C(bits_per_element=1.5), shared_basis=True),
        # Short prompts (keys-only): the worst-reconstructed keys exact, a shorter 16-bit tail
        # (smaller groups), more 16-bit sinks.
        Method("keys svdq 1.5, values fp16, shared, 4 exact keys", EXACT_KEYS, shared_basis=True),
        Method("keys svdq 1.5 g32, values fp16, shared", C(bits_per_element=1.5, group_size=32), shared_basis=True),
        Method("keys svdq 1.5 g16, values fp16, shared", C(bits_per_element=1.5, group_size=16), shared_basis=True),
        Method("keys svdq 1.5 16 sinks, values fp16, shared", C(bits_per_element=1.5, num_sinks=16), shared_basis=True),
        Method("kivi 2-bit K and V g32", C(method="kivi", bits=2, group_size=32), values=ValueConfig(bits=2, group_size=32)),
        Method("kivi 2-bit K g128, V g64", C(method="kivi", bits=2, group_size=128), values=ValueConfig(bits=2)),
        Method("kivi 4-bit K and V g32", C(method="kivi", bits=4, group_size=32), values=ValueConfig(bits=4, group_size=32)),
        Method("keys svdq 1.5, values 4-bit per token", C(bits_per_element=1.5), values=ValueConfig(bits=4)),
        Method("svdq K 1.5 + V 2.5, own bases", C(bits_per_element=1.5), values=latent_values(2.5)),
        Method("svdq K 1.5 + V 2.5, shared", C(bits_per_element=1.5), values=latent_values(2.5), shared_basis=True),
        Method("svdq cache 1.5 bits, shared", C(), budget=CacheBudget(1.5, key_codec=C()), shared_basis=True),
        Method("svdq cache 1.75 bits, shared", C(), budget=CacheBudget(1.75, key_codec=C()), shared_basis=True),
        Method("svdq cache 2.0 bits, own bases", C(), budget=CacheBudget(2.0, key_codec=C())),
        Method("svdq cache 2.0 bits, shared", C(), budget=CacheBudget(2.0, key_codec=C()), shared_basis=True),
        Method("svdq cache 2.5 bits, shared", C(), budget=CacheBudget(2.5, key_codec=C()), shared_basis=True),
        Method("svdq cache 1.5 bits, shared, 4 exact keys", C(), budget=CacheBudget(1.5, key_codec=EXACT_KEYS),
               shared_basis=True),
        Method("svdq cache 1.75 bits, shared, 4 exact keys", C(), budget=CacheBudget(1.75, key_codec=EXACT_KEYS),
               shared_basis=True),
        Method("svdq cache 2.0 bits, shared, 4 exact keys", C(), budget=CacheBudget(2.0, key_codec=EXACT_KEYS),
               shared_basis=True),
    ] + [
        Method(f"svdq cache {total} bits, shared, 1/8 exact keys {bits}-bit", C(),
               budget=CacheBudget(total, key_codec=exact_share_keys(bits)), shared_basis=True)
        for total in (1.5, 1.75, 2.0) for bits in (4, 2)
    ] + [Method("svdq cache 2.5 bits, shared, 1/8 exact keys 2-bit", C(),
                budget=CacheBudget(2.5, key_codec=exact_share_keys(2)), shared_basis=True),
         # The integration's calibrate_split=True: the split measured once on the calibration text.
         Method(CALIBRATED_DEFAULT, C(), budget=CacheBudget(2.0, key_codec=exact_share_keys(2)), shared_basis=True,
                calibrated_split=True)]


#: The whole-cache default with its key/value split calibrated once per layer (the
#: integration's opt-in ``calibrate_split=True``) instead of measured on every upload.
CALIBRATED_DEFAULT = "svdq cache 2.0 bits, shared, 1/8 exact keys 2-bit, calibrated split"


def calibrate_splits(model, methods: Sequence[Method], calibration_ids: torch.Tensor, bases: Bases) -> list[Method]:
    """``methods`` with every ``calibrated_split`` row's ``layer_shares`` measured on
    ``calibration_ids`` (the shared bases' text, never evaluated text) with those bases."""
    calibrated = []
    for method in methods:
        if method.calibrated_split:
            shares = calibrate_key_shares(model, calibration_ids, method.budget,
                                          key_bases=bases.keys if method.shared_basis else None,
                                          value_bases=bases.values if method.shared_basis else None)
            method = replace(method, layer_shares=shares)
            LOGGER.info("%s: calibrated key shares %s", method.name, " ".join(f"{s:.4g}" for s in shares))
        calibrated.append(method)
    return calibrated


def explore_methods() -> list[Method]:
    """Settings explored at 1.5 bits for the defaults: group size, sinks, shared basis."""
    C = svdq.CodecConfig
    methods = [
        Method(f"svdq 1.5 g{group} sinks{sinks}", C(bits_per_element=1.5, group_size=group, num_sinks=sinks))
        for group in (32, 64, 128)
        for sinks in (0, 4, 16)
        if (group, sinks) != (svdq.codec.DEFAULT_GROUP_SIZE, svdq.codec.DEFAULT_SINKS)  # = the main table's
    ]
    methods.append(Method("svdq 1.5 shared basis", C(bits_per_element=1.5), shared_basis=True))
    methods.append(Method("svdq 1.25 shared basis", C(bits_per_element=1.25), shared_basis=True))
    return methods


def explore_value_methods() -> list[Method]:
    """How to store values, keys fixed at svdq 1.5 bits with a shared basis: per-token
    quantization against SVDq latent values with their own or a shared basis, token groups
    and the allocation's noise weighing (``noise_averaging``)."""
    C = svdq.CodecConfig
    keys = C(bits_per_element=1.5)
    methods = [Method("values per-token 4-bit g64", keys, True, ValueConfig(bits=4)),
               Method("values per-token 2-bit g64", keys, True, ValueConfig(bits=2)),
               Method("values per-token 2-bit g32", keys, True, ValueConfig(bits=2, group_size=32)),
               Method("values latent 2.5 own basis g32 noise 3", keys, False, latent_values(2.5))]
    for group in (32, 64):
        for noise in (1.0, 3.0, 5.0):
            codec = C(bits_per_element=2.5, group_size=group, noise_averaging=noise)
            methods.append(Method(f"values latent 2.5 g{group} noise {noise:g}", keys, True, ValueConfig(codec=codec)))
    return methods


#: Methods that also answer the needle cases by default (``--needle-methods``; each case costs
#: one compression per method, a whole-cache one five; on the shared 2-core machine 36 cases x
#: 3 methods take ~35 min). The targets compare with the fp16 row's count (the float32 cache's
#: where the fp16 row has none).
NEEDLE_METHODS = ("fp16 K and V", "keys svdq 1.5, values fp16", "kivi 2-bit K and V g32", "svdq cache 2.0 bits, shared",
                  "svdq cache 2.0 bits, shared, 4 exact keys", "svdq cache 2.0 bits, shared, 1/8 exact keys 4-bit",
                  "svdq cache 2.0 bits, shared, 1/8 exact keys 2-bit", "svdq cache 1.75 bits, shared, 1/8 exact keys 2-bit",
                  "svdq cache 1.5 bits, shared, 1/8 exact keys 2-bit", CALIBRATED_DEFAULT)
#: Methods scored again at the short prefix (the issue's 1,024-token case).
SHORT_METHODS = ("fp16 K and V", "keys svdq 1.5, values fp16", "keys svdq 1.5, values fp16, shared",
                 "svdq cache 2.0 bits, own bases", "svdq cache 2.0 bits, shared", "svdq cache 2.5 bits, shared",
                 "svdq cache 2.0 bits, shared, 4 exact keys", "svdq cache 2.0 bits, shared, 1/8 exact keys 4-bit",
                 "svdq cache 2.0 bits, shared, 1/8 exact keys 2-bit", CALIBRATED_DEFAULT)


@dataclass
class Bases:
    """Shared per-layer key and value bases and what they were fitted on: ``window``, the
    token range of the evaluation text."""

    keys: Sequence[svdq.Basis]
    values: Sequence[svdq.Basis]
    source: str
    window: tuple[int, int] = (0, 0)

    def refuse_overlap(self, start: int, stop: int, what: str) -> None:
        """Stop the run when evaluated text tokens ``start..stop`` overlap the calibration text."""
        if start < self.window[1] and self.window[0] < stop:
            raise SystemExit(f"{what} (text tokens {start}-{stop}) overlaps the shared bases' calibration text "
                             f"({self.source}): shared-basis rows must not be fitted on what they evaluate; "
                             "shorten the windows or use the other --calibration")


@dataclass
class KeyStats:
    """Byte and error accounting of one method's keys and values over the layers of one prefix."""

    serialized_bytes: int = 0
    value_bytes: int = 0
    elements: int = 0
    error_sq: float = 0.0
    reference_sq: float = 0.0
    value_error_sq: float = 0.0
    value_reference_sq: float = 0.0
    layer_errors: list[float] = field(default_factory=list)
    key_shares: list[float] = field(default_factory=list)
    blobs_checked: int = 0

    @property
    def bits_per_element(self) -> float:
        """True bits per key element."""
        return 8.0 * self.serialized_bytes / max(1, self.elements)

    @property
    def value_bits_per_element(self) -> float:
        return 8.0 * self.value_bytes / max(1, self.elements)

    @property
    def total_bits_per_element(self) -> float:
        """True bits per KV element: keys' and values' bytes over twice the key elements."""
        return 8.0 * (self.serialized_bytes + self.value_bytes) / max(1, 2 * self.elements)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes of the keys over their serialized bytes."""
        return 16.0 / self.bits_per_element

    @property
    def total_ratio(self) -> float:
        """fp16 bytes of keys and values over their serialized bytes."""
        return 16.0 / self.total_bits_per_element

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / max(self.reference_sq, 1e-300))

    @property
    def value_relative_error(self) -> float:
        return math.sqrt(self.value_error_sq / max(self.value_reference_sq, 1e-300))


def cache_transforms(method: Method, rope: svdq.RopeConfig, stats: KeyStats, prefix: harness.PrefixCache,
                     bases: Bases | None = None) -> tuple[harness.KeyTransform, harness.ValueTransform]:
    """Key and value transforms that round-trip each layer through the serialized codecs.

    The key transform compresses the layer's keys and values (the values from ``prefix``,
    together, since a whole-cache budget splits its bits between them) and keeps the decoded
    values for the value transform, which the harness calls next for the same layer. ``stats``
    accumulates the serialized sizes (``len(to_bytes(...))``) and errors; what the model sees
    is decoded from the bytes, so nothing that is not stored can leak in.
    """
    decoded_values: dict[int, torch.Tensor] = {}

    def transform_keys(layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        values = prefix.values[layer]
        key_basis = bases.keys[layer] if method.shared_basis and bases is not None else None
        value_basis = bases.values[layer] if method.shared_basis and bases is not None else None
        if method.budget is not None:
            cache = compress_kv(keys, values, method.layer_budget(layer), positions=positions, rope=rope, key_space="post_rope",
                                key_basis=key_basis, value_basis=value_basis)
            compressed, stored_values = cache.keys, cache.values
            stats.key_shares.append(cache.key_share)
        else:
            compressed = svdq.compress(keys, method.config, positions=positions, rope=rope, key_space="post_rope",
                                       basis=key_basis)
            stored_values = compress_values(values, method.values,
                                            basis=value_basis if method.values.method == "svdq" else None)
        blob = svdq.to_bytes(compressed)
        value_blob = values_to_bytes(stored_values)
        if len(blob) != compressed.nbytes or len(value_blob) != stored_values.nbytes:
            raise AssertionError(f"{method.name} layer {layer}: nbytes {compressed.nbytes}/{stored_values.nbytes} != "
                                 f"{len(blob)}/{len(value_blob)} serialized")
        restored = svdq.decompress(svdq.from_bytes(blob, basis=key_basis), "post_rope", dtype=torch.float32)
        restored_values = decompress_values(
            values_from_bytes(value_blob, basis=value_basis if stored_values.method == "svdq" else None), torch.float32)
        decoded_values[layer] = restored_values
        stats.serialized_bytes += len(blob)
        stats.value_bytes += len(value_blob)
        stats.elements += keys.numel()
        stats.blobs_checked += 1
        error = (restored.double() - keys.double()).pow(2).sum().item()
        reference = keys.double().pow(2).sum().item()
        stats.error_sq += error
        stats.reference_sq += reference
        stats.layer_errors.append(math.sqrt(error / reference))
        stats.value_error_sq += (restored_values.double() - values.double()).pow(2).sum().item()
        stats.value_reference_sq += values.double().pow(2).sum().item()
        return restored

    def transform_values(layer: int, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if values is not prefix.values[layer]:
            raise AssertionError(f"value transform of layer {layer} called on values other than the prefix's")
        return decoded_values.pop(layer)

    return transform_keys, transform_values


@dataclass
class Row:
    """One method's results."""

    method: Method
    stats: KeyStats
    dnll: float
    #: needle length -> (found, cases)
    needles: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: needle length -> bytes and elements of every case's key and value blobs
    needle_stats: dict[int, KeyStats] = field(default_factory=dict)


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


def score_nll(model, setup: NllSetup, methods: Sequence[Method], bases: Bases | None = None,
              progress: Callable[[str], None] = LOGGER.info) -> list[Row]:
    """One row per method: bytes, errors and dNLL of the continuation over its cache."""
    rows = []
    for method in methods:
        stats = KeyStats()
        keys, values = cache_transforms(method, setup.rope, stats, setup.prefix, bases)
        nll = harness.continuation_nll(model, setup.prefix, setup.continuation_ids, keys, value_transform=values)
        rows.append(Row(method, stats, nll - setup.reference_nll))
        progress(f"{method.name}: {stats.bits_per_element:.3f} + {stats.value_bits_per_element:.3f} bits, "
                 f"dNLL {nll - setup.reference_nll:+.4f}")
    return rows


def score_needles(model, tokenizer, rows: Sequence[Row], *, count: int = 12, tokens: int = 4096,
                  filler: str = "noise", bases: Bases | None = None,
                  progress: Callable[[str], None] = LOGGER.info) -> list[bool]:
    """Answer the needle cases of one length with each row's method (fills ``row.needles[tokens]``).

    Every case is prefilled once without compression; each method then replaces the keys and
    values of that prefill. Returns whether the uncompressed float32 cache answered each case.
    """
    rope = svdq.RopeConfig.from_hf_config(model.config)
    found = {row.method.name: 0 for row in rows}
    reference_found: list[bool] = []
    for case in harness.needle_cases(tokenizer, tokens, count=count, filler=filler):
        if bases is not None and case.text_window is not None:
            bases.refuse_overlap(*case.text_window, f"the haystack of the {tokens}-token needle case at depth "
                                 f"{case.depth:.2f}")
        case_prefix = harness.prefill(model, case.prefix_ids)
        reference_found.append(harness.needle_found(
            harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids), case))
        for row in rows:
            stats = row.needle_stats.setdefault(tokens, KeyStats())
            keys, values = cache_transforms(row.method, rope, stats, case_prefix, bases)
            answer = harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids, keys,
                                           value_transform=values)
            found[row.method.name] += harness.needle_found(answer, case)
        progress(f"needle {tokens} depth {case.depth:.2f}: fp32 cache {'ok' if reference_found[-1] else 'miss'}, "
                 + ", ".join(f"{name} {hits}" for name, hits in found.items()))
    for row in rows:
        row.needles[tokens] = (found[row.method.name], len(reference_found))
    return reference_found


def format_quality_table(rows: Sequence[Row], reference_found: dict[int, Sequence[bool]],
                         calibration: str = "-") -> str:
    """Markdown table of the rows; the first line is the uncompressed float32 reference.

    ``calibration`` names what the shared bases were fitted on (shown on shared-basis rows).
    """
    lengths = sorted(reference_found)
    needle_heads = "".join(f" needle {n} |" for n in lengths)
    lines = [
        "| method | bases | key bits | value bits | total bits/KV elem | total ratio vs fp16 | rel. K err | "
        f"rel. V err | dNLL |{needle_heads}",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(lengths),
    ]
    if lengths:
        lines.append("| fp32 cache (reference) | - | 32 | 32 | 32 | 0.5x | 0 | 0 | 0 |"
                     + "".join(f" {sum(reference_found[n])}/{len(reference_found[n])} |" for n in lengths))
    for row in rows:
        needles = "".join(
            f" {row.needles[n][0]}/{row.needles[n][1]} |" if n in row.needles else " - |" for n in lengths)
        stats = row.stats
        lines.append(
            f"| {row.method.name} | {_bases_column(row.method, calibration)} | "
            f"{stats.bits_per_element:.3f} | {stats.value_bits_per_element:.3f} | "
            f"{stats.total_bits_per_element:.3f} | {stats.total_ratio:.2f}x | {stats.relative_error:.4f} | "
            f"{stats.value_relative_error:.4f} | {row.dnll:+.4f} |{needles}"
        )
    return "\n".join(lines)


def _bases_column(method: Method, calibration: str) -> str:
    """The table's "bases" column: where the shared bases (and a calibrated split) come from."""
    if not method.shared_basis:
        return "own" + ("; split calibrated on the evaluated text" if method.calibrated_split else "")
    return f"{calibration}{'; split calibrated there too' if method.calibrated_split else ''}"


def _needle_parity(row: Row, fp16: Row | None, reference_found: dict[int, Sequence[bool]]) -> tuple[bool, str]:
    """Whether ``row`` finds as many needles as fp16 (else the float32 cache) at every length."""
    parts, ok = [], True
    for length in sorted(reference_found):
        if length not in row.needles:
            return False, "needles not run"
        target = fp16.needles[length][0] if fp16 is not None and length in fp16.needles else sum(reference_found[length])
        ok &= row.needles[length][0] >= target
        parts.append(f"{length}: {row.needles[length][0]} vs {target}")
    return ok, ", ".join(parts) or "needles not run"


def target_checks(rows: Sequence[Row], reference_found: dict[int, Sequence[bool]]) -> list[str]:
    """The issue's targets, each as a PASS/FAIL line with the numbers behind it.

    * whole cache <= 2.0 true bits per KV element (>= 8x smaller than fp16) with dNLL <= 0.03
      and fp16's needle count at every length;
    * the frontier: the largest whole-cache ratio with dNLL <= 0.06 and needle parity.
    """
    fp16 = next((r for r in rows if r.method.config.method == "fp16"), None)
    whole = [r for r in rows if r.method.whole_cache]
    lines = []
    for row in [r for r in whole if r.stats.total_bits_per_element <= 2.0]:
        parity, needles = _needle_parity(row, fp16, reference_found)
        ok = row.dnll <= 0.03 and parity
        lines.append(f"{'PASS' if ok else 'FAIL'} {row.method.name}: {row.stats.total_bits_per_element:.3f} bits per "
                     f"KV element ({row.stats.total_ratio:.2f}x) needs dNLL <= 0.03 ({row.dnll:+.4f}) and fp16's "
                     f"needles ({needles})")
    frontier = [r for r in whole if r.dnll <= 0.06 and _needle_parity(r, fp16, reference_found)[0]]
    if frontier:
        best = max(frontier, key=lambda r: r.stats.total_ratio)
        lines.append(f"frontier: {best.method.name}, {best.stats.total_ratio:.2f}x smaller than fp16 "
                     f"({best.stats.total_bits_per_element:.3f} bits per KV element), dNLL {best.dnll:+.4f}, "
                     f"needles {_needle_parity(best, fp16, reference_found)[1]}")
    else:
        lines.append("frontier: no whole-cache row has dNLL <= 0.06 with fp16's needles at every length")
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


def synthetic_layer_values(tokens: int, kv_heads: int = 8, head_dim: int = 128, seed: int = 1) -> torch.Tensor:
    """float16 [tokens, kv_heads, head_dim] values: a flatter latent spectrum than the keys'
    (as measured on SmolLM2, docs/quality.md), a random rotation and a mean; no RoPE."""
    generator = torch.Generator().manual_seed(seed)
    channels = kv_heads * head_dim
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
    scales = 2.0 * torch.exp(-torch.arange(channels, dtype=torch.float32) / 160.0) + 0.05
    latent = torch.randn(tokens, channels, generator=generator) * scales
    flat = latent @ rotation.T + 0.1 * torch.randn(channels, generator=generator)
    return flat.reshape(tokens, kv_heads, head_dim).to(torch.float16)


@dataclass(frozen=True)
class ThroughputRow:
    name: str
    compress: Callable[[], object]  # returns the blob (or the copy)
    decompress: Callable[[object], object] | None = None
    tensors: int = 1  # fp16 tensors of the layer's shape it reads: 2 for keys + values


def _blob_bytes(blob: object) -> bytes | None:
    """The serialized bytes a compress returned (a whole-cache row returns two blobs), or None
    for the memory copy."""
    if isinstance(blob, tuple):
        return b"".join(blob)
    return blob if isinstance(blob, bytes) else None


def _blob_digest(blob: object) -> str:
    import hashlib

    data = _blob_bytes(blob)
    return hashlib.sha256(data).hexdigest()[:12] if data is not None else "-"


def throughput_rows(tokens: int) -> tuple[torch.Tensor, list[ThroughputRow]]:
    """The compared paths on one synthetic layer: a memory copy, the fp16 passthrough codec,
    svdq with the sequence's own basis and with a shared basis fitted on other tokens of the
    same synthetic layer (positions ``tokens..2*tokens``), the KIVI-like baseline and two value
    codecs. Compress ends in the serialized blob (``to_bytes``), decompress starts from it."""
    keys = synthetic_layer_keys(tokens)
    calibration = synthetic_layer_keys(2 * tokens)[tokens:]
    shared = svdq.fit_layer_basis(calibration, torch.arange(tokens, 2 * tokens), LLAMA3_ROPE)
    values = synthetic_layer_values(tokens)
    # The same synthetic values' other tokens (same rotation; their mean is drawn anew).
    shared_values = svdq.fit_layer_basis(synthetic_layer_values(2 * tokens)[tokens:])
    positions = torch.arange(tokens)

    def keys_row(name: str, config: svdq.CodecConfig, basis: svdq.Basis | None = None) -> ThroughputRow:
        def compress_one() -> bytes:
            return svdq.to_bytes(svdq.compress(keys, config, positions=positions, rope=LLAMA3_ROPE,
                                               key_space="post_rope", basis=basis))

        return ThroughputRow(name, compress_one,
                             lambda blob: svdq.decompress(svdq.from_bytes(blob, basis), "post_rope"))

    def values_row(name: str, config: ValueConfig) -> ThroughputRow:
        return ThroughputRow(name, lambda: values_to_bytes(compress_values(values, config)),
                             lambda blob: decompress_values(values_from_bytes(blob)))

    def cache_row(name: str, budget: CacheBudget, bases: bool = False) -> ThroughputRow:
        key_basis, value_basis = (shared, shared_values) if bases else (None, None)

        # Both blobs, every byte: (keys' blob, values' blob).
        def compress_one() -> tuple[bytes, bytes]:
            cache = compress_kv(keys, values, budget, positions=positions, rope=LLAMA3_ROPE, key_space="post_rope",
                                key_basis=key_basis, value_basis=value_basis)
            return svdq.to_bytes(cache.keys), values_to_bytes(cache.values)

        def decompress_one(blobs: tuple[bytes, bytes]) -> object:
            return (svdq.decompress(svdq.from_bytes(blobs[0], key_basis), "post_rope"),
                    decompress_values(values_from_bytes(blobs[1], basis=value_basis)))

        return ThroughputRow(name, compress_one, decompress_one, tensors=2)

    return keys, [
        ThroughputRow("memory copy (keys.clone)", keys.clone),
        keys_row("keys fp16 passthrough", svdq.CodecConfig(method="fp16")),
        keys_row("keys svdq 1.5 bits, own basis", svdq.CodecConfig(bits_per_element=1.5)),
        keys_row("keys svdq 1.5 bits, shared basis", svdq.CodecConfig(bits_per_element=1.5), shared),
        keys_row("keys kivi 2-bit g128", svdq.CodecConfig(method="kivi", bits=2, group_size=128)),
        values_row("values svdq 2.5 bits", latent_values(2.5)),
        values_row("values per-token 2-bit g64", ValueConfig(bits=2)),
        cache_row("cache svdq 2.0 bits, split measured per upload (5 trials)", CacheBudget(2.0, key_codec=EXACT_KEYS)),
        cache_row("cache svdq 2.0 bits, calibrated split (profile cache_key_shares)",
                  CacheBudget(2.0, key_codec=EXACT_KEYS, key_shares=(0.3125,))),
        # The demo's and the integration's default: shared key and value bases.
        cache_row("cache svdq 2.0 bits, shared bases, split measured per upload (5 trials)",
                  CacheBudget(2.0, key_codec=EXACT_KEYS), bases=True),
        cache_row("cache svdq 2.0 bits, shared bases, calibrated split",
                  CacheBudget(2.0, key_codec=EXACT_KEYS, key_shares=(0.3125,)), bases=True),
    ]


def throughput_table(token_counts: Sequence[int] = (8192, 32768), repeats: int = 5,
                     clock: Callable[[], float] = time.perf_counter) -> str:
    """Markdown table of compress / decompress MB/s (of the layer's fp16 keys or values) of
    every :func:`throughput_rows` path, measured in turns in this process (medians of
    ``repeats``) so that load on the machine falls on all rows alike; times relative to the
    memory copy; the blob's bits per element and the first hex digits of its SHA-256 (equal
    digests: byte-identical blobs across code versions). ``clock``: wall time, or
    ``time.thread_time`` (CPU time of this thread: one torch thread on a shared machine)."""
    lines = [
        "| layer [tokens x 8 x 128] | path | compress MB/s | decompress MB/s | compress / copy | "
        "bits per element | ratio vs fp16 | blob sha256 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for tokens in token_counts:
        keys, rows = throughput_rows(tokens)
        blobs = [row.compress() for row in rows]  # warm-up, and the blob each decompress reads
        compress_times: list[list[float]] = [[] for _ in rows]
        decompress_times: list[list[float]] = [[] for _ in rows]
        for _ in range(repeats):
            for index, (row, blob) in enumerate(zip(rows, blobs, strict=True)):
                started = clock()
                row.compress()
                compress_times[index].append(clock() - started)
                if row.decompress is not None:
                    started = clock()
                    row.decompress(blob)
                    decompress_times[index].append(clock() - started)
        copy_s = statistics.median(compress_times[0])
        for row, blob, c_times, d_times in zip(rows, blobs, compress_times, decompress_times, strict=True):
            elements = keys.numel() * row.tensors
            megabytes = elements * 2 / 1e6
            compress_s = statistics.median(c_times)
            decompress = f"{megabytes / statistics.median(d_times):.1f}" if d_times else "-"
            data = _blob_bytes(blob)
            if data is not None:
                bits, ratio = f"{8 * len(data) / elements:.4f}", f"{2 * elements / len(data):.2f}x"
            else:
                bits, ratio = "16", "1.00x"
            # compress / copy: against a copy of the same number of bytes
            lines.append(f"| {tokens} | {row.name} | {megabytes / compress_s:.1f} | {decompress} | "
                         f"{compress_s / (copy_s * row.tensors):.0f}x | {bits} | {ratio} | {_blob_digest(blob)} |")
    return "\n".join(lines)


def print_throughput(token_counts: Sequence[int], repeats: int, clock: str = "wall") -> None:
    timer = time.perf_counter if clock == "wall" else time.thread_time
    print(f"## Throughput ({torch.get_num_threads()} torch threads, median of {repeats} runs in turns, "
          f"{'wall time' if clock == 'wall' else 'CPU time of the timing thread'}, MB/s of "
          "the layer's fp16 tensor; synthetic post-RoPE Llama-3 keys: compress = undo RoPE + fit + allocate + "
          "quantize + pack + to_bytes, decompress = from_bytes + reconstruct + RoPE; synthetic values likewise)")
    print()
    print(throughput_table(token_counts, repeats, timer))
    sys.stdout.flush()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="short run: 384-token prefix, four methods, one needle case of 768 tokens")
    parser.add_argument("--prefix-tokens", type=int, default=3072, help="tokens whose keys are compressed")
    parser.add_argument("--continuation-tokens", type=int, default=512, help="tokens scored after the prefix")
    parser.add_argument("--needle-cases", type=int, default=12, help="needle prompts (0 = skip the needle test)")
    parser.add_argument("--needle-tokens", type=int, nargs="+", default=[512, 1024, 4096],
                        help="needle prompt lengths (each gets --needle-cases cases)")
    parser.add_argument("--short-prefix-tokens", type=int, default=1024,
                        help="prefix of the short-prompt table (0 = skip it)")
    parser.add_argument("--calibration-tokens", type=int, default=2048,
                        help="tokens of text that the shared bases are fitted on")
    parser.add_argument("--calibration", choices=("after", "default"), default="after",
                        help="where that text lies: 'after' the scored windows, or 'default': the end of the text, "
                             "the window the transformers integration and svdq-demo calibrate on by default "
                             "(svdq_client.hf.default_calibrated_bases); a window that overlaps any evaluated text "
                             "stops the run")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="only these rows of the main table (names as printed); default all")
    parser.add_argument("--needle-methods", nargs="*", default=list(NEEDLE_METHODS),
                        help="rows of the main table that also answer the needle cases (names as printed)")
    parser.add_argument("--needle-filler", choices=("noise", "prose"), default="noise",
                        help="haystack: repeated plain sentences (RULER's noise haystack) or the docs prose")
    parser.add_argument("--no-explore", action="store_true", help="skip the group size / sinks / basis sweep")
    parser.add_argument("--explore-only", action="store_true",
                        help="print only the sweeps (value options, key settings), not the main table")
    parser.add_argument("--throughput-tokens", type=int, nargs="*", default=[8192, 32768],
                        help="token counts of the throughput layer (none = skip)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per throughput median")
    parser.add_argument("--throughput-only", action="store_true",
                        help="print only the throughput table (no model is loaded)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default); 1 is much faster on an oversubscribed CPU, "
                             "where multi-threaded LAPACK calls such as the basis eigh stall for seconds")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="throughput timer: wall time, or the timing thread's CPU time (with --threads 1, on a "
                             "machine shared with other jobs)")
    parser.add_argument("--server-malloc", action="store_true",
                        help="throughput: set glibc malloc as the server does at start (its default "
                             "--malloc-trim-bytes, svdq_server.app.tune_malloc) before timing, so that the table is "
                             "what the server's process pays; without it, this process's glibc defaults")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread only: use it with --threads 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.server_malloc:
        from svdq_server.app import tune_malloc
        from svdq_server.config import Settings

        print(f"malloc as the server sets it: {tune_malloc(0, Settings().malloc_trim_bytes) or 'nothing (not glibc)'}")
    if args.throughput_only:
        print_throughput(args.throughput_tokens or [8192], args.repeats, args.clock)
        return 0
    from svdq_client.models import load_smollm2

    methods = main_methods()
    if args.smoke:
        args.prefix_tokens, args.continuation_tokens, args.short_prefix_tokens = 384, 64, 256
        args.needle_cases, args.needle_tokens, args.calibration_tokens = 1, [768], 400
        args.no_explore, args.throughput_tokens, args.repeats = True, [1024], 2
        args.methods = ["fp16 K and V", "keys svdq 1.5, values fp16", "kivi 2-bit K and V g32",
                        "svdq cache 2.0 bits, shared"]
    unknown = (set(args.methods or ()) | set(args.needle_methods)) - {m.name for m in methods}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
    if args.methods is not None:
        methods = [m for m in methods if m.name in args.methods]
    started = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    # Shared bases: fitted on text no scored window holds (checked here, before any prefill,
    # for the NLL windows, in score_needles for prose haystacks), never on what is evaluated.
    scored_stop = max(args.prefix_tokens, args.short_prefix_tokens) + args.continuation_tokens
    if args.calibration == "default":
        window = harness.calibration_window(tokenizer, args.calibration_tokens)
        calibration = f"text tokens {window[0]}-{window[1]} (the integration's default)"
    else:
        window = (scored_stop, scored_stop + args.calibration_tokens)
        calibration = f"text tokens {window[0]}-{window[1]}"
    bases = Bases((), (), calibration, window)
    bases.refuse_overlap(0, scored_stop, "the scored prefix and continuation")
    setup = prepare_nll(model, tokenizer, args.prefix_tokens, args.continuation_tokens)
    if args.calibration == "default":
        calibration_ids = harness.calibration_tokens(tokenizer, args.calibration_tokens)
        bases.keys, bases.values = default_calibrated_bases(model, tokenizer, args.calibration_tokens)
    else:
        calibration_ids = harness.text_tokens(tokenizer, args.calibration_tokens, start=window[0])
        bases.keys, bases.values = calibrate_cache_bases(model, calibration_ids)
    methods = calibrate_splits(model, methods, calibration_ids, bases)
    print(f"## Cache quality: SmolLM2-135M-Instruct (float32, CPU), text: {harness.TEXT_SOURCE}")
    print(f"prefix {args.prefix_tokens} tokens (text tokens 0-{args.prefix_tokens}), continuation "
          f"{args.continuation_tokens} tokens (dNLL over the last {args.continuation_tokens - 1}), reference NLL "
          f"{setup.reference_nll:.4f} nats/token; bits and ratios from the serialized key and value blobs of the "
          "prefix, all layers, everything included; 'shared' rows use key and value bases fitted on "
          f"{calibration}")
    print(f"RoPE exactness (max over layers, relative to max |key|): undo+apply {setup.rope_check.roundtrip:.2e}, "
          f"undo vs k_proj outputs {setup.rope_check.undo_vs_k_proj:.2e}")
    sys.stdout.flush()
    if args.explore_only:
        methods, args.needle_cases, args.short_prefix_tokens = [], 0, 0
    rows = score_nll(model, setup, methods, bases)
    reference_found: dict[int, list[bool]] = {}
    needle_rows = [row for row in rows if row.method.name in args.needle_methods or args.smoke]
    if args.needle_cases and needle_rows:
        for length in args.needle_tokens:
            reference_found[length] = score_needles(model, tokenizer, needle_rows, count=args.needle_cases,
                                                    tokens=length, filler=args.needle_filler, bases=bases)
    print(f"needle: {args.needle_cases} cases at each length, {args.needle_filler} filler, depths evenly spread "
          "0..1, greedy answer after the question; '-' = not run for that method")
    if rows:
        print()
        print(format_quality_table(rows, reference_found, calibration))
        print()
        for line in target_checks(rows, reference_found):
            print(line)
    for row in rows:
        if row.needle_stats:
            print(f"{row.method.name}: stored bits per KV element of the needle prompts (all cases, every byte) "
                  + ", ".join(f"{length}: {stats.total_bits_per_element:.3f} ({stats.bits_per_element:.3f} K + "
                              f"{stats.value_bits_per_element:.3f} V)" for length, stats in sorted(row.needle_stats.items())))
    for row in rows:
        if row.stats.key_shares:
            shares = row.stats.key_shares
            how = "calibrated split" if row.method.calibrated_split else "measured split"
            print(f"{row.method.name}: key share of the bits per layer ({how}) "
                  + " ".join(f"{share:.2f}" for share in shares))
    sys.stdout.flush()
    if args.short_prefix_tokens:
        short = prepare_nll(model, tokenizer, args.short_prefix_tokens, args.continuation_tokens)
        short_methods = [m for m in methods if m.name in SHORT_METHODS or args.smoke]
        short_rows = score_nll(model, short, short_methods, bases)
        print()
        print(f"## Short prompt: prefix {args.short_prefix_tokens} tokens (text tokens 0-{args.short_prefix_tokens}), "
              f"continuation {args.continuation_tokens}, reference NLL {short.reference_nll:.4f}; shared bases as above")
        print()
        print(format_quality_table(short_rows, {}, calibration))
        sys.stdout.flush()
    if not args.no_explore:
        value_rows = score_nll(model, setup, explore_value_methods(), bases)
        print()
        print("## Value options, keys svdq 1.5 bits with a shared basis (same prefix; shared bases as above)")
        print()
        print(format_quality_table(value_rows, {}, calibration))
        sys.stdout.flush()
        explore_rows = score_nll(model, setup, explore_methods(), bases)
        print()
        print("## Key settings at 1.5 bits, values 16-bit (same prefix; shared bases as above)")
        print()
        print(format_quality_table(explore_rows, {}, calibration))
        sys.stdout.flush()
    if args.throughput_tokens:
        print()
        print_throughput(args.throughput_tokens, args.repeats, args.clock)
    LOGGER.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
