"""/metrics is valid Prometheus exposition with per-task series and the engine's numbers read at scrape time."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import engine_config, server_config, tiny_backbone_dir, write_prompt_store

from serving.api import create_app
from serving.engine import Engine


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_metrics")
    backbone = tiny_backbone_dir(root)
    return server_config(engine_config(write_prompt_store(root, backbone), backbone))


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family, name: str) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_metrics_parse_and_carry_per_task_series(cfg):
    with TestClient(create_app(Engine(cfg.engine), cfg)) as c:
        for task in ("sst2", "samsum", "sst2"):
            assert (
                c.post("/v1/completions", json={"model": task, "prompt": "hi", "max_tokens": 2}).status_code
                == 200
            )
        assert c.post("/v1/classify", json={"model": "trec", "input": "who?"}).status_code == 200
        assert c.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
        assert c.post("/v1/completions", json={"model": "ghost", "prompt": ""}).status_code == 404
        assert c.post("/v1/completions", json={"model": "sst2", "prompt": ""}).status_code == 400
        fams = scrape(c)

    requests = samples(fams["promptfleet_requests"], "promptfleet_requests_total")
    assert (
        requests[(("endpoint", "completions"), ("status", "200"), ("task", "sst2"), ("tenant", "anonymous"))]
        == 2
    )
    assert (
        requests[
            (("endpoint", "completions"), ("status", "200"), ("task", "samsum"), ("tenant", "anonymous"))
        ]
        == 1
    )
    assert (
        requests[(("endpoint", "classify"), ("status", "200"), ("task", "trec"), ("tenant", "anonymous"))]
        == 1
    )
    assert (
        requests[(("endpoint", "completions"), ("status", "400"), ("task", "sst2"), ("tenant", "anonymous"))]
        == 1
    )
    # an unknown name never becomes a label value (no unbounded series from random names)
    assert (
        requests[(("endpoint", "completions"), ("status", "404"), ("task", "-"), ("tenant", "anonymous"))]
        == 2
    )
    assert not any(dict(k).get("task") in ("nope", "ghost") for k in requests)

    ttft = samples(
        fams["promptfleet_time_to_first_token_seconds"], "promptfleet_time_to_first_token_seconds_count"
    )
    assert ttft[(("task", "sst2"),)] == 2 and ttft[(("task", "samsum"),)] == 1
    latency = samples(
        fams["promptfleet_request_latency_seconds"], "promptfleet_request_latency_seconds_count"
    )
    assert latency[(("endpoint", "completions"), ("task", "sst2"))] == 3  # two 200s and the 400
    completion = samples(fams["promptfleet_completion_tokens"], "promptfleet_completion_tokens_total")
    assert 1 <= completion[(("task", "sst2"), ("tenant", "anonymous"))] <= 4

    # engine-side numbers, read from engine.stats() at scrape time
    for name in ("promptfleet_queue_depth", "promptfleet_running_requests", "promptfleet_batch_size"):
        assert fams[name].type == "gauge"
    generated = fams["promptfleet_tokens_generated"]
    assert generated.type == "counter" and generated.samples[0].value >= 3
    assert fams["promptfleet_prefill_tokens"].samples[0].value > 0
    hits, misses = fams["promptfleet_prefix_cache_hits"], fams["promptfleet_prefix_cache_misses"]
    assert hits.samples[0].value + misses.samples[0].value >= 3
    assert fams["promptfleet_engine_requests_finished"].samples[0].value >= 3


def test_two_apps_in_one_process_keep_separate_registries(cfg):
    a, b = (create_app(Engine(cfg.engine), cfg) for _ in range(2))
    with TestClient(a) as ca, TestClient(b) as cb:
        assert (
            ca.post("/v1/completions", json={"model": "sst2", "prompt": "hi", "max_tokens": 1}).status_code
            == 200
        )
        in_a = samples(scrape(ca)["promptfleet_requests"], "promptfleet_requests_total")
        in_b = samples(scrape(cb).get("promptfleet_requests"), "promptfleet_requests_total")
    assert sum(in_a.values()) == 1 and sum(in_b.values()) == 0


def test_a_broken_stats_does_not_break_the_scrape(cfg):
    class NoStats(Engine):
        def stats(self):
            raise RuntimeError("stats unavailable")

    with TestClient(create_app(NoStats(cfg.engine), cfg)) as c:
        fams = scrape(c)
    assert "promptfleet_requests" in fams and "promptfleet_queue_depth" not in fams
