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


def test_metrics_need_an_operator_key_and_the_public_page_names_nothing(tmp_path, cfg):
    """Row 2: /metrics used to show every tenant's task names to anyone."""
    import dataclasses

    import yaml

    from serving.auth import hash_key

    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {"key_sha256": [hash_key("k-acme")], "tasks": ["sst2"]},
                    "ops": {"key_sha256": [hash_key("k-ops")], "tasks": [], "metrics": True},
                }
            }
        )
    )
    acme, ops = {"Authorization": "Bearer k-acme"}, {"Authorization": "Bearer k-ops"}
    for public in (False, True):
        api = dataclasses.replace(cfg.api, auth=str(tenants), metrics_public=public)
        server = dataclasses.replace(cfg, api=api)
        with TestClient(create_app(Engine(server.engine), server)) as c:
            body = {"model": "sst2", "prompt": "hi", "max_tokens": 1}
            assert c.post("/v1/completions", json=body, headers=acme).status_code == 200
            full = c.get("/metrics", headers=ops)
            anonymous, tenant = c.get("/metrics"), c.get("/metrics", headers=acme)
        assert full.status_code == 200 and 'task="sst2"' in full.text and 'tenant="acme"' in full.text
        if not public:
            assert anonymous.status_code == 401 and tenant.status_code == 404
            continue
        for page in (anonymous, tenant):
            assert page.status_code == 200
            fams = {f.name: f for f in text_string_to_metric_families(page.text)}
            assert "sst2" not in page.text and "acme" not in page.text and "ops" not in page.text
            by_status = samples(fams["promptfleet_http_requests"], "promptfleet_http_requests_total")
            assert by_status[(("endpoint", "completions"), ("status", "200"))] == 1
            assert "promptfleet_queue_depth" in fams


def test_per_tenant_series(cfg, tmp_path):
    import dataclasses

    import yaml

    from serving.auth import hash_key

    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "a": {"key_sha256": [hash_key("ka")], "tasks": "*", "metrics": True},
                    "b": {"key_sha256": [hash_key("kb")], "tasks": ["sst2"]},
                }
            }
        )
    )
    server = dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, auth=str(tenants)))
    with TestClient(create_app(Engine(server.engine), server)) as c:
        for key, task in (("ka", "sst2"), ("kb", "sst2"), ("kb", "samsum"), ("kb", "sst2")):
            c.post(
                "/v1/completions",
                json={"model": task, "prompt": "hi", "max_tokens": 1},
                headers={"Authorization": f"Bearer {key}"},
            )
        fams = scrape_with(c, {"Authorization": "Bearer ka"})
    requests = samples(fams["promptfleet_requests"], "promptfleet_requests_total")
    assert requests[(("endpoint", "completions"), ("status", "200"), ("task", "sst2"), ("tenant", "b"))] == 2
    assert requests[(("endpoint", "completions"), ("status", "200"), ("task", "sst2"), ("tenant", "a"))] == 1
    rejected = samples(fams["promptfleet_tenant_rejections"], "promptfleet_tenant_rejections_total")
    assert rejected == {(("status", "404"), ("tenant", "b")): 1}
    prompt = samples(fams["promptfleet_prompt_tokens"], "promptfleet_prompt_tokens_total")
    assert prompt[(("task", "sst2"), ("tenant", "b"))] > prompt[(("task", "sst2"), ("tenant", "a"))] > 0


def scrape_with(client, headers) -> dict:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_engine_per_tenant_numbers_are_exposed_only_with_a_key():
    """The engine reports each tenant's share (stats()["tenants"]); only the full page shows it."""
    from serving.metrics import ENGINE_SERIES, TENANT_SERIES, ApiMetrics
    from serving.types import TenantStats

    waited = TenantStats(2, 1, 50, 9, 400, 3, preemptions_total=4)
    for steps in (1, 1, 2, 5):
        waited.queue_wait_steps.observe(steps)
    stats = {**dict.fromkeys(ENGINE_SERIES, 0), "tenants": {"acme": waited, "b": TenantStats()}}
    metrics = ApiMetrics(lambda: stats)
    full = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    public = metrics.render_public()[0].decode()
    rejected = samples(
        full["promptfleet_tenant_quota_rejections"], "promptfleet_tenant_quota_rejections_total"
    )
    assert rejected == {(("tenant", "acme"),): 3.0, (("tenant", "b"),): 0.0}
    assert samples(full["promptfleet_tenant_running_requests"], "promptfleet_tenant_running_requests") == {
        (("tenant", "acme"),): 2.0,
        (("tenant", "b"),): 0.0,
    }
    wait = full["promptfleet_tenant_queue_wait_steps"]
    buckets = {
        s.labels["le"]: s.value
        for s in wait.samples
        if s.name.endswith("_bucket") and s.labels["tenant"] == "acme"
    }
    assert (buckets["1.0"], buckets["2.0"], buckets["4.0"], buckets["6.0"], buckets["+Inf"]) == (
        2,
        3,
        3,
        4,
        4,
    )
    assert samples(full["promptfleet_tenant_preemptions"], "promptfleet_tenant_preemptions_total") == {
        (("tenant", "acme"),): 4.0,
        (("tenant", "b"),): 0.0,
    }
    assert len(TENANT_SERIES) == 8 and "acme" not in public and "promptfleet_tenant" not in public
    assert "promptfleet_engine_step_seconds_bucket" in public  # no names in it: public
