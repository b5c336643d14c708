"""The serving benchmark's clients: `promptfleet serve` in a subprocess and the load sent to it.

* `Server`: the server on 127.0.0.1, started and stopped by the benchmark, with its /metrics; from
  this checkout or from another source tree (an older revision, for a before / after comparison).
* `TENANTS`, `tenants_yaml`: the benchmark's API keys and the tenants file the server reads.
* `make_requests`, `load`: the valid load, (kind, task, text) requests drained by many concurrent
  httpx clients (closed loop), with latencies, statuses and outputs; `warm_up`, `warm_tasks`.
* `raw_request`, `send_raw`, `error_shaped`: requests as pre-encoded bytes sent on raw sockets
  (open loop), for the malformed and hostile load (`bench.serving_attacks`), and the check that a
  reply is the API's JSON error.

It measures nothing by itself: `bench.serving` decides what runs against what.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import REPO
from bench.stats import percentile
from serving.auth import hash_key

KEY = "pf-bench-key"  # tenant "bench" (tenant B of the two-tenant run; may read /metrics)
FLOOD_KEY = "pf-bench-flood-key"  # tenant "flood" (tenant A), limited by FLOOD_LIMITS
FLOOD_LIMITS = {"max_concurrent": 4, "tokens_per_minute": 60000}
ACME_KEY = "pf-bench-acme-key"  # tenant "acme" of the attacks on globex (`bench.serving_tenants`)
GLOBEX_KEY = "pf-bench-globex-key"  # tenant "globex", the one attacked
# acme within its quota: as many requests as the engine's batch (engine.max_batch_size=32 below), and
# a token rate far above what 32 loops of ~700-token classifications reach on this CPU.
ACME_LIMITS = {"max_concurrent": 32, "tokens_per_minute": 2_000_000, "weight": 1.0}
# name -> (key, settings in the tenants file); every tenant may use every task
TENANTS = {
    "bench": (KEY, {"metrics": True}),  # also the operator key that scrapes /metrics
    "flood": (FLOOD_KEY, FLOOD_LIMITS),
    "acme": (ACME_KEY, ACME_LIMITS),
    "globex": (GLOBEX_KEY, {"weight": 1.0}),
}
MAX_TOKENS = 8  # the workload: short completions

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def tenants_yaml(names: tuple[str, ...]) -> str:
    """The tenants file (`api.auth`) holding the tenants `names` of `TENANTS`."""
    lines = ["tenants:"]
    for name in names:
        key, settings = TENANTS[name]
        lines += [f"  {name}:", f"    key_sha256: [{hash_key(key)}]", "    tasks: '*'"]
        lines += [f"    {k}: {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def make_requests(n: int, n_tasks: int, texts: list[str], seed: int) -> list[tuple[str, str, str]]:
    """(kind, task, text): uniform task, completion or classification with equal odds."""
    rng = random.Random(seed)
    return [
        (rng.choice(("complete", "classify")), f"task{rng.randrange(n_tasks):03d}", rng.choice(texts))
        for _ in range(n)
    ]


def http_body(
    kind: str, task: str, text: str, stream: bool = False, max_tokens: int = MAX_TOKENS
) -> tuple[str, dict]:
    if kind == "classify":
        return "/v1/classify", {"model": task, "input": text}
    return "/v1/completions", {"model": task, "prompt": text, "max_tokens": max_tokens, "stream": stream}


def parse_series(text: str) -> Series:
    """The samples of a Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


