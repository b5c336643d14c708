"""The first `promptfleet plan smollm2-135m` on a machine converts the embedded backbone; its console
shows the plan and the conversion line, not DeepSpeed's "Setting accelerator to CPU" warning (plan
runs nothing on a device)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def test_first_plan_prints_no_accelerator_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(PROMPTFLEET_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", "smollm2-135m", "--devices-per-node", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "models" / "smollm2-135m").is_dir()  # this run converted it
    assert "accelerator" not in done.stderr.lower() and "[WARNING]" not in done.stderr, done.stderr
    assert "recommended:" in done.stdout
