"""The HTTP layer at its edges (issue 34, items 2 and 6): connections cannot starve requests, and
the corners of HTTP/1.1 a public endpoint meets are answered safely.

A real uvicorn server (`serving.http_server.uvicorn_config`, what `promptfleet serve` runs) on
127.0.0.1 with a stand-in engine (these routes never reach a model), talked to over raw sockets
where the bytes matter. Nothing waits on a guess: each test polls the server's state with a deadline,
and the one ordering that matters (a half-close seen while a request runs) is held by a gate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest
import yaml
from fastapi import Request
from serving_helpers import UvicornThread

from serving.api import create_app
from serving.auth import KeyRing, hash_key
from serving.config import ApiConfig, EngineConfig, ServerConfig, load_server_config
from serving.http_server import MAX_HEAD_BYTES, PEER_CHECK_S, connection_budget, uvicorn_config
from serving.middleware import LimitRequestsInFlight
from serving.types import EngineStats, TaskInfo, UnknownTask
from tuner.schema import ConfigError

KEY = "pf-edge-acme"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n"  # % an Authorization line


class StubEngine:
    """What create_app and the GET routes ask of an engine; records the tenant limits it is given."""

    def __init__(self):
        self.limits: list[dict] = []

    def stats(self) -> EngineStats:
        return EngineStats()

    def set_tenant_limits(self, limits, default=None) -> None:
        self.limits.append(dict(limits))

    def task_names(self) -> list[str]:
        return ["sst2"]

    def task_info(self, task: str) -> TaskInfo:
        if task != "sst2":
            raise UnknownTask(task)
        return TaskInfo(task, "classification", 4, frozenset({"classify"}))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def write_tenants(path, tenants: dict) -> None:
    """Replace the file atomically (a new inode), as an operator or a Secret volume does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tenants": tenants}) if isinstance(tenants, dict) else tenants)
    os.replace(tmp, path)


def acme(key: str = KEY, **limits) -> dict:
    return {"key_sha256": [hash_key(key)], "tasks": "*", **limits}


@pytest.fixture
def tenants(tmp_path):
    path = tmp_path / "tenants.yaml"
    write_tenants(path, {"acme": acme()})
    return path


class Gate:
    """`POST /held` (a test route) waits here until the test opens it, then echoes the body's size;
    it notes a client that goes away meanwhile, as the completion routes do."""

    def __init__(self):
        self.entered, self.opened, self.client_gone = threading.Event(), threading.Event(), threading.Event()

    async def route(self, request: Request) -> dict:
        body = await request.body()
        self.entered.set()
        while not self.opened.is_set():
            if await request.is_disconnected():
                self.client_gone.set()
                return {"received": None}
            await asyncio.sleep(0.01)
        return {"received": len(body)}


def serve(tenants_file, engine: StubEngine | None = None, reload_interval_s: float = 60.0, **api):
    """A UvicornThread for the stub engine behind `tenants_file`, with `.gate` holding `POST /held`."""
    cfg = ServerConfig(
        engine=EngineConfig(reload_interval_s=reload_interval_s),
        api=ApiConfig(auth=str(tenants_file), **api),
    )
    app = create_app(engine or StubEngine(), cfg)
    thread = UvicornThread(app)
    thread.gate = Gate()
    app.add_api_route("/held", thread.gate.route, methods=["POST"])
    return thread


def table(thread: UvicornThread):
    """The server's connection table (read from the test thread: only len() and list() copies)."""
    return thread.server.config.http.table


def held_request(body: bytes, sent: int | None = None, close: bool = False) -> bytes:
    """An authenticated `POST /held` with `body`, of which only the first `sent` bytes."""
    head = b"POST /held HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: %d\r\n" % len(body)
    return head + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body[:sent]


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the server closes the connection (fails the test if it never does)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def is_open(sock: socket.socket) -> bool:
    """True if the server has not closed `sock` (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(10)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """(status, headers, body) of each response in `data` (bodies framed by content-length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:size]))
        data = rest[size:]
    return out


