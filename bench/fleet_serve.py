"""The `serve` part of `bench.fleet` (issue 37): one server over a packed store of 100,000 tasks.

A packed store (`tuner.prompt_store.write_packed_store`) of N synthetic SST-2-style classification
tasks (SmolLM2's width, `--virtual-tokens` rows each, random prompts) is written once. Then the real
server (`promptfleet serve`, a child process: SmolLM2-135M, dtype auto) is started twice, side by
side in one run: over a store of only the `--serve-warm` tasks (the backbone alone, in effect) and
over the N tasks. For each: seconds from process start to `/health` 200 (ready), and resident
memory (VmRSS) when ready and after the same number of requests. `/v1/classify` requests with SST-2
sentences go one at a time; over the N tasks they alternate a warm task (one of the `--serve-warm`
tasks used before) and a never-seen task (a new one each time: its prompt is read from its shard
and its prefix KV computed in that request), p50/p99 latency of each kind (alternating puts both
under the same load, whatever else runs); over the small store every request is warm.

    python -m bench.fleet --parts serve --serve-tasks 100000
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

HIDDEN = 576  # SmolLM2-135M's width
CONFIG = SimpleNamespace(hidden_size=HIDDEN, num_attention_heads=9, num_hidden_layers=30)
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
READY_TIMEOUT_S = 600.0


def _adapters(n: int, virtual_tokens: int) -> Iterator:
    from tuner.export import TaskAdapter, TaskMeta

    base = torch.randn(virtual_tokens, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.05
    meta = TaskMeta(
        kind="classification",
        template="Review: {sentence}\nSentiment:",
        verbaliser={"0": " negative", "1": " positive"},
        metric="accuracy",
    )
    for i in range(n):
        yield TaskAdapter(f"fleet.{i}", base + i * 1e-6, "smollm2-135m", meta)


def _sentences(n: int) -> list[str]:
    with open(SST2, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return [r["sentence"].strip() for _, r in zip(range(n), rows)]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store: Path, log: Path, threads: int) -> tuple[subprocess.Popen, str, float]:
    """The server over `store`, and its seconds from process start to /health 200."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "cluster.cli", "serve", "--prompt-store", str(store), "--port", str(port),
        "api.auth=none", f"engine.threads={threads}", "engine.request_timeout_s=600",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]
    )
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - start < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server was not ready in {READY_TIMEOUT_S:g} s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _latencies(url: str, n_tasks: int, requests: int, warm: int) -> dict:
    """p50/p99 ms of /v1/classify to warm and to never-seen tasks, alternated one at a time (a
    store of `warm` tasks only: warm tasks instead of never-seen ones)."""
    texts = _sentences(requests + warm)
    stride = max(1, (n_tasks - warm) // requests)  # never-seen tasks spread over the whole store
    out: dict[str, list[float]] = {"warm": [], "new": []}
    with httpx.Client(base_url=url, timeout=600) as http:

        def classify(task: str, text: str) -> float:
            t0 = time.perf_counter()
            r = http.post("/v1/classify", json={"model": task, "input": text})
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"{task}: {r.status_code} {r.text[:300]}")
            return ms

        for i in range(warm):  # first uses: their prompts read, their prefix KV computed
            classify(f"fleet.{i}", texts[i])
        for i in range(requests):
            out["warm"].append(classify(f"fleet.{i % warm}", texts[warm + i]))
            new = f"fleet.{warm + i * stride}" if n_tasks > warm else f"fleet.{(i + 1) % warm}"
            out["new"].append(classify(new, texts[warm + i]))
        metrics = http.get("/metrics").text
    row = {}
    for kind, ms in out.items():
        ms.sort()
        row[f"{kind}_p50_ms"] = statistics.median(ms)
        row[f"{kind}_p99_ms"] = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    row["new_over_warm_p50"] = row["new_p50_ms"] / row["warm_p50_ms"]
    row["prompt_cache"] = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("promptfleet_prompt_cache_") and not line.startswith("#")
    }
    return row


def bench_serve(
    n_tasks: int, virtual_tokens: int, requests: int, warm: int, threads: int, where=None
) -> dict:
    """One row (see the module's docstring)."""
    from tuner.prompt_store import write_packed_store

    tmp = Path(tempfile.mkdtemp(prefix="fleet-serve-", dir=where))
    try:
        store, small = tmp / "packed", tmp / "small"
        write_packed_store(small, _adapters(warm, virtual_tokens), CONFIG)
        t0 = time.perf_counter()
        write_packed_store(store, _adapters(n_tasks, virtual_tokens), CONFIG)
        row: dict = {
            "tasks": n_tasks,
            "virtual_tokens": virtual_tokens,
            "write_store_s": time.perf_counter() - t0,
        }
        row["store_bytes"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        for label, root, n in (("backbone", small, warm), ("fleet", store, n_tasks)):
            proc, url, ready = _start(root, tmp / f"{label}.log", threads)
            try:
                row[f"{label}_ready_s"] = ready
                row[f"{label}_rss_ready_mib"] = _rss_mib(proc.pid)
                lat = _latencies(url, n, requests, warm)
                row[f"{label}_rss_after_mib"] = _rss_mib(proc.pid)
            finally:
                _stop(proc)
            row.update(lat if label == "fleet" else {f"backbone_{k}": v for k, v in lat.items()})
        row["rss_over_backbone_mib"] = row["fleet_rss_after_mib"] - row["backbone_rss_after_mib"]
        row["load_average"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(row, flush=True)
    return row


HEADER = [
    "tasks", "ready s (backbone alone)", "ready s (fleet)", "RSS MiB (backbone)", "RSS MiB (fleet)",
    "warm p50 / p99 ms", "never-seen p50 / p99 ms", "never-seen / warm p50",
]  # fmt: skip


def table_rows(row: dict) -> list[list]:
    return [
        [
            row["tasks"], row["backbone_ready_s"], row["fleet_ready_s"], row["backbone_rss_after_mib"],
            row["fleet_rss_after_mib"], f"{row['warm_p50_ms']:.0f} / {row['warm_p99_ms']:.0f}",
            f"{row['new_p50_ms']:.0f} / {row['new_p99_ms']:.0f}", row["new_over_warm_p50"],
        ]
    ]  # fmt: skip
