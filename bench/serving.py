"""Benchmark: many tasks served from one SmolLM2 backbone over HTTP, vs PEFT per-task serving and HF generate.

Setup: a prompt store of 512 task adapters (20 virtual tokens each, random prompts: speed does not
depend on their values), every task an SST-2-style classifier (template + verbaliser), so one
request list works for any number of tasks. Requests are real SST-2 dev sentences; each picks a
task uniformly and is, with equal odds, a short completion (max_tokens=8) or a classification.

* ours: `promptfleet serve` in a subprocess (uvicorn, real engine, API keys on), driven by an
  httpx async load generator with many concurrent clients on 127.0.0.1 (closed loop).
  - mixed-task (64 tasks) vs single-task throughput; the sweep over 1 / 8 / 64 / 512 tasks (PNG);
  - prefix KV cache on vs off: prefill tokens per request and streamed time to first token;
  - robustness: the same valid requests alone (A) and with 1,000 malformed requests spread evenly
    over the run (B), A/B/A/B, p99 over each condition's pooled latencies (`robustness_runs`). The
    malformed requests are pre-encoded bytes sent open loop on raw sockets: an httpx client spends
    more CPU per request than the server does rejecting it, on the same 2 cores.
* two tenants on one server (`--tenants`, run on its own, a few minutes): tenant B sends the valid
  load; tenant A floods past its quota (max_concurrent) with valid requests and sends malformed and
  hostile-but-well-formed requests (extreme seeds and temperatures, oversized prompts, lone
  surrogates, unsupported parameters) plus slow-header clients, open loop on raw sockets. B alone
  and B under A, A/B/A/B, p99 over pooled latencies; B's outputs compared with its clean run
  (`two_tenant_runs`).
* a second, decode-heavier workload beside the issue's: the same 64-task requests with
  max_tokens=32 instead of 8, against the same two baselines, to show how the ratios move when
  batched decode dominates the work.
* PEFT per-task serving (in process, no HTTP: favours the baseline): one `PeftModel` holding every
  adapter in use; requests are grouped by task, `set_adapter(task)`, then one batched `generate`
  (left padding) for its completions and one batched forward for its classifications.
* HF generate one request at a time (in process): `generate(inputs_embeds=[prompt; text])`, and one
  forward for a classification; on a balanced half of the requests (as many completions as
  classifications, the mix of the whole run).

Before each measured run the server gets one classification per task in the mix, so the task
prefix KV cache is warm (steady state) as far as its LRU bound holds; the baselines likewise load
every adapter before their clocks start. Classification forwards compute logits at the last
position only (`logits_to_keep=1`), in the baselines as in the engine.

Baselines run after the server has stopped, so nothing else competes for the 2 cores. fp32, SDPA,
same threads everywhere. This module is not a test: it asserts nothing, it prints and records.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from bench.common import REPO, markdown_table, write_result
from serving.auth import hash_key

DATA = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
KEY = "pf-bench-key"  # tenant "bench" (tenant B of the two-tenant run; may read /metrics)
FLOOD_KEY = "pf-bench-flood-key"  # tenant "flood" (tenant A), limited by FLOOD_LIMITS
FLOOD_LIMITS = {"max_concurrent": 4, "tokens_per_minute": 60000}
META = {
    "kind": "classification",
    "template": "Review: {sentence}\nSentiment:",
    "verbaliser": {"0": " negative", "1": " positive"},
    "max_new_tokens": 8,
}
MAX_TOKENS = 8  # the workload: short completions
DECODE_HEAVY_MAX_TOKENS = 32  # the second, decode-heavier workload (same requests otherwise)
P = 20


# ------------------------------------------------------------------------------------ setup


def sentences(n: int) -> list[str]:
    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows[:n]]


def write_store(root: Path, n_tasks: int) -> Path:
    from transformers import AutoConfig

    from tuner.export import TaskAdapter, save_adapter
    from tuner.model.backbone import resolve_backbone

    cfg = AutoConfig.from_pretrained(resolve_backbone("smollm2-135m"))
    gen = torch.Generator().manual_seed(0)
    for i in range(n_tasks):
        prompt = torch.randn(P, cfg.hidden_size, generator=gen) * 0.02
        save_adapter(root / "store", TaskAdapter(f"task{i:03d}", prompt, "smollm2-135m", dict(META)), cfg)
    limits = "".join(f"    {k}: {v}\n" for k, v in FLOOD_LIMITS.items())
    (root / "tenants.yaml").write_text(
        f"tenants:\n  bench:\n    key_sha256: [{hash_key(KEY)}]\n    tasks: '*'\n    metrics: true\n"
        f"  flood:\n    key_sha256: [{hash_key(FLOOD_KEY)}]\n    tasks: '*'\n{limits}"
    )
    return root / "store"


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


class Server:
    """`promptfleet serve` in a subprocess on 127.0.0.1 (started and stopped by this benchmark only)."""

    def __init__(self, root: Path, store: Path, port: int, *overrides: str):
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
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

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

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if not s.labels:
                    out[s.name] = s.value
        return out


# ------------------------------------------------------------------------------------ load generator


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def _load(
    url: str,
    requests: list,
    concurrency: int,
    junk: list[bytes] = (),
    junk_over_s: float = 0.0,
    max_tokens: int = MAX_TOKENS,
) -> dict:
    """Closed loop: `concurrency` clients drain `requests`. `junk` (pre-encoded raw requests) is sent
    open loop at the same time, evenly spread: the i-th at i * junk_over_s / len(junk) seconds, each on
    its own connection, whatever the server's replies take. Returns latencies, statuses, junk replies."""
    lat, ttft, statuses, tokens, completions = [], [], Counter(), 0, 0
    outputs: list = [None] * len(requests)  # completion text or label of each request, by index
    todo = list(reversed(list(enumerate(requests))))
    headers = {"Authorization": f"Bearer {KEY}"}
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
                    r = await http.post(path, json=body)
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
        "p50_ms": 1e3 * pct(lat, 50),
        "p99_ms": 1e3 * pct(lat, 99),
        "ttft_p50_ms": 1e3 * pct(ttft, 50),
        "statuses": dict(statuses),
        "_latencies": lat,
        "_junk": list(junk_results),
        "_outputs": outputs,
    }


