"""The uvicorn server `promptfleet serve` runs, with the limits and HTTP edges a public endpoint needs.

Connections cannot starve requests. uvicorn's own `limit_concurrency` counted open connections with
requests in flight, so a few thousand idle or half-sent sockets (no key needed) made every request a
503; it is off. Instead `GuardedH11` keeps each server's `ConnectionTable`, sized by what the process
can hold (`connection_budget`: the file-descriptor limit, raised to the hard limit when allowed,
less a reserve for model, store and log files and a burst of accepts). A new connection that finds
the table full closes the connection that has waited longest with no request in progress (idle
keep-alive, or still sending its headers); a connection whose request headers are complete is never
closed for another, and only when every connection has a request does a newcomer get a JSON 503.
Requests are counted apart from connections (`serving.middleware.LimitRequestsInFlight`).

Deadlines before any key is seen: a connection that sends nothing for `first_byte_timeout_s` is
closed, and one whose request headers are not complete `header_timeout_s` after it opened (or after
its previous response) is closed too (slowloris). One client address may hold at most
`max_connections_per_client` connections (more get a JSON 429); behind a proxy every client has the
proxy's address, so set it to 0 there and let the proxy limit clients (k8s/README.md).

HTTP edges h11 leaves open, closed by `CheckedConnection`: request line + headers over
`MAX_HEAD_BYTES` are a 431 however they arrive (h11 bounds only headers still incomplete); a request
with both Content-Length and Transfer-Encoding is a 400 and the connection is closed (a request
smuggling building block behind a proxy that frames by Content-Length); an absolute-form target
(`GET http://host/health`) is routed by its path. Every protocol error is a JSON error that closes
the connection. A client that half-closes after its request (`shutdown(SHUT_WR)`) still gets its
answer, then the connection closes; one that closed for good is told apart by an interim
`100 Continue` it cannot take (`GuardedH11.eof_received`), so its request is still aborted. Slow bodies are bounded by `serving.middleware.RequireApiKey`,
slow readers of a stream by `serving.api.EventStream`. This module does not build the app.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
import resource
import socket
from collections import Counter
from typing import NamedTuple
from urllib.parse import urlsplit

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.config import ApiConfig
from serving.middleware import ThrottledWarning
from serving.protocol import error_body

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line + headers
FD_TARGET = 65536  # the soft file-descriptor limit asked for when the hard limit allows
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a request head
PEER_CHECK_S = 0.1  # how often a half-closed connection is checked for a reset while its answer is made


def closing_error(status: int, message: str, type_: str, code: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 JSON error response that closes its connection, written before (or instead
    of) any ASGI request cycle."""
    body = json.dumps(error_body(message, type_, None, code)).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if retry_after is not None:
        head += f"retry-after: {retry_after}\r\n"
    return (head + "\r\n").encode() + body


TOO_MANY_CONNECTIONS = closing_error(
    429,
    "Too many open connections from this client address.",
    "rate_limit_error",
    "too_many_connections",
    retry_after=1,
)
SERVER_FULL = closing_error(
    503,
    "Every connection this server can hold has a request in progress; retry shortly.",
    "server_error",
    "server_busy",
    retry_after=1,
)
HEAD_TOO_LARGE = f"Request line and headers larger than {MAX_HEAD_BYTES} bytes."


class FdBudget(NamedTuple):
    connections: int  # what the connection table may hold
    reserve: int  # descriptors kept for everything else, and for accepts not yet admitted


