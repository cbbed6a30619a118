"""bench/gpu_check.sh is run by hand on a lent GPU, where a broken import would cost the
device time: its CPU dry run (toy sizes, the same steps) must work here."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| check | path | median | result | target | verdict |" in done.stdout
    assert "attend svdq sparse 1/32" in done.stdout and "compress" in done.stdout
    # issue 14's rows: latent values beside 16-bit ones, and the whole-cache budget
    assert "keys 1.5 bits, latent V 2.50 bits" in done.stdout and "the 16-bit V row" in done.stdout
    assert "compress_kv whole cache" in done.stdout and "| compress_kv 512 x 8 x 128 fp16 keys + values |" in done.stdout
    # the summed counts of the test runs (on a GPU one per case; here one run of the score tests)
    tests_line = next(line for line in done.stdout.splitlines() if line.startswith("tests: "))
    assert re.fullmatch(r"tests: 7 passed, 7 skipped in 1 pytest run\(s\), \d+ at a time", tests_line), tests_line
