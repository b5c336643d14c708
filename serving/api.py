"""The HTTP API: an OpenAI-compatible FastAPI app in front of one `Engine` (the `model` field names a task).

    POST /v1/completions       text completion (SSE streaming with `stream: true`)
    POST /v1/chat/completions  chat completion; the task's input is the last user message
    POST /v1/classify          {model, input} -> label probabilities from the task's verbaliser
    GET  /v1/models            the tasks this caller may use;  GET /v1/models/{task}
    GET  /health               liveness, no key
    GET  /metrics              Prometheus: a tenant with `metrics: true` sees every series; with
                               `api.metrics_public` anyone sees a page without task or tenant names
    HEAD on every GET route answers as GET would, without the body (`serving.middleware.HeadAsGet`).

Every error is JSON `{"error": {message, type, param, code}}`. A task the caller may not use, a name
that is not a valid task name (`../x`, `a/b`) and a task that does not exist get the same 404, and a
task name is never used as a path. A client that goes away aborts its request in the engine, and a
streaming client that stops reading for `api.write_timeout_s` is cut off. Prompts longer than
`api.max_prompt_chars` are refused before anything is tokenized. Each request carries its tenant to
the engine, which enforces the tenant's limits (`QuotaExceeded`: 429 with that tenant's Retry-After).
This module does not batch, tokenize or run the model (the engine does) and does not check keys
(`serving.middleware.RequireApiKey` does, before a body is read).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving import protocol
from serving.auth import KeyRing, Tenant, load_keyring
from serving.config import ServerConfig
from serving.metrics import NO_TASK, ApiMetrics
from serving.middleware import (
    INTERNAL_ERROR,
    HeadAsGet,
    LimitRequestsInFlight,
    RecordRequests,
    RequireApiKey,
    error_response,
    public_message,
)
from serving.protocol import UNSUPPORTED_ERROR, ChatBody, ClassifyBody, CompletionBody
from serving.types import (
    GenerationRequest,
    InvalidRequest,
    PromptTooLong,
    RequestOutput,
    SamplingParams,
    ServingError,
    TaskInfo,
    UnknownTask,
    check_sampling,
)
from tuner.schema import is_valid_name
from tuner.tasks.kinds.base import CLASSIFY

log = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody reads it, metrics do


class TaskNotFound(UnknownTask):
    """One message for a missing task, a forbidden one and a path-like name: they must be indistinguishable."""

    def __init__(self, name: str):
        shown = name if len(name) <= 128 else name[:128] + "..."
        # A path parameter may still carry a lone surrogate: show it escaped, never fail to encode it.
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(
            f"The model '{shown}' does not exist or you do not have access to it.", param="model"
        )


def create_app(
    engine, config: ServerConfig, keyring: KeyRing | None = None, manage_engine: bool = True
) -> FastAPI:
    """Build the app. With `manage_engine` the app's lifespan starts and stops the engine."""
    keyring = keyring if keyring is not None else load_keyring(config.api.auth)
    metrics = ApiMetrics(engine.stats)
    engine.set_tenant_limits(keyring.tenant_limits())  # the engine's scheduler enforces each tenant's limits

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.stop()

    # No /docs or /openapi.json: every route but /health (and /metrics) needs a key.
    app = FastAPI(title="promptfleet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = Serving(engine, config, metrics)
    app.include_router(router)
    public = {"/health"} | ({"/metrics"} if config.api.metrics_public else set())
    app.add_middleware(HeadAsGet)  # innermost: routes see GET, the server still sends no body
    app.add_middleware(  # counts requests whose key and body are in
        LimitRequestsInFlight,
        max_in_flight=config.api.max_requests_in_flight,
        uncounted=frozenset({"/health"}),
    )
    app.add_middleware(
        RequireApiKey,
        keyring=keyring,
        public_paths=frozenset(public),
        max_body_bytes=config.api.max_body_bytes,
        body_timeout_s=config.api.body_timeout_s,
        body_deadline_s=config.api.body_deadline_s,
        reload_interval_s=config.engine.reload_interval_s,  # the tenants file reloads like the prompt store
        on_keys_reloaded=lambda ring: engine.set_tenant_limits(ring.tenant_limits()),
    )
    app.add_middleware(RecordRequests, metrics=metrics)  # outermost: also counts 401s
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


class Serving:
    """What the routes share: the engine, the config, the metrics."""

    def __init__(self, engine, config: ServerConfig, metrics: ApiMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics

    def check_length(self, text: str, param: str) -> None:
        """Refuse an over-long prompt by its characters, before any tokenizer sees it."""
        limit = self.config.api.max_prompt_chars
        if len(text) > limit:
            raise PromptTooLong(f"{param} has {len(text)} characters, the limit is {limit}.", param=param)

    def resolve_task(self, request: Request, name: str, endpoint: str) -> TaskInfo:
        """The task's info if it exists and this caller may use it; else the one 404.

        Only then does the name become the request's metrics label: names from clients must not
        create series.
        """
        request.state.endpoint = endpoint
        tenant: Tenant = request.state.tenant
        if not is_valid_name(name) or not tenant.may_use(name):
            raise TaskNotFound(name)
        with self.engine_errors(request, name):
            info = self.engine.task_info(name)
        request.state.task = name
        return info

    @contextmanager
    def engine_errors(self, request: Request, task: str):
        """Turn the engine's own UnknownTask into the API's one 404 shape."""
        try:
            yield
        except UnknownTask:
            request.state.task = NO_TASK  # not a task label: unknown names must not create series
            raise TaskNotFound(task) from None

    async def start(
        self, request: Request, req: GenerationRequest
    ) -> tuple[AsyncIterator[RequestOutput], RequestOutput]:
        """Submit `req` and wait for its first output; admission errors (404/400/429) surface here."""
        with self.engine_errors(request, req.task):
            stream = self.engine.generate(req)
            if inspect.isawaitable(stream):
                stream = await stream
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise RuntimeError(f"engine produced no output for {req.request_id}") from None
        self.metrics.ttft.labels(req.task).observe(time.monotonic() - req.arrival_time)
        return stream, first

    async def collect(self, request: Request, req: GenerationRequest) -> tuple[str, RequestOutput] | None:
        """Run `req` to the end; None if the client went away first (the request is aborted)."""
        try:
            out = await self.unless_gone(request, self._run_to_end(request, req), req.request_id)
        except asyncio.CancelledError:
            self.engine.abort(req.request_id)
            raise
        if out is None:
            self.engine.abort(req.request_id)
        return out

    async def unless_gone(self, request: Request, work: Awaitable[T], what: str) -> T | None:
        """`work`'s result, or None if the client went away first: `work` is then cancelled (the
        engine's request ends with it, so a client that hangs up frees its place at once).

        The client's going is awaited, not polled: once the body is read, the server's `receive()`
        returns only `http.disconnect` (the connection closed, or the response is complete), so one
        waiting `receive()` per request costs nothing until then. Polling every 0.25 s woke the event
        loop 128 times a second for 32 long classifications, each wake taking a core from the
        engine's torch threads on a 2-core machine (about 3 % of a flood's throughput)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            log.info("client went away, aborting %s", what)
            return None
        finally:
            for pending in (task, gone):
                if not pending.done():
                    pending.cancel()

    async def _run_to_end(self, request: Request, req: GenerationRequest) -> tuple[str, RequestOutput]:
        stream, last = await self.start(request, req)
        parts = [last.text]
        try:
            while not last.finished:
                last = await anext(stream)
                parts.append(last.text)
        except StopAsyncIteration:
            pass
        finally:
            await _close(stream)
        self.metrics.observe_tokens(req.task, req.tenant, last.prompt_tokens, last.completion_tokens)
        return "".join(parts), last

    async def events(
        self,
        req: GenerationRequest,
        stream: AsyncIterator[RequestOutput],
        first: RequestOutput,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """SSE events in OpenAI's chunk format, ending with `data: [DONE]`."""
        last, finished = first, first.finished
        chunk = (
            (lambda out, i: protocol.chat_chunk(req.request_id, req.task, out, i == 0))
            if chat
            else (lambda out, i: protocol.completion_chunk(req.request_id, req.task, out))
        )
        try:
            yield protocol.sse(chunk(first, 0))
            i = 1
            while not finished:
                last = await anext(stream)
                finished = last.finished
                yield protocol.sse(chunk(last, i))
                i += 1
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield protocol.sse(protocol.usage_chunk(req.request_id, req.task, obj, last))
            self.metrics.observe_tokens(req.task, req.tenant, last.prompt_tokens, last.completion_tokens)
            yield protocol.sse("[DONE]")
        except ServingError as err:  # e.g. a timeout after the headers were sent: one error event, then stop
            yield protocol.sse(protocol.error_body(public_message(err), err.type, err.param, err.code))
        except StopAsyncIteration:
            finished = True
            yield protocol.sse("[DONE]")
        except Exception:
            log.exception("stream %s failed", req.request_id)
            yield protocol.sse(protocol.error_body(INTERNAL_ERROR, "server_error", None, "internal_error"))
        finally:
            if not finished:
                self.engine.abort(req.request_id)
            await _close(stream)


async def _close(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. Called after the body was read: uvicorn, Starlette's test
    client and Ray Serve then block in `receive()` until `http.disconnect`; a stale empty
    `http.request` (an end-of-body event read late) is skipped and the wait goes on. A `receive()`
    that fails leaves nobody to answer either: it counts as gone."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as e:  # not CancelledError: the answer came first
        log.info("reading the connection failed (%s): the client counts as gone", type(e).__name__)


class EventStream(StreamingResponse):
    """An SSE response that notices a client going away even between tokens and always closes its
    generator, whose `finally` aborts the request in the engine. A client that stops reading (its
    socket buffers full, so `send` blocks) is cut off after `write_timeout_s`."""

    media_type = "text/event-stream"

    def __init__(self, content, write_timeout_s: float, **kwargs):
        super().__init__(content, **kwargs)
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        async def send_in_time(message) -> None:
            with anyio.fail_after(self.write_timeout_s):
                await send(message)

        try:
            async with anyio.create_task_group() as tg:

                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send_in_time)
                    except OSError:  # the client is gone; uvicorn raises this from send()
                        pass
                    except TimeoutError:
                        log.info("stream cut off: the client read nothing for %gs", self.write_timeout_s)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# ------------------------------------------------------------------------------------ routes

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    failure = getattr(request.app.state.serving.engine, "failure", None)  # a tensor-parallel rank lost
    if failure is not None:
        return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    srv: Serving = request.app.state.serving
    tenant: Tenant | None = getattr(request.state, "tenant", None)
    if tenant is not None and tenant.metrics:
        body, content_type = srv.metrics.render()
    elif srv.config.api.metrics_public:
        body, content_type = srv.metrics.render_public()
    else:  # a tenant key without `metrics: true`: as if the route did not exist
        raise HTTPException(404, "Not Found")
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    tenant: Tenant = request.state.tenant
    request.state.endpoint = "models"
    tasks = sorted(t for t in request.app.state.serving.engine.task_names() if tenant.may_use(t))
    return {"object": "list", "data": [protocol.model_card(t) for t in tasks]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict:
    request.app.state.serving.resolve_task(request, model, "models")
    return protocol.model_card(model)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request) -> Response:
    return await _generate(request, body, body.prompt_text(), "prompt", chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request) -> Response:
    return await _generate(request, body, body.prompt_text(), "messages", chat=True)


@router.post("/v1/classify")
async def classify(body: ClassifyBody, request: Request) -> dict:
    srv: Serving = request.app.state.serving
    task, info = body.model, srv.resolve_task(request, body.model, "classify")
    srv.check_length(body.input, "input")
    if CLASSIFY not in info.serves:
        raise InvalidRequest(
            f"'{task}' is a {info.kind} task; /v1/classify needs a task with a "
            f"verbaliser (use /v1/completions)",
            param="model",
        )
    tenant = request.state.tenant.name
    with srv.engine_errors(request, task):
        try:
            work = srv.engine.classify(task, body.input, raw=body.raw, tenant=tenant)
            result = await srv.unless_gone(request, work, f"a classification of {task!r}")
        except ServingError as err:  # the engine names a request's text "prompt"; here it is `input`
            err.param = "input" if err.param == "prompt" else err.param
            raise
    if result is None:  # nobody to answer
        return Response(status_code=499)
    srv.metrics.observe_tokens(task, tenant, result.prompt_tokens, 0)
    return protocol.classification(
        f"clf-{uuid.uuid4().hex}", task, result.label, result.labels, result.prompt_tokens
    )


async def _generate(
    request: Request, body: CompletionBody | ChatBody, prompt: str, prompt_param: str, chat: bool
) -> Response:
    srv: Serving = request.app.state.serving
    task = body.model
    srv.resolve_task(request, task, "chat" if chat else "completions")
    if not prompt:
        raise InvalidRequest("The prompt must not be empty.", param=prompt_param)
    srv.check_length(prompt, prompt_param)
    # Chat's max_completion_tokens wins over max_tokens, its older name, when both are sent.
    field = "max_tokens" if getattr(body, "max_completion_tokens", None) is None else "max_completion_tokens"
    asked = getattr(body, field)
    params = SamplingParams(
        max_tokens=srv.config.api.default_max_tokens if asked is None else asked,
        seed=body.seed,
        stop=body.stop_list(),
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
    )
    check_sampling(params, srv.config.engine.max_new_tokens_limit, max_tokens_param=field)
    req = GenerationRequest(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        task=task,
        prompt=prompt,
        params=params,
        tenant=request.state.tenant.name,
        raw=body.raw,
    )
    if body.stream:
        stream, first = await srv.start(request, req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            srv.events(req, stream, first, chat, include_usage),
            write_timeout_s=srv.config.api.write_timeout_s,
            headers={"Cache-Control": "no-cache", "X-Request-Id": req.request_id},
        )
    result = await srv.collect(request, req)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    text, last = result
    shape = protocol.chat_completion if chat else protocol.completion
    return JSONResponse(shape(req.request_id, task, text, last), headers={"X-Request-Id": req.request_id})


# ------------------------------------------------------------------------------------ errors


async def _serving_error(_request: Request, err: ServingError) -> JSONResponse:
    return error_response(err)


async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    # For a union field pydantic reports one error per member; the deepest one names the bad element.
    errors = err.errors()
    unsupported = next((e for e in errors if e.get("type") == UNSUPPORTED_ERROR), None)
    if unsupported is not None:
        param = unsupported["ctx"]["param"]
        return error_response(InvalidRequest(unsupported["msg"], param=param))
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    if first.get("type") == "json_invalid":
        return error_response(InvalidRequest("The request body is not valid JSON."))
    if tuple(first.get("loc", ())) == ("body",):
        return error_response(InvalidRequest("The request body must be a JSON object."))
    # The field path without FastAPI's "body" root and the member tags unions add (`prompt.list[str]`).
    loc = [str(p) for p in first.get("loc", ())[1:]]
    param = ".".join(p for p in loc if not _is_type_tag(p)) or None
    message = (
        f"{param}: {first.get('msg', 'invalid value')}"
        if param
        else first.get("msg", "Invalid request body.")
    )
    return error_response(InvalidRequest(message, param=param))


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "TextPart", "StreamOptions")


async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse(
        protocol.error_body(str(err.detail), "invalid_request_error", None, code),
        status_code=err.status_code,
        headers=getattr(err, "headers", None),
    )


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    return JSONResponse(
        protocol.error_body(INTERNAL_ERROR, "server_error", None, "internal_error"), status_code=500
    )
