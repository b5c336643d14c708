"""Pure-ASGI layers in front of the API routes: API-key check, body-size cap, request metrics.

They run before FastAPI parses a body, so an unauthenticated caller gets 401 whatever it sent (never
a 400 that reveals how the body would be read, never a 404 that reveals which routes exist).
Routes record what they learned (endpoint, task) in `request.state`; `RecordRequests` reads it when
the response has been sent, so streamed responses are timed to their last byte. Errors are shaped
by `error_response`, the one place that turns a `ServingError` into the JSON error body.
"""

from __future__ import annotations

import math
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import KeyRing
from serving.metrics import NO_TASK, ApiMetrics
from serving.protocol import error_body
from serving.types import ServingError


class PayloadTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


def error_response(err: ServingError) -> JSONResponse:
    """The JSON error for `err`, with `Retry-After` (whole seconds) when it carries one."""
    headers = {}
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=headers
    )


class RequireApiKey:
    """Puts the caller's `Tenant` in `scope["state"]["tenant"]`, or answers 401 / 413 itself."""

    def __init__(self, app: ASGIApp, keyring: KeyRing, public_paths: frozenset[str], max_body_bytes: int):
        self.app, self.keyring, self.public_paths, self.max_body_bytes = (
            app,
            keyring,
            public_paths,
            max_body_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            tenant = self.keyring.check(headers.get("authorization"))
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                raise PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
        except ServingError as err:
            scope.setdefault("state", {})["endpoint"] = "rejected"  # counted, without trusting the path
            return await error_response(err)(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, self._capped(receive), send)

    def _capped(self, receive: Receive) -> Receive:
        """A chunked body has no Content-Length: count what arrives and stop at the cap."""
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
            return message

        return capped_receive


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
                self.metrics.observe_request(
                    state["endpoint"], state.get("task", NO_TASK), status, time.perf_counter() - start
                )
