"""Bad input, unknown tasks and engine errors: every answer has the right status AND the JSON error shape.

Runs the real Engine on a tiny random Llama (SmolLM2 tokenizer) with adapters written by
`tuner.export.save_adapter`; requests go through FastAPI's in-process client, except overload and
timeout, which need concurrency and a real server.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_helpers import (
    UvicornThread,
    assert_error,
    engine_config,
    server_config,
    tiny_backbone_dir,
    write_prompt_store,
)

from serving.api import create_app
from serving.engine import Engine


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_errors")
    backbone = tiny_backbone_dir(root)
    return write_prompt_store(root, backbone), backbone


@pytest.fixture(scope="module")
def client(dirs):
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone))
    with TestClient(create_app(Engine(cfg.engine), cfg), raise_server_exceptions=False) as c:
        yield c


def complete(client, **body):
    return client.post(
        "/v1/completions", json={"model": "sst2", "prompt": "a fine film", "max_tokens": 2, **body}
    )


def test_valid_request_works(client):
    r = complete(client)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "name", ["nope", "../sst2", "a/b", "/etc/passwd", "..", "sst2/../sst2", "", "x" * 300]
)
def test_unknown_and_path_like_tasks_are_the_same_404(client, name):
    err = assert_error(complete(client, model=name), 404, "model_not_found", "model")
    assert (
        err["message"] == f"The model '{name if len(name) <= 128 else name[:128] + '...'}' does not exist "
        "or you do not have access to it."
    )
    assert_error(
        client.post("/v1/classify", json={"model": name, "input": "x"}), 404, "model_not_found", "model"
    )
    assert_error(
        client.post(
            "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
        "model_not_found",
        "model",
    )


def test_invalid_json(client):
    r = client.post(
        "/v1/completions",
        content=b'{"model": "sst2", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert "JSON" in assert_error(r, 400, "invalid_value", None)["message"]
    assert_error(client.post("/v1/completions", json=["not", "an", "object"]), 400, "invalid_value", None)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": 123}, "prompt"),
        ({"prompt": ["a", 5]}, "prompt.1"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"model": 7}, "model"),
        ({"stop": {"a": 1}}, "stop"),
    ],
)
def test_wrong_types_name_the_field(client, body, param):
    assert_error(complete(client, **body), 400, "invalid_value", param)


def test_missing_fields(client):
    assert_error(client.post("/v1/completions", json={"model": "sst2"}), 400, "invalid_value", "prompt")
    assert_error(
        client.post("/v1/chat/completions", json={"model": "sst2", "messages": []}),
        400,
        "invalid_value",
        "messages",
    )
    assert_error(
        client.post("/v1/chat/completions", json={"model": "sst2", "messages": [{"role": "wizard"}]}),
        400,
        "invalid_value",
        "messages.0.role",
    )
    assert_error(
        client.post(
            "/v1/chat/completions",
            json={"model": "sst2", "messages": [{"role": "system", "content": "be nice"}]},
        ),
        400,
        "invalid_value",
        "messages",
    )


def test_empty_and_over_long_prompts(client):
    assert_error(complete(client, prompt=""), 400, "invalid_value", "prompt")
    assert_error(complete(client, prompt=[""]), 400, "invalid_value", "prompt")
    assert_error(complete(client, prompt=["a", "b"]), 400, "invalid_value", "prompt")
    assert_error(complete(client, prompt="word " * 500), 400, "context_length_exceeded")
    assert_error(
        client.post("/v1/classify", json={"model": "sst2", "input": ""}), 400, "invalid_value", "input"
    )
    assert_error(  # over the engine's token limit: the field is `input` here, not `prompt`
        client.post("/v1/classify", json={"model": "sst2", "input": "word " * 500}),
        400,
        "context_length_exceeded",
        "input",
    )


@pytest.mark.parametrize("max_tokens", [0, -1, 257, 10**9])
def test_max_tokens_out_of_range(client, max_tokens):
    assert_error(complete(client, max_tokens=max_tokens), 400, "invalid_value", "max_tokens")
    chat = {
        "model": "sst2",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": max_tokens,
    }
    assert_error(
        client.post("/v1/chat/completions", json=chat), 400, "invalid_value", "max_completion_tokens"
    )


def test_n_greater_than_one_is_rejected(client):
    assert_error(complete(client, n=2), 400, "invalid_value", "n")


def test_classify_on_a_generation_task_is_400(client):
    assert_error(
        client.post("/v1/classify", json={"model": "samsum", "input": "a: hi\nb: hello"}),
        400,
        "invalid_value",
        "model",
    )
    r = client.post("/v1/classify", json={"model": "sst2", "input": "a fine film"})
    assert r.status_code == 200, r.text
    assert set(r.json()["labels"]) == {"0", "1"} and abs(sum(r.json()["labels"].values()) - 1) < 1e-4


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/v2/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_unexpected_engine_error_is_a_500_without_traceback(dirs, caplog):
    store, backbone = dirs

    class BrokenEngine(Engine):
        async def classify(self, task, text, raw=False, tenant=""):
            raise RuntimeError("secret internal detail")

    cfg = server_config(engine_config(store, backbone))
    with TestClient(create_app(BrokenEngine(cfg.engine), cfg), raise_server_exceptions=False) as c:
        r = c.post("/v1/classify", json={"model": "sst2", "input": "x"})
        err = assert_error(r, 500, "internal_error", None)
        assert "secret" not in r.text and err["type"] == "server_error"
        assert complete(c).status_code == 200  # the server and other requests are unaffected
    assert "secret internal detail" in caplog.text  # logged for operators


async def _burst(base_url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        body = {"model": "sst2", "prompt": "a fine film", "max_tokens": max_tokens}
        return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)))


def test_full_queue_is_429_with_retry_after(dirs):
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone, max_batch_size=1, max_queue=1))
    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        responses = asyncio.run(_burst(url, 12, max_tokens=64))
        with httpx.Client(base_url=url) as http:  # still serving afterwards
            assert (
                http.post(
                    "/v1/completions", json={"model": "sst2", "prompt": "ok", "max_tokens": 1}
                ).status_code
                == 200
            )
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, "queue_full")
            assert int(r.headers["Retry-After"]) >= 1


def test_request_timeout_is_503_with_retry_after(dirs):
    store, backbone = dirs
    # 1,900 tokens take seconds even on the tiny model; the engine expires requests within ~0.25 s.
    cfg = server_config(engine_config(store, backbone, request_timeout_s=0.05, max_new_tokens_limit=1900))
    with (
        UvicornThread(create_app(Engine(cfg.engine), cfg)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        r = http.post("/v1/completions", json={"model": "samsum", "prompt": "a: hi", "max_tokens": 1900})
        assert_error(r, 503, "request_timeout")
        assert int(r.headers["Retry-After"]) >= 1


def test_oversized_bodies_are_rejected_before_parsing(client):
    big = b'{"model": "sst2", "prompt": "' + b"x" * (2 << 20) + b'"}'
    assert_error(
        client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )

    def chunks():  # no Content-Length: the cap is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")  # stopped at the cap, not read as bad JSON
    assert complete(client).status_code == 200