def exchange(port: int, raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Send `raw` on a new connection and parse everything the server answers until it closes."""
    with connect(port) as sock:
        sock.sendall(raw)
        return responses(read_all(sock))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---------------------------------------------------------------- item 2: connections cannot starve requests


def test_idle_and_half_sent_connections_cannot_starve_an_authenticated_request(tenants):
    """The issue's attack in small: the table (6) filled with idle and half-sent sockets from several
    addresses. A complete authenticated request and /health are still answered 200; the sockets that
    waited longest are the ones closed to make room."""
    srv = serve(tenants, max_connections=6, first_byte_timeout_s=30, header_timeout_s=30)
    with srv as url:
        port = port_of(url)
        held = []
        for i in range(6):
            sock = connect(port, source=f"127.0.0.{2 + i % 3}")
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\n")  # headers never finished
            held.append(sock)
        wait_for(lambda: len(table(srv).waiting) == 6, "six waiting connections")

        (answer,) = exchange(port, MODELS % AUTH)
        assert answer[0] == 200 and json.loads(answer[2])["data"][0]["id"] == "sst2"
        assert read_all(held[0]) == b""  # the one that waited longest, closed without a word
        assert all(is_open(s) for s in held[1:])

        wait_for(lambda: len(table(srv)) == 5, "the answered connection to leave the table")
        held.append(connect(port, source="127.0.0.5"))  # full again
        wait_for(lambda: len(table(srv)) == 6, "a full table")
        (health,) = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health[0] == 200
        assert read_all(held[1]) == b"" and all(is_open(s) for s in held[2:])
        for s in held:
            s.close()


def test_a_request_in_progress_is_never_evicted_and_a_full_busy_table_answers_503(tenants):
    """Connections whose request headers are complete are never closed for a newcomer; when every
    connection has one, the newcomer gets a JSON 503 and the requests in progress finish."""
    srv = serve(tenants, max_connections=2)
    body = b"0123456789"
    srv.gate.opened.set()
    with srv as url:
        port = port_of(url)
        busy = [connect(port), connect(port)]
        for s in busy:
            s.sendall(held_request(body, sent=5, close=True))  # headers complete, the body still coming
        wait_for(lambda: len(table(srv).busy) == 2, "two requests in progress")

        (refused,) = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused[0] == 503 and refused[1]["content-type"] == "application/json"
        assert json.loads(refused[2])["error"]["code"] == "server_busy" and refused[1]["retry-after"] == "1"
        assert all(is_open(s) for s in busy)

        busy[0].sendall(body[5:])  # a request in progress completes normally
        (done,) = responses(read_all(busy[0]))
        assert done[0] == 200 and json.loads(done[2]) == {"received": 10}
        wait_for(lambda: len(table(srv)) == 1, "the finished connection to leave the table")
        (health,) = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health[0] == 200
        busy[1].close()


def test_per_address_cap_and_first_byte_deadline(tenants):
    srv = serve(tenants, max_connections_per_client=3, first_byte_timeout_s=0.3, header_timeout_s=30)
    with srv as url:
        port = port_of(url)
        talking = []
        for _ in range(3):
            talking.append(connect(port))
            talking[-1].sendall(b"G")  # past the first-byte deadline, within the header deadline
        with connect(port) as extra:
            (refused,) = responses(read_all(extra))
        assert refused[0] == 429 and json.loads(refused[2])["error"]["code"] == "too_many_connections"

        silent = connect(port, source="127.0.0.2")
        start = time.monotonic()
        assert read_all(silent) == b""  # closed by the first-byte deadline, nothing written
        assert 0.25 < time.monotonic() - start < 5
        assert all(is_open(s) for s in talking)  # one byte sent: the 30 s header deadline applies
        for s in talking:
            s.close()


def test_connection_budget_comes_from_the_file_descriptor_limit():
    import resource

    budget = connection_budget()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # as connection_budget raised it
    assert budget.reserve >= 64 and budget.connections + budget.reserve == min(soft, 65536)
    assert connection_budget(5).connections == 5
    assert connection_budget(10**9).connections == budget.connections  # no more than the process holds
    config = uvicorn_config(object(), ApiConfig(auth="none", max_connections=7))
    assert config.limit_concurrency is None and config.http.table.capacity == 7
    assert config.backlog <= budget.reserve


def test_requests_in_flight_are_capped_apart_from_connections():
    gate = asyncio.Event()

    async def slow_app(scope, receive, send):
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(limiter, path="/v1/models"):
        sent = []

        async def send(message):
            sent.append(message)

        await limiter({"type": "http", "path": path, "headers": []}, None, send)
        return sent[0]["status"], dict(sent[0].get("headers", []))

    async def main():
        limiter = LimitRequestsInFlight(slow_app, max_in_flight=2, uncounted=frozenset({"/health"}))
        running = [asyncio.ensure_future(call(limiter)) for _ in range(2)]
        await asyncio.sleep(0)  # both are now waiting on the gate
        assert limiter.in_flight == 2
        status, headers = await call(limiter)
        assert status == 503 and headers[b"retry-after"] == b"1"
        health = asyncio.ensure_future(call(limiter, "/health"))  # not counted: it waits on the gate
        await asyncio.sleep(0)
        gate.set()
        assert [(await r)[0] for r in running] == [200, 200] and (await health)[0] == 200
        assert limiter.in_flight == 0 and (await call(limiter))[0] == 200

    asyncio.run(main())


def test_the_old_limit_concurrency_still_loads(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("api:\n  auth: none\n  limit_concurrency: 300\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_server_config(old)
    assert cfg.api.max_requests_in_flight == 300 and "max_requests_in_flight" in caplog.text
    with pytest.raises(ConfigError, match="set only"):
        load_server_config(old, ["api.max_requests_in_flight=50"])


# ---------------------------------------------------------------- item 6: HTTP edges


def test_content_length_with_transfer_encoding_is_400_and_closes(tenants):
    """Chunked framing ends this body after `0\\r\\n\\r\\n`; a Content-Length proxy sees one request.
    One JSON 400, then the connection closes: the smuggled second request is never answered."""
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (
        b"POST /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(smuggled))
        + smuggled
    )  # fmt: skip
    with serve(tenants) as url:
        answers = exchange(port_of(url), raw)
    assert len(answers) == 1, answers
    status, headers, body = answers[0]
    assert (
        status == 400 and headers["connection"] == "close" and headers["content-type"] == "application/json"
    )
    assert "Content-Length and Transfer-Encoding" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("pieces", [1, 40])
def test_headers_over_the_limit_are_431_however_they_arrive(tenants, pieces):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    with serve(tenants) as url, connect(port_of(url)) as sock:
        step = -(-len(head) // pieces)
        for i in range(0, len(head), step):
            if select.select([sock], [], [], 0)[0]:
                break  # answered already: stop sending
            try:
                sock.sendall(head[i : i + step])
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed before the last piece
        (answer,) = responses(read_all(sock))
    assert answer[0] == 431 and answer[1]["content-type"] == "application/json"
    assert json.loads(answer[2])["error"]["code"] == "headers_too_large"


def test_headers_just_within_the_limit_are_accepted(tenants):
    start = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    head = start + b"a" * (MAX_HEAD_BYTES - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_BYTES
    with serve(tenants) as url:
        port = port_of(url)
        (answer,) = exchange(port, head)
        assert answer[0] == 200
        (over,) = exchange(port, head[:-4] + b"a\r\n\r\n")
        assert over[0] == 431


def test_absolute_form_targets_are_routed_by_their_path(tenants):
    with serve(tenants) as url:
        port = port_of(url)
        (health,) = exchange(
            port,
            b"GET http://example.com:8000/health HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        )
        assert health[0] == 200 and json.loads(health[2]) == {"status": "ok"}
        (model,) = exchange(
            port,
            b"GET HTTPS://example.com/v1/models/sst2?x=1 HTTP/1.1\r\nHost: example.com\r\n" + AUTH
            + b"Connection: close\r\n\r\n",
        )  # fmt: skip
        assert model[0] == 200 and json.loads(model[2])["id"] == "sst2"


def test_head_answers_like_get_without_a_body(tenants):
    """On one keep-alive connection: HEAD then GET. HEAD's headers equal GET's (content-length too)
    and no body follows it, so the next bytes are the GET's status line."""
    with serve(tenants) as url:
        for path, auth in (("/health", b""), ("/v1/models", AUTH), ("/v1/models/sst2", AUTH)):
            with connect(port_of(url)) as sock:
                sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"\r\n")
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"Connection: close\r\n\r\n"
                )
                data = read_all(sock)
            end = data.index(b"\r\n\r\n") + 4
            assert data[end:].startswith(b"HTTP/1.1 200"), data  # no body between the two answers
            (head_status, head_headers, _), (get_status, get_headers, body) = responses(
                data[:end]
            ) + responses(data[end:])
            assert head_status == get_status == 200 and body
            assert head_headers["content-length"] == get_headers["content-length"] == str(len(body))
            assert head_headers["content-type"] == get_headers["content-type"]
        (head,) = exchange(port_of(url), b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head[0] == 401  # HEAD needs the key where GET does


def peer_eof_seen(srv) -> bool:
    return any(c._peer_eof for c in list(table(srv).busy))


def test_a_half_closed_client_still_gets_its_answer(tenants):
    """The client sends its request and shuts down its write side. The route is held until the
    server has seen the half-close and checked the client a few times, then the whole answer
    arrives (after the interim 100 the server probes with) and the connection closes."""
    srv = serve(tenants)
    with srv as url, connect(port_of(url)) as sock:
        sock.sendall(held_request(b"x" * 5000))
        wait_for(srv.gate.entered.is_set, "the request to reach its route")
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: peer_eof_seen(srv), "the server to see the half-close")
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        time.sleep(3 * PEER_CHECK_S)  # checks that must find the client alive (a wrong one is caught below)
        srv.gate.opened.set()
        (answer,) = responses(read_all(sock))
    assert answer[0] == 200 and json.loads(answer[2]) == {"received": 5000}
    assert not srv.gate.client_gone.is_set()


