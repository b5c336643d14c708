"""`promptfleet train --address HOST:PORT` against a `ray start` cluster with Ray's default token auth.

The cluster is built the way the README's multi-node steps say, on this machine: `ray start --head
--num-cpus=0` (it runs drivers, never ranks) with RAY_AUTH_MODE unset, so Ray turns token authentication
on by itself because a token exists in ~/.ray/auth_token (HOME is the test's own directory); then a
worker node joins with `RAY_AUTH_MODE=token ray start --address=HEAD`, as the README tells an operator
to. The job needs one CPU, which only the worker node has, so a run that finishes also shows the worker
joined. The driver gets no RAY_AUTH_* variable: it finds the token the way `promptfleet submit` does
(`cluster.auth`). Without any token it fails in one line naming the fix, exit 2.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from local_ray import AGENT_PORTS, RAY, REPO, LocalRayCluster, free_ports
from tiny_job import write_tiny_backbone, write_tiny_job

pytestmark = pytest.mark.distributed

# Ports a worker node opens (the head's own are in AGENT_PORTS); all picked free on this shared machine.
WORKER_PORTS = tuple(p for p in AGENT_PORTS if p != "ray-client-server-port")


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This machine's environment without any Ray auth setting, with `home` as HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {
        **env,
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": path,
        **extra,
    }


def _ray(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def auth_cluster():
    """(cluster, HOME holding its token): a head and one worker node, both `ray start`, auth on by default."""
    home = Path(tempfile.mkdtemp(prefix="pfhome-", dir="/tmp"))
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)  # what `ray get-auth-token --generate` writes
    temp_dir = Path(tempfile.mkdtemp(prefix="pfauth-", dir="/tmp"))  # short: Ray's socket paths are bounded
    gcs, dashboard, *ports = free_ports(2 + len(AGENT_PORTS) + len(WORKER_PORTS))
    cluster = LocalRayCluster(gcs, dashboard, temp_dir, token, _env(home))
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head_ports, worker_ports = ports[: len(AGENT_PORTS)], ports[len(AGENT_PORTS) :]
    try:
        head = _ray(
            ["start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=0", *common]
            + [f"--{n}={p}" for n, p in zip(AGENT_PORTS, head_ports)],
            _env(home),
        )
        assert "Token authentication is enabled" in head.stderr + head.stdout  # Ray's default, not ours
        _ray(
            ["start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *common]
            + [f"--{n}={p}" for n, p in zip(WORKER_PORTS, worker_ports)],
            _env(home, RAY_AUTH_MODE="token"),  # the README's worker step
        )
        yield cluster, home
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(home)], check=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("auth")
    return write_tiny_job(
        root / "job",
        write_tiny_backbone(root / "backbone"),
        optim={"max_steps": 4},
        cluster={"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0},
    )


def _train(job: Path, address: str, env: dict[str, str], name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(job), f"name={name}", "--address", address],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_joins_a_token_auth_cluster_with_the_token_submit_uses(auth_cluster, job):
    cluster, home = auth_cluster
    proc = _train(job, cluster.gcs_address, _env(home), "joined")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "InvalidAuthToken" not in out and "AuthenticationError" not in out
    summary = json.loads((job.parent / "runs" / "joined" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 1


def test_train_without_a_token_fails_in_one_line(auth_cluster, job, tmp_path):
    cluster, _ = auth_cluster
    proc = _train(job, cluster.gcs_address, _env(tmp_path), "no-token")  # a HOME with no ~/.ray/auth_token
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("promptfleet: error: the Ray cluster at 127.0.0.1:") and "RAY_AUTH_TOKEN" in last
    assert "Traceback" not in proc.stderr
