"""SSE streaming in OpenAI's chunk format, and clients that go away: their requests are aborted in the engine.

A real uvicorn server on 127.0.0.1 (in-process clients cannot hang up mid-response) and the real
Engine on a tiny random Llama, wrapped to record which request ids were aborted.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serving_helpers import UvicornThread, engine_config, server_config, tiny_backbone_dir, write_prompt_store

from serving.api import create_app
from serving.engine import Engine
from serving.scheduler import RequestKind


class RecordingEngine(Engine):
    """The real engine, noting every abort (called from the event loop and from the engine's own cleanup)."""

    def __init__(self, config):
        super().__init__(config)
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        super().abort(request_id)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_streaming")
    backbone = tiny_backbone_dir(root)
    cfg = server_config(
        engine_config(write_prompt_store(root, backbone), backbone, max_new_tokens_limit=1900)
    )
    engine = RecordingEngine(cfg.engine)
    with UvicornThread(create_app(engine, cfg)) as url:
        yield url, engine


def events(resp) -> list[str]:
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            out.append(block[len("data: ") :])
    return out


def test_completion_stream_matches_the_non_streamed_text(server):
    url, _ = server
    body = {"model": "samsum", "prompt": "a: hi\nb: hello", "max_tokens": 6}
    with httpx.Client(base_url=url, timeout=60) as http:
        whole = http.post("/v1/completions", json=body).json()
        data = events(
            http.post(
                "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
            )
        )
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage, chunks = chunks[-1], chunks[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == "samsum" and c["id"] == chunks[0]["id"]
        assert set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_chat_stream_format(server):
    url, _ = server
    body = {
        "model": "sst2",
        "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "a fine film"}],
        "max_tokens": 3,
    }
    with httpx.Client(base_url=url, timeout=60) as http:
        whole = http.post("/v1/chat/completions", json=body).json()
        data = events(http.post("/v1/chat/completions", json={**body, "stream": True}))
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_closing_a_stream_aborts_the_request(server):
    url, engine = server
    body = {"model": "samsum", "prompt": "a: hi", "max_tokens": 1900, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        request_id = resp.headers["x-request-id"]
        next(resp.iter_lines())  # the first token arrived: the request is running
    assert wait_for(lambda: request_id in engine.aborted)
    assert wait_for(lambda: engine.stats()["running"] == 0)
    with httpx.Client(base_url=url, timeout=60) as http:  # and the server carries on
        assert (
            http.post("/v1/completions", json={"model": "sst2", "prompt": "ok", "max_tokens": 1}).status_code
            == 200
        )


def test_a_client_that_hangs_up_aborts_a_non_streamed_request(server):
    url, engine = server
    before = len(engine.aborted)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=1.0) as http:
        http.post("/v1/completions", json={"model": "samsum", "prompt": "a: hi", "max_tokens": 1900})
    assert wait_for(lambda: len(engine.aborted) > before)
    assert wait_for(lambda: engine.stats()["running"] == 0)


def test_a_client_that_hangs_up_aborts_its_classification(server):
    """The engine's step is held (an event, not a timer) while the client's read times out: the
    classification is aborted in the engine, its tenant's place is free, and the server carries on."""
    url, engine = server
    runner_step, held = engine.runner.step, threading.Event()

    def step(out):
        if any(r.kind is RequestKind.CLASSIFY for r in out.prefill):
            held.wait(30)
        return runner_step(out)

    engine.runner.step = step
    before = len(engine.aborted)
    try:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=1.0) as http:
            http.post("/v1/classify", json={"model": "sst2", "input": "a fine film"})
        assert wait_for(lambda: any(a.startswith("classify-") for a in engine.aborted[before:]))
    finally:
        held.set()
        engine.runner.step = runner_step
    assert wait_for(lambda: not engine.scheduler.has_work)
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/classify", json={"model": "sst2", "input": "a fine film"}).status_code == 200
