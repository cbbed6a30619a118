"""Shared fixtures: a real svdq-server process on loopback, TLS material, small tensors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 90.0
TENANT_TOKENS = {"team-a": "token-team-a-0123456789", "team-b": "token-team-b-0123456789"}


@pytest.fixture
def exact_attention(monkeypatch):
    """The torch attention path in float32 (``SVDQ_ATTENTION_PRECISION``): for the tests that
    compare it with float64 attention at float32 tolerances. Its bfloat16 products, the
    default on CPUs that multiply bfloat16 natively, have their own tests with a tolerance
    measured against the compression error (``tests/test_attention_precision.py``)."""
    monkeypatch.setenv("SVDQ_ATTENTION_PRECISION", "float32")


@pytest.fixture(autouse=True)
def _restore_attention_cache_limit():
    """Put back the process-wide limit of ``svdq.derived.DERIVED`` that an in-process engine or
    ``LocalOffload`` sets, so that no test sees the budget another one left."""
    from svdq.derived import DERIVED

    limit = DERIVED.limit_bytes
    yield
    DERIVED.limit_bytes = limit


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``svdq-server`` in a child process on 127.0.0.1 with free ports.

    ``start()`` returns once the standard health service answers SERVING (or fails with the
    server's log). ``stop()`` sends SIGTERM and waits for a clean exit.
    """

    def __init__(self, tmp_path: Path, args: list[str] = (), env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                     "--device", "cpu", "--workers", "4", "--drain-seconds", "0", *args]
        self.env = {**os.environ, "SVDQ_BACKEND": "torch", **(env or {})}
        self.credentials = credentials
        self.server_name = server_name
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "svdq_server.cli", *self.args], stdout=log,
                                        stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"svdq-server exited with {self.process.returncode}:\n{self.log()}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"svdq-server did not become SERVING within {START_TIMEOUT_S}s:\n{self.log()}")

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(self.address, self.credentials, options=options)

    def health(self) -> int | None:
        try:
            with self.channel() as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    lines = ["tenants:"] + [f"  {tenant}: [{token}]" for tenant, token in TENANT_TOKENS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def profiles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  - name: tiny\n"
        "    num_layers: 2\n"
        "    kv_heads: 2\n"
        "    head_dim: 32\n"
        "    rope: {theta: 10000.0}\n"
        "    codec: {method: svdq, bits_per_element: 2.0, group_size: 32}\n"
    )
    return path


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, tokens_file, profiles_file):
    """One multi-tenant server for the integration modules (auth on, metrics on)."""
    server = ServerProcess(tmp_path_factory.mktemp("shared-server"),
                           ["--tokens-file", str(tokens_file), "--profiles-file", str(profiles_file),
                            "--store-bytes", "64MiB", "--max-message-bytes", "3MiB"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 'localhost'/127.0.0.1 and a client certificate, made
    with openssl at test time."""
    folder = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=svdq-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=svdq-test-client")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    # A second CA whose certificates the server must refuse.
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=svdq-rogue-ca", "-keyout", "rogue.key", "-out", "rogue.pem")
    return {name: folder / f"{name}" for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "rogue.pem", "rogue.key")}


@pytest.fixture
def redis_server(tmp_path):
    """A fresh ``redis-server`` with deploy/redis/redis.conf for one test (tests/redis_process.py)."""
    from redis_process import RedisProcess  # it imports this module

    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.kill()
