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
    from prometheus_client import REGISTRY
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="table", choices=("table", "engine"))
    parser.add_argument("spec", nargs="?", help="engine: the spec JSON file")
    args = parser.parse_args(argv)
    if args.command == "engine":
        engine(args.spec)
        return 0
    raise SystemExit("table: not written yet")


if __name__ == "__main__":
    sys.exit(main())
