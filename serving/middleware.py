"""Pure-ASGI layers in front of the API routes: API-key check, body-size cap and timeout, the cap on
requests in flight, HEAD as GET, request metrics.

They run before FastAPI parses a body, so an unauthenticated caller gets 401 whatever it sent (never
a 400 that reveals how the body would be read, never a 404 that reveals which routes exist).
`RequireApiKey` then reads the whole body itself (at most `max_body_bytes`, each piece within
`body_timeout_s`, all of it within `body_deadline_s`) and answers 413 / 408 before any route runs, chunked bodies included; the route
reads the buffered copy. Before each check it lets the `KeyRing` reload a changed tenants file
(`KeyRing.reload_if_changed`) and hands new tenant limits to the engine.
`LimitRequestsInFlight` (inside the key check) counts complete requests (body received, key
checked), not connections: beyond `max_in_flight` a request gets 503 + Retry-After, while idle or half-sent
connections (bounded in `serving.http_server`) never take a request's place. /health is not counted.
Routes record what they learned (endpoint, task) in `request.state`; `RecordRequests` reads it when
the response has been sent, so streamed responses are timed to their last byte. Errors are shaped
by `error_response`, the one place that turns a `ServingError` into the JSON error body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import KeyRing
from serving.metrics import NO_TASK, NO_TENANT, ApiMetrics
from serving.protocol import error_body
from serving.types import RetryableError, ServingError

log = logging.getLogger(__name__)
INTERNAL_ERROR = "Internal server error."


class PayloadTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class BodyTimeout(ServingError):
    status, type, code = 408, "invalid_request_error", "request_body_timeout"


class ServerBusy(RetryableError):
    status, type, code = 503, "server_error", "server_busy"


def public_message(err: ServingError) -> str:
    """What a client may read of `err`: a server fault's text may carry internals (torch's error,
    another request's data), so it is replaced; client errors and retry hints are ours and kept."""
    if err.status >= 500 and not isinstance(err, RetryableError):
        return INTERNAL_ERROR
    return err.message


def error_response(err: ServingError) -> JSONResponse:
    """The JSON error for `err`, with `Retry-After` (whole seconds) when it carries one."""
    headers = {}
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(public_message(err), err.type, err.param, err.code),
        status_code=err.status,
        headers=headers,
    )


class RequireApiKey:
    """Puts the caller's `Tenant` in `scope["state"]["tenant"]`, or answers 401 / 413 / 408 itself."""

    def __init__(
        self,
        app: ASGIApp,
        keyring: KeyRing,
        public_paths: frozenset[str],
        max_body_bytes: int,
        body_timeout_s: float = 10.0,
        body_deadline_s: float = 30.0,
        reload_interval_s: float = 2.0,
        on_keys_reloaded: Callable[[KeyRing], None] | None = None,
    ):
        self.app, self.keyring, self.public_paths = app, keyring, public_paths
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.body_deadline_s = body_deadline_s
        self.reload_interval_s, self.on_keys_reloaded = reload_interval_s, on_keys_reloaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.keyring.reload_if_changed(self.reload_interval_s) and self.on_keys_reloaded is not None:
            self.on_keys_reloaded(self.keyring)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] in self.public_paths:  # no key needed, but a valid one may see more (/metrics)
            tenant = self.keyring.authenticate(headers.get("authorization"))
            if tenant is not None:
                scope.setdefault("state", {})["tenant"] = tenant
            return await self.app(scope, receive, send)
        try:
            tenant = self.keyring.check(headers.get("authorization"))
            scope.setdefault("state", {})["tenant"] = tenant  # its errors below count as its own
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                raise PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
            buffered = await self._read_body(receive)
        except ServingError as err:
            state = scope.setdefault("state", {})
            state["endpoint"] = "rejected"  # counted, without trusting the path
            return await error_response(err)(scope, receive, send)

        async def replay():  # the buffered body first, then the connection (for disconnects)
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> list[dict]:
        """The whole body, counted as it arrives (a chunked body has no Content-Length), each piece
        awaited at most `body_timeout_s` and the whole body at most `body_deadline_s` from the
        headers: a client trickling a byte now and then holds its connection for that long at most."""
        messages, seen = [], 0
        deadline = time.monotonic() + self.body_deadline_s
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), min(self.body_timeout_s, left))
            except TimeoutError:
                raise BodyTimeout(
                    f"Request body not received in time (each piece within {self.body_timeout_s:g}s, "
                    f"all of it within {self.body_deadline_s:g}s)."
                ) from None
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client went away; the route will notice
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
            if not message.get("more_body", False):
                return messages


class ThrottledWarning:
    """A warning logged at most once per `interval_s`, with how often it happened since the last line:
    one log line per problem, however many clients run into it."""

    def __init__(self, logger: logging.Logger, message: str, interval_s: float = 60.0):
        self.logger, self.message, self.interval_s = logger, message, interval_s
        self._count, self._logged_at = 0, -math.inf

    def __call__(self, *args) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= self.interval_s:
            self.logger.warning(self.message + " (%d time(s) since this was last logged)", *args, self._count)
            self._count, self._logged_at = 0, now


class LimitRequestsInFlight:
    """Answers 503 + Retry-After to a request beyond `max_in_flight` being handled (from its complete
    body to its last response byte); paths in `uncounted` (/health) always pass."""

    def __init__(self, app: ASGIApp, max_in_flight: int, uncounted: frozenset[str] = frozenset()):
        self.app, self.max_in_flight, self.uncounted = app, max_in_flight, uncounted
        self.in_flight = 0
        self._warn = ThrottledWarning(
            log, "requests refused with 503: %d in flight already (api.max_requests_in_flight)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.uncounted:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            self._warn(self.max_in_flight)
            scope.setdefault("state", {})["endpoint"] = "rejected"
            busy = ServerBusy(f"The server is handling {self.max_in_flight} requests; retry shortly.")
            return await error_response(busy)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class HeadAsGet:
    """HEAD is routed as GET (RFC 9110 9.3.2: the same status and headers). The route sees a copy of
    the scope saying GET; the server's own scope still says HEAD, so uvicorn sends no body."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope.setdefault("state", {})  # one dict for both scopes: what the route notes is seen outside
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class RecordRequests:
    """Counts and times every request a route claimed by setting `request.state.endpoint`."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            state = scope.get("state", {})
            if "endpoint" in state:
                tenant = state.get("tenant")
                self.metrics.observe_request(
                    state["endpoint"],
                    state.get("task", NO_TASK),
                    status,
                    time.perf_counter() - start,
                    tenant.name if tenant is not None else NO_TENANT,
                )
