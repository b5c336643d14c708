"""A real local Ray cluster for tests: `ray start --head` on free ports with its own temp dir.

`LocalRayCluster.start(...)` runs the head (2 CPUs, 127.0.0.1, token auth with a token of its
own) and waits for its job server. `stop()` ends exactly this cluster's processes: plain
`ray stop` would kill every Ray cluster on the machine (other test sessions' included), so it
signals the processes whose command line names this cluster's unique temp dir, by PID.
It does not submit jobs (tests use `promptfleet submit` / `cluster.jobs`).

`shared_cluster` serves the `ray_cluster` fixture of the modules that only need *a* 2-CPU cluster (fault
tolerance, search fault tolerance, tune, Ray Jobs): starting a head (GCS, raylet, the dashboard's
nine module processes, agents) costs 10-30 s of a 2-core machine, so it is module-scoped in name but
hands every module the same cluster, started by the first module that asks and stopped after the last
collected test that uses it (it does not idle through the rest of the session), or at the session's
end however that comes. Isolation between modules: each test waits for its own runs and jobs to end
(or stops them) and writes under its own temp dirs and run names; a cluster that no longer answers (a
test broke it) is replaced by a fresh one for the next module. Modules that need another shape
(several nodes, Ray's default token auth, an embedded `ray.init`) start their own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
AGENT_PORTS = (
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
)


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, so the kernel cannot hand
    the same port out twice (one `free_port()` after another can, and Ray then fails to start)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _process_table() -> tuple[dict[int, int], dict[int, bytes]]:
    """{pid: parent pid} and {pid: command line} of every process we can read."""
    parent, cmdline = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline[int(proc.name)] = (proc / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
    return parent, cmdline


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" once it is gone): identifies it beyond its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return "" if stat.rsplit(")", 1)[1].split()[0] == "Z" else stat.rsplit(")", 1)[1].split()[19]


def _has_ancestor(pid: int, ancestors: set[int], parent: dict[int, int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        pid, seen = parent.get(pid, 0), seen + 1
        if pid in ancestors:
            return True
    return False


@dataclass
class LocalRayCluster:
    gcs_port: int
    dashboard_port: int
    temp_dir: Path
    token: str
    env: dict[str, str] = field(default_factory=dict)  # environment of the head (and its jobs)

    @property
    def address(self) -> str:
        """Job server URL (for `--address` of `promptfleet submit` / `jobs`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @classmethod
    def start(
        cls, num_cpus: int = 2, extra_env: dict[str, str] | None = None, timeout_s: float = 120
    ) -> LocalRayCluster:
        # Short temp path: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))
        token = secrets.token_hex(32)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
            # Ray Train's controller polls its workers this often (default 2 s): a run's start, end and a
            # lost worker are each noticed up to one poll late, and the tests run a few dozen runs.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            # jobs run `python -m cluster.cli`: the venv's python, as on a head started from an activated venv
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
        env.pop("RAY_ADDRESS", None)
        gcs_port, dashboard_port, *agent_ports = free_ports(2 + len(AGENT_PORTS))
        cluster = cls(gcs_port, dashboard_port, temp_dir, token, env)
        cmd = [
            RAY,
            "start",
            "--head",
            f"--port={cluster.gcs_port}",
            f"--dashboard-port={cluster.dashboard_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        # Every fixed default port may be taken by another Ray on this shared machine.
        cmd += [f"--{name}={port}" for name, port in zip(AGENT_PORTS, agent_ports)]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not cluster.is_up():  # the job server comes up a little after `ray start` returns
            if time.monotonic() > deadline:
                cluster.stop()
                raise TimeoutError(
                    f"Ray's job server at {cluster.address} did not answer in {timeout_s:.0f} s"
                )
            time.sleep(0.2)
        return cluster

    def cpu_seconds(self) -> float:
        """CPU seconds this cluster's processes used so far (their reaped children's included)."""
        ticks = 0
        for pid in self.pids():
            try:
                ticks += sum(
                    int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:15]
                )
            except (OSError, ValueError):
                continue
        return ticks / os.sysconf("SC_CLK_TCK")

    def pids(self) -> list[int]:
        """PIDs of this cluster's processes: those whose command line names its temp dir (GCS,
        raylet, dashboard), and all their descendants (agents and workers, which rename themselves)."""
        mark = str(self.temp_dir).encode()
        parent, cmdline = _process_table()
        found = {p for p, cmd in cmdline.items() if mark in cmd and p != os.getpid()}
        return sorted(p for p in parent if p in found or _has_ancestor(p, found, parent))

    def actor_pids(self, class_name: str) -> list[int]:
        """PIDs of this cluster's live actor processes of `class_name`."""
        _, cmdline = _process_table()
        prefix = f"ray::{class_name}".encode()
        return [p for p in self.pids() if cmdline.get(p, b"").startswith(prefix)]

    def stop(self, grace_s: float = 2, kill_wait_s: float = 10) -> None:
        """SIGTERM every process of this cluster, SIGKILL what is left after `grace_s`.

        The grace is short on purpose: the GCS server and the autoscaler monitor do not exit on SIGTERM
        at all (they waited out a 10 s grace on every stop), and a test cluster keeps nothing worth a
        clean shutdown; the raylet, which does act on SIGTERM, stops its workers within it.
        """
        # Snapshot first: once the raylet is gone its agents are re-parented and no longer look like
        # ours. Each PID is remembered with its start time so a recycled PID is never signalled.
        if log := os.environ.get("PF_TEST_RAY_CPU_LOG"):  # CPU seconds, for timing the suite
            with open(log, "a") as f:
                f.write(f"{self.temp_dir.name} {self.cpu_seconds():.1f}\n")
        victims: dict[int, str] = {}
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
            victims |= {p: _start_time(p) for p in self.pids()}
            for pid, started in victims.items():
                if _start_time(pid) == started:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + wait_s
            while any(_start_time(p) == t for p, t in victims.items()) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def is_up(self) -> bool:
        """Whether the job server answers (the head's GCS and dashboard are alive)."""
        request = urllib.request.Request(
            f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                return True
        except OSError:
            return False

    def cli_env(self, token: bool = True) -> dict[str, str]:
        """Environment for a CLI call from outside the cluster: with or without the auth token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update({"HF_HUB_OFFLINE": "1", "HOME": str(self.temp_dir)})  # HOME: no ~/.ray/auth_token fallback
        if token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def promptfleet(
        self, *args: str, token: bool = True, timeout_s: float = 300, cwd: Path = REPO
    ) -> subprocess.CompletedProcess:
        """Run the `promptfleet` CLI against this cluster (from `cwd`); returns the finished process."""
        return subprocess.run(
            [sys.executable, "-m", "cluster.cli", *args],
            env=self.cli_env(token),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


# ------------------------------------------------------------------------ one cluster for several modules

_shared: dict[str, LocalRayCluster] = {}


def _stop_shared() -> None:
    cluster = _shared.pop("cluster", None)
    if cluster is not None:
        cluster.stop()


def _used_later(request: pytest.FixtureRequest) -> bool:
    """Whether a collected test after this module's last one asks for `ray_cluster`."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    later = items[max(mine, default=len(items)) + 1 :]
    return any("ray_cluster" in getattr(item, "fixturenames", ()) for item in later)


def shared_cluster(request: pytest.FixtureRequest):
    """Body of a module's `ray_cluster` fixture (`yield from shared_cluster(request)`): a running 2-CPU
    `LocalRayCluster` (token auth, job server), the one the other modules get too."""
    cluster = _shared.get("cluster")
    if cluster is not None and not cluster.is_up():
        _stop_shared()
        cluster = None
    if cluster is None:
        cluster = _shared["cluster"] = LocalRayCluster.start(num_cpus=2)
        request.config.add_cleanup(_stop_shared)  # the session's end, however it ends
    yield cluster
    if not _used_later(request):
        _stop_shared()
