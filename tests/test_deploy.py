"""Deployment artefacts checked against the real tools and the real server code.

* Dockerfile: hadolint, structure (multi-stage, dependency layers first, non-root, ports),
  and the commands the image runs (ENTRYPOINT, HEALTHCHECK) are real console scripts with
  valid options. Docker itself is not available here, so nothing is built.
* Kubernetes manifests: validated offline against the schemas kubernetes-validate ships for
  a pinned Kubernetes version. The ServiceMonitor CRD is not in those schemas: its
  structure, and that it selects the Service's labels and metrics port, is checked here.
* docker-compose, Prometheus, Grafana: every file a service mounts exists, every SVDQ_*
  variable is a real server option, every metric a dashboard panel or alert uses is one the
  server's metrics module exports, and promtool accepts the config and passes the alert
  unit tests (deploy/prometheus/alerts_test.yml).

The helpers that read queries out of the dashboard and the alert rules are shared with
tests/test_prometheus_live.py, which evaluates them on a real Prometheus.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "svdq.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes still in upstream support when this was written; the manifests use
# nothing newer (native sidecars, etc.), so they also validate on later versions.
KUBERNETES_VERSION = "1.30.0"
# Ports fixed in docs/CONTRACTS.md.
GRPC_PORT = 50051
METRICS_PORT = 9464
TIMEOUT_S = 60

# Grafana's built-in variables and the dashboard's own, replaced by values Prometheus
# accepts when a query is evaluated outside Grafana (all profiles, all instances).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$profile": ".*",
    "$instance": ".*",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


# -- shared helpers (also used by tests/test_prometheus_live.py) ------------------------------

def console_script(name: str) -> str:
    """Path of a console script installed next to this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} is not installed; run `pip install -e .` (scripts/setup.sh)")
    return found


def dashboard_panels(dashboard: dict | None = None) -> list[dict]:
    """Every non-row panel of the dashboard, rows' nested panels included."""
    dashboard = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL query as written in the dashboard) for every panel target."""
    return [(panel["title"], target["expr"]) for panel in dashboard_panels() for target in panel["targets"]]


def render_grafana_query(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, ready for Prometheus's API."""
    for variable in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_SUBSTITUTIONS[variable])
    if "$" in expr:
        raise AssertionError(f"unsubstituted Grafana variable in query: {expr}")
    return expr


