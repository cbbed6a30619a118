"""The dashboard and the alert rules against a real svdq server and a real Prometheus.

A server (the `svdq-server` console script the image runs, on the CPU, with the example
profiles and tenant tokens from deploy/config) and Debian's `prometheus` start on free
loopback ports. Prometheus runs the repo's own prometheus.yml and alerts.yml, rendered with
the scrape target replaced and 1 s intervals. Traffic goes through `svdq_client` (uploads,
appends, dense and sparse attention, evictions, rejected requests), then Prometheus's HTTP
API evaluates every dashboard panel query and every alert rule's signal: each must return
series with a finite value, and Prometheus must report every rule as evaluated without error.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port
from helpers import scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# The query helpers live with the static deploy checks; loaded by path so that this works
# whether or not tests/ is a package.
_spec = importlib.util.spec_from_file_location("svdq_deploy_checks", Path(__file__).with_name("test_deploy.py"))
deploy_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deploy_checks)

EXAMPLE_PROFILES = deploy_checks.DEPLOY / "config" / "profiles.yaml"
EXAMPLE_TOKENS = deploy_checks.DEPLOY / "config" / "tokens.example.yaml"
TENANT_TOKEN = "example-team-a-token-replace-me"
PROFILE = "smollm2-135m"  # from the example profiles file: 30 layers, 3 KV heads x 64
# Small enough that a third short sequence evicts the least recently used one, and that a
# long one cannot fit at all (RESOURCE_EXHAUSTED): both must show up on the dashboard.
STORE_BYTES = 4 << 20
SHORT_TOKENS = 64
MAX_UPLOADS = 12
# More raw bytes than 4x the budget: the server refuses it from the upload's header.
OVERSIZE_TOKENS = 1024
KEY_RANK = 8
START_TIMEOUT_S = 90
SCRAPE_TIMEOUT_S = 60


def http_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def healthcheck_command(address: str) -> list[str]:
    """The Dockerfile's HEALTHCHECK command with its address pointed at the test server."""
    runtime = deploy_checks.runtime_stage()
    healthcheck = next(arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK")
    command = deploy_checks.exec_form(healthcheck[healthcheck.index("CMD"):])
    command[command.index("--address") + 1] = address
    return [deploy_checks.console_script(command[0]), *command[1:]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real svdq server on loopback: (gRPC address, metrics port)."""
    log = tmp_path_factory.mktemp("svdq-server") / "server.log"
    grpc_port, metrics_port = free_port(), free_port()
    command = [deploy_checks.console_script("svdq-server"), "--host", "127.0.0.1", "--port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--device", "cpu", "--store-bytes", str(STORE_BYTES),
               "--eviction", "lru", "--profiles-file", str(EXAMPLE_PROFILES), "--tokens-file", str(EXAMPLE_TOKENS),
               "--workers", "2", "--log-level", "WARNING"]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SVDQ_")}
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environ)
    address = f"127.0.0.1:{grpc_port}"
    try:
        probe = healthcheck_command(address)
        wait_until(lambda: subprocess.run(probe, capture_output=True, timeout=10).returncode == 0,
                   START_TIMEOUT_S, "the server's health service to answer SERVING", process, log)
        yield address, metrics_port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A real Prometheus scraping the server with the repo's config and rules: its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: apt-get install prometheus (scripts/test.sh installs it)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(deploy_checks.PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str((deploy_checks.PROMETHEUS_CONFIG.parent / name).resolve())
                            for name in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "svdq"]
    for group in job["static_configs"]:
        group["targets"] = [f"127.0.0.1:{server[1]}"]
    rendered = workdir / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(config))
    port, log = free_port(), workdir / "prometheus.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [binary, f"--config.file={rendered}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def target_up():
        try:
            targets = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return any(target["labels"]["job"] == "svdq" and target["health"] == "up" for target in targets)

    try:
        wait_until(target_up, START_TIMEOUT_S, "Prometheus to scrape the server", process, log)
        yield base
    finally:
        stop(process)


def drive_traffic(address: str, round_name: str) -> None:
    """Every kind of call the dashboard shows, including failures and an eviction."""
    from svdq_client import (
        AuthenticationError,
        InvalidInputError,
        KVCacheClient,
        NotFoundError,
        ResourceExhaustedError,
        Sparsity,
    )

    generator = torch.Generator().manual_seed(0)
    with KVCacheClient(address, token=TENANT_TOKEN, timeout=60) as client:
        profile = client.get_profile(PROFILE)
        channels = profile.kv_heads * profile.head_dim

        def cache(tokens: int = SHORT_TOKENS):
            # Keys with a decaying spectrum like real ones (random keys have none, which
            # would put a compression ratio below 1 on the dashboard); values plain noise.
            latent = torch.randn(profile.num_layers, tokens, KEY_RANK, generator=generator)
            mixing = torch.randn(profile.num_layers, KEY_RANK, channels, generator=generator)
            keys = latent @ mixing + 0.05 * torch.randn(profile.num_layers, tokens, channels, generator=generator)
            layout = (profile.num_layers, tokens, profile.kv_heads, profile.head_dim)
            return keys.reshape(layout), torch.randn(layout, generator=generator)

        # Upload until the store budget forces the first sequence out (LRU eviction). The
        # server's counter is read, not the sequence: a describe would refresh its recency.
        uploaded, evictions_before = [], client.server_info().evictions
        while len(uploaded) < 2 or client.server_info().evictions == evictions_before:
            assert len(uploaded) < MAX_UPLOADS, f"{MAX_UPLOADS} sequences fit in {STORE_BYTES} bytes: no eviction"
            keys, values = cache()
            sequence_id = f"{round_name}-{len(uploaded)}"
            assert client.upload(sequence_id, PROFILE, keys, values).num_tokens == SHORT_TOKENS
            uploaded.append(sequence_id)
        with pytest.raises(NotFoundError):
            client.describe(f"{round_name}-never-uploaded")
        older, newest = uploaded[-2], uploaded[-1]
        assert client.describe(older).num_tokens == SHORT_TOKENS, "the budget must hold at least two sequences"
        step_keys, step_values = cache(1)
        assert client.append(newest, step_keys, step_values) == SHORT_TOKENS + 1

        queries = torch.randn(2, profile.kv_heads, profile.head_dim, generator=generator)
        entries = [(older, 0), (newest, profile.num_layers - 1)]
        dense = client.attend(queries, entries)
        sparse = client.attend(queries, entries, sparsity=Sparsity(keep_fraction=0.25, chunk_size=16, num_recent=16))
        assert dense.output.shape == sparse.output.shape == (2, profile.kv_heads, profile.head_dim)

        blob = client.compress(keys[0], profile=PROFILE)
        assert client.decompress(blob.blob, profile=PROFILE).shape == keys[0].shape

        with pytest.raises(InvalidInputError):
            client.attend(queries[:1], [(older, profile.num_layers)])  # no such layer: server-side check
        with pytest.raises(ResourceExhaustedError):
            big_keys, big_values = cache(OVERSIZE_TOKENS)
            client.upload(f"{round_name}-too-big", PROFILE, big_keys, big_values)
        client.delete(older)
    with KVCacheClient(address, token="wrong-token-of-enough-length", timeout=10, retries=0) as stranger:
        with pytest.raises(AuthenticationError):
            stranger.list_profiles()


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Two rounds of traffic with a scrape in between: a series first seen with its final
    value has no increase for rate() to measure, so the second round is what the rates show."""
    drive_traffic(server[0], "first")
    scrapes = f"count_over_time(svdq_rpc_total{{job=\"svdq\",method=\"Attend\",code=\"OK\"}}[{SCRAPE_TIMEOUT_S}s])"
    wait_until(lambda: instant_query(prometheus, scrapes)["data"]["result"], SCRAPE_TIMEOUT_S,
               "Prometheus to scrape the first round of traffic")
    drive_traffic(server[0], "second")
    return server


def instant_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return http_json(url)
    except urllib.error.HTTPError as error:  # 400/422: the query itself is invalid
        return json.loads(error.read() or b"{}") or {"status": "error", "error": str(error)}


def query_problem(base: str, expr: str) -> str | None:
    """None when the query succeeds with at least one series holding a finite value."""
    answer = instant_query(base, expr)
    if answer.get("status") != "success":
        return f"error: {answer.get('errorType')}: {answer.get('error')}"
    result = answer["data"]["result"]
    if not result:
        return "no series"
    values = [float(series["value"][1]) for series in result]
    if not any(math.isfinite(value) for value in values):
        return f"no finite value among {len(values)} series"
    return None


def wait_for_queries(base: str, named_queries: list[tuple[str, str]]) -> None:
    """Poll until every query passes (new series need two scrapes before rate() sees them);
    fail listing the ones that never did."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        problems = {name: (expr, problem) for name, expr in named_queries
                    if (problem := query_problem(base, expr)) is not None}
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not problems, "queries that failed on a live server:\n" + "\n".join(
        f"  {name}: {problem}\n    {expr}" for name, (expr, problem) in problems.items())


def test_every_dashboard_query_returns_series(traffic, prometheus):
    queries = [(f"panel {title!r}", deploy_checks.render_grafana_query(expr))
               for title, expr in deploy_checks.dashboard_queries()]
    assert len(queries) >= 20
    wait_for_queries(prometheus, queries)


def test_every_dashboard_variable_query_finds_values(traffic, prometheus):
    dashboard = json.loads(deploy_checks.DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        # label_values(selector, label): the values Grafana offers in the picker.
        selector, label = variable["definition"][len("label_values("):-1].rsplit(",", 1)
        url = f"{prometheus}/api/v1/label/{label.strip()}/values?" + urllib.parse.urlencode({"match[]": selector})
        values = http_json(url)["data"]
        assert values, f"variable ${variable['name']} has no values ({variable['definition']})"
        if variable["name"] == "profile":
            assert PROFILE in values


def test_every_alert_signal_returns_series_and_full_expression_is_valid(traffic, prometheus):
    queries = []
    for rule in deploy_checks.alert_rules():
        queries.append((f"alert {rule['alert']} signal", deploy_checks.alert_signal(rule["expr"])))
    wait_for_queries(prometheus, queries)
    for rule in deploy_checks.alert_rules():
        answer = instant_query(prometheus, rule["expr"])
        assert answer.get("status") == "success", f"{rule['alert']}: {answer}"


def test_prometheus_evaluates_every_rule_without_error(traffic, prometheus):
    expected = {rule["alert"] for rule in deploy_checks.alert_rules()}

    def all_evaluated():
        groups = http_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        evaluated = {name: rule for name, rule in rules.items() if rule.get("health") != "unknown"}
        return rules if set(evaluated) >= expected else None

    rules = wait_until(all_evaluated, SCRAPE_TIMEOUT_S, "Prometheus to evaluate every alert rule")
    broken = {name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"}
    assert not broken, broken
    # A healthy test server must not be alerting (beyond `pending` of slow-burning rules).
    firing = [alert for name in expected for alert in rules[name].get("alerts", []) if alert["state"] == "firing"]
    assert not firing, firing


def test_live_metrics_page_has_every_metric_the_dashboards_use(traffic, prometheus):
    address, metrics_port = traffic
    page = scrape(metrics_port)
    exported = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line and not line.startswith("#")}
    used = {name for _, expr in deploy_checks.dashboard_queries() for name in deploy_checks.metric_names(expr)}
    used |= {name for rule in deploy_checks.alert_rules() for name in deploy_checks.metric_names(rule["expr"])}
    assert used - {"up"} <= exported, f"not on the live /metrics page: {sorted(used - {'up'} - exported)}"


def test_docker_healthcheck_command_passes_against_the_live_server(server):
    result = subprocess.run(healthcheck_command(server[0]), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # and fails against a port nobody listens on, so the probe can tell the difference
    dead = subprocess.run(healthcheck_command(f"127.0.0.1:{free_port()}"), capture_output=True, text=True, timeout=30)
    assert dead.returncode != 0


def test_query_check_flags_missing_metrics_and_invalid_queries(traffic, prometheus):
    # The checks above are only as good as query_problem: it must fail on what matters.
    assert query_problem(prometheus, 'svdq_no_such_metric{job="svdq"}') == "no series"
    assert query_problem(prometheus, "sum(rate(svdq_rpc_total[1m])").startswith("error")
    assert query_problem(prometheus, 'svdq_ready{job="svdq"} / 0 * 0') == "no finite value among 1 series"
    assert query_problem(prometheus, 'svdq_ready{job="svdq"}') is None