def connection_budget(configured: int = 0) -> FdBudget:
    """How many connections this process can hold: `configured` (api.max_connections) if set and
    possible, else the file-descriptor limit less a reserve of max(64, 10 %). The soft limit is raised
    towards the hard one (up to FD_TARGET) first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_TARGET)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as err:
            log.warning("could not raise the file-descriptor limit from %d to %d: %s", soft, want, err)
    soft = FD_TARGET if soft == resource.RLIM_INFINITY else soft
    reserve = max(64, soft // 10)
    fits = max(1, soft - reserve)
    if configured > fits:
        log.warning(
            "api.max_connections=%d is more than the file-descriptor limit allows: holding %d",
            configured,
            fits,
        )
    return FdBudget(min(configured, fits) if configured else fits, reserve)


class CheckedConnection(h11.Connection):
    """h11's connection with the checks h11 does not make (see the module docstring). A rejection is
    a `RemoteProtocolError`, as h11's own are, kept in `rejection` for the answer."""

    rejection: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            if self.their_state is h11.IDLE:  # a request head is next: bound it however it arrived
                pending = self.trailing_data[0]
                if len(pending) > MAX_HEAD_BYTES and not _BLANK_LINE.search(pending, 0, MAX_HEAD_BYTES):
                    raise h11.RemoteProtocolError(HEAD_TOO_LARGE, error_status_hint=431)
            event = super().next_event()
            return _checked_request(event) if isinstance(event, h11.Request) else event
        except h11.RemoteProtocolError as err:
            self.rejection = err
            raise


def _checked_request(event: h11.Request) -> h11.Request:
    names = {name for name, _ in event.headers}  # h11 lower-cases them
    if b"content-length" in names and b"transfer-encoding" in names:
        raise h11.RemoteProtocolError(
            "A request must not carry both Content-Length and Transfer-Encoding.", error_status_hint=400
        )
    if event.target[:8].lower().startswith((b"http://", b"https://")):  # absolute-form, RFC 9112 3.2.2
        parts = urlsplit(event.target)
        target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        return h11.Request(
            method=event.method, headers=event.headers, target=target, http_version=event.http_version
        )
    return event