def alert_rules() -> list[dict]:
    """Every alerting rule of deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _strip_promql(expr: str) -> str:
    """The expression without string literals, label matchers, range selectors and
    grouping label lists, so that only metric names, functions and keywords remain."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names and keywords excluded)."""
    stripped = _strip_promql(render_grafana_query(expr))
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped):
        following = stripped[match.end():].lstrip()
        if following.startswith("("):
            continue  # a function call
        name = match.group(0)
        before = stripped[:match.start()]
        if name.lower() in PROMQL_KEYWORDS or re.search(r"[0-9.]$", before):
            continue  # keyword, or the exponent/suffix of a number
        names.add(name)
    return names


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool)?\s*([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\s*$")


def alert_signal(expr: str) -> str:
    """The signal of an alert expression: the part before its final top-level comparison
    with a constant, inside ``absent(...)`` if it tests for absence.

    Alerts are written ``<signal> <comparison> <threshold>``; the signal is what must
    return series on a live server for the alert to be able to fire at all.
    """
    expr = expr.strip()
    match = _COMPARISON.search(expr)
    if match is None:
        raise AssertionError(f"alert expression does not end in a comparison with a constant: {expr}")
    depth = 0
    for char in expr[:match.start()]:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
    if depth != 0:
        raise AssertionError(f"the final comparison of the alert expression is not at top level: {expr}")
    signal = expr[:match.start()].strip()
    absent = re.fullmatch(r"absent\((.*)\)", signal, flags=re.S)
    return absent.group(1).strip() if absent else signal


def exported_metric_names() -> set[str]:
    """Sample names the server's metrics module exports, read from a real Metrics object
    bound to a real (CPU) engine, plus Prometheus's own `up`."""
    from svdq_server.engine import Engine, EngineConfig
    from svdq_server.metrics import Metrics

    metrics = Metrics()
    metrics.bind_engine(Engine(EngineConfig(device="cpu", store_bytes=1 << 20), metrics=metrics), "test")
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
                "gauge": ("",), "info": ("_info",), "unknown": ("",)}
    names = {"up"}
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names


@functools.cache
def help_options(script: str) -> frozenset[str]:
    """The long options a console script's --help documents."""
    result = subprocess.run([console_script(script), "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{script} --help failed ({result.returncode}): {result.stderr[-2000:]}"
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def server_env_variables() -> set[str]:
    """SVDQ_* variables svdq-server reads: one per documented option (docs/CONTRACTS.md)."""
    options = help_options("svdq-server") - {"--help"}
    return {"SVDQ_" + option[2:].upper().replace("-", "_") for option in options}


def check_server_settings(environ: dict[str, str], argv: list[str]) -> object:
    """Parse a deployment's SVDQ_* variables and arguments with the server's own settings
    parser (svdq_server.config), failing with its message when a value is invalid."""
    from svdq_server.config import parse_settings

    unknown = {name for name in environ if name.startswith("SVDQ_")} - server_env_variables()
    assert not unknown, f"not svdq-server options: {sorted(unknown)}"
    try:
        return parse_settings(argv, environ={name: str(value) for name, value in environ.items()})
    except SystemExit:
        pytest.fail(f"svdq-server rejects {environ} {argv} (see its usage message above)")


def command_options(command: list[str]) -> set[str]:
    """Long options used in a command line (the `--name` part of `--name value`/`--name=value`)."""
    return {argument.split("=", 1)[0] for argument in command if argument.startswith("--")}


# -- Dockerfile -------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def runtime_stage() -> list[tuple[str, str]]:
    """Instructions of the last (runtime) stage."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT/CMD/HEALTHCHECK CMD)."""
    start = arguments.index("[")
    return json.loads(arguments[start:])


def test_dockerfile_is_lint_clean():
    result = subprocess.run([console_script("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0 and not result.stdout.strip(), f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The lint test is only worth something if hadolint reports problems in this setting.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nCMD svdq-server\n")
    result = subprocess.run([console_script("hadolint"), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout


def test_dockerfile_stages_layers_and_user():
    instructions = dockerfile_instructions()
    stages = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert len(stages) >= 2 and all(" AS " in stage.upper() for stage in stages), stages
    assert any("nvidia/cuda" in arguments and "runtime" in arguments
               for keyword, arguments in instructions if keyword == "ARG" and arguments.startswith("BASE_IMAGE="))

    # Dependency layers come before the source is copied, so code edits keep them cached.
    position = {arguments: i for i, (keyword, arguments) in enumerate(instructions) if keyword == "COPY"}
    pyproject_copy = next(i for arguments, i in position.items() if arguments.startswith("pyproject.toml"))
    source_copies = [i for arguments, i in position.items() if arguments.split()[0] in ("svdq", "server")]
    installs = [i for i, (keyword, arguments) in enumerate(instructions)
                if keyword == "RUN" and "pip install -r" in arguments]
    assert installs and pyproject_copy < installs[0] < min(source_copies)

    runtime = runtime_stage()
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (runAsNonRoot), got {users[-1]}"
    exposed = {int(port.split("/")[0]) for keyword, arguments in runtime if keyword == "EXPOSE"
               for port in arguments.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}


def test_dockerfile_commands_are_real_console_scripts():
    runtime = runtime_stage()
    entrypoint = exec_form(next(arguments for keyword, arguments in runtime if keyword == "ENTRYPOINT"))
    commands = [arguments for keyword, arguments in runtime if keyword == "CMD"]
    server_command = entrypoint + (exec_form(commands[-1]) if commands else [])
    assert server_command[0] == "svdq-server"
    assert command_options(server_command) <= help_options("svdq-server")

    healthcheck = next(arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK")
    probe = exec_form(healthcheck[healthcheck.index("CMD"):])
    assert probe[0] == "svdq-health"
    assert command_options(probe) <= help_options("svdq-health"), probe
    assert probe[probe.index("--address") + 1].endswith(f":{GRPC_PORT}")

    # Every SVDQ_* default the image sets must be an option the server reads, with a valid value.
    env_lines = " ".join(arguments for keyword, arguments in runtime if keyword == "ENV")
    image_environ = dict(re.findall(r"\b(SVDQ_[A-Z_]+)=(\S+)", env_lines))
    settings = check_server_settings(image_environ, server_command[1:])
    assert (settings.port, settings.metrics_port, settings.host) == (GRPC_PORT, METRICS_PORT, "0.0.0.0")


def test_requirements_script_lists_runtime_dependencies_without_torch():
    script = DEPLOY / "docker" / "pyproject_requirements.py"
    result = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), "gpu"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    listed = [Requirement(line) for line in result.stdout.splitlines()]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    assert {r.name for r in listed} == {r.name for r in expected} - {"torch"}
    assert [str(r) for r in listed] == [str(r) for r in expected if r.name != "torch"]

    unknown = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), "no-such-extra"],
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert unknown.returncode == 2 and "no-such-extra" in unknown.stderr and "gpu" in unknown.stderr


def _dockerignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex with Go filepath.Match semantics: `*` and `?` stay
    within one path element, `**` spans any number of them."""
    pattern = pattern.strip("/")
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex + r"\Z")


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether Docker keeps a path of the build context: a pattern applies when it matches
    the path or one of its parent folders, `!` re-includes, and the last applying pattern wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        matcher = _dockerignore_pattern(pattern[1:] if negated else pattern)
        if any(matcher.match(prefix) for prefix in prefixes):
            included = negated
    return included


def test_dockerignore_keeps_every_build_input():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [arguments.split()[0] for keyword, arguments in dockerfile_instructions()
              if keyword == "COPY" and not arguments.startswith("--from")]
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert _dockerignore_allows(source, patterns), f".dockerignore excludes {source}"
    for folder in package_dirs.values():
        assert folder in copied, f"package folder {folder} (pyproject package-dir) is not copied into the image"
        for module in (REPO / folder).rglob("*.py"):
            assert _dockerignore_allows(str(module.relative_to(REPO)), patterns), module
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "svdq/__pycache__/codec.cpython-311.pyc"):
        assert not _dockerignore_allows(unwanted, patterns), f".dockerignore lets {unwanted} into the build context"


# -- Kubernetes -------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict]]:
    """(file name, manifest) of every resource in deploy/k8s except the kustomization."""
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def k8s_resource(kind: str, name: str | None = None) -> dict:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    documents = k8s_documents()
    kinds = {doc["kind"] for _, doc in documents}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "ServiceMonitor", "StatefulSet",
            "PodDisruptionBudget"} <= kinds
    validated = 0
    for filename, doc in documents:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRD: test_servicemonitor_selects_the_metrics_port checks it
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, error.path))}: "
                        f"{error.message}")
        validated += 1
    assert validated >= 6


def test_k8s_validation_rejects_a_misspelled_field():
    # Strict validation must catch typos, or the test above proves nothing.
    deployment = copy.deepcopy(k8s_resource("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_k8s_deployment_requests_a_gpu_and_probes_the_health_service():
    deployment = k8s_resource("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for section in ("requests", "limits"):
        assert int(container["resources"][section]["nvidia.com/gpu"]) >= 1
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    health_options = help_options("svdq-health")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe_name]["exec"]["command"]
        assert command[0] == "svdq-health" and command_options(command) <= health_options, command
        assert command[command.index("--address") + 1].endswith(f":{GRPC_PORT}")

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)

    # Settings reach the server as SVDQ_* variables: each must be an option it accepts.
    settings = k8s_resource("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    parsed = check_server_settings(settings | {entry["name"]: entry["value"] for entry in container["env"]}, [])
    assert parsed.device == "cuda" and parsed.tls_cert and parsed.tokens_file and parsed.store_bytes > 1 << 30

    # Every file path a setting or probe names lies in a mounted volume that holds that key.
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    file_paths = [value for key, value in settings.items() if key.endswith(("_FILE", "_CERT", "_KEY", "_CA"))]
    file_paths += [arg for probe in ("readinessProbe",) for arg in container[probe]["exec"]["command"] if arg.startswith("/")]
    for path in file_paths:
        volume_name = next((name for name, mount in mounts.items() if path.startswith(mount + "/")), None)
        assert volume_name is not None, f"{path} is not inside any volume mount"
        volume = volumes[volume_name]
        key = path.rsplit("/", 1)[1]
        if "secret" in volume:
            secret = k8s_resource("Secret", volume["secret"]["secretName"])
            assert key in secret.get("stringData", {}) | secret.get("data", {}), f"secret lacks {key}"
        else:
            config = k8s_resource("ConfigMap", volume["configMap"]["name"])
            assert key in config["data"], f"configmap lacks {key}"


def test_k8s_profiles_match_the_example_config_and_load():
    from svdq_server.config import load_profiles

    example_path = DEPLOY / "config" / "profiles.yaml"
    embedded = yaml.safe_load(k8s_resource("ConfigMap", "svdq-profiles")["data"]["profiles.yaml"])
    assert embedded == yaml.safe_load(example_path.read_text()), \
        "deploy/k8s/configmap.yaml and deploy/config/profiles.yaml drifted apart"
    profiles = load_profiles(str(example_path))
    assert {profile.name for profile in profiles} == {"smollm2-135m", "llama-3.1-8b"}


def test_example_tokens_load_and_k8s_placeholder_is_refused():
    from svdq_server.auth import TokenAuthenticator

    from svdq.errors import InvalidInputError

    example = TokenAuthenticator.from_sources(str(DEPLOY / "config" / "tokens.example.yaml"), None)
    assert example.tenants == ["team-a", "team-b"]
    # The committed Kubernetes secret must not be usable as is.
    placeholder = yaml.safe_load(k8s_resource("Secret", "svdq-tokens")["stringData"]["tokens.yaml"])
    with pytest.raises(InvalidInputError, match="at least 16 characters"):
        TokenAuthenticator(placeholder["tenants"])


def test_service_exposes_the_named_container_ports():
    service = k8s_resource("Service", "svdq")
    deployment = k8s_resource("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == container_ports
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}


def test_servicemonitor_selects_the_metrics_port():
    # Structural check of the Prometheus Operator CRD (its schema is not in kubernetes-validate).
    monitor = k8s_resource("ServiceMonitor")
    service = k8s_resource("Service", "svdq")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                                    "podTargetLabels", "sampleLimit"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    duration = re.compile(r"^([0-9]+(ms|s|m|h))+$")
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                                 "metricRelabelings", "honorLabels", "tlsConfig"}
        assert endpoint["port"] == "metrics" and endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
        # The alerts and the dashboard select job="svdq".
        assert {"targetLabel": "job", "replacement": "svdq"} in endpoint["relabelings"]


def test_k8s_replicas_share_the_redis_statefulset():
    deployment = k8s_resource("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU needed
    settings = k8s_resource("ConfigMap", "svdq-settings")["data"]
    redis_set = k8s_resource("StatefulSet", "svdq-redis")
    redis_service = k8s_resource("Service", "svdq-redis")
    assert redis_service["spec"]["clusterIP"] == "None" and redis_set["spec"]["serviceName"] == "svdq-redis"
    host = f"{redis_set['metadata']['name']}-0.{redis_service['metadata']['name']}.svdq.svc"
    assert settings["SVDQ_STORE"] == f"redis://{host}:{redis_service['spec']['ports'][0]['port']}/0"
    pod = redis_set["spec"]["template"]["spec"]
    mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data" and redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    command = " ".join(pod["containers"][0]["command"])
    assert f"{mounts['config']}/redis.conf" in command and "--dir /data" in command
    # the ConfigMap carries the shipped redis.conf, whose durability settings the tests run with
    embedded = k8s_resource("ConfigMap", "svdq-redis-config")["data"]["redis.conf"]
    shipped = (DEPLOY / "redis" / "redis.conf").read_text()
    assert embedded == shipped, "deploy/k8s/redis.yaml and deploy/redis/redis.conf drifted apart"
    assert re.search(r"^appendonly yes$", shipped, re.M) and re.search(r"^appendfsync (always|everysec)$", shipped, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", shipped, re.M)
    budget = k8s_resource("PodDisruptionBudget", "svdq")
    assert budget["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    headless = k8s_resource("Service", "svdq-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_compose_replicas_share_one_redis():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for first, second in (("svdq-gpu", "svdq-gpu-2"), ("svdq-cpu", "svdq-cpu-2")):
        one, two = services[first], services[second]
        assert one["profiles"] == two["profiles"] and one["image"] == two["image"]
        assert one["environment"] == two["environment"] and one["command"] == two["command"]
        assert one["environment"]["SVDQ_STORE"] == "redis://redis:6379/0"
        assert two["networks"]["default"]["aliases"] == ["svdq-2"]
        assert {port.split(":")[-2] for port in two["ports"]} == {"50052", "9465"}
        check_server_settings(two["environment"], two["command"])
        assert one["environment"]["SVDQ_STORE_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in one["secrets"] and "redis" in one["depends_on"]
    redis = services["redis"]
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert "/usr/local/etc/redis/redis.conf" in redis["command"][-1] and "redis_password" in redis["secrets"]
    assert (COMPOSE.parent / re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", compose["secrets"]["redis_password"]["file"])).exists()


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    namespaces = {doc["metadata"].get("namespace", doc["metadata"]["name"]) for _, doc in k8s_documents()}
    assert namespaces == {kustomization["namespace"]}
    image = k8s_resource("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] in {entry["name"] for entry in kustomization["images"]}


# -- docker-compose -----------------------------------------------------------------------------

def test_compose_file_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"svdq-gpu", "svdq-cpu", "prometheus", "grafana"} <= set(services)
    gpu, cpu = services["svdq-gpu"], services["svdq-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in cpu and cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert gpu["command"] == ["--device", "cuda"] and cpu["command"] == ["--device", "cpu"]

    server_options = help_options("svdq-server")
    for server in (gpu, cpu):
        assert command_options(server["command"]) <= server_options
        check_server_settings(server["environment"], server["command"])
        assert "svdq" in server["networks"]["default"]["aliases"]
        assert server["build"]["context"] == ".." and (COMPOSE.parent / server["build"]["context"] / "Dockerfile").exists()
        published = {port.rsplit(":", 1)[-1] for port in server["ports"]}
        assert published == {str(GRPC_PORT), str(METRICS_PORT)}
        for secret in server["secrets"]:
            source = compose["secrets"][secret]["file"]
            default = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", source)
            assert (COMPOSE.parent / default).exists(), default
        assert server["environment"]["SVDQ_TOKENS_FILE"] == f"/run/secrets/{server['secrets'][0]}"

    # Every bind mount exists; the containers see the files where the configs expect them.
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
                mounts[(name, target)] = (COMPOSE.parent / source).resolve()
    assert gpu["environment"]["SVDQ_PROFILES_FILE"] == "/etc/svdq/profiles.yaml"
    assert mounts[("svdq-gpu", "/etc/svdq/profiles.yaml")] == (DEPLOY / "config" / "profiles.yaml").resolve()
    assert mounts[("prometheus", "/etc/prometheus")] == PROMETHEUS_CONFIG.parent.resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    # Prometheus scrapes the server's alias on the metrics port.
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    targets = [target for job in scrape if job["job_name"] == "svdq" for group in job["static_configs"]
               for target in group["targets"]]
    assert targets == [f"svdq:{METRICS_PORT}", f"svdq-2:{METRICS_PORT}"]

    # Grafana: the provisioned datasource points at the compose Prometheus with the uid the
    # dashboard uses; the dashboard provider reads the folder the dashboards are mounted in.
    provisioning = mounts[("grafana", "/etc/grafana/provisioning")]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "svdq.yml").read_text())["providers"][0]
    assert mounts[("grafana", provider["options"]["path"])] == DASHBOARD.parent.resolve()
    uids = {panel["datasource"]["uid"] for panel in dashboard_panels()}
    assert uids == {datasource["uid"]}


# -- Prometheus and Grafana ----------------------------------------------------------------------

def test_promtool_accepts_config_and_rules_and_alert_unit_tests_pass():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (scripts/test.sh does it)"
    for arguments in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)],
                      ["test", "rules", str(ALERTS_TEST)]):
        result = subprocess.run([promtool, *arguments], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, f"promtool {' '.join(arguments)}:\n{result.stdout}{result.stderr}"
    # Every alert has a unit test that expects it to fire.
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert {rule["alert"] for rule in alert_rules()} <= tested


def test_alerts_are_actionable():
    rules = alert_rules()
    assert {"SvdqDown", "SvdqHighServerErrorRate", "SvdqHighAttendLatency", "SvdqStoreNearBudget",
            "SvdqReconstructionErrorHigh"} <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), rule["alert"]
        assert 'job="svdq"' in rule["expr"], f"{rule['alert']} must select job=\"svdq\""
        alert_signal(rule["expr"])  # raises when the expression is not <signal> <cmp> <threshold>


def test_every_dashboard_and_alert_metric_is_exported_by_the_server():
    exported = exported_metric_names()
    used = {}
    for title, expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, []).append(f"panel {title!r}")
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, []).append(f"alert {rule['alert']}")
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"metrics the server does not export: {missing}"
    # The dashboard shows every svdq metric family the server exports.
    families = {re.sub(r"(_total|_bucket|_sum|_count|_created)$", "", name) for name in exported if name.startswith("svdq_")}
    shown = {re.sub(r"(_total|_bucket|_sum|_count)$", "", name) for title, expr in dashboard_queries()
             for name in metric_names(expr)}
    assert families <= shown, f"exported but not on the dashboard: {families - shown}"


def test_metric_name_extraction_and_alert_signal():
    expr = ('histogram_quantile(0.9, sum by (profile, le) (rate(svdq_reconstruction_relative_error_bucket'
            '{job="svdq",profile=~"$profile"}[$__rate_interval]))) > 0.4')
    assert metric_names(expr) == {"svdq_reconstruction_relative_error_bucket"}
    assert metric_names('(sum(rate(a_total{code=~"X|Y"}[5m])) or vector(0)) / on (job) b > 1e3') == {"a_total", "b"}
    assert alert_signal('up{job="svdq"} == 0') == 'up{job="svdq"}'
    assert alert_signal("sum(x) / (y > 0) > 0.9") == "sum(x) / (y > 0)"
    assert alert_signal('absent(up{job="svdq"}) == 1') == 'up{job="svdq"}'
    with pytest.raises(AssertionError):
        alert_signal("rate(x[5m])")


def test_dashboard_panels_have_units_legends_and_profile_filter():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert "profile" in variables and variables["profile"]["allValue"] == ".*"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "table"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"])
        if panel["type"] == "timeseries":
            assert panel["options"]["legend"]["showLegend"]
            assert all(target["legendFormat"] for target in panel["targets"]), panel["title"]
        for target in panel["targets"]:
            render_grafana_query(target["expr"])
            if re.search(r"svdq_(compression_ratio|bits_per_element|reconstruction_relative_error)", target["expr"]):
                assert 'profile=~"$profile"' in target["expr"], f"{panel['title']!r} ignores $profile"
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("compression ratio", "bits per element", "fp16", "sequences", "evictions", "request rate",
                  "p99", "errors by code", "key bytes read", "reconstruction error", "device memory"):
        assert topic in titles, f"no panel about {topic}"


def test_dashboard_counts_a_shared_store_once(tmp_path):
    # Two replicas a and b share one Redis store and both report its 5 sequences; c is a server
    # with its own memory store holding 3. The overview counts 8, not 13.
    queries = {title: expr for title, expr in dashboard_queries()}
    series = {"a": ("redis", "redis://redis:6379/0", 5), "b": ("redis", "redis://redis:6379/0", 5),
              "c": ("memory", "memory:c:1", 3)}
    lines = []
    for instance, (backend, store, sequences) in series.items():
        lines += [f"      - series: 'svdq_store_info{{job=\"svdq\",instance=\"{instance}\",backend=\"{backend}\","
                  f"store=\"{store}\"}}'", "        values: '1x5'",
                  f"      - series: 'svdq_sequences{{job=\"svdq\",instance=\"{instance}\"}}'",
                  f"        values: '{sequences}x5'"]
    test = tmp_path / "store_once_test.yml"
    test.write_text("tests:\n  - interval: 1m\n    input_series:\n" + "\n".join(lines) + "\n"
                    "    promql_expr_test:\n      - expr: " + json.dumps(render_grafana_query(queries["Sequences stored"]))
                    + "\n        eval_time: 2m\n        exp_samples:\n          - labels: '{}'\n            value: 8\n")
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (scripts/test.sh does it)"
    result = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
