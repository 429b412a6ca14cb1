"""Every example runs: each is executed as a script against the module's Ray cluster."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_runs_ten_steps(ray_cluster: None, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # join this module's cluster
        "XDG_CACHE_HOME": str(tmp_path),  # the corpus cache goes here, not into ~/.cache
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 10, done.stdout
    losses = [float(line.split()[-1]) for line in lines]
    assert all(math.isfinite(x) for x in losses)
    assert list(tmp_path.glob("zetta_ray/corpus-*/manifest.json")), "the corpus was built in the cache"