def test_a_client_that_closed_for_good_is_still_noticed(tenants):
    """A full close looks like a half-close until something is written: the interim 100 draws a
    reset, the server closes, and the route sees the client gone (the engine's request is aborted)."""
    srv = serve(tenants)
    with srv as url:
        sock = connect(port_of(url))
        sock.sendall(held_request(b"x" * 10))
        wait_for(srv.gate.entered.is_set, "the request to reach its route")
        sock.close()
        wait_for(srv.gate.client_gone.is_set, "the route to see the client gone", 5)
        wait_for(lambda: len(table(srv)) == 0, "the connection to be closed")


def test_a_half_close_with_nothing_in_progress_closes(tenants):
    with serve(tenants) as url, connect(port_of(url)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # headers never finished
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock, timeout=5) == b""


# ---------------------------------------------------------------- item 6: the tenants file reloads


def test_keyring_reloads_a_changed_file_and_keeps_the_last_good_keys(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    write_tenants(path, {"acme": acme(), "globex": acme("pf-globex")})
    ring = KeyRing.from_file(path)
    assert not ring.reload_if_changed(2.0, now=100.0)  # unchanged: a stat, nothing read

    write_tenants(path, {"globex": acme("pf-globex", max_concurrent=3)})
    assert not ring.reload_if_changed(2.0, now=101.0)  # within the interval: not even a stat
    assert ring.authenticate(f"Bearer {KEY}") is not None
    assert ring.reload_if_changed(2.0, now=102.0)
    assert (
        ring.authenticate(f"Bearer {KEY}") is None and ring.authenticate("Bearer pf-globex").name == "globex"
    )
    assert ring.tenant_limits()["globex"].max_concurrent == 3

    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        write_tenants(path, "tenants: [not, a, mapping")
        assert not ring.reload_if_changed(2.0, now=104.0)
        write_tenants(path, "tenants: [not, a, mapping")  # the same problem again: no second line
        assert not ring.reload_if_changed(2.0, now=106.0)
        assert not ring.reload_if_changed(2.0, now=108.0)
        assert ring.authenticate("Bearer pf-globex").name == "globex"  # the last good keys
        assert len(caplog.records) == 1 and "keeping the last good keys" in caplog.text
        path.unlink()  # another problem: one more line
        assert not ring.reload_if_changed(2.0, now=110.0)
        assert len(caplog.records) == 2 and ring.authenticate("Bearer pf-globex") is not None

    write_tenants(path, {"acme": acme()})
    assert ring.reload_if_changed(2.0, now=112.0) and ring.authenticate(f"Bearer {KEY}").name == "acme"


def test_a_removed_key_gets_401_within_the_reload_interval(tenants):
    engine = StubEngine()
    with serve(tenants, engine, reload_interval_s=0.1) as url:
        port = port_of(url)
        assert exchange(port, MODELS % AUTH)[0][0] == 200
        write_tenants(tenants, {"globex": acme("pf-globex", max_concurrent=2)})
        wait_for(lambda: exchange(port, MODELS % AUTH)[0][0] == 401, "the removed key to be refused", 5)
        assert exchange(port, MODELS % b"Authorization: Bearer pf-globex\r\n")[0][0] == 200
    assert engine.limits[-1]["globex"].max_concurrent == 2 and "acme" not in engine.limits[-1]


def test_the_rayservice_follows_the_ingress_recommendation():
    """Behind the ingress every client has the proxy's address: the per-address cap is off, and
    Serve's proxy (which takes the connections there) has keep-alive and request bounds."""
    from pathlib import Path

    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    http = ServeDeploySchema.model_validate(serve_config).http_options
    assert http.keep_alive_timeout_s == ApiConfig().timeout_keep_alive_s
    assert http.request_timeout_s >= EngineConfig().request_timeout_s + ApiConfig().write_timeout_s
    (app,) = serve_config["applications"]
    overrides = [o for o in app["args"]["overrides"] if not o.startswith("api.auth=")]
    assert load_server_config(None, overrides).api.max_connections_per_client == 0
