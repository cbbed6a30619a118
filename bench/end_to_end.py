"""End-to-end benchmark: SmolLM2-135M with its KV prefix offloaded through the svdq service.

Every row runs the real model through :mod:`svdq_client.hf` (``SvdqOffloadCache`` +
``RemoteOffload``; ``--in-process`` swaps in ``LocalOffload``) against one server this script
starts on the CPU (or ``--address``). Rows, side by side in one process on the same cases:

* ``plain model``: the model alone, its exact DynamicCache (the reference, no service);
* ``fp16``: passthrough through the service (should equal the plain model);
* ``svdq``: SVDq keys at ``--bits`` true bits per element (every serialized byte counted);
* ``svdq+sparse``: the same keys, attention over ``--keep-fraction`` of the tokens;
* ``kivi2``: the KIVI-like baseline, 2-bit per-channel keys in groups of 32 tokens.

Columns:

* ``dNLL``: mean NLL (nats/token) of ``--continuation`` tokens of prose after a
  ``--prefix``-token prefix, minus the plain model's. The prefix is offloaded (all but the
  ``--window`` most recent tokens), the continuation runs as one chunk of queries.
* ``needle``: RULER-style needle cases answered (``--cases`` cases of ``--context`` tokens,
  svdq_client.evaluation): the document is offloaded, the question runs on top of it, the answer is
  generated greedily.
* ``key bits``: serialized key bytes the server stores over key elements (16 = fp16);
  ``stored/fp16``: the same as a share of fp16 bytes.
* ``read/fp16``: key bytes the server read to answer attention over the prefix, over what
  dense fp16 attention reads (all needle answers).
* ``KiB read/step``: key bytes read per decode step (all layers, one query token).
* ``tok/s``: generated tokens per second of the needle answers (question chunk included);
  ``RPC %``: share of that time spent in server calls.

The document prefix of each case is computed once by the plain model and offloaded to every
row (``SvdqOffloadCache.offload_prefix``), so rows differ only in how the prefix is stored and
attended. Run: ``python bench/end_to_end.py`` (about 20-40 minutes on 2 CPU cores for the
defaults; ``--cases 4 --context 2048`` for a quick look).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch
from svdq_client import KVCacheClient
from svdq_client import evaluation as harness
from svdq_client.demo import local_server
from svdq_client.hf import LocalOffload, RemoteOffload, SvdqOffloadCache, disable_offload, enable_offload
from svdq_client.models import load_smollm2

from svdq.attention import SparsityConfig
from svdq.codec import CodecConfig


@dataclass(frozen=True)
class Row:
    """One way of storing the offloaded prefix."""

    name: str
    codec: CodecConfig
    sparsity: SparsityConfig | None = None


@dataclass
class Measure:
    """Accumulated results of one row."""

    nll: float | None = None
    found: int = 0
    cases: int = 0
    key_bytes: int = 0
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


def _backend(row: Row, client: KVCacheClient | None):
    if client is None:
        return LocalOffload(row.codec, sparsity=row.sparsity)
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
        cache = SvdqOffloadCache(model, _backend(row, client), window=args.window)
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
            cache = SvdqOffloadCache(model, backend, window=args.window)
            try:
                cache.offload_prefix(prefix.keys, prefix.values)
                stored = backend.stats
                measure = results[row.name]
                measure.key_bytes += stored.key_bytes_stored
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="HOST:PORT of a running server (default: start a CPU server)")
    parser.add_argument("--in-process", action="store_true", help="LocalOffload instead of the service")
    parser.add_argument("--bits", type=float, default=1.5, help="svdq true bits per element (default 1.5)")
    parser.add_argument("--keep-fraction", type=float, default=1 / 32, help="sparse rows' share (default 1/32)")
    parser.add_argument("--window", type=int, default=128, help="local recent tokens (default 128)")
    parser.add_argument("--prefix", type=int, default=3072, help="dNLL prefix tokens (default 3072)")
    parser.add_argument("--continuation", type=int, default=512, help="dNLL continuation tokens (default 512)")
    parser.add_argument("--cases", type=int, default=12, help="needle cases (default 12)")
    parser.add_argument("--context", type=int, default=4096, help="needle context tokens (default 4096)")
    parser.add_argument("--answer-tokens", type=int, default=12, help="answer length limit (default 12)")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    model, tokenizer = load_smollm2(torch.float32)
    rows = _rows(args)
    results = {row.name: Measure() for row in rows}

    def run_all(client: KVCacheClient | None) -> tuple[float, tuple[int, int]]:
        plain_nll = measure_nll(model, tokenizer, rows, client, args, results)
        return plain_nll, measure_needles(model, tokenizer, rows, client, args, results)

    started = time.perf_counter()
    if args.in_process:
        plain_nll, (plain_found, cases) = run_all(None)
        where = "in-process (LocalOffload)"
    elif args.address:
        with KVCacheClient(args.address, timeout=600.0) as client:
            plain_nll, (plain_found, cases) = run_all(client)
        where = f"server {args.address}"
    else:
        with local_server("cpu") as address, KVCacheClient(address, timeout=600.0) as client:
            plain_nll, (plain_found, cases) = run_all(client)
        where = f"CPU server started by the bench ({address})"
    elapsed = time.perf_counter() - started

    print()
    print(f"SmolLM2-135M-Instruct, {where}; window {args.window} local tokens; dNLL: prefix {args.prefix}, "
          f"continuation {args.continuation} (plain NLL {plain_nll:.4f}); needle: {cases} cases x "
          f"{args.context} tokens; {elapsed / 60:.1f} min")
    header = "| keys | dNLL | needle | key bits | stored/fp16 | read/fp16 | KiB read/step | tok/s | RPC % |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    print(f"| plain model | 0 | {plain_found}/{cases} | 32 (float32 model) | - | - | - | - | - |")
    layers = model.config.num_hidden_layers
    for row in rows:
        m = results[row.name]
        bits = 16.0 * m.key_bytes / max(1, m.fp16_key_bytes)
        read = m.key_bytes_read / max(1, m.dense_fp16_key_bytes_read)
        per_step = m.key_bytes_read / max(1, m.read_entries) * layers / 1024
        rate = m.generated / max(1e-9, m.generate_seconds)
        rpc = 100.0 * m.backend_seconds / max(1e-9, m.generate_seconds)
        print(f"| {row.name} | {m.nll - plain_nll:+.4f} | {m.found}/{m.cases} | {bits:.3f} | "
              f"{m.key_bytes / max(1, m.fp16_key_bytes):.3f} | {read:.3f} | {per_step:.0f} | {rate:.2f} | {rpc:.0f} |")
    rates = {row.name: results[row.name].generated / max(1e-9, results[row.name].generate_seconds) for row in rows}
    print("\ntok/s relative to the fp16 passthrough row: "
          + ", ".join(f"{row.name} {rates[row.name] / rates[rows[0].name]:.2f}x" for row in rows[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
