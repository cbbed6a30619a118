"""Settings, profiles file, tokens, and the interceptor's status mapping, in process."""

import json
import logging
import platform
import subprocess
import sys

import grpc
import pytest
import torch
from svdq_client import Profile
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc
from svdq_server.auth import AuthenticationError, TokenAuthenticator
from svdq_server.config import build_parser, load_profiles, parse_settings
from svdq_server.engine import Engine, EngineConfig
from svdq_server.interceptors import ServiceInterceptor
from svdq_server.servicer import KVCacheServicer

from svdq import InvalidInputError, fit_basis

CONTRACT_OPTIONS = ["host", "port", "metrics-port", "device", "store-bytes", "eviction", "ttl-seconds", "profiles-file",
                    "tokens-file", "tls-cert", "tls-key", "tls-client-ca", "log-format", "log-level",
                    "attention-cache-bytes"]


def test_help_documents_every_option_with_its_environment_variable():
    text = " ".join(build_parser().format_help().split())
    for option in CONTRACT_OPTIONS:
        assert f"--{option}" in text
        assert f"env SVDQ_{option.upper().replace('-', '_')}" in text


def test_command_line_beats_environment_beats_defaults():
    settings = parse_settings(["--port", "6000", "--store-bytes", "2GiB"],
                              {"SVDQ_PORT": "5000", "SVDQ_EVICTION": "none", "SVDQ_TTL_SECONDS": "30",
                               "SVDQ_METRICS_PORT": "0"})
    assert settings.port == 6000 and settings.store_bytes == 2 << 30
    assert settings.eviction == "none" and settings.ttl_seconds == 30 and settings.metrics_port == 0
    assert parse_settings([], {}).port == 50051 and parse_settings([], {}).metrics_port == 9464


@pytest.mark.parametrize("argv, message", [
    (["--eviction", "random"], "invalid choice: 'random'"),
    (["--store-bytes", "lots"], "expected a byte size"),
    (["--tls-cert", "a.pem"], "--tls-cert and --tls-key must be given together"),
    (["--tls-client-ca", "ca.pem"], "needs --tls-cert"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--torch-threads", "-1"], "--torch-threads must be >= 0"),
    (["--malloc-arenas", "-1"], "--malloc-arenas must be >= 0"),
    (["--malloc-trim-bytes", "2GiB"], "--malloc-trim-bytes must be in 0..2GiB-1"),
    (["--inline-attend-tokens", "-1"], "--inline-attend-tokens must be >= 0"),
])
def test_bad_settings_exit_with_a_message_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, {})
    assert message in capsys.readouterr().err


