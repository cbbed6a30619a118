"""A real ``redis-server`` (Debian's package) on loopback for the Redis backend's tests: the
shipped deploy/redis/redis.conf (AOF, ``appendfsync always``, ``noeviction``) with its own
temp directory and free port, stopped (or killed) by the test."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port

REDIS_SERVER = shutil.which("redis-server")
#: the configuration deploy/ ships: the tests run with its durability settings
REDIS_CONF = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "redis.conf"
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (scripts/test.sh "
                                 "installs Debian's redis-server as root)")


class RedisProcess:
    """``redis-server`` with deploy/redis/redis.conf; restart it on the same port and
    directory to check what persisted."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        args = [REDIS_SERVER, str(REDIS_CONF), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.folder), "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 30 s")

    def stop(self) -> None:
        """SIGTERM: redis-server flushes the AOF and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