class ConnectionTable:
    """The open connections of one server: those with a request in progress (`busy`) and the others
    (`waiting`: idle or still sending headers), in the order they started waiting."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.waiting: dict[GuardedH11, None] = {}  # insertion-ordered: the first has waited longest
        self.busy: set[GuardedH11] = set()
        self._warn_evicted = ThrottledWarning(
            log, "connection table full (%d, api.max_connections): closed the longest-waiting idle connection"
        )

    def __len__(self) -> int:
        return len(self.waiting) + len(self.busy)

    def admit(self, conn: GuardedH11) -> bool:
        """Make room for `conn` by closing the longest-waiting connection without a request; False
        when every connection has one."""
        if len(self) >= self.capacity:
            if not self.waiting:
                return False
            victim = next(iter(self.waiting))
            del self.waiting[victim]
            victim.transport.close()
            self._warn_evicted(self.capacity)
        self.waiting[conn] = None
        return True

    def request_started(self, conn: GuardedH11) -> None:
        if conn in self.waiting:  # not evicted or gone meanwhile
            del self.waiting[conn]
            self.busy.add(conn)

    def request_ended(self, conn: GuardedH11) -> None:
        if conn in self.busy:
            self.busy.discard(conn)
            self.waiting[conn] = None

    def remove(self, conn: GuardedH11) -> None:
        self.waiting.pop(conn, None)
        self.busy.discard(conn)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the connection table, the per-address cap, the first-byte and
    header deadlines and the stricter parser. `uvicorn_config` makes a subclass per server, with its
    own settings, table and counts."""

    first_byte_timeout_s = 2.0
    header_timeout_s = 10.0
    max_connections_per_client = 64  # 0: no cap
    open_per_client: Counter[str] = Counter()
    table = ConnectionTable(1024)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = CheckedConnection(h11.SERVER, MAX_HEAD_BYTES)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_cycle = None  # the cycle current when this connection began waiting for headers
        self._client: str | None = None
        self._awaiting_first_byte = True
        self._peer_eof = False  # the client sent its last byte (half-closed, or gone)
        self._peer_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened_at = self.loop.time()
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) and peer else None  # a Unix socket has none
        cap = self.max_connections_per_client
        if client is not None and cap and self.open_per_client[client] >= cap:
            return self._refuse(TOO_MANY_CONNECTIONS)
        if not self.table.admit(self):
            return self._refuse(SERVER_FULL)
        if client is not None:
            self.open_per_client[client] += 1
            self._client = client
        self._arm(min(self.first_byte_timeout_s, self.header_timeout_s))

    def _refuse(self, answer: bytes) -> None:
        self.transport.write(answer)
        self.transport.close()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle  # a new cycle object means the next headers arrived
        self._header_timer = self.loop.call_later(max(0.0, delay), self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_first_byte:  # from here the header deadline, counted from the opening
            self._awaiting_first_byte = False
            self._arm(self._opened_at + self.header_timeout_s - self.loop.time())
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_cycle:  # a request's headers are complete
            self._waiting_cycle = self.cycle
            self._disarm()
            self.table.request_started(self)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to any h11 protocol error, as a JSON error with h11's status (431 for a
        head too large, 501 for an unknown transfer coding), then the connection closes."""
        err = self.conn.rejection
        status = err.error_status_hint if err is not None else 400
        code = {431: "headers_too_large", 501: "not_implemented"}.get(status, "bad_request")
        message = HEAD_TOO_LARGE if status == 431 else str(err or msg)
        self.transport.write(closing_error(status, message, "invalid_request_error", code))
        self.transport.close()

    def eof_received(self) -> bool:
        """The client sent its last byte: it half-closed (shutdown(SHUT_WR)) and waits for the answer,
        or it went away; TCP says which only when something is written to it. A request received
        whole keeps the connection open (`on_response_complete` closes it after the answer); one
        not answered yet gets an interim `100 Continue` (RFC 9110 15.2: HTTP/1.1 clients accept one
        unasked), which a closed socket answers with a reset that `_check_peer` notices, so the
        request of a client that went away is still aborted. A stream's own writes notice it."""
        self._peer_eof = True
        cycle = self.cycle
        if (
            cycle is None
            or cycle.response_complete
            or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE)
        ):
            return False  # nothing to answer: the transport closes
        if not cycle.response_started and self.conn.their_http_version == b"1.1":
            probe = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self.transport.write(self.conn.send(probe))
            cycle.waiting_for_100_continue = False
            self._check_peer()
        return True

    def _check_peer(self) -> None:
        """Every PEER_CHECK_S until the answer is complete: a reset socket means the client is gone;
        closing tells the app (`http.disconnect`), which aborts the request."""
        self._peer_timer = None
        if self.transport.is_closing() or self.cycle.response_complete:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.transport.close()
            return
        self._peer_timer = self.loop.call_later(PEER_CHECK_S, self._check_peer)

    def on_response_complete(self) -> None:
        self.table.request_ended(self)
        self._arm(self.header_timeout_s)  # the next request on this connection gets the same deadline
        super().on_response_complete()  # may start a request already received (pipelined)
        if self._peer_eof and self.cycle.response_complete and not self.transport.is_closing():
            self.transport.close()  # a half-closed client sends nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer_timer is not None:
            self._peer_timer.cancel()
        self.table.remove(self)
        if self._client is not None:
            self.open_per_client[self._client] -= 1
            if not self.open_per_client[self._client]:
                del self.open_per_client[self._client]
            self._client = None
        super().connection_lost(exc)


def uvicorn_config(app, api: ApiConfig, **overrides) -> uvicorn.Config:
    """The uvicorn config for `app` with `api`'s timeouts and limits (`overrides` win, e.g. in tests)."""
    budget = connection_budget(api.max_connections)
    protocol = type(
        "GuardedH11",
        (GuardedH11,),
        {
            "first_byte_timeout_s": api.first_byte_timeout_s,
            "header_timeout_s": api.header_timeout_s,
            "max_connections_per_client": api.max_connections_per_client,
            "open_per_client": Counter(),
            "table": ConnectionTable(budget.connections),
        },
    )
    settings = dict(
        host=api.host,
        port=api.port,
        log_level=api.log_level,
        http=protocol,
        timeout_keep_alive=api.timeout_keep_alive_s,
        limit_concurrency=None,  # connections: the table above; requests: api.max_requests_in_flight
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=min(2048, budget.reserve),  # accepted at once before any is admitted: within the reserve
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Config(app, **{**settings, **overrides})
