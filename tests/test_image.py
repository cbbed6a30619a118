"""The CPU image, built for real with buildah from the production Dockerfile, starts
svdq-server, answers health and makes a round trip (scripts/build_image.sh does the work).

Needs root and Debian's buildah and debootstrap; `scripts/test.sh` installs them."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/svdq:cpu-test"

missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]


@pytest.mark.skipif(bool(missing) or os.geteuid() != 0,
                    reason=f"needs root and buildah + debootstrap (missing: {missing or 'root'})")
def test_cpu_image_builds_runs_and_serves_a_round_trip():
    result = subprocess.run(["scripts/build_image.sh", TAG], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=1500)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert "svdq-health: 127.0.0.1:" in output and "SERVING" in output
    assert "round trip: 256 tokens stored" in output and "image smoke test passed" in output
    inspect = subprocess.run(["buildah", "inspect", "--type", "image", TAG], capture_output=True, text=True,
                             timeout=60, check=True)
    config = json.loads(inspect.stdout)["Docker"]["config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["svdq-server"]
    assert "svdq-health" in " ".join(config["Healthcheck"]["Test"])
