"""The API as a Ray Serve application on an embedded local Ray: one replica, tasks mixed in its engine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import engine_config, free_port, server_config, tiny_backbone_dir, write_prompt_store

from serving.auth import KeyRing

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


SLOW_PROXY_SITE = Path(__file__).parent / "slow_proxy"  # its sitecustomize.py delays the proxy's start
SLOW_PROXY_S = 30


def _listening_pid(port: int) -> int | None:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return conn.pid
    return None


def test_ray_serve_app_answers_like_uvicorn(tmp_path, monkeypatch):
    """Also: a proxy slow to start (as on a busy node) is waited for, not killed after Ray's 3 x 5 s checks."""
    import ray
    from ray import serve

    from serving import ray_app
    from serving.ray_app import run_on_ray

    backbone = tiny_backbone_dir(tmp_path)
    cfg = server_config(engine_config(write_prompt_store(tmp_path, backbone), backbone), port=free_port())
    cfg.ray.num_cpus = 0.5
    slow = tmp_path / "slow_proxy"
    slow.mkdir()
    monkeypatch.setattr(
        ray_app,
        "SERVE_CONTROLLER_ENV",
        {
            **ray_app.SERVE_CONTROLLER_ENV,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SLOW_PROXY_SITE), os.environ.get("PYTHONPATH")])),
            "PROMPTFLEET_SLOW_PROXY_DIR": str(slow),
            "PROMPTFLEET_SLOW_PROXY_S": str(SLOW_PROXY_S),
        },
    )
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # ours, whatever else runs
        run_on_ray(cfg, KeyRing.disabled(), blocking=False)
        # The process listening on the port (Serve's proxy) is the one made slow, and serve.start waited for it.
        pid, woke_after_s = (slow / "proxy").read_text().split()
        assert float(woke_after_s) >= SLOW_PROXY_S and int(pid) == _listening_pid(cfg.api.port)
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
