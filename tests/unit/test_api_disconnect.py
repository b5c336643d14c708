"""A non-streamed request waits for its client to go instead of polling for it (`serving.api.unless_gone`).

Polling every 0.25 s woke the event loop 4 times a second per waiting request; 32 long
classifications made 128 wake-ups a second, each taking a core from the engine's torch threads on a
2-core machine. Now each request has one `receive()` waiting for `http.disconnect`. A real uvicorn
server on 127.0.0.1 and the real Engine on a tiny random Llama; the app is wrapped to count the
`receive()` calls made after a request's body was read. That a client hanging up still aborts its
request is `test_api_streaming.py`'s.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest
from serving_helpers import UvicornThread, engine_config, server_config, tiny_backbone_dir, write_prompt_store

from serving.api import create_app
from serving.engine import Engine
from serving.scheduler import RequestKind

HELD_S = 1.0  # polling every 0.25 s called receive() about 4 times in this long


class CountReceives:
    """ASGI middleware (outermost): `after_body[path]` counts the `receive()` calls made after the
    last piece of a request's body was returned."""

    def __init__(self, app):
        self.app = app
        self.after_body: Counter[str] = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = False

        async def counted():
            nonlocal body_read
            if body_read:
                self.after_body[scope["path"]] += 1
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body"):
                body_read = True
            return message

        await self.app(scope, counted, send)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_disconnect")
    backbone = tiny_backbone_dir(root)
    cfg = server_config(engine_config(write_prompt_store(root, backbone), backbone))
    engine = Engine(cfg.engine)
    app = create_app(engine, cfg)
    counter: dict[str, CountReceives] = {}

    def outermost(inner):
        counter["it"] = CountReceives(inner)
        return counter["it"]

    app.add_middleware(outermost)
    with UvicornThread(app) as url:
        yield url, engine, counter["it"]


def test_a_waiting_classification_reads_its_connection_once(server):
    """While the engine holds the classification's step (an event) for HELD_S, the request makes
    one `receive()` after its body (the wait for a disconnect), however long it waits."""
    url, engine, counter = server
    runner_step, entered, held = engine.runner.step, threading.Event(), threading.Event()

    def step(out):
        if any(r.kind is RequestKind.CLASSIFY for r in out.prefill):
            entered.set()
            held.wait(30)
        return runner_step(out)

    engine.runner.step = step
    reply = {}

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            reply["r"] = http.post("/v1/classify", json={"model": "sst2", "input": "a fine film"})

    sender = threading.Thread(target=client)
    try:
        sender.start()
        assert entered.wait(30)
        time.sleep(HELD_S)
        calls = counter.after_body["/v1/classify"]
    finally:
        held.set()
        engine.runner.step = runner_step
        sender.join(60)
    assert calls == 1
    r = reply["r"]
    assert r.status_code == 200, r.text
    assert set(r.json()["labels"]) == {"0", "1"}
    assert abs(sum(r.json()["labels"].values()) - 1.0) < 1e-6
