"""Per-tenant quotas at the HTTP edge (issue 11, row 5): the tenants file's limits reach the engine,
a tenant over its quota gets 429 `tenant_quota_exceeded` with its own Retry-After, and another
tenant's requests at the same time are all answered 200.
"""

from __future__ import annotations

import asyncio

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    UvicornThread,
    assert_error,
    engine_config,
    server_config,
    tiny_backbone_dir,
    write_prompt_store,
)

from serving.api import create_app
from serving.auth import hash_key
from serving.engine import Engine


def test_a_tenant_over_its_quota_gets_429_and_another_is_unaffected(tmp_path):
    backbone = tiny_backbone_dir(tmp_path)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "flood": {"key_sha256": [hash_key("k-flood")], "tasks": "*", "max_concurrent": 2},
                    "calm": {"key_sha256": [hash_key("k-calm")], "tasks": "*", "metrics": True},
                }
            }
        )
    )
    cfg = server_config(engine_config(write_prompt_store(tmp_path, backbone), backbone), auth=str(tenants))
    body = {"model": "samsum", "prompt": "a: hi\nb: hello", "max_tokens": 48}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            flood = [
                http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-flood"})
                for _ in range(16)
            ]
            calm = [
                http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-calm"})
                for _ in range(4)
            ]
            results = await asyncio.gather(*flood, *calm)
            return results[:16], results[16:]

    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        flood, calm = asyncio.run(burst(url))
        page = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k-calm"}).text

    assert all(r.status_code == 200 for r in calm), [r.text for r in calm if r.status_code != 200]
    statuses = [r.status_code for r in flood]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for r in flood:
        if r.status_code == 429:
            assert_error(r, 429, "tenant_quota_exceeded")
            assert int(r.headers["Retry-After"]) >= 1
    fams = {f.name: f for f in text_string_to_metric_families(page)}
    rejected = {
        tuple(sorted(s.labels.items())): s.value
        for s in fams["promptfleet_tenant_rejections"].samples
        if s.name.endswith("_total")
    }
    assert rejected[(("status", "429"), ("tenant", "flood"))] == statuses.count(429)
    assert not any(dict(k)["tenant"] == "calm" for k in rejected)