class Server:
    """`promptfleet serve` in a subprocess on 127.0.0.1 (started and stopped by this benchmark only).

    `src` is the source tree it runs (cwd and PYTHONPATH, so `cluster.cli` and `serving` come from
    there, ahead of the editable install), with this interpreter: this checkout by default.
    """

    def __init__(self, root: Path, store: Path, port: int, *overrides: str, src: Path = REPO):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--prompt-store",
            str(store),
            "--port",
            str(port),
            f"api.auth={root / 'tenants.yaml'}",
            "api.log_level=warning",
            "engine.dtype=fp32",
            "engine.max_batch_size=32",
            "engine.max_queue=4096",
            "engine.reload_interval_s=30",
            "engine.request_timeout_s=900",
            *overrides,
        ]  # a shared 2-core machine can be slow: no 503s
        self.log = open(root / f"server-{port}.log", "w")
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all its threads (Linux /proc; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def series(self) -> Series:
        """Every sample of /metrics (read with the operator key), labelled ones included."""
        return parse_series(
            httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
        )

    def metrics(self) -> dict[str, float]:
        """The samples without labels, by name."""
        return {name: value for (name, labels), value in self.series().items() if not labels}

    def wait_idle(self, timeout_s: float = 600.0) -> None:
        """Until nothing waits or runs in the engine: requests of a cancelled load are aborted or run
        first. A classification leaves the queue for its step without joining the running batch, so
        the tenants' gauges (queued, running: classifications in a step included) are read too."""
        busy_series = (
            "promptfleet_queue_depth",
            "promptfleet_running_requests",
            "promptfleet_tenant_queued_requests",
            "promptfleet_tenant_running_requests",
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = {name: v for (name, _), v in self.series().items() if name in busy_series and v}
            if not busy:
                return
            time.sleep(0.25)
        print(
            f"  warning: the engine is still busy {timeout_s:.0f} s after the load ended ({busy}); going on"
        )


async def load_async(
    url: str,
    requests: list,
    concurrency: int,
    junk: list[bytes] = (),
    junk_over_s: float = 0.0,
    max_tokens: int = MAX_TOKENS,
    key: str = KEY,
) -> dict:
    """Closed loop: `concurrency` clients of the tenant holding `key` drain `requests`. `junk`
    (pre-encoded raw requests) is sent open loop at the same time, evenly spread: the i-th at
    i * junk_over_s / len(junk) seconds, each on its own connection, whatever the server's replies
    take. Returns latencies, statuses, junk replies."""
    lat, ttft, statuses, tokens, completions = [], [], Counter(), 0, 0
    outputs: list = [None] * len(requests)  # completion text or label of each request, by index
    todo = list(reversed(list(enumerate(requests))))
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency + 4)
    host, port = httpx.URL(url).host, httpx.URL(url).port
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:

        async def client() -> None:
            nonlocal tokens, completions
            while todo:
                i, (kind, task, text, *stream) = todo.pop()
                path, body = http_body(kind, task, text, bool(stream), max_tokens)
                t0 = time.perf_counter()
                if stream:
                    first = None
                    async with http.stream("POST", path, json=body) as r:
                        async for line in r.aiter_lines():
                            if first is None and line.startswith("data: "):
                                first = time.perf_counter() - t0
                        statuses[r.status_code] += 1
                    if first is not None:
                        ttft.append(first)
                else:
                    try:
                        r = await http.post(path, json=body)
                    except httpx.TransportError:  # no reply at all (the server dropped the connection)
                        statuses[0] += 1
                        lat.append(time.perf_counter() - t0)
                        continue
                    statuses[r.status_code] += 1
                    if r.status_code == 200 and kind == "complete":
                        tokens += r.json()["usage"]["completion_tokens"]
                        completions += 1
                        outputs[i] = r.json()["choices"][0]["text"]
                    elif r.status_code == 200:
                        outputs[i] = r.json()["label"]
                lat.append(time.perf_counter() - t0)

        async def junk_sender() -> list:
            sent = []
            for i, data in enumerate(junk):
                await asyncio.sleep(max(0.0, t0 + i * junk_over_s / len(junk) - time.perf_counter()))
                sent.append(asyncio.ensure_future(send_raw(host, port, data)))
            return await asyncio.gather(*sent)

        t0 = time.perf_counter()
        *_, junk_results = await asyncio.gather(*(client() for _ in range(concurrency)), junk_sender())
        wall = time.perf_counter() - t0
    return {
        "requests": len(requests),
        "wall_s": wall,
        "req_s": len(requests) / wall,
        "completion_tokens": tokens,
        "tokens_per_completion": tokens / completions if completions else float("nan"),
        "p50_ms": 1e3 * percentile(lat, 50),
        "p99_ms": 1e3 * percentile(lat, 99),
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "statuses": dict(statuses),
        "_latencies": lat,
        "_junk": list(junk_results),
        "_outputs": outputs,
    }


def load(url: str, requests: list, concurrency: int, **kw) -> dict:
    """`load_async` run to its end."""
    return asyncio.run(load_async(url, requests, concurrency, **kw))


def warm_up(url: str, n_tasks: int, texts: list[str]) -> None:
    load(url, make_requests(16, n_tasks, texts, seed=99), 8)


def warm_tasks(url: str, n_tasks: int, texts: list[str]) -> None:
    """Steady state: one classification per task, so each task's prompt KV is in the prefix cache (as
    far as the LRU holds them), as the baselines get their adapters loaded before their clocks start."""
    load(url, [("classify", f"task{i:03d}", texts[i % len(texts)]) for i in range(n_tasks)], 16)


def balanced(requests: list, n: int) -> list:
    """The first n/2 completions and n/2 classifications, in their original order (the same mix as the whole)."""
    kinds = {"complete": [], "classify": []}
    for r in requests:
        if len(kinds[r[0]]) < n // 2:
            kinds[r[0]].append(r)
    chosen = {id(r) for rs in kinds.values() for r in rs}
    return [r for r in requests if id(r) in chosen]


def raw_request(method: str, path: str, kwargs: dict, key: str = KEY) -> bytes:
    """One malformed request as the bytes on the wire (`Connection: close`), encoded once before the run."""
    headers = {"Host": "127.0.0.1", "Authorization": f"Bearer {key}", "Connection": "close"}
    headers.update(kwargs.get("headers", {}))
    if "json" in kwargs or "raw" in kwargs:
        body = kwargs["raw"] if "raw" in kwargs else json.dumps(kwargs["json"]).encode()
        headers.setdefault("content-type", "application/json")
    else:
        body = kwargs.get("content", b"")
    if body or method == "POST":
        headers["Content-Length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


async def send_raw(host: str, port: int, data: bytes) -> tuple[int, str, str]:
    """Send one pre-encoded request on its own connection; (status, body, content type) of the reply.

    The malformed load must not measure the load generator: an httpx request costs ~2.6 ms of client
    CPU here (more than the server spends rejecting it) on the same 2 cores as the server, a raw
    socket write/read about a tenth of that. The reply is read while the body is still being written,
    because the server may answer (413) before reading a large body and then close the connection.
    """
    reader, writer = await asyncio.open_connection(host, port)

    async def read_reply() -> bytes:
        chunks = []  # kept as they come: a reset after the reply must not lose it
        try:
            while chunk := await reader.read(1 << 16):
                chunks.append(chunk)
        except ConnectionError:
            pass
        return b"".join(chunks)

    reply = asyncio.ensure_future(read_reply())
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass  # the server answered early and closed; its reply is still read
    raw = await reply
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, "", ""  # no reply at all: counted as a failure
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    content_type = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("content-type", "")
    return status, body.decode("utf-8", "replace"), content_type


def error_shaped(status: int, text: str, content_type: str) -> bool:
    if not (400 <= status < 500) or not content_type.startswith("application/json"):
        return False
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
