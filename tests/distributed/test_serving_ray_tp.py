"""A tensor-parallel replica on Ray Serve: one deployment whose replica is 2 ranks in one placement group.

Embedded local Ray (2 CPUs), the tiny random Llama (4 heads, 2 KV heads) over 2 ranks: the replica's
actor is rank 0 in bundle 0, `serving.ray_app.RankActor` is rank 1 in bundle 1. The answers must be
the single-process engine's (greedy tokens, label probabilities within `tp_helpers.PROB_TOL`). When
rank 1's process is killed, requests get 503 and Serve replaces the replica (its health check fails).
"""

from __future__ import annotations

import time

import httpx
import psutil
import pytest
from serving_helpers import engine_config, free_port, server_config, tiny_backbone_dir, write_prompt_store
from tp_helpers import PROB_TOL, engine_loop, stop_engine

from serving.auth import KeyRing
from serving.engine import Engine
from serving.types import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROMPT = "a fine film"


def _reference(cfg) -> tuple[str, dict]:
    engine = Engine(cfg)
    loop = engine_loop(engine)

    async def run():
        req = GenerationRequest("ref", "sst2", PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
        text = "".join([out.text async for out in engine.generate(req)])
        return text, (await engine.classify("trec", "where is paris?")).labels

    try:
        return loop.run_until_complete(run())
    finally:
        stop_engine(engine)


def _until(call, status: int, timeout_s: float):
    """`call()`'s response once it has `status` (a bounded wait: Serve checks health every 10 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = call()
            if resp.status_code == status:
                return resp
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no {status} within {timeout_s} s"
        time.sleep(0.5)


def test_a_replica_of_two_ranks_in_one_placement_group_answers_like_one_process(tmp_path):
    import ray
    from ray import serve

    from serving.ray_app import run_on_ray

    backbone = tiny_backbone_dir(tmp_path)
    store = write_prompt_store(tmp_path, backbone)
    want_text, want_probs = _reference(engine_config(store, backbone))
    cfg = server_config(engine_config(store, backbone, tensor_parallel=2, threads=1), port=free_port())
    cfg.ray.num_cpus = 0.5
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # ours, whatever else runs here
        run_on_ray(cfg, KeyRing.disabled(), blocking=False)
        url = f"http://127.0.0.1:{cfg.api.port}"
        _until(lambda: httpx.get(f"{url}/health", timeout=5), 200, 300)
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert any(len(g["bundles"]) == 2 and g["strategy"] == "STRICT_PACK" for g in groups), groups
        with httpx.Client(base_url=url, timeout=120) as http:
            body = {"model": "sst2", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want_text
            got = http.post("/v1/classify", json={"model": "trec", "input": "where is paris?"}).json()[
                "labels"
            ]
            assert max(abs(got[k] - want_probs[k]) for k in want_probs) <= PROB_TOL

            # Rank 1's process dies: the replica answers 503, fails Serve's health check and is replaced.
            ranks = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "ray::RankActor" in " ".join(p.info["cmdline"] or [])
            ]
            assert len(ranks) == 1, ranks  # its process title while it serves rank 1
            ranks[0].kill()
            lost = _until(lambda: http.post("/v1/classify", json={"model": "trec", "input": "x"}), 503, 120)
            assert lost.json()["error"]["code"] == "replica_rank_lost"
            _until(lambda: http.get("/health"), 200, 300)  # a new replica, both ranks new
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_text, r.text
    finally:
        serve.shutdown()
        ray.shutdown()
