"""A real local Ray cluster for tests: `ray start --head` on free ports with its own temp dir.

`LocalRayCluster.start(...)` runs the head (2 CPUs, 127.0.0.1) and waits for its job server;
`stop()` runs `ray stop` against that cluster only. It does not submit jobs (tests use
`promptfleet submit` / `cluster.jobs`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    gcs_port: int
    dashboard_port: int
    temp_dir: Path
    env: dict[str, str] = field(default_factory=dict)  # environment of the head and of CLI calls

    @property
    def address(self) -> str:
        """Job server URL (for `--address` of `promptfleet submit` / `jobs`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @classmethod
    def start(cls, num_cpus: int = 2, extra_env: dict[str, str] | None = None, timeout_s: float = 120) -> LocalRayCluster:
        # Short temp path: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30", **(extra_env or {})}
        env.pop("RAY_ADDRESS", None)
        cluster = cls(free_port(), free_port(), temp_dir, env)
        cmd = [RAY, "start", "--head", f"--port={cluster.gcs_port}", f"--dashboard-port={cluster.dashboard_port}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:  # the job server comes up a little after `ray start` returns
            try:
                with urllib.request.urlopen(f"{cluster.address}/api/version", timeout=5):
                    return cluster
            except OSError:
                if time.monotonic() > deadline:
                    cluster.stop()
                    raise
                time.sleep(1)

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force", f"--address={self.gcs_address}"], env=self.env, cwd=REPO,
                       capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def promptfleet(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Run the `promptfleet` CLI against this cluster; returns the finished process."""
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout_s)
