"""Property-based fuzzing of the live server with schemathesis (issue 11, item 9).

The app's own OpenAPI schema drives schemathesis' generators (bodies that fit the schema and bodies
that do not), sent by tenant A over real HTTP to a real uvicorn server; a second pass pins `model`
to the served tasks so generated bodies reach the engine. Meanwhile tenant B sends valid requests.
Bounded by example counts (well under a minute on the tiny random Llama). Must hold: no 5xx, the
server alive at the end, and every one of B's requests answered 200 with the output it gets alone.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from serving_helpers import (
    TASKS,
    UvicornThread,
    engine_config,
    server_config,
    tiny_backbone_dir,
    write_prompt_store,
)

from serving.api import create_app
from serving.auth import hash_key
from serving.engine import Engine

EXAMPLES = 10  # per operation and generation mode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_fuzz")
    backbone = tiny_backbone_dir(root)
    tenants = root / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "a": {"key_sha256": [hash_key("key-a")], "tasks": "*", "metrics": True},
                    "b": {"key_sha256": [hash_key("key-b")], "tasks": ["sst2", "samsum"]},
                }
            }
        )
    )
    store = write_prompt_store(root, backbone)
    # max_new_tokens_limit bounds what a generated max_tokens costs: the run stays well under a minute.
    cfg = server_config(engine_config(store, backbone, max_new_tokens_limit=32), auth=str(tenants))
    app = create_app(Engine(cfg.engine), cfg)
    with UvicornThread(app) as url:
        yield app, url


def _with_served_models(schema: dict) -> dict:
    """The same schema with every body's `model` limited to the served task names."""
    pinned = copy.deepcopy(schema)
    for model in pinned.get("components", {}).get("schemas", {}).values():
        props = model.get("properties", {})
        if "model" in props:
            props["model"] = {"type": "string", "enum": sorted(TASKS)}
    return pinned


B_BODIES = [
    {"model": "sst2", "prompt": "a fine film", "max_tokens": 4},
    {"model": "samsum", "prompt": "a: hi\nb: hello", "max_tokens": 8, "temperature": 0.7, "seed": 3},
]


def _tenant_b(url: str, expected: list[str], stop: threading.Event, results: list) -> None:
    headers = {"Authorization": "Bearer key-b"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        while not stop.is_set():
            for body, want in zip(B_BODIES, expected):
                r = http.post("/v1/completions", json=body)
                results.append(
                    (r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text, want)
                )


def test_fuzzing_the_live_schema_finds_no_5xx_and_leaves_other_tenants_untouched(server):
    app, url = server
    headers = {"Authorization": "Bearer key-b"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        expected = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in B_BODIES]

    stop, b_results, statuses = threading.Event(), [], []
    b_thread = threading.Thread(target=_tenant_b, args=(url, expected, stop, b_results))
    b_thread.start()
    start = time.monotonic()
    try:
        for raw in (app.openapi(), _with_served_models(app.openapi())):
            schema = schemathesis.openapi.from_dict(raw)
            for result in schema.get_all_operations():
                operation = result.ok()
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                    @settings(
                        max_examples=EXAMPLES,
                        deadline=None,
                        database=None,
                        derandomize=True,
                        phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=operation.as_strategy(generation_mode=mode))
                    def fuzz(case):
                        r = case.call(base_url=url, headers={"Authorization": "Bearer key-a"}, timeout=30)
                        statuses.append(r.status_code)
                        assert r.status_code < 500, (case.method, case.formatted_path, case.body, r.text)

                    try:
                        fuzz()
                    except Unsatisfiable:  # nothing can violate the schema of a body-less GET
                        assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    finally:
        stop.set()
        b_thread.join()
    elapsed = time.monotonic() - start

    # Bounded by counts; ~40 s on 2 shared cores. The time bound is generous for a loaded machine.
    assert len(statuses) > 80 and elapsed < 120, (len(statuses), elapsed)
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert b_results and all(status == 200 and text == want for status, text, want in b_results), [
        r for r in b_results if r[0] != 200 or r[1] != r[2]
    ][:3]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
