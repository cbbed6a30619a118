"""bench/gpu_check.sh is run by hand on a lent GPU, where a broken import would cost the
device time: its CPU dry run (toy sizes, the same steps) must work here."""

import os
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
