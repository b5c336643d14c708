"""The uvicorn server `promptfleet serve` runs, with the limits a public endpoint needs.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and the number of connections
and requests (`limit_concurrency`, 503 beyond), but not how long a client may take to send its
request headers: a slow-headers client (slowloris) holds a connection forever. `HeaderTimeoutH11`
closes a connection whose headers are not complete `header_timeout_s` after it opened (or after its
previous response). Slow bodies are bounded by `serving.middleware.RequireApiKey`, slow readers of a
stream by `serving.api.EventStream`. This module does not build the app.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.config import ApiConfig


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
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
        super().connection_lost(exc)


def uvicorn_config(app, api: ApiConfig, **overrides) -> uvicorn.Config:
    """The uvicorn config for `app` with `api`'s timeouts and limits (`overrides` win, e.g. in tests)."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": api.header_timeout_s})
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