def load(url: str, requests: list, concurrency: int, **kw) -> dict:
    return asyncio.run(_load(url, requests, concurrency, **kw))


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


# ------------------------------------------------------------------------------------ malformed requests


def malformed_requests(n: int, n_tasks: int) -> list[tuple[str, str, dict]]:
    """`n` bad requests cycling through every kind of mistake a client (or an attacker) makes."""
    ok = {"model": "task000", "prompt": "fine", "max_tokens": 2}
    kinds = [
        (
            "POST",
            "/v1/completions",
            {"content": b'{"model": "task000", "prompt": ', "headers": {"content-type": "application/json"}},
        ),
        ("POST", "/v1/completions", {"json": ["not", "an", "object"]}),
        ("POST", "/v1/completions", {"json": {**ok, "prompt": 42}}),
        ("POST", "/v1/completions", {"json": {**ok, "max_tokens": "lots"}}),
        ("POST", "/v1/completions", {"json": {**ok, "max_tokens": 10**9}}),
        ("POST", "/v1/completions", {"json": {**ok, "max_tokens": 0}}),
        ("POST", "/v1/completions", {"json": {**ok, "model": f"task{n_tasks + 7}"}}),
        ("POST", "/v1/completions", {"json": {**ok, "model": "../../etc/passwd"}}),
        ("POST", "/v1/completions", {"json": ok, "headers": {"Authorization": ""}}),
        ("POST", "/v1/completions", {"json": ok, "headers": {"Authorization": "Bearer wrong-key"}}),
        ("POST", "/v1/completions", {"json": {**ok, "prompt": ""}}),
        ("POST", "/v1/completions", {"json": {**ok, "prompt": "word " * 1500}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "task000", "messages": "hello"}}),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {"model": "task000", "messages": [{"role": "user", "content": "x"}], "n": 3}},
        ),
        ("POST", "/v1/classify", {"json": {"model": "task000"}}),
        ("POST", "/v1/classify", {"json": {"model": "task000", "input": {"nested": True}}}),
        ("GET", "/v1/completions", {}),
        ("GET", "/v1/no-such-route", {}),
        (
            "POST",
            "/v1/completions",
            {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}},
        ),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def hostile_requests(n: int) -> list[tuple[str, str, dict]]:
    """`n` well-formed JSON requests with values meant to hurt: each must be a 4xx for its sender only."""
    ok = {"model": "task000", "prompt": "fine", "max_tokens": 2}
    kinds = [
        ("POST", "/v1/completions", {"json": {**ok, "temperature": 0.7, "seed": 2**64}}),
        ("POST", "/v1/completions", {"json": {**ok, "temperature": 1e-300}}),
        ("POST", "/v1/completions", {"json": {**ok, "top_p": 0.0}}),
        ("POST", "/v1/completions", {"json": {**ok, "prompt": "y" * 900_000}}),
        ("POST", "/v1/classify", {"json": {"model": "task000", "input": "z" * 500_000}}),
        ("POST", "/v1/completions", {"raw": b'{"model": "task000", "prompt": "a \\ud800 b"}'}),
        ("POST", "/v1/completions", {"raw": b'{"model": "\\udfff", "prompt": "x"}'}),
        ("POST", "/v1/completions", {"json": {**ok, "logprobs": 5}}),
        ("POST", "/v1/completions", {"json": {**ok, "echo": True, "best_of": 3}}),
        ("POST", "/v1/completions", {"json": {**ok, "logit_bias": {"1": 100}}}),
        ("POST", "/v1/completions", {"json": {**ok, "stop": ["a", "b", "c", "d", "e"]}}),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


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


# ------------------------------------------------------------------------------------ in-process baselines


def baseline_requests(requests, tokenizer):
    from serving.prompt_format import format_prompt

    return [
        (kind, task, tokenizer(format_prompt(META, text), add_special_tokens=False).input_ids)
        for kind, task, text in requests
    ]


def peft_serving(store: Path, requests: list, backbone, tokenizer, max_tokens: int = MAX_TOKENS) -> dict:
    """One PeftModel with every adapter in use; per task: set_adapter, batched generate / forward."""
    from peft import PeftModel

    tasks = sorted({t for _, t, _ in requests})
    model = PeftModel.from_pretrained(backbone, str(store / tasks[0]), adapter_name=tasks[0])
    for t in tasks[1:]:
        model.load_adapter(str(store / t), adapter_name=t)
    model.eval()
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in META["verbaliser"].values()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups: dict[str, list] = {}
    for kind, task, ids in baseline_requests(requests, tokenizer):
        groups.setdefault(task, []).append((kind, ids))

    def left_padded(seqs):
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return ids, mask

    t0 = time.perf_counter()
    with torch.inference_mode():
        for task, items in groups.items():
            model.set_adapter(task)
            gen = [ids for kind, ids in items if kind == "complete"]
            cls = [ids for kind, ids in items if kind == "classify"]
            if gen:
                ids, mask = left_padded(gen)
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            if cls:
                ids, mask = left_padded(cls)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
                torch.softmax(logits[:, label_ids], dim=-1)
    wall = time.perf_counter() - t0
    return {
        "requests": len(requests),
        "wall_s": wall,
        "req_s": len(requests) / wall,
        "max_tokens": max_tokens,
    }


def hf_one_at_a_time(store: Path, requests: list, backbone, tokenizer, max_tokens: int = MAX_TOKENS) -> dict:
    """Plain `generate` per request: [task prompt; text] as inputs_embeds, no batching, no cache reuse."""
    from tuner.export import load_adapter

    embed = backbone.get_input_embeddings()
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in META["verbaliser"].values()]
    prompts = {t: load_adapter(store / t).prompt for t in {t for _, t, _ in requests}}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        for kind, task, ids in baseline_requests(requests, tokenizer):
            x = torch.cat([prompts[task], embed(torch.tensor(ids))])[None]
            if kind == "complete":
                backbone.generate(
                    inputs_embeds=x,
                    attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            else:
                torch.softmax(backbone(inputs_embeds=x, logits_to_keep=1).logits[0, -1, label_ids], dim=-1)
    wall = time.perf_counter() - t0
    return {
        "requests": len(requests),
        "wall_s": wall,
        "req_s": len(requests) / wall,
        "max_tokens": max_tokens,
    }


# ------------------------------------------------------------------------------------ the benchmark


def plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in sweep)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [sweep[str(k)]["req_s"] for k in ks], "o-", label="promptfleet (HTTP, mixed batches)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tasks in the request mix")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M, 2-core CPU, max_tokens=8")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: few requests and tasks, nothing recorded"
    )
    ap.add_argument("--requests", type=int, default=64, help="requests per measured run")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--port", type=int, default=18777)
    ap.add_argument(
        "--robust-requests", type=int, default=400, help="valid requests per robustness run (p99 needs many)"
    )
    ap.add_argument("--robust-pairs", type=int, default=2, help="clean/malformed run pairs (A/B/A/B)")
    ap.add_argument(
        "--tenants",
        action="store_true",
        help="only the two-tenant run (tenant A floods past its quota and is hostile, tenant B is normal)",
    )
    ap.add_argument("--tenant-requests", type=int, default=120, help="tenant B's valid requests per run")
    args = ap.parse_args(argv)
    if args.tenants:
        return tenants_main(args)
    n = 24 if args.quick else args.requests
    task_counts = [1, 8] if args.quick else [1, 8, 64, 512]
    mixed_k = 8 if args.quick else 64
    n_bad = 50 if args.quick else 1000
    rn = 24 if args.quick else args.robust_requests
    root = Path(tempfile.mkdtemp(prefix="promptfleet-bench-serving-"))
    texts = sentences(400)
    store = write_store(root, max(task_counts))
    print(f"prompt store: {max(task_counts)} tasks under {store}")
    out: dict = {
        "benchmark": "serving",
        "quick": args.quick,
        "requests_per_run": n,
        "concurrency": args.concurrency,
        "max_tokens": MAX_TOKENS,
        "num_virtual_tokens": P,
    }

    # 1) ours: task sweep, mixed vs single, robustness (prefix cache on)
    with Server(root, store, args.port) as srv:
        warm_up(srv.url, max(task_counts), texts)
        sweep = {}
        for k in task_counts:
            warm_tasks(srv.url, k, texts)
            before = srv.metrics()
            run = load(srv.url, make_requests(n, k, texts, seed=k), args.concurrency)
            after = srv.metrics()
            run["prefix_cache_hit_rate"] = _rate(before, after)
            run.pop("_latencies"), run.pop("_junk"), run.pop("_outputs")
            sweep[str(k)] = run
            print(
                f"  {k:>3} tasks: {run['req_s']:.2f} req/s  p50 {run['p50_ms']:.0f} ms  p99 {run['p99_ms']:.0f} ms  "
                f"statuses {run['statuses']}  prefix hit rate {run['prefix_cache_hit_rate']:.2f}"
            )
        warm_tasks(srv.url, mixed_k, texts)  # the 512-task run evicted some of them
        heavy = load(
            srv.url,
            make_requests(n, mixed_k, texts, seed=mixed_k),
            args.concurrency,
            max_tokens=DECODE_HEAVY_MAX_TOKENS,
        )
        heavy.pop("_latencies"), heavy.pop("_junk"), heavy.pop("_outputs")
        print(
            f"  {mixed_k} tasks, max_tokens {DECODE_HEAVY_MAX_TOKENS}: {heavy['req_s']:.2f} req/s  "
            f"p50 {heavy['p50_ms']:.0f} ms  p99 {heavy['p99_ms']:.0f} ms  statuses {heavy['statuses']}  "
            f"{heavy['tokens_per_completion']:.1f} tokens/completion"
        )
        robustness = robustness_runs(
            srv, texts, mixed_k, max(task_counts), rn, n_bad, args.robust_pairs, args.concurrency
        )
        print(f"  robustness: { {k: v for k, v in robustness.items() if k != 'runs'} }")
        ttft_on = _prefill_and_ttft(srv, n, mixed_k, texts)
    # 2) ours with the prefix KV cache off
    with Server(root, store, args.port + 1, "engine.prefix_cache=false") as srv:
        warm_up(srv.url, mixed_k, texts)
        ttft_off = _prefill_and_ttft(srv, n, mixed_k, texts)
    print(f"  prefix cache on: {ttft_on}\n  prefix cache off: {ttft_off}")

    # 3) baselines, in process, after the server has gone
    from tuner.model.backbone import load_backbone, load_tokenizer, resolve_backbone

    path = resolve_backbone("smollm2-135m")
    tokenizer = load_tokenizer(path)
    mixed_requests = make_requests(n, mixed_k, texts, seed=mixed_k)
    backbone = load_backbone(path, torch.float32, "sdpa", torch.device("cpu"))
    hf_n = max(8, n // 2)
    hf = hf_one_at_a_time(store, balanced(mixed_requests, hf_n), backbone, tokenizer)
    print(f"  HF generate, one at a time ({hf_n} requests): {hf['req_s']:.2f} req/s")
    peft = peft_serving(store, mixed_requests, backbone, tokenizer)
    print(f"  PEFT per-task serving: {peft['req_s']:.2f} req/s")
    hf_heavy = hf_one_at_a_time(
        store, balanced(mixed_requests, hf_n), backbone, tokenizer, DECODE_HEAVY_MAX_TOKENS
    )
    peft_heavy = peft_serving(store, mixed_requests, backbone, tokenizer, DECODE_HEAVY_MAX_TOKENS)
    print(
        f"  max_tokens {DECODE_HEAVY_MAX_TOKENS}: HF one at a time {hf_heavy['req_s']:.2f} req/s, "
        f"PEFT per task {peft_heavy['req_s']:.2f} req/s"
    )

    ours = sweep[str(mixed_k)]
    out.update(
        {
            "task_sweep": sweep,
            "mixed_tasks": mixed_k,
            "mixed_vs_single": ours["req_s"] / sweep["1"]["req_s"],
            "peft_per_task": peft,
            "vs_peft": ours["req_s"] / peft["req_s"],
            "hf_one_at_a_time": hf,
            "vs_hf_generate": ours["req_s"] / hf["req_s"],
            "prefix_cache": {"on": ttft_on, "off": ttft_off},
            "robustness": robustness,
            "decode_heavy": {
                "max_tokens": DECODE_HEAVY_MAX_TOKENS,
                "ours": heavy,
                "peft_per_task": peft_heavy,
                "hf_one_at_a_time": hf_heavy,
                "vs_peft": heavy["req_s"] / peft_heavy["req_s"],
                "vs_hf_generate": heavy["req_s"] / hf_heavy["req_s"],
            },
        }
    )
    dh = out["decode_heavy"]
    rows = [
        [
            f"ours, {mixed_k} tasks mixed (HTTP)",
            ours["req_s"],
            f"{ours['p50_ms']:.0f} / {ours['p99_ms']:.0f}",
            "1.00x",
            heavy["req_s"],
            f"{heavy['p50_ms']:.0f} / {heavy['p99_ms']:.0f}",
            "1.00x",
        ],
        [
            "ours, 1 task (HTTP)",
            sweep["1"]["req_s"],
            f"{sweep['1']['p50_ms']:.0f} / {sweep['1']['p99_ms']:.0f}",
            f"mixed/single {out['mixed_vs_single']:.2f} (target >= 0.9)",
            "",
            "",
            "",
        ],
        [
            "PEFT, set_adapter + batched generate per task (in process)",
            peft["req_s"],
            "",
            f"ours/PEFT {out['vs_peft']:.1f}x (target >= 5x)",
            peft_heavy["req_s"],
            "",
            f"ours/PEFT {dh['vs_peft']:.1f}x",
        ],
        [
            "HF generate, one request at a time (in process)",
            hf["req_s"],
            "",
            f"ours/HF {out['vs_hf_generate']:.1f}x (target >= 10x)",
            hf_heavy["req_s"],
            "",
            f"ours/HF {dh['vs_hf_generate']:.1f}x",
        ],
    ]
    heads = [f"max_tokens {MAX_TOKENS}: req/s", "p50 / p99 ms", "ratio"]
    heads += [f"max_tokens {DECODE_HEAVY_MAX_TOKENS}: req/s", "p50 / p99 ms", "ratio"]
    print(markdown_table(["method", *heads], rows))
    if not args.quick:
        png = REPO / "bench" / "results" / "serving_tasks.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(sweep, png)
        out["plot"] = str(png.relative_to(REPO))
    write_result("serving", out, args.quick)
    return out


def robustness_runs(
    srv: Server,
    texts: list[str],
    n_tasks: int,
    store_tasks: int,
    n: int,
    n_bad: int,
    pairs: int,
    concurrency: int,
) -> dict:
    """Valid load alone (A) and with `n_bad` malformed requests spread evenly over it (B), A/B/A/B.

    Every run sends the same `n` valid requests; p99 is taken over each condition's pooled latencies
    (with n=400 and 2 pairs, p99 is the 8th-worst of 800 samples, not the 2nd-worst of 64). The junk
    of a B run is spread over the wall time of the A run just before it, so it covers the whole run.
    """
    reqs = make_requests(n, n_tasks, texts, seed=1)
    junk = [raw_request(*r) for r in malformed_requests(n_bad, store_tasks)]
    runs: list[dict] = []
    lat = {"clean": [], "malformed": []}
    replies: list[tuple[int, str, str]] = []
    for _ in range(pairs):
        clean = load(srv.url, reqs, concurrency)
        dirty = load(srv.url, reqs, concurrency, junk=junk, junk_over_s=clean["wall_s"])
        for name, run in (("clean", clean), ("malformed", dirty)):
            lat[name] += run.pop("_latencies")
            replies += run.pop("_junk")
            run.pop("_outputs")
            runs.append({"condition": name, **run})
        print(
            f"  robustness pair: clean {clean['req_s']:.2f} req/s p99 {clean['p99_ms']:.0f} ms | "
            f"with {n_bad} malformed {dirty['req_s']:.2f} req/s p99 {dirty['p99_ms']:.0f} ms"
        )
    alive = httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    p99 = {k: 1e3 * pct(v, 99) for k, v in lat.items()}
    pairs_ratio = [b["p99_ms"] / a["p99_ms"] for a, b in zip(runs[::2], runs[1::2])]
    return {
        "valid_requests_per_run": n,
        "malformed_per_run": n_bad,
        "pairs": pairs,
        "malformed": len(replies),
        "malformed_4xx_json": sum(error_shaped(*r) for r in replies),
        "malformed_5xx": sum(r[0] >= 500 for r in replies),
        "malformed_no_reply": sum(r[0] == 0 for r in replies),
        "status_counts": dict(Counter(r[0] for r in replies)),
        "valid_statuses": dict(sum((Counter(r["statuses"]) for r in runs), Counter())),
        "server_up_after": alive,
        "valid_p50_ms_clean": 1e3 * pct(lat["clean"], 50),
        "valid_p50_ms_with_malformed": 1e3 * pct(lat["malformed"], 50),
        "valid_p99_ms_clean": p99["clean"],
        "valid_p99_ms_with_malformed": p99["malformed"],
        "valid_p99_ratio": p99["malformed"] / p99["clean"],
        "valid_p99_ratio_per_pair": pairs_ratio,
        "valid_req_s_clean": sum(r["req_s"] for r in runs[::2]) / pairs,
        "valid_req_s_with_malformed": sum(r["req_s"] for r in runs[1::2]) / pairs,
        "runs": runs,
    }


def tenants_main(args) -> dict:
    """The two-tenant run on its own server (8 tasks), written to bench/results/serving_tenants.json."""
    n = 16 if args.quick else args.tenant_requests
    root = Path(tempfile.mkdtemp(prefix="promptfleet-bench-tenants-"))
    texts, n_tasks = sentences(400), 8
    store = write_store(root, n_tasks)
    with Server(root, store, args.port) as srv:
        warm_up(srv.url, n_tasks, texts)
        warm_tasks(srv.url, n_tasks, texts)
        result = two_tenant_runs(srv, texts, n_tasks, n, args.robust_pairs, args.concurrency, args.quick)
    out = {"benchmark": "serving_tenants", "quick": args.quick, "flood_limits": FLOOD_LIMITS, **result}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    write_result("serving_tenants", out, args.quick)
    return out


async def _slow_headers(host: str, port: int, hold_s: float) -> float:
    """A client that sends half a request head and then nothing; seconds until the server closed it
    (`hold_s` if it never did)."""
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    try:
        await asyncio.wait_for(reader.read(), hold_s)
        closed = time.perf_counter() - t0
    except (TimeoutError, ConnectionError):
        closed = hold_s
    writer.close()
    return closed


async def _tenant_a(url: str, flood: list[bytes], hostile: list[bytes], over_s: float, slow: int) -> dict:
    """Tenant A, open loop on raw sockets: valid requests past its quota and hostile ones, evenly
    spread over `over_s` seconds, and `slow` slow-header connections opened at the start."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    t0 = time.perf_counter()
    mixed = [x for pair in zip(flood, hostile) for x in pair]
    slow_tasks = [asyncio.ensure_future(_slow_headers(host, port, max(over_s, 30.0))) for _ in range(slow)]
    sent = []
    for i, data in enumerate(mixed):
        await asyncio.sleep(max(0.0, t0 + i * over_s / len(mixed) - time.perf_counter()))
        sent.append(asyncio.ensure_future(send_raw(host, port, data)))
    replies = await asyncio.gather(*sent)
    return {
        "flood": replies[0::2],
        "hostile": replies[1::2],
        "slow_closed_after_s": await asyncio.gather(*slow_tasks),
    }


def two_tenant_runs(
    srv: Server, texts: list[str], n_tasks: int, n: int, pairs: int, concurrency: int, quick: bool
) -> dict:
    """Tenant B's valid load alone (clean) and with tenant A at the same time (attacked), A/B/A/B.

    A sends, per attacked run, as many valid completions (max_tokens 32, past its max_concurrent)
    as hostile requests, interleaved and spread over the wall time of the clean run before, plus
    4 slow-header clients. B's requests are greedy, so its outputs must equal the clean run's.
    """
    reqs = make_requests(n, n_tasks, texts, seed=1)
    n_bad = 20 if quick else 150
    flood_body = {"model": "task001", "prompt": "a long and winding review", "max_tokens": 32}
    flood = [raw_request("POST", "/v1/completions", {"json": flood_body}, FLOOD_KEY)] * n_bad
    hostile = [raw_request(*r, key=FLOOD_KEY) for r in hostile_requests(n_bad)]
    lat = {"clean": [], "attacked": []}
    runs, a_replies, b_outputs = [], {"flood": [], "hostile": []}, []
    slow_closed = []
    for _ in range(pairs):
        clean = load(srv.url, reqs, concurrency)

        async def attacked_run(over_s: float) -> tuple[dict, dict]:
            return await asyncio.gather(
                _load(srv.url, reqs, concurrency), _tenant_a(srv.url, flood, hostile, over_s, slow=4)
            )

        dirty, a = asyncio.run(attacked_run(clean["wall_s"]))
        for key in ("flood", "hostile"):
            a_replies[key] += a[key]
        slow_closed += a["slow_closed_after_s"]
        b_outputs.append((clean.pop("_outputs"), dirty.pop("_outputs")))
        for name, run in (("clean", clean), ("attacked", dirty)):
            lat[name] += run.pop("_latencies")
            run.pop("_junk")
            runs.append({"condition": name, **run})
        print(
            f"  tenants pair: B alone {clean['req_s']:.2f} req/s p99 {clean['p99_ms']:.0f} ms | "
            f"B under A {dirty['req_s']:.2f} req/s p99 {dirty['p99_ms']:.0f} ms  A flood "
            f"{dict(Counter(r[0] for r in a['flood']))} hostile {dict(Counter(r[0] for r in a['hostile']))}"
        )
    alive = httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    reference = b_outputs[0][0]
    same = sum(o == ref for _, attacked in b_outputs for o, ref in zip(attacked, reference))
    p99 = {k: 1e3 * pct(v, 99) for k, v in lat.items()}
    b_statuses = sum((Counter(r["statuses"]) for r in runs), Counter())
    all_a = a_replies["flood"] + a_replies["hostile"]
    return {
        "tenant_b_requests_per_run": n,
        "pairs": pairs,
        "tenant_b_statuses": dict(b_statuses),
        "tenant_b_outputs_same_as_clean": same,
        "tenant_b_outputs_compared": len(reference) * pairs,
        "tenant_b_p99_ms_clean": p99["clean"],
        "tenant_b_p99_ms_attacked": p99["attacked"],
        "tenant_b_p99_ratio": p99["attacked"] / p99["clean"],
        "tenant_b_p50_ms_clean": 1e3 * pct(lat["clean"], 50),
        "tenant_b_p50_ms_attacked": 1e3 * pct(lat["attacked"], 50),
        "tenant_a_flood_statuses": dict(Counter(r[0] for r in a_replies["flood"])),
        "tenant_a_hostile_statuses": dict(Counter(r[0] for r in a_replies["hostile"])),
        "tenant_a_hostile_4xx_json": sum(error_shaped(*r) for r in a_replies["hostile"]),
        "responses_5xx": sum(r[0] >= 500 for r in all_a) + sum(v for k, v in b_statuses.items() if k >= 500),
        "tenant_a_no_reply": sum(r[0] == 0 for r in all_a),
        "slow_header_clients_closed_after_s": slow_closed,
        "server_up_after": alive,
        "runs": runs,
    }


def _rate(before: dict, after: dict) -> float:
    hits = after.get("promptfleet_prefix_cache_hits_total", 0) - before.get(
        "promptfleet_prefix_cache_hits_total", 0
    )
    miss = after.get("promptfleet_prefix_cache_misses_total", 0) - before.get(
        "promptfleet_prefix_cache_misses_total", 0
    )
    return hits / (hits + miss) if hits + miss else float("nan")


def _prefill_and_ttft(srv: Server, n: int, n_tasks: int, texts: list[str]) -> dict:
    """Prefill tokens per request (server counter) and streamed TTFT at moderate load (8 clients)."""
    reqs = [(kind, task, text) for kind, task, text in make_requests(n, n_tasks, texts, seed=7)]
    before = srv.metrics()
    load(srv.url, reqs, 8)
    after = srv.metrics()
    prefill = after["promptfleet_prefill_tokens_total"] - before["promptfleet_prefill_tokens_total"]
    # The engine counts text tokens; a prefix-cache miss also runs the task's P prompt positions.
    misses = after.get("promptfleet_prefix_cache_misses_total", 0) - before.get(
        "promptfleet_prefix_cache_misses_total", 0
    )
    streamed = [
        ("complete", task, text, True) for _, task, text in make_requests(n // 2, n_tasks, texts, seed=8)
    ]
    run = load(srv.url, streamed, 8)
    return {
        "prefill_text_tokens_per_request": prefill / n,
        "prefill_positions_per_request": (prefill + P * misses) / n,
        "ttft_p50_ms": run["ttft_p50_ms"],
        "stream_p50_ms": run["p50_ms"],
        "req_s": run["req_s"],
        "hit_rate": _rate(before, after),
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
