"""The uvicorn server `promptfleet serve` runs, with the limits a public endpoint needs.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and the number of connections
and requests (`limit_concurrency`, 503 beyond), but not how long a client may take to send its
request headers: a slow-headers client (slowloris) holds a connection forever. `HeaderTimeoutH11`
closes a connection whose headers are not complete `header_timeout_s` after it opened (or after its
previous response). Nor does uvicorn bound what one client holds of `limit_concurrency`: a single
address opening a thousand connections (a byte each, or a body trickled within every timeout) would
make the server answer 503 to everyone, before any key is checked. `HeaderTimeoutH11` counts the open
connections of each client address and answers one more than `max_connections_per_client` with a
JSON 429 and closes it. Slow bodies are bounded by `serving.middleware.RequireApiKey`, slow readers of
a stream by `serving.api.EventStream`. This module does not build the app.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.config import ApiConfig
from serving.protocol import error_body


def _too_many_connections() -> bytes:
    body = json.dumps(
        error_body(
            "Too many open connections from this client address.",
            "rate_limit_error",
            None,
            "too_many_connections",
        )
    ).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY_CONNECTIONS = _too_many_connections()


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers and a cap on the open
    connections of one client address (`uvicorn_config` makes a subclass per server, with its own
    settings and its own count)."""

    header_timeout_s = 10.0
    max_connections_per_client = 64
    open_per_client: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._client: str | None = None
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) and peer else None  # a Unix socket has none
        if client is not None:
            if self.open_per_client[client] >= self.max_connections_per_client:
                transport.write(TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self.open_per_client[client] += 1
            self._client = client
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle  # a new cycle object means the next headers arrived
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._waiting_cycle:
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request on this connection gets the same deadline
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._client is not None:
            self.open_per_client[self._client] -= 1
            if not self.open_per_client[self._client]:
                del self.open_per_client[self._client]
            self._client = None
        super().connection_lost(exc)


def uvicorn_config(app, api: ApiConfig, **overrides) -> uvicorn.Config:
    """The uvicorn config for `app` with `api`'s timeouts and limits (`overrides` win, e.g. in tests)."""
    protocol = type(
        "HeaderTimeoutH11",
        (HeaderTimeoutH11,),
        {
            "header_timeout_s": api.header_timeout_s,
            "max_connections_per_client": api.max_connections_per_client,
            "open_per_client": Counter(),
        },
    )
    settings = dict(
        host=api.host,
        port=api.port,
        log_level=api.log_level,
        http=protocol,
        timeout_keep_alive=api.timeout_keep_alive_s,
        limit_concurrency=api.limit_concurrency,
        h11_max_incomplete_event_size=16 * 1024,  # headers larger than this are a 400
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Config(app, **{**settings, **overrides})
