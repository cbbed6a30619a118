"""Plain helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch

from svdq.attention import body_range


def seal(body: bytes | bytearray) -> bytes:
    """``body`` with the CRC-32 trailer every svdq blob ends with: a crafted or edited blob
    (``seal(blob[:-4])`` after editing it) passes the checksum and reaches the check under test."""
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def scrape(metrics_port: int, timeout: float = 10.0) -> str:
    """The text of a server's Prometheus ``/metrics`` page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def wait_until(condition, seconds: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.1):
    """Poll ``condition`` every ``interval`` seconds until it returns a truthy value (which is
    returned); fail naming ``what`` after ``seconds``, or at once when ``process`` exited (with
    the tail of ``log``)."""
    deadline = time.monotonic() + seconds
    while True:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"{what}: process exited with {process.returncode}:\n{tail}")
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"timed out after {seconds}s waiting for {what}\n{tail}")
        time.sleep(interval)


def allowed_mask(selection, keys) -> torch.Tensor:
    """bool [kv_heads, tokens]: the tokens sparse attention attends for one query under
    ``selection`` (:func:`svdq.attention.select_body_tokens` over ``keys``): sinks and tail,
    and of the quantized body only the selected tokens (all of them when it selects everything)."""
    allowed = torch.ones(keys.kv_heads, keys.num_tokens, dtype=torch.bool)
    if selection.token_index is None:
        return allowed
    start, n_body = body_range(keys)
    allowed[:, start:start + n_body] = False
    for head in range(keys.kv_heads):
        allowed[head, selection.token_index[head][selection.valid[head]] + start] = True
    return allowed
