"""End-to-end benchmark: SmolLM2-135M with its KV prefix offloaded through the svdq service.

Every row runs the real model through :mod:`svdq_client.hf` (``SvdqOffloadCache`` +
``RemoteOffload``; ``--in-process`` swaps in ``LocalOffload``) against one server this script
starts on the CPU (or ``--address``). Rows, side by side in one process on the same cases:

* ``plain model``: the model alone, its exact DynamicCache (the reference, no service);
* ``fp16``: passthrough through the service (should equal the plain model);
* ``svdq``: SVDq keys at ``--bits`` true bits per element (every serialized byte counted),
  with the integration's default shared bases (fitted by ``SvdqOffloadCache`` on the end of
  the shipped prose, :func:`svdq_client.evaluation.calibration_window`, not the scored text);
* ``svdq+sparse``: the same keys, attention over ``--keep-fraction`` of the tokens;
* ``kivi2``: the KIVI-like baseline, 2-bit per-channel keys in groups of 32 tokens;
* ``svdq cache``, one per ``--cache-bits``: keys and SVDq latent values under one budget of
  that many true bits per KV element, with shared key and value bases and each layer's
  key/value split calibrated once on text after the dNLL window (not the evaluated text) and
  sent in the profile; keys keep 1/8 of their quantized tokens (at least 4), the worst
  reconstructed, as 2-bit corrections (:data:`svdq.kv.DEFAULT_CACHE_KEY_CODEC`, the budget's
  default, the best whole-cache setting ``bench/quality.py`` measured at 2.0 bits).

Columns:

* ``dNLL``: mean NLL (nats/token) of ``--continuation`` tokens of prose after a
  ``--prefix``-token prefix, minus the plain model's. The prefix is offloaded (all but the
  ``--window`` most recent tokens), the continuation runs as one chunk of queries.
* ``needle``: RULER-style needle cases answered (``--cases`` cases of ``--context`` tokens,
  svdq_client.evaluation): the document is offloaded, the question runs on top of it, the answer is
  generated greedily.
* ``key bits``: serialized key bytes the server stores over key elements (16 = fp16);
  ``stored/fp16``: the same as a share of fp16 bytes; ``KV bits``: key and value bytes over
  key and value elements (the whole cache, every byte).
* ``read/fp16``: key bytes the server read to answer attention over the prefix, over what
  dense fp16 attention reads (all needle answers).
* ``KiB read/step``: key bytes read per decode step (all layers, one query token).
* ``tok/s``: generated tokens per second of the needle answers (question chunk included);
  ``RPC %``: share of that time spent in server calls.

The document prefix of each case is computed once by the plain model and offloaded to every
row (``SvdqOffloadCache.offload_prefix``), so rows differ only in how the prefix is stored and
attended.

Two more tables, same process, baselines side by side:

* prefill: the first needle prompt (``--context`` tokens) through the plain model and through
  ``enable_offload`` + ``SvdqOffloadCache`` (SVDq at ``--bits``), alternately
  ``--prefill-repeats`` times; medians of the forward pass alone and of forward + upload.
* decode: ``--decode-tokens`` greedy tokens per row at batch 1, 4 and 8 (``--batches``) of
  ``--decode-context``-token prompts, through the service (SVDq keys at ``--bits`` with 16-bit
  values, and each ``--cache-bits`` whole-cache row) and with the plain model at the same
  batch; tokens/s counts every row's tokens.

``--parts`` runs some of the parts (prefill, decode, dnll, needles) and ``--rows`` some of the
rows, e.g. ``--parts decode --cache-bits 2.0 --batches 1`` or ``--parts needles --rows fp16 "svdq 1.5b"
"svdq cache 2b" --cache-bits 2.0`` to compare the keys-only and whole-cache tok/s alone.

Run: ``python bench/end_to_end.py`` (defaults sized to finish within 25 minutes on this
project's shared 2-core machine: 6 needle cases, 512-token decode prompts; the headline
prints each part's minutes; ``--cases 12 --decode-context 1024`` for the earlier, longer
tables; ``--cases 2 --context 2048 --batches 1,4`` for a quick look).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import psutil
import torch
from svdq_client import KVCacheClient
from svdq_client import evaluation as harness
from svdq_client.demo import local_server
from svdq_client.hf import LocalOffload, RemoteOffload, SvdqOffloadCache, disable_offload, enable_offload
from svdq_client.models import load_smollm2
from transformers import DynamicCache

from svdq.attention import SparsityConfig
from svdq.codec import Basis, CodecConfig
from svdq.kv import CacheBudget
from svdq.values import DEFAULT_VALUE_CODEC

#: The bench's parts (``--parts``), in the order they run.
PARTS = ("prefill", "decode", "dnll", "needles")


@dataclass(frozen=True)
class WholeCache:
    """Keys and latent values under one budget, with calibrated bases and split."""

    budget: CacheBudget
    key_bases: tuple[Basis, ...]
    value_bases: tuple[Basis, ...]
    key_shares: tuple[float, ...]


@dataclass(frozen=True)
class Row:
    """One way of storing the offloaded prefix."""

    name: str
    codec: CodecConfig
    sparsity: SparsityConfig | None = None
    cache: WholeCache | None = None


@dataclass
class Measure:
    """Accumulated results of one row."""

    nll: float | None = None
    found: int = 0
    cases: int = 0
    key_bytes: int = 0
    value_bytes: int = 0
    fp16_key_bytes: int = 0
    key_bytes_read: int = 0
    dense_fp16_key_bytes_read: int = 0
    read_entries: int = 0
    generated: int = 0
    generate_seconds: float = 0.0
    backend_seconds: float = 0.0
    answers: list[str] = field(default_factory=list)


def _rows(args: argparse.Namespace) -> list[Row]:
    svdq = CodecConfig(method="svdq", bits_per_element=args.bits)
    return [
        Row("fp16", CodecConfig(method="fp16")),
        Row(f"svdq {args.bits:g}b", svdq),
        Row(f"svdq {args.bits:g}b+sparse 1/{round(1 / args.keep_fraction)}", svdq,
            SparsityConfig(keep_fraction=args.keep_fraction)),
        Row("kivi2 (g32)", CodecConfig(method="kivi", bits=2, group_size=32, num_sinks=0)),
    ]


def _cache_rows(model, tokenizer, args: argparse.Namespace) -> list[Row]:
    """One whole-cache row per ``--cache-bits``, calibrated on the text after the dNLL window."""
    if not args.cache_bits:
        return []
    from svdq_client.hf import calibrate_cache_bases, calibrate_key_shares

    calibration = harness.text_tokens(tokenizer, 2048, start=args.prefix + args.continuation)
    key_bases, value_bases = calibrate_cache_bases(model, calibration)
    rows = []
    for bits in args.cache_bits:
        budget = CacheBudget(bits, value_codec=DEFAULT_VALUE_CODEC)  # keys: DEFAULT_CACHE_KEY_CODEC
        shares = calibrate_key_shares(model, calibration, budget, key_bases, value_bases)
        rows.append(Row(f"svdq cache {bits:g}b", budget.key_codec,
                        cache=WholeCache(budget, key_bases, value_bases, shares)))
    return rows


def _backend(row: Row, client: KVCacheClient | None):
    whole = row.cache
    if client is None:
        if whole is not None:
            return LocalOffload(bases=whole.key_bases, value_bases=whole.value_bases, cache_budget=whole.budget,
                                cache_key_shares=whole.key_shares, sparsity=row.sparsity)
        return LocalOffload(row.codec, sparsity=row.sparsity)
    if whole is not None:
        return RemoteOffload(client, row.codec, sparsity=row.sparsity, bases=whole.key_bases,
                             value_codec=whole.budget.value_codec, value_bases=whole.value_bases,
                             cache_bits_per_element=whole.budget.bits_per_element, cache_key_shares=whole.key_shares)
    return RemoteOffload(client, row.codec, sparsity=row.sparsity)


def _nll(logits: torch.Tensor, continuation_ids: torch.Tensor) -> float:
    """Mean NLL of tokens 2..T of the continuation, as svdq_client.evaluation.continuation_nll scores
    (the first token is predicted from the prefix's own last position)."""
    log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return float(-log_probs.gather(1, continuation_ids[0, 1:, None]).mean())


@torch.no_grad()
def measure_nll(model, tokenizer, rows, client, args, results) -> float:
    ids = harness.text_tokens(tokenizer, args.prefix + args.continuation)
    prefix_ids, continuation_ids = ids[:, : args.prefix], ids[:, args.prefix :]
    disable_offload(model)
    prefix = harness.prefill(model, prefix_ids)
    plain = harness.continuation_nll(model, prefix, continuation_ids)
    enable_offload(model)
    for row in rows:
        cache = SvdqOffloadCache(model, _backend(row, client), window=args.window, tokenizer=tokenizer)
        try:
            cache.offload_prefix(prefix.keys, prefix.values)
            positions = torch.arange(args.prefix, ids.shape[1])[None]
            logits = model(input_ids=continuation_ids, cache=cache, use_cache=True, position_ids=positions).logits
            results[row.name].nll = _nll(logits, continuation_ids)
        finally:
            cache.close()
    return plain


@torch.no_grad()
def measure_needles(model, tokenizer, rows, client, args, results) -> tuple[int, int]:
    cases = harness.needle_cases(tokenizer, context_tokens=args.context, count=args.cases)
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plain_found = 0
    for index, case in enumerate(cases):
        disable_offload(model)
        prefix = harness.prefill(model, case.prefix_ids)
        plain_found += harness.needle_found(harness.greedy_answer(model, tokenizer, prefix, case.question_ids), case)
        enable_offload(model)
        prompt_ids = torch.cat([case.prefix_ids, case.question_ids], dim=1)
        for row in rows:
            backend = _backend(row, client)
            cache = SvdqOffloadCache(model, backend, window=args.window, tokenizer=tokenizer)
            try:
                cache.offload_prefix(prefix.keys, prefix.values)
                stored = backend.stats
                measure = results[row.name]
                measure.key_bytes += stored.key_bytes_stored
                measure.value_bytes += stored.value_bytes_stored
                measure.fp16_key_bytes += stored.fp16_key_bytes_stored
                backend_before = stored.backend_seconds
                started = time.perf_counter()
                output_ids = model.generate(prompt_ids, cache=cache, max_new_tokens=args.answer_tokens,
                                            do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
                measure.generate_seconds += time.perf_counter() - started
                measure.backend_seconds += backend.stats.backend_seconds - backend_before
                new_ids = [t for t in output_ids[0, prompt_ids.shape[1] :].tolist() if t not in stop_ids]
                answer = tokenizer.decode(new_ids)
                measure.generated += output_ids.shape[1] - prompt_ids.shape[1]
                measure.found += harness.needle_found(answer, case)
                measure.cases += 1
                measure.answers.append(answer.strip())
                measure.key_bytes_read += backend.stats.key_bytes_read
                measure.dense_fp16_key_bytes_read += backend.stats.dense_fp16_key_bytes_read
                measure.read_entries += backend.stats.attend_entries
            finally:
                cache.close()
        print(f"case {index + 1}/{len(cases)} (depth {case.depth:.2f}, answer {case.answer}): "
              + ", ".join(f"{row.name}: {results[row.name].answers[-1]!r}" for row in rows), flush=True)
    return plain_found, len(cases)


@torch.no_grad()
def measure_prefill(model, tokenizer, client, args) -> dict[str, list[float]]:
    """Seconds of the plain prefill and of the prefill with offload (forward alone, and with
    the upload that follows it), alternating so that machine load hits both alike."""
    case = harness.needle_cases(tokenizer, context_tokens=args.context, count=1)[0]
    prompt_ids = torch.cat([case.prefix_ids, case.question_ids], dim=1)
    codec = CodecConfig(method="svdq", bits_per_element=args.bits)
    times: dict[str, list[float]] = {"plain": [], "offload forward": [], "offload forward + upload": []}
    for _ in range(args.prefill_repeats):
        disable_offload(model)
        started = time.perf_counter()
        model(input_ids=prompt_ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        times["plain"].append(time.perf_counter() - started)
        enable_offload(model)
        backend = _backend(Row("svdq", codec), client)
        cache = SvdqOffloadCache(model, backend, window=args.window, tokenizer=tokenizer)
        try:
            started = time.perf_counter()
            model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
            total = time.perf_counter() - started
        finally:
            cache.close()
        times["offload forward"].append(total - backend.stats.store_seconds)
        times["offload forward + upload"].append(total)
        print(f"prefill {prompt_ids.shape[1]} tokens: plain {times['plain'][-1]:.1f} s, with offload "
              f"{total:.1f} s ({backend.stats.store_seconds:.1f} s of it storing)", flush=True)
    disable_offload(model)
    return times


@torch.no_grad()
def measure_decode(model, tokenizer, client, args, cache_rows=()) -> dict[int, dict[str, float]]:
    """Tokens/s of greedy decoding at each batch size: the plain model, the service with SVDq
    keys at ``--bits`` (16-bit values), and the service with each whole-cache row, each batch's
    rows run in turns (``--decode-repeats``) on the same prompts; the median run counts."""
    service_rows = [Row(f"svdq {args.bits:g}b", CodecConfig(method="svdq", bits_per_element=args.bits)),
                    *cache_rows]
    rates = {}
    # The server this bench started (a child process): its CPU seconds join the client's, so the
    # CPU rate counts what a decode costs whatever else runs on a shared machine.
    servers = [child for child in psutil.Process().children(recursive=True)
               if "svdq_server.cli" in " ".join(child.cmdline())]
    for batch in args.batches:
        # Rows: windows of the evaluation text at different offsets, all of the same length (no padding).
        prompts = torch.cat([harness.text_tokens(tokenizer, args.decode_context, start=row * 997)
                             for row in range(batch)])
        seconds: dict[str, list[float]] = {}
        cpu_seconds: dict[str, list[float]] = {}
        # In turns: every repeat runs every row once, so load from other work falls on all alike.
        for row in [None, *service_rows] * args.decode_repeats:
            if row is None:
                disable_offload(model)
                cache, backend = DynamicCache(config=model.config), None
            else:
                enable_offload(model)
                backend = _backend(row, client)
                cache = SvdqOffloadCache(model, backend, window=args.window, tokenizer=tokenizer)
            try:
                model(input_ids=prompts[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
                started, cpu_started = time.perf_counter(), _cpu_seconds(servers)
                output = model.generate(prompts, attention_mask=torch.ones_like(prompts), cache=cache,
                                        max_new_tokens=args.decode_tokens,
                                        min_new_tokens=args.decode_tokens, do_sample=False,
                                        pad_token_id=tokenizer.eos_token_id)
                name = "plain" if row is None else row.name
                seconds.setdefault(name, []).append(time.perf_counter() - started)
                cpu_seconds.setdefault(name, []).append(_cpu_seconds(servers) - cpu_started)
            finally:
                if backend is not None:
                    cache.close()
            assert output.shape[1] == prompts.shape[1] + args.decode_tokens
        disable_offload(model)
        rates[batch] = {name: batch * args.decode_tokens / statistics.median(elapsed)
                        for name, elapsed in seconds.items()}
        cpu_rates = {name: batch * args.decode_tokens / statistics.median(spent) for name, spent in cpu_seconds.items()}
        rates[batch].update({f"{name} per CPU s": rate for name, rate in cpu_rates.items()})
        print(f"decode batch {batch}: " + ", ".join(f"{name} {rate:.2f} tok/s" for name, rate in rates[batch].items()),
              flush=True)
    return rates


def _cpu_seconds(servers: list[psutil.Process]) -> float:
    """User + system CPU seconds of this process and of ``servers`` so far."""
    total = time.process_time()
    for server in servers:
        times = server.cpu_times()
        total += times.user + times.system
    return total


def _print_rows(model, rows, results, plain_nll, plain_found, cases) -> None:
    """The main table: one line per row (dNLL, needles, stored and read bytes, tok/s)."""
    header = "| keys | dNLL | needle | key bits | stored/fp16 | KV bits | read/fp16 | KiB read/step | tok/s | RPC % |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    print(f"| plain model | 0 | {plain_found}/{cases} | 32 (float32 model) | - | 32 | - | - | - | - |")
    layers = model.config.num_hidden_layers
    for row in rows:
        m = results[row.name]
        bits = 16.0 * m.key_bytes / max(1, m.fp16_key_bytes)
        read = m.key_bytes_read / max(1, m.dense_fp16_key_bytes_read)
        per_step = m.key_bytes_read / max(1, m.read_entries) * layers / 1024
        rate = m.generated / max(1e-9, m.generate_seconds)
        rpc = 100.0 * m.backend_seconds / max(1e-9, m.generate_seconds)
        kv_bits = 16.0 * (m.key_bytes + m.value_bytes) / max(1, 2 * m.fp16_key_bytes)
        dnll = "-" if m.nll is None else f"{m.nll - plain_nll:+.4f}"
        print(f"| {row.name} | {dnll} | {m.found}/{m.cases} | {bits:.3f} | "
              f"{m.key_bytes / max(1, m.fp16_key_bytes):.3f} | {kv_bits:.3f} | {read:.3f} | {per_step:.0f} | "
              f"{rate:.2f} | {rpc:.0f} |")
    rates = {row.name: results[row.name].generated / max(1e-9, results[row.name].generate_seconds) for row in rows}
    if results[rows[0].name].generated:
        print(f"\ntok/s relative to the {rows[0].name} row: "
              + ", ".join(f"{row.name} {rates[row.name] / rates[rows[0].name]:.2f}x" for row in rows[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="HOST:PORT of a running server (default: start a CPU server)")
    parser.add_argument("--in-process", action="store_true", help="LocalOffload instead of the service")
    parser.add_argument("--bits", type=float, default=1.5, help="svdq true bits per element (default 1.5)")
    parser.add_argument("--keep-fraction", type=float, default=1 / 32, help="sparse rows' share (default 1/32)")
    parser.add_argument("--window", type=int, default=128, help="local recent tokens (default 128)")
    parser.add_argument("--prefix", type=int, default=3072, help="dNLL prefix tokens (default 3072)")
    parser.add_argument("--continuation", type=int, default=512, help="dNLL continuation tokens (default 512)")
    parser.add_argument("--cases", type=int, default=6,
                        help="needle cases (default 6; 12 gave the earlier table, in about twice the time)")
    parser.add_argument("--context", type=int, default=4096, help="needle context tokens (default 4096)")
    parser.add_argument("--answer-tokens", type=int, default=12, help="answer length limit (default 12)")
    parser.add_argument("--cache-bits", type=float, nargs="*", default=[],
                        help="whole-cache rows at these true bits per KV element (default none)")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="prefill timings of each kind (default 3)")
    parser.add_argument("--batches", default="1,4,8", help="decode batch sizes (default 1,4,8)")
    parser.add_argument("--decode-context", type=int, default=512, help="decode prompt tokens per row (default 512)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decoded tokens per row (default 16)")
    parser.add_argument("--decode-repeats", type=int, default=1,
                        help="decode runs of each row, in turns; tok/s from the median (default 1)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="parts to run (default all): e.g. --parts decode for the decode table alone, "
                             "--parts needles for the main table's needle and tok/s columns")
    parser.add_argument("--rows", nargs="+", metavar="NAME",
                        help="keep only these rows of the dNLL and needle table (names as printed, e.g. fp16 "
                             "'svdq 1.5b' 'svdq cache 2b'; default all)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of this process and of the server it starts (default 1; 0: torch's "
                        "default). On the shared 2-core machine, under a load average of ~10, one SmolLM2 decode "
                        "step took 1.5 s with torch's 2 threads and 0.06 s with 1")
    parser.add_argument("--server-args", default="",
                        help="more options of the server this bench starts, one string (e.g. "
                        "'--inline-attend-tokens 0'), to compare server settings in separate runs")
    args = parser.parse_args(argv)
    args.batches = [int(item) for item in args.batches.split(",")]

    torch.set_grad_enabled(False)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_smollm2(torch.float32)
    rows = _rows(args) + _cache_rows(model, tokenizer, args)
    if args.rows:
        unknown = sorted(set(args.rows) - {row.name for row in rows})
        if unknown:
            parser.error(f"--rows {unknown} are not rows of this run; rows: {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in args.rows]
    results = {row.name: Measure() for row in rows}

    extra: dict = {}

    def timed(name, measure, *arguments):
        # Each part's wall time, so a run that overruns says which part to shrink.
        part_started = time.perf_counter()
        result = measure(*arguments)
        extra.setdefault("minutes", {})[name] = (time.perf_counter() - part_started) / 60
        return result

    def run_all(client: KVCacheClient | None) -> tuple[float | None, tuple[int, int]]:
        if "prefill" in args.parts:
            extra["prefill"] = timed("prefill", measure_prefill, model, tokenizer, client, args)
        if "decode" in args.parts:
            extra["decode"] = timed("decode", measure_decode, model, tokenizer, client, args,
                                    [row for row in rows if row.cache is not None])
        plain_nll = timed("dNLL", measure_nll, model, tokenizer, rows, client, args, results) \
            if "dnll" in args.parts else None
        if "needles" not in args.parts:
            return plain_nll, (0, 0)
        return plain_nll, timed("needles", measure_needles, model, tokenizer, rows, client, args, results)

    started = time.perf_counter()
    if args.in_process:
        plain_nll, (plain_found, cases) = run_all(None)
        where = "in-process (LocalOffload)"
    elif args.address:
        with KVCacheClient(args.address, timeout=600.0) as client:
            plain_nll, (plain_found, cases) = run_all(client)
        where = f"server {args.address}"
    else:
        server_args = ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
        server_args += shlex.split(args.server_args)
        with local_server("cpu", server_args) as address, KVCacheClient(address, timeout=600.0) as client:
            plain_nll, (plain_found, cases) = run_all(client)
        where = f"CPU server started by the bench ({address}{', ' + args.server_args if args.server_args else ''})"
    elapsed = time.perf_counter() - started

    print()
    print(f"SmolLM2-135M-Instruct, {where}; torch threads {torch.get_num_threads()}; window {args.window} local "
          f"tokens; parts {', '.join(args.parts)}; "
          + (f"dNLL: prefix {args.prefix}, continuation {args.continuation} (plain NLL {plain_nll:.4f}); "
             if plain_nll is not None else "")
          + (f"needle: {cases} cases x {args.context} tokens; " if "needles" in args.parts else "")
          + f"{elapsed / 60:.1f} min ("
          + ", ".join(f"{name} {minutes:.1f}" for name, minutes in extra["minutes"].items()) + ")")
    if "dnll" in args.parts or "needles" in args.parts:
        _print_rows(model, rows, results, plain_nll, plain_found, cases)
    if "prefill" in args.parts:
        prefill = {name: statistics.median(values) for name, values in extra["prefill"].items()}
        print(f"\nPrefill of one {args.context}-token needle prompt, median of {args.prefill_repeats} alternating "
              f"runs (svdq {args.bits:g}b, {where})")
        print("| prefill | median s | runs s | vs plain |")
        print("| --- | ---: | --- | ---: |")
        for name, values in extra["prefill"].items():
            print(f"| {name} | {prefill[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
                  f"{prefill[name] / prefill['plain']:.2f}x |")
    if "decode" in args.parts:
        names = [name for name in next(iter(extra["decode"].values())) if not name.endswith(" per CPU s")]
        print(f"\nDecode, {args.decode_tokens} greedy tokens per row after a {args.decode_context}-token prompt per "
              f"row ({where}); tok/s over all rows from the median of {args.decode_repeats} runs, each batch's rows "
              "run in turns on the same prompts")
        print("| batch | " + " | ".join(f"{name} tok/s" for name in names) + " | "
              + " | ".join(f"{name} / plain" for name in names[1:]) + " |")
        print("| ---: |" + " ---: |" * (2 * len(names) - 1))
        for batch, rates in extra["decode"].items():
            print(f"| {batch} | " + " | ".join(f"{rates[name]:.2f}" for name in names) + " | "
                  + " | ".join(f"{rates[name] / rates['plain']:.2f}x" for name in names[1:]) + " |")
        # The same runs' tokens over the CPU seconds of this process and the server it started
        # (the server's are left out with --address): on a shared machine another process's
        # load stretches the wall time of one row's run more than its CPU time.
        print(f"\nThe same runs, tokens per CPU second (this process{'' if args.address else ' + the server'}; "
              "median of the runs)")
        print("| batch | " + " | ".join(f"{name} tok/CPU s" for name in names) + " | "
              + " | ".join(f"{name} / {names[1]}" for name in names[2:]) + " |")
        print("| ---: |" + " ---: |" * (len(names) + len(names[2:])))
        for batch, rates in extra["decode"].items():
            cpu = {name: rates[f"{name} per CPU s"] for name in names}
            print(f"| {batch} | " + " | ".join(f"{cpu[name]:.2f}" for name in names) + " | "
                  + " | ".join(f"{cpu[name] / cpu[names[1]]:.2f}x" for name in names[2:]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
