"""Hostile and careless input at the edge (issue 11, rows 1, 6, 7, 8, 10, 11): each is a clear 4xx in
the JSON error shape, never a 500, never a traceback in the log, and never hurts another request.

The real Engine on a tiny random Llama; row 1's concurrency and row 11's slow clients go through a
real uvicorn server built by `serving.http_server.uvicorn_config`, the one `promptfleet serve` runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from serving_helpers import (
    StepGate,
    UvicornThread,
    assert_error,
    engine_config,
    server_config,
    tiny_backbone_dir,
    write_prompt_store,
)

from serving.api import EventStream, create_app
from serving.engine import Engine


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_hardening")
    backbone = tiny_backbone_dir(root)
    return write_prompt_store(root, backbone), backbone


@pytest.fixture(scope="module")
def client(dirs):
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone), max_prompt_chars=2000)
    with TestClient(create_app(Engine(cfg.engine), cfg), raise_server_exceptions=False) as c:
        yield c


def complete(client, **body):
    return client.post(
        "/v1/completions", json={"model": "sst2", "prompt": "a fine film", "max_tokens": 2, **body}
    )


def no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text


# ---------------------------------------------------------------- row 1: sampling values the model cannot take


@pytest.mark.parametrize(
    "body, param",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 0.001}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),  # numbers only, as max_tokens and seed are
        ({"temperature": True}, "temperature"),
        ({"top_p": "0.9"}, "top_p"),
    ],
)
def test_sampling_values_out_of_range_are_400(client, body, param, caplog):
    with caplog.at_level(logging.INFO):
        assert_error(complete(client, **{"temperature": 0.7, "seed": 1, **body}), 400, "invalid_value", param)
    no_tracebacks(caplog)


@pytest.mark.parametrize("raw", ['{"temperature": NaN}', '{"temperature": Infinity}', '{"top_p": -Infinity}'])
def test_non_finite_numbers_are_400(client, raw):
    body = {"model": "sst2", "prompt": "x", **json.loads(raw)}
    r = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_value", next(iter(json.loads(raw))))


def test_edge_values_are_accepted(client):
    for body in ({"seed": 0}, {"seed": 2**63 - 1}, {"temperature": 0.01}, {"temperature": 0}, {"top_p": 1}):
        assert complete(client, **{"temperature": 0.7, **body}).status_code == 200, body


def test_hostile_requests_do_not_touch_concurrent_innocent_ones(dirs):
    """Row 1: hostile sampling values used to fail every in-flight request. Now innocent requests
    running at the same time answer exactly what they answer alone."""
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone))
    innocent = [
        {"model": t, "prompt": f"text {i}", "max_tokens": 12, "temperature": 0.8, "seed": i}
        for i, t in enumerate(["sst2", "samsum", "trec", "samsum"] * 2)
    ]
    hostile = [
        {"model": "sst2", "prompt": "x", "max_tokens": 1, "temperature": 0.7, "seed": 18446744073709551616},
        {"model": "sst2", "prompt": "x", "max_tokens": 1, "temperature": 1e-300},
    ] * 4
    engine = Engine(cfg.engine)
    gate = StepGate(engine)  # both runs' innocent requests start in one step, whatever the load
    with UvicornThread(create_app(engine, cfg)) as url:

        async def run(bodies, stream=False):
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(
                    *(http.post("/v1/completions", json={**b, "stream": stream}) for b in bodies)
                )

        gate.expect(len(innocent))
        alone = [r.json()["choices"][0]["text"] for r in asyncio.run(run(innocent))]
        gate.expect(len(innocent))  # the hostile requests are refused before they queue
        mixed = asyncio.run(run([x for pair in zip(innocent, hostile) for x in pair]))
    for i, r in enumerate(mixed):
        if i % 2:
            assert_error(r, 400, "invalid_value")
        else:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == alone[i // 2]


# ---------------------------------------------------------------- row 6: a huge prompt is refused before tokenizing


def test_over_long_prompt_is_refused_by_characters(client):
    for body in ({"prompt": "x" * 900_000}, {"prompt": ["y" * 2001]}):
        err = assert_error(complete(client, **body), 400, "context_length_exceeded", "prompt")
        assert "characters" in err["message"]  # the character check, which runs before the tokenizer
    r = client.post(
        "/v1/chat/completions",
        json={"model": "samsum", "messages": [{"role": "user", "content": "z" * 5000}]},
    )
    assert_error(r, 400, "context_length_exceeded", "messages")
    r = client.post("/v1/classify", json={"model": "sst2", "input": "w" * 5000})
    assert_error(r, 400, "context_length_exceeded", "input")


# ---------------------------------------------------------------- row 7: invalid unicode


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '{"model": "sst2", "prompt": "a \\ud800 b"}', "prompt"),
        ("/v1/completions", '{"model": "sst2", "prompt": ["\\udfff"]}', "prompt.0"),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
        ("/v1/completions", '{"model": "sst2", "prompt": "x", "stop": "\\ud800"}', "stop"),
        (
            "/v1/chat/completions",
            '{"model": "sst2", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        ("/v1/classify", '{"model": "sst2", "input": "\\ud800"}', "input"),
    ],
)
def test_lone_surrogates_are_400_without_tracebacks(client, path, raw, param, caplog):
    with caplog.at_level(logging.INFO):
        r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
        err = assert_error(r, 400, "invalid_value", param)
    assert "unicode" in err["message"]
    no_tracebacks(caplog)


def test_the_404_renders_any_model_name(client):
    r = client.get("/v1/models/%ED%A0%80")  # the UTF-8 bytes of a surrogate in a path
    assert_error(r, 404, "model_not_found", "model")


# ---------------------------------------------------------------- row 8: stop follows the OpenAI API


def test_stop_string_of_any_length_is_one_sequence(client):
    assert complete(client, stop="Answer:").status_code == 200
    assert complete(client, stop="a much longer stop sequence than four").status_code == 200
    assert complete(client, stop=["a", "b", "c", "d"]).status_code == 200
    err = assert_error(complete(client, stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop")
    assert "at most 4 stop strings" in err["message"]  # names the limit, not the strings' length
    err = assert_error(complete(client, stop=["a", ""]), 400, "invalid_value", "stop")
    assert "non-empty" in err["message"]


# ---------------------------------------------------------------- row 10: unsupported OpenAI parameters


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", 3),
        ("logprobs", True),
        ("echo", True),
        ("best_of", 2),
        ("logit_bias", {"50256": -100}),
        ("suffix", "end"),
        ("presence_penalty", 0.5),
        ("tools", [{"type": "function"}]),
    ],
)
def test_unsupported_parameters_are_400_naming_them(client, field, value):
    err = assert_error(complete(client, **{field: value}), 400, "invalid_value", field)
    assert field in err["message"] and "not supported" in err["message"]


def test_n_above_one_and_neutral_values_of_unsupported_fields(client):
    assert_error(complete(client, n=2), 400, "invalid_value", "n")
    neutral = {"n": 1, "logprobs": None, "echo": False, "best_of": 1, "logit_bias": {}, "user": "u1"}
    assert complete(client, **neutral).status_code == 200  # what OpenAI clients send by default
    r = client.post(
        "/v1/chat/completions",
        json={"model": "sst2", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
    )
    assert_error(r, 400, "invalid_value", "logprobs")


# ---------------------------------------------------------------- row 11: slow clients are cut off


def _raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True  # EOF: the server closed it
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_headers_and_slow_bodies_are_cut_off(dirs):
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone), header_timeout_s=0.5, body_timeout_s=0.5)
    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        start = time.monotonic()
        slow_headers = _raw_connection(url)
        slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert _closed_within(slow_headers, 5) and time.monotonic() - start < 5

        slow_body = _raw_connection(url)
        slow_body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        slow_body.settimeout(5)
        answer = slow_body.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "request_body_timeout" in answer

        with httpx.Client(base_url=url) as http:  # and the server still answers
            assert http.post("/v1/completions", json={"model": "sst2", "prompt": "x"}).status_code == 200


def test_a_body_trickled_within_every_piece_timeout_still_ends_at_the_body_deadline(dirs):
    """A byte every 0.3 s never trips the 0.5 s piece timeout; it used to hold the connection (and a
    slot of uvicorn's old limit_concurrency) for as long as the client liked."""
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone), body_timeout_s=0.5, body_deadline_s=1.5)
    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        sock = _raw_connection(url)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        start, answer = time.monotonic(), b""
        sock.settimeout(0.3)
        while time.monotonic() - start < 10 and not answer:
            try:
                answer = sock.recv(65536)  # waits 0.3 s, then one more byte
            except TimeoutError:
                sock.sendall(b" ")
        assert answer.startswith(b"HTTP/1.1 408") and b"request_body_timeout" in answer, answer
        assert time.monotonic() - start < 5


