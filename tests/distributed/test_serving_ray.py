"""The API as a Ray Serve application on an embedded local Ray: one replica, tasks mixed in its engine."""

from __future__ import annotations

import time

import httpx
import pytest
from serving_helpers import engine_config, free_port, server_config, tiny_backbone_dir, write_prompt_store

from serving.auth import KeyRing

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_ray_serve_app_answers_like_uvicorn(tmp_path):
    import ray
    from ray import serve

    from serving.ray_app import run_on_ray

    backbone = tiny_backbone_dir(tmp_path)
    cfg = server_config(engine_config(write_prompt_store(tmp_path, backbone), backbone), port=free_port())
    cfg.ray.num_cpus = 0.5
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # ours, whatever else runs
        run_on_ray(cfg, KeyRing.disabled(), blocking=False)
        url = f"http://127.0.0.1:{cfg.api.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Serve app did not come up"
            time.sleep(1)
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/completions", json={"model": "sst2", "prompt": "a fine film", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            r = http.post("/v1/classify", json={"model": "trec", "input": "where is paris?"})
            assert r.status_code == 200 and set(r.json()["labels"]) == {"ABBR", "DESC", "LOC"}
            nf = http.post("/v1/completions", json={"model": "../sst2", "prompt": "x"})
            assert nf.status_code == 404 and nf.json()["error"]["code"] == "model_not_found"
            assert sorted(m["id"] for m in http.get("/v1/models").json()["data"]) == [
                "samsum",
                "sst2",
                "trec",
            ]
            assert "promptfleet_requests_total" in http.get("/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
