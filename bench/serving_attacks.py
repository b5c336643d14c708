"""Load meant to hurt the server: malformed and hostile requests, slow clients, a tenant past its quota.

* `robustness_runs`: the valid load alone and with malformed requests spread over it, A/B/A/B.
* `two_tenant_runs`: tenant B's valid load alone and with tenant A flooding past its quota,
  sending hostile-but-well-formed requests and holding slow-header connections, A/B/A/B.

Each reports the valid load's latency percentiles over each condition's pooled runs and how every
bad request was answered. `bench.serving` runs them against its server.

A tenant *within* its quota can hurt others too; `bench.serving_tenants` runs these attackers beside
globex's load, each until told to stop:
* `closed_loops`: clients that send their request again as soon as its reply ended (long streams
  that keep the batch full; long-input classifications);
* `hold_connections`: many loopback source addresses holding idle and half-sent connections.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter

import httpx

from bench.serving_load import (
    FLOOD_KEY,
    Server,
    error_shaped,
    load,
    load_async,
    make_requests,
    raw_request,
    send_raw,
)
from bench.stats import percentile


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
    p99 = {k: 1e3 * percentile(v, 99) for k, v in lat.items()}
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
        "valid_p50_ms_clean": 1e3 * percentile(lat["clean"], 50),
        "valid_p50_ms_with_malformed": 1e3 * percentile(lat["malformed"], 50),
        "valid_p99_ms_clean": p99["clean"],
        "valid_p99_ms_with_malformed": p99["malformed"],
        "valid_p99_ratio": p99["malformed"] / p99["clean"],
        "valid_p99_ratio_per_pair": pairs_ratio,
        "valid_req_s_clean": sum(r["req_s"] for r in runs[::2]) / pairs,
        "valid_req_s_with_malformed": sum(r["req_s"] for r in runs[1::2]) / pairs,
        "runs": runs,
    }


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
                load_async(srv.url, reqs, concurrency), _tenant_a(srv.url, flood, hostile, over_s, slow=4)
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
    p99 = {k: 1e3 * percentile(v, 99) for k, v in lat.items()}
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
        "tenant_b_p50_ms_clean": 1e3 * percentile(lat["clean"], 50),
        "tenant_b_p50_ms_attacked": 1e3 * percentile(lat["attacked"], 50),
        "tenant_a_flood_statuses": dict(Counter(r[0] for r in a_replies["flood"])),
        "tenant_a_hostile_statuses": dict(Counter(r[0] for r in a_replies["hostile"])),
        "tenant_a_hostile_4xx_json": sum(error_shaped(*r) for r in a_replies["hostile"]),
        "responses_5xx": sum(r[0] >= 500 for r in all_a) + sum(v for k, v in b_statuses.items() if k >= 500),
        "tenant_a_no_reply": sum(r[0] == 0 for r in all_a),
        "slow_header_clients_closed_after_s": slow_closed,
        "server_up_after": alive,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------ within-quota attackers


async def closed_loops(
    url: str,
    key: str,
    path: str,
    bodies: list[dict],
    stop: asyncio.Event,
    ready: asyncio.Event,
    ready_after: int,
    rounds: int | None = None,
) -> dict:
    """One closed-loop client per body, each sending its body again as soon as the reply ended,
    `rounds` times each or until `stop` is set (requests in flight are then cancelled: the server
    sees their clients go). `ready` is set once `ready_after` replies have begun (a stream: its first
    token; otherwise the whole reply). A refused request (e.g. 429) is retried after 0.5 s.

    Returns the statuses (as each reply began), the replies that ended with 200, the requests with
    no reply or a reply cut off, the completion tokens of every stream that ended (its
    `include_usage` chunk), the clients' errors and the wall time.
    """
    statuses, tokens, began, done, broken = Counter(), [], 0, 0, 0
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    headers = {"Authorization": f"Bearer {key}"}

    def begin() -> None:
        nonlocal began
        began += 1
        if began >= ready_after:
            ready.set()

    async def send(http: httpx.AsyncClient, body: dict) -> int:
        async with http.stream("POST", path, json=body) as r:
            statuses[r.status_code] += 1
            if r.status_code != 200 or not body.get("stream"):
                await r.aread()
                if r.status_code == 200:
                    begin()
                return r.status_code
            first = True
            async for line in r.aiter_lines():
                if line.startswith("data: {") and first:
                    first = False
                    begin()
                if line.startswith("data: {") and '"usage"' in line:
                    tokens.append(json.loads(line[6:])["usage"]["completion_tokens"])
            return r.status_code

    async def client(http: httpx.AsyncClient, body: dict) -> None:
        nonlocal done, broken
        for _ in itertools.count() if rounds is None else range(rounds):
            try:
                status = await send(http, body)
            except httpx.TransportError:  # no reply, or one cut off
                status, broken = 0, broken + 1
            done += status == 200
            if status != 200:
                await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900, limits=limits) as http:
        clients = [asyncio.ensure_future(client(http, b)) for b in bodies]
        everyone = asyncio.gather(*clients, return_exceptions=True)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([everyone, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (*clients, stopped):
            task.cancel()
        errors = [repr(r) for r in await everyone if isinstance(r, Exception)]  # not the cancelled
    ready.set()  # never left waiting, whatever happened
    return {
        "statuses": dict(statuses),
        "replies_200": done,
        "transport_errors": broken,
        "stream_tokens": tokens,
        "errors": errors,
        "wall_s": time.perf_counter() - t0,
    }


async def hold_connections(
    host: str,
    port: int,
    addresses: list[str],
    per_address: int,
    stop: asyncio.Event,
    ready: asyncio.Event,
    reopen_s: float = 9.0,
) -> dict:
    """`per_address` connections from each source address (127.0.0.x: Linux routes all of 127/8 to
    lo), half of them idle and half with `GET /health HTTP/1.1\\r\\n` sent and nothing more; each is
    reopened as soon as the server closes it (or answers), and anyway after `reopen_s`, until `stop`.
    `ready` is set once every connection has been opened (or refused) once.

    Returns how many connections were opened, refused and closed (or answered) by the server, the
    statuses of those answers, and how long the server kept the closed ones open.
    """
    n = {"opened": 0, "refused": 0, "closed_by_server": 0, "first": 0}
    answers, lifetimes = Counter(), []

    async def hold(addr: str, half_sent: bool) -> None:
        first = True
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(addr, 0))
                n["opened"] += 1
            except OSError:
                n["refused"] += 1
                reader = writer = None
            if first:
                first, n["first"] = False, n["first"] + 1
                if n["first"] == len(addresses) * per_address:
                    ready.set()
            if writer is None:
                await asyncio.sleep(0.5)
                continue
            t0 = time.perf_counter()
            try:
                if half_sent:
                    writer.write(b"GET /health HTTP/1.1\r\n")
                data = await asyncio.wait_for(reader.read(4096), reopen_s)  # b"": the server closed it
            except TimeoutError:
                data = None  # still open: reopened by the attacker itself
            except OSError:
                data = b""  # reset by the server
            finally:
                writer.close()
            if data is not None:
                n["closed_by_server"] += 1
                lifetimes.append(time.perf_counter() - t0)
                answers[
                    data.split(b" ", 2)[1].decode("latin-1") if data.startswith(b"HTTP/") else "none"
                ] += 1

    holders = [
        asyncio.ensure_future(hold(addr, i % 2 == 1)) for addr in addresses for i in range(per_address)
    ]
    await stop.wait()
    for task in holders:
        task.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    ready.set()
    return {
        "connections": len(holders),
        "opened": n["opened"],
        "refused": n["refused"],
        "closed_by_server": n["closed_by_server"],
        "server_answers": dict(answers),
        "closed_after_s_p50": percentile(lifetimes, 50),
    }