def test_one_client_cannot_hold_every_connection(dirs):
    """One address opening more connections than `max_connections_per_client` gets a JSON 429 on each
    extra one; before, a thousand idle sockets from anyone (no key needed) made every client's request
    a 503 until they were closed. Its own connections, and everyone else's requests, still work."""
    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone), max_connections_per_client=4, max_connections=8)
    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        held = [_raw_connection(url) for _ in range(4)]
        for s in held:
            s.sendall(b"G")  # a request that never finishes (cut at header_timeout_s)
        extra = [_raw_connection(url) for _ in range(6)]  # more than the table holds
        for s in extra:
            s.settimeout(5)
            answer = s.recv(65536).decode()
            head, _, body = answer.partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 429") and "application/json" in head, answer
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            assert _closed_within(s, 5)
        # another client address (127.0.0.2 is loopback too) is served as usual meanwhile
        port = int(url.rsplit(":", 1)[1])
        other = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert other.recv(65536).startswith(b"HTTP/1.1 200")
        other.close()
        for s in held:
            s.close()
        deadline = time.monotonic() + 5  # the closed ones are counted out again
        while time.monotonic() < deadline:
            with httpx.Client(base_url=url) as http:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError("the client's closed connections were never counted out")


def test_server_has_keep_alive_and_concurrency_limits(dirs):
    from serving.http_server import uvicorn_config

    store, backbone = dirs
    cfg = server_config(engine_config(store, backbone), timeout_keep_alive_s=3, max_connections=7)
    config = uvicorn_config(create_app(Engine(cfg.engine), cfg), cfg.api)
    assert config.timeout_keep_alive == 3 and config.http.table.capacity == 7
    assert config.limit_concurrency is None  # it counted idle connections against requests
    assert config.http.header_timeout_s == cfg.api.header_timeout_s
    assert config.http.first_byte_timeout_s == cfg.api.first_byte_timeout_s
    assert config.http.max_connections_per_client == cfg.api.max_connections_per_client == 64


def test_a_stream_nobody_reads_is_ended_and_aborted():
    """A client that stops reading makes the server's `send` block (full socket buffers); the
    stream gives up after write_timeout_s and closes its generator, which aborts the request."""
    closed = asyncio.Event()

    async def tokens():
        try:
            while True:
                yield "data: {}\n\n"
        finally:
            closed.set()

    async def main():
        response = EventStream(tokens(), write_timeout_s=0.2)
        sent = []

        async def send(message):
            sent.append(message)
            if len(sent) > 2:
                await anyio.sleep_forever()  # what uvicorn's send does while the client reads nothing

        async def receive():
            await anyio.sleep_forever()

        with anyio.fail_after(5):
            await response({"type": "http"}, receive, send)
        return sent

    assert len(asyncio.run(main())) == 3 and closed.is_set()
