"""The tenant benchmark's helpers: engine numbers read from /metrics, its tenants file, attack (c)'s sockets.

The /metrics text is made by prometheus_client itself (the library the server exports with), the
percentile is checked against the sorted observations written out here.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from bench.serving_attacks import hold_connections
from bench.serving_load import ACME_KEY, GLOBEX_KEY, KEY, TENANTS, parse_series, tenants_yaml
from bench.serving_tenants import (
    PREEMPTIONS,
    QUEUE_WAIT,
    STEP_SECONDS,
    bucket_percentile,
    engine_numbers,
    histogram_buckets,
    merge_buckets,
    series_diff,
)
from serving.auth import KeyRing
from serving.config import EngineConfig

WAIT_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)


class FakeEngineMetrics:
    """The three series the benchmark reads, as the server names and labels them."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.wait = Histogram(
            QUEUE_WAIT, "steps waited", ["tenant"], buckets=WAIT_BUCKETS, registry=self.registry
        )
        self.step = Histogram(STEP_SECONDS, "step time", registry=self.registry)
        self.preempt = PromCounter(
            PREEMPTIONS.removesuffix("_total"), "preemptions", ["tenant"], registry=self.registry
        )

    def scrape(self):
        return parse_series(generate_latest(self.registry).decode())


def upper_bound_percentile(observations: list[float], q: float) -> float:
    """The nearest-rank q-th percentile of the observations, rounded up to its bucket's bound."""
    xs = sorted(observations)
    value = xs[math.ceil(q / 100 * len(xs)) - 1]
    return next((b for b in WAIT_BUCKETS if value <= b), math.inf)


def test_bucket_percentile_is_the_smallest_bound_holding_q_percent():
    buckets = {1.0: 50.0, 2.0: 98.0, 3.0: 99.0, 4.0: 100.0, math.inf: 100.0}
    assert bucket_percentile(buckets, 50) == 1.0
    assert bucket_percentile(buckets, 98) == 2.0
    assert bucket_percentile(buckets, 99) == 3.0
    assert bucket_percentile(buckets, 100) == 4.0
    assert bucket_percentile({1.0: 0.0, math.inf: 1.0}, 99) == math.inf  # beyond the last bound
    assert bucket_percentile(None, 99) is None  # a server without the series
    assert bucket_percentile({1.0: 0.0, math.inf: 0.0}, 99) is None  # nothing observed


def test_engine_numbers_of_one_run_are_the_difference_across_it():
    fake = FakeEngineMetrics()
    for steps in (5, 7, 200):  # before the run: must not count
        fake.wait.labels("globex").observe(steps)
    fake.step.observe(9.0)
    before = fake.scrape()
    globex = [1, 1, 2, 1, 3, 1, 2, 1, 1, 40] * 10  # the run: 100 observations
    for steps in globex:
        fake.wait.labels("globex").observe(steps)
    for steps in (64, 64):
        fake.wait.labels("acme").observe(steps)
    for seconds in (0.1, 0.2, 0.3):
        fake.step.observe(seconds)
    fake.preempt.labels("acme").inc(3)
    numbers = engine_numbers(series_diff(before, fake.scrape()))

    wait = numbers["queue_wait_steps"]["globex"]
    assert wait[math.inf] == len(globex) and wait[1.0] == Counter(globex)[1]
    for q in (50, 90, 99):
        assert bucket_percentile(wait, q) == upper_bound_percentile(globex, q)
    assert bucket_percentile(numbers["queue_wait_steps"]["acme"], 99) == 64.0
    assert numbers["steps"] == 3 and abs(numbers["step_seconds_sum"] / numbers["steps"] - 0.2) < 1e-9
    assert numbers["preemptions"] == {"acme": 3.0}
    # two runs pooled: the counts add up bucket by bucket
    pooled = merge_buckets([wait, None, wait])
    assert pooled[math.inf] == 2 * len(globex) and bucket_percentile(pooled, 99) == bucket_percentile(
        wait, 99
    )


def test_engine_numbers_of_a_server_without_the_series_are_none():
    registry = CollectorRegistry()
    PromCounter("promptfleet_tokens_generated", "tokens", registry=registry).inc(7)
    numbers = engine_numbers(parse_series(generate_latest(registry).decode()))
    assert numbers["queue_wait_steps"] == {"globex": None, "acme": None}
    assert numbers["steps"] is None and numbers["preemptions"] is None
    assert numbers["tokens_generated"] == 7.0
    assert histogram_buckets({}, QUEUE_WAIT, tenant="globex") is None and merge_buckets([None]) is None


def test_tenants_file_loads_with_acme_limited_to_one_batch(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml(tuple(TENANTS)))
    ring = KeyRing.from_file(path)
    acme, globex = ring.check(f"Bearer {ACME_KEY}"), ring.check(f"Bearer {GLOBEX_KEY}")
    assert (acme.name, globex.name) == ("acme", "globex")
    assert acme.limits.max_concurrent == EngineConfig().max_batch_size == 32
    assert acme.limits.tokens_per_minute > 32 * 1024 * 2  # 32 loops of a whole prompt twice a minute
    assert acme.limits.weight == globex.limits.weight == 1.0 and not globex.limits.max_concurrent
    assert ring.check(f"Bearer {KEY}").metrics and not acme.metrics and not globex.metrics


def test_hold_connections_binds_each_source_address_and_reopens_what_the_server_closes():
    addresses, per_address = ["127.0.0.2", "127.0.0.3"], 4
    seen: Counter[str] = Counter()
    lines: list[bytes] = []

    async def run() -> dict:
        stop, ready = asyncio.Event(), asyncio.Event()

        async def serve(reader, writer):  # reads what the client sent, then closes: a header timeout
            seen[writer.get_extra_info("peername")[0]] += 1
            try:
                lines.append(await asyncio.wait_for(reader.read(100), 0.2))
            except TimeoutError:
                lines.append(b"")
            writer.close()
            if sum(seen.values()) >= 3 * len(addresses) * per_address:
                stop.set()  # every connection was reopened at least once

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            out = await asyncio.wait_for(
                hold_connections("127.0.0.1", port, addresses, per_address, stop, ready, reopen_s=30), 60
            )
        assert ready.is_set()
        return out

    out = asyncio.run(run())
    assert set(seen) == set(addresses) and min(seen.values()) >= per_address
    assert out["connections"] == len(addresses) * per_address and out["refused"] == 0
    assert out["opened"] >= 3 * len(addresses) * per_address
    assert out["closed_by_server"] >= 2 * len(addresses) * per_address  # reopened when closed, not at 30 s
    assert lines.count(b"GET /health HTTP/1.1\r\n") > 0 and lines.count(b"") > 0  # half sent, half idle