#: What the malloc test checks, run in a fresh interpreter: mallopt changes the settings of
#: the whole process it runs in (and a built SvdqServer sets the process's attention cache
#: limit), so the pytest process is left as it was.
MALLOC_CHECK = """
import ctypes, json
import torch
from svdq_server.app import SvdqServer, tune_malloc
from svdq_server.config import parse_settings


def mapped_bytes_of_a_40_mib_tensor():
    # glibc's count of bytes in mappings of their own (mallinfo2's hblkhd) while one is alive
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Info
    before = mallinfo2().hblkhd
    tensor = torch.empty(40 << 20, dtype=torch.uint8)
    return mallinfo2().hblkhd - before


off = {"SVDQ_MALLOC_ARENAS": "0", "SVDQ_MALLOC_TRIM_BYTES": "0"}
results = {"mapped_before": mapped_bytes_of_a_40_mib_tensor()}
results.update({
    "nothing": tune_malloc(0, 0), "arenas": tune_malloc(1, 0), "trim": tune_malloc(0, 1 << 30),
    "small_map": tune_malloc(0, 1 << 30, 8 << 20), "mapped_small": mapped_bytes_of_a_40_mib_tensor(),
    "both": tune_malloc(1, 256 << 20), "mapped_after": mapped_bytes_of_a_40_mib_tensor(),
    "server": SvdqServer(parse_settings(["--device", "cpu"], {})).malloc,
    "server_off": SvdqServer(parse_settings(["--device", "cpu"], off)).malloc,
})
print(json.dumps(results))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_sets_what_it_is_given_and_nothing_at_zero():
    done = subprocess.run([sys.executable, "-c", MALLOC_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["nothing"] == {} and results["arenas"] == {"arenas": 1}
    assert parse_settings([], {}).malloc_arenas == 1 and parse_settings([], {}).malloc_trim_bytes == 256 << 20
    # The mapping threshold follows the trim threshold, or stops at 32 MiB where glibc accepts no more
    # (older releases; this machine's glibc takes more).
    mapped = results["trim"]["mmap_bytes"]
    assert results["trim"] == {"trim_bytes": 1 << 30, "mmap_bytes": mapped} and mapped in (1 << 30, 32 << 20)
    assert results["small_map"] == {"trim_bytes": 1 << 30, "mmap_bytes": 8 << 20}
    default_map = 256 << 20 if mapped == 1 << 30 else 32 << 20
    assert results["both"] == {"arenas": 1, "trim_bytes": 256 << 20, "mmap_bytes": default_map}
    # What the thresholds do: with glibc's defaults a 40 MiB tensor gets a mapping of its own,
    # under an 8 MiB threshold too, and under the default one (where glibc takes it) none.
    assert results["mapped_before"] >= 40 << 20 and results["mapped_small"] >= 40 << 20
    assert results["mapped_after"] == (0 if default_map > 40 << 20 else results["mapped_before"])
    # the server applies its settings when it is built, before any of its threads runs
    assert results["server"] == {"arenas": 1, "trim_bytes": 256 << 20, "mmap_bytes": default_map}
    assert results["server_off"] == {}


def test_profiles_file_with_a_shared_basis(tmp_path):
    bases = [fit_basis(torch.randn(50, 16)) for _ in range(2)]
    torch.save([{"mean": b.mean, "components": b.components, "singular_values": b.singular_values} for b in bases],
               tmp_path / "basis.pt")
    (tmp_path / "profiles.yaml").write_text(
        "profiles:\n"
        "  - {name: m, num_layers: 2, kv_heads: 2, head_dim: 8, basis_file: basis.pt,\n"
        "     rope: {theta: 500000.0}, codec: {method: svdq, schedule: [8, 4, 0, 0]}, value_bits: 4,\n"
        "     value_group_size: 8}\n")
    (profile,) = load_profiles(str(tmp_path / "profiles.yaml"))
    assert profile.codec.schedule == (8, 4, 0, 0) and profile.rope.theta == 500000.0 and profile.value_bits == 4
    assert torch.equal(profile.bases[1].components, bases[1].components)
    (tmp_path / "bad.yaml").write_text("profiles:\n  - {name: m, num_layers: 2, kv_heads: 2, head_dim: 8, colour: 1}\n")
    with pytest.raises(InvalidInputError, match=r"unknown profile fields \['colour'\]"):
        load_profiles(str(tmp_path / "bad.yaml"))


def test_tokens_from_file_and_environment(tmp_path):
    (tmp_path / "tokens.yaml").write_text("tenants:\n  alpha: [alpha-token-0123456789]\n")
    auth = TokenAuthenticator.from_sources(str(tmp_path / "tokens.yaml"), "beta=beta-token-0123456789")
    assert auth.tenants == ["alpha", "beta"]
    assert auth.tenant_for("Bearer beta-token-0123456789") == "beta"
    assert auth.tenant_for("bearer alpha-token-0123456789") == "alpha"
    for header in (None, "", "Basic abc", "Bearer ", "Bearer wrong-token-0123456789"):
        with pytest.raises(AuthenticationError):
            auth.tenant_for(header)
    assert TokenAuthenticator().tenant_for(None) == "default"
    with pytest.raises(InvalidInputError, match="at least 16 characters"):
        TokenAuthenticator({"alpha": ["short"]})
    with pytest.raises(InvalidInputError, match="for two tenants"):
        TokenAuthenticator({"a": ["same-token-0123456789"], "b": ["same-token-0123456789"]})


async def test_unexpected_errors_become_internal_without_details(caplog, monkeypatch):
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 20), [Profile("p", 1, 1, 8)])

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(engine, "describe", broken)
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.aio.server(interceptors=[ServiceInterceptor(TokenAuthenticator())])
    pb_grpc.add_KVCacheServicer_to_server(KVCacheServicer(engine, ThreadPoolExecutor(2), 1 << 20), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KVCacheStub(channel)
            with caplog.at_level(logging.ERROR, logger="svdq_server.interceptors"):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.Describe(pb.DescribeRequest(sequence_id="s"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INTERNAL
            assert "secret detail" not in raised.value.details() and "reference" in raised.value.details()
            assert "secret detail of a bug" in caplog.text and "Traceback" in caplog.text
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetProfile(pb.GetProfileRequest(name="nope"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)


async def test_a_small_attend_runs_on_the_event_loop_only_while_it_is_the_only_call(monkeypatch):
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from svdq_client.client import attend_request
    from svdq_server import servicer as servicer_module
    from svdq_server.engine import UploadHeader
    from svdq_server.interceptors import current_tenant

    profile = Profile("p", 1, 2, 16)
    engine = Engine(EngineConfig(device="cpu"), [profile])
    generator = torch.Generator().manual_seed(0)
    for name, tokens in (("small", 64), ("large", 256)):
        keys, values = (torch.randn(1, tokens, 2, 16, generator=generator).half() for _ in range(2))
        engine.upload("default", UploadHeader(name, "p", name, tokens, "pre_rope", False, True), keys, values,
                      torch.arange(tokens))
    queries = torch.randn(1, 4, 16, generator=generator)
    small, large = (attend_request(queries, [(name, 0)], None, None) for name in ("small", "large"))
    servicer = KVCacheServicer(engine, ThreadPoolExecutor(2), 1 << 20, inline_attend_tokens=128)
    # the back-to-back calls below are not queued ones (checked at the end)
    monkeypatch.setattr(servicer_module, "INLINE_AFTER_IDLE_S", 0.0)
    current_tenant.set("default")

    alone = await servicer.Attend(small, None)
    assert servicer.inline_attends == 1
    # over the token limit (one large entry, or three entries on the small sequence: each is
    # attended), or two at once (each counts the other), or beside a worker job: the workers
    await servicer.Attend(large, None)
    assert engine.attend_tokens_in_memory("default", ["small"] * 3) == 192
    await servicer.Attend(attend_request(queries.expand(3, -1, -1), [("small", 0)] * 3, None, None), None)
    together = await asyncio.gather(servicer.Attend(small, None), servicer.Attend(small, None))
    assert servicer.inline_attends == 1
    assert all(response.SerializeToString() == alone.SerializeToString() for response in together)
    release = threading.Event()
    busy = asyncio.ensure_future(servicer._run(release.wait, 10))
    await asyncio.sleep(0.05)
    beside = await servicer.Attend(small, None)
    release.set()
    await busy
    assert servicer.inline_attends == 1 and beside.SerializeToString() == alone.SerializeToString()
    # a store outside this process (a lookup may wait on the network) never runs on the loop
    engine.store.backend = "redis"
    assert engine.attend_tokens_in_memory("default", ["small"]) is None
    await servicer.Attend(small, None)
    assert servicer.inline_attends == 1
    engine.store.backend = "memory"
    await servicer.Attend(small, None)
    assert servicer.inline_attends == 2
    # one that starts right after the last one ended was queued behind it: the workers
    monkeypatch.setattr(servicer_module, "INLINE_AFTER_IDLE_S", 10.0)
    await servicer.Attend(small, None)
    assert servicer.inline_attends == 2
    monkeypatch.setattr(servicer_module, "INLINE_AFTER_IDLE_S", 0.0)
    # 0 turns it off
    servicer.inline_attend_tokens = 0
    await servicer.Attend(small, None)
    assert servicer.inline_attends == 2


def test_profiles_file_takes_latent_values_and_a_whole_cache_budget(tmp_path):
    from svdq_server.config import load_profiles

    from svdq.values import DEFAULT_VALUE_CODEC

    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  - name: cache\n"
        "    num_layers: 2\n    kv_heads: 2\n    head_dim: 32\n"
        "    value_codec: {method: svdq, bits_per_element: 2.5, group_size: 32, num_sinks: 4, noise_averaging: 3.0}\n"
        "    cache_bits_per_element: 2.0\n"
    )
    (profile,) = load_profiles(str(path))
    assert profile.value_codec == DEFAULT_VALUE_CODEC and profile.cache_budget.bits_per_element == 2.0
    path.write_text("profiles:\n  - {name: bad, num_layers: 2, kv_heads: 2, head_dim: 32, cache_bits_per_element: 2.0}\n")
    with pytest.raises(InvalidInputError, match="needs an svdq codec with a bit budget and profile.value_codec"):
        load_profiles(str(path))


def test_a_store_url_with_a_password_stops_the_server_at_start(capsys):
    # One check, where the URL becomes a store (open_store): the CLI reports it and exits 1.
    from svdq_server.cli import main

    assert main(["--store", "redis://:secret@127.0.0.1:1/0", "--port", "1", "--metrics-port", "0"]) == 1
    logged = capsys.readouterr().err
    assert "--store must not contain a password" in logged and "secret" not in logged
    assert main(["--store", "http://127.0.0.1:1", "--port", "1", "--metrics-port", "0"]) == 1
    assert "--store must be 'memory' or redis://host:port/db" in capsys.readouterr().err


def test_attention_precision_option_reaches_the_engine_config(capsys):
    assert parse_settings([], {}).engine_config().attention_precision is None  # auto: svdq.attention decides
    environ = {"SVDQ_ATTENTION_PRECISION": "float32"}
    assert parse_settings([], environ).engine_config().attention_precision == "float32"
    assert parse_settings(["--attention-precision", "bfloat16"], environ).engine_config().attention_precision == "bfloat16"
    with pytest.raises(SystemExit):
        parse_settings(["--attention-precision", "fp8"], {})
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_cpu_bfloat16_option_mirrors_the_library_variable(monkeypatch, capsys):
    import os

    from svdq_server.app import SvdqServer

    monkeypatch.setenv("SVDQ_CPU_BFLOAT16", "auto")  # restored after the test, whatever the server sets
    assert parse_settings([], {}).cpu_bfloat16 == "auto"
    assert parse_settings([], {"SVDQ_CPU_BFLOAT16": " Off "}).cpu_bfloat16 == "off"
    assert parse_settings(["--cpu-bfloat16", "on"], {"SVDQ_CPU_BFLOAT16": "off"}).cpu_bfloat16 == "on"
    with pytest.raises(SystemExit):
        parse_settings(["--cpu-bfloat16", "fast"], {})
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    # A command-line choice reaches the library, which reads the variable.
    server = SvdqServer(parse_settings(["--device", "cpu", "--cpu-bfloat16", "off"], {}))
    assert os.environ["SVDQ_CPU_BFLOAT16"] == "off"
    assert server.engine.cpu_bfloat16.startswith("CPU bfloat16 products off")
