"""The serving engine: registry + scheduler + model runner behind an asyncio interface.

`Engine.generate(req)` validates a request (unknown task, too long, bad parameters, tenant quota,
queue full) before it yields anything, queues it, and streams `RequestOutput` increments;
`classify` scores a classification task's verbaliser words. Both are requests of the one scheduler
(one queue, one token budget, the same tenant limits). Prompts are tokenised off the event loop,
after a character-length check, so a huge prompt never stalls other requests.

One background thread owns the model: each iteration it frees (when due) the prompt KV of the tasks
the prompt-store loader changed or removed, expires timed-out requests, then runs one model step
(decode every running generation; prefill the newly admitted generations and classifications, any
tasks, in one batch), and feeds the sampled tokens to the scheduler and then to the output path
(`serving.output`: detokenising, stop strings) outside the scheduler's lock. A request whose rows make a forward fail is ended alone with `EngineError`
(the runner isolates it); the others carry on. Results reach the event loop by `call_soon_threadsafe`.
The scheduler is shared with the event loop under a lock held only for bookkeeping, never during a
forward.

The prompt store is rescanned by a second thread, the prompt-store loader, every `reload_interval_s`:
reading and checking adapters never holds up the engine thread, and only a loaded, checked task is
swapped into the registry (the first scan runs in the constructor, before the server is ready). The
scan indexes the store without reading prompts: a request's task prompt is read on its first use by
`serving.prompt_cache.PromptReads` (off the event loop and this thread) into an LRU of
`engine.prompt_cache_bytes`, and the request enters the scheduler with its prompt in memory. A
task's prefix is tokenised once per version (`serving.task_tokens`), not on every request.

With `engine.tensor_parallel` > 1 this engine is rank 0 of a replica: its runner is a
`serving.tp_worker.ShardedRunner`, which sends each step's plan to the other ranks (and proves itself
alive to them while idle). A lost rank (`RankLost`) ends every request with 503, refuses new ones,
sets `failure` (/health reports it) and `failed` (the standalone server then exits 1).

It does not speak HTTP, authenticate, or export metrics (`serving.api` does, from `stats()`, an
`EngineStats`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import torch

from serving.config import EngineConfig
from serving.offline import decode_text, eos_token_ids
from serving.output import to_output
from serving.prompt_cache import PromptReads
from serving.registry import IndexedTask, PromptRegistry
from serving.runner import ModelRunner, StepResult
from serving.scheduler import Request, RequestKind, Scheduler, SchedulerConfig, SchedulerOutput
from serving.task_tokens import TaskTokenCache, splits_exactly
from serving.tensor_parallel import RankLost
from serving.types import (
    STEP_SECONDS_BUCKETS,
    ClassifyResult,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Histogram,
    InvalidRequest,
    PromptTooLong,
    RequestOutput,
    RequestTimeout,
    SamplingParams,
    TaskInfo,
    TenantLimits,
    UnknownTask,
    check_sampling,
)
from tuner.export import TaskMeta
from tuner.model.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype
from tuner.model.model_cache import resolve_backbone
from tuner.tasks.input_budget import cut_input
from tuner.tasks.kinds import kind_of
from tuner.tasks.kinds.base import CLASSIFY

log = logging.getLogger(__name__)

# A prompt longer than max_prompt_tokens * this many characters is refused before it is tokenised:
# English averages ~4 characters per token, so no prompt within the token limit comes near it.
MAX_CHARS_PER_TOKEN = 32
STEP_FAILED = "the model failed on this request"  # all a client learns; the detail is logged
LOADER_JOIN_S = 5.0  # stop() waits this long for a load in progress; the loader ends after it anyway


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        model=None,
        tokenizer=None,
        backbone_names: set[str] | None = None,
        start_ranks: Callable | None = None,
    ):
        """Load the backbone (unless `model`/`tokenizer` are given, e.g. by tests) and scan the store.

        With `config.tensor_parallel` > 1, `start_ranks(config) -> (runner, model)` starts the other
        ranks and loads this one's shard (default: `serving.tp_worker.start_ranks`, child processes)."""
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self._ranks = None  # tensor_parallel > 1: rank 0's runner (`serving.tp_worker.ShardedRunner`)
        self.failure: str | None = None  # why the replica failed (a rank was lost); /health reports it
        self.failed = threading.Event()  # set with `failure`: the standalone server then exits non-zero
        if model is None:
            path = resolve_backbone(config.backbone)
            device = torch.device(config.device)
            if config.tensor_parallel > 1:
                if start_ranks is None:
                    from serving.tp_worker import start_ranks
                self._ranks, model = start_ranks(config)
            else:
                model = load_backbone(
                    path, pick_dtype(config.dtype, device), pick_attention("auto", device), device
                )
            tokenizer = tokenizer or load_tokenizer(path)
            backbone_names = (backbone_names or set()) | {config.backbone, path}
        elif config.tensor_parallel > 1:
            raise ValueError("engine.tensor_parallel > 1 loads the backbone on every rank: pass no model")
        self.tokenizer = tokenizer
        self._encode = text_encoder(tokenizer)
        self.runner = self._ranks or ModelRunner(model, config.prefix_cache_bytes, config.prefix_cache)
        self.registry = PromptRegistry(
            config.prompt_store,
            backbone_names or {config.backbone},
            self.runner.hidden_size,
            allow_symlinks=config.prompt_store_symlinks,
            max_virtual_tokens=self.runner.max_positions - 1,  # room for one prompt token at least
            max_text_chars=config.max_prompt_tokens * MAX_CHARS_PER_TOKEN,  # a prompt's longest
            lazy=True,
            prompt_cache_bytes=config.prompt_cache_bytes,
        )
        self._reads = PromptReads(
            self.registry.prompts, self.registry.load
        )  # first uses, off this and the event loop
        self.registry.refresh()  # the first scan, before the server is ready; then the loader's
        self._tokens = TaskTokenCache(self._encode, splits_exactly(tokenizer))
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_batch_size,
                config.max_queue,
                config.max_step_tokens,
                config.alone_step_tokens,
                config.shared_step_tokens,
            )
        )
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._lock = threading.Lock()  # guards the scheduler
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters since start, under `_lock` (`stats()` reports them).
        self._tokens_generated_total = 0
        self._requests_finished_total = 0
        self._requests_failed_total = 0
        self._step_seconds = Histogram(STEP_SECONDS_BUCKETS)
        self._loader: threading.Thread | None = None  # the prompt-store loader (`_load_store`)
        self._loader_stop = threading.Event()
        self._reloaded_lock = threading.Lock()
        self._reloaded: set[str] = set()  # tasks the loader changed or removed, for the engine thread

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="promptfleet-engine", daemon=True)
        self._thread.start()
        self._loader_stop = threading.Event()
        self._loader = threading.Thread(
            target=self._load_store, args=(self._loader_stop,), name="prompt-store loader", daemon=True
        )
        self._loader.start()

    async def stop(self) -> None:
        if self._thread is None:
            if self._ranks is not None:  # never started: the other ranks wait for a plan all the same
                await asyncio.to_thread(self._ranks.stop, self.failure is not None)
            return
        self._stopping = True
        self._loader_stop.set()
        self._reads.close()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._ranks is not None and self.failure is None:
            await asyncio.to_thread(self._ranks.stop)
        if self._loader is not None:
            await asyncio.to_thread(self._loader.join, LOADER_JOIN_S)
            self._loader = None
        with self._lock:
            left = self.scheduler.abort_all()
            self._requests_finished_total += len(left)
        self._deliver(
            [
                (r.request_id, self._final(r, FinishReason.ABORT))
                if r.kind is RequestKind.GENERATE
                else (r.request_id, EngineError("the engine stopped"))
                for r in left
            ]
        )

    def set_tenant_limits(self, limits: dict[str, TenantLimits], default: TenantLimits | None = None) -> None:
        """Per-tenant limits and weights (thread-safe; tenants not named get `default`, else unlimited)."""
        with self._lock:
            self.scheduler.set_tenant_limits(limits, default)

    # ------------------------------------------------------------------ tasks
    def task_names(self) -> list[str]:
        return self.registry.names()

    def task_info(self, task: str) -> TaskInfo:
        """What a client may know of a task (raises UnknownTask)."""
        entry = self.registry.get(task)
        meta = entry.meta
        return TaskInfo(
            name=task,
            kind=meta.kind,
            num_virtual_tokens=entry.num_virtual_tokens,
            serves=kind_of(meta.kind).serves,
            description=meta.description,
            template=meta.template,
            verbaliser=dict(meta.verbaliser),
            labels=list(meta.verbaliser),
            metric=meta.metric,
            max_new_tokens=meta.max_new_tokens,
            score=meta.score,
            stop=list(meta.stop),
        )

    # ------------------------------------------------------------------ requests
    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a completion. Errors (UnknownTask, PromptTooLong, InvalidRequest, QuotaExceeded,
        Overloaded) are raised at the first `__anext__`, before any output; RequestTimeout or
        EngineError (the model failed on this request) may end the stream later.
        Leaving the iteration early (aclose / cancellation) aborts the request."""
        if self._loop is None:
            raise RuntimeError("Engine.start() has not been called")
        entry = self.registry.get(req.task)
        self._check_params(req.params)
        if req.request_id in self._streams:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use")
        # A raw prompt is the client's own input: only the task's own format has an evaluated length.
        cut = None if req.raw else entry.meta.max_input_tokens
        prompt_ids = await self._tokenize_prompt(entry, req.prompt, req.raw, req.params.max_tokens, cut)
        adapter = await self._reads.loaded(entry)  # read on first use (PromptUnavailable: 503)
        sreq = Request(
            req.request_id,
            req.task,
            prompt_ids,
            req.params,
            req.arrival_time,
            self.eos_token_ids,
            adapter,
            tenant=req.tenant,
            # A raw prompt bypasses the task's template, so its answer format is the client's too.
            task_stop=[] if req.raw else list(entry.meta.stop),
        )
        stream = self._submit(sreq)
        done = False
        try:
            while not done:
                item = await stream.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            self._streams.pop(req.request_id, None)
            if not done:
                self.abort(req.request_id)

    async def classify(self, task: str, text: str, raw: bool = False, tenant: str = "") -> ClassifyResult:
        """Label probabilities: softmax over each label's summed verbaliser-token log-probs.

        Queued, admitted and limited like a generation of `tenant` (same errors before it runs)."""
        if self._loop is None:
            raise RuntimeError("Engine.start() has not been called")
        entry = self.registry.get(task)
        if CLASSIFY not in kind_of(entry.meta.kind).serves or not entry.meta.verbaliser:
            raise InvalidRequest(f"task {task!r} is not a classification task", param="model")
        labels = self._labels(entry)
        prompt_ids = await self._tokenize_prompt(entry, text, raw, max(len(v) for v in labels.values()))
        adapter = await self._reads.loaded(entry)
        req = Request(
            f"classify-{uuid.uuid4().hex}",
            task,
            prompt_ids,
            SamplingParams(max_tokens=1),
            time.monotonic(),
            adapter=adapter,
            kind=RequestKind.CLASSIFY,
            continuations=list(labels.values()),
            tenant=tenant,
        )
        stream = self._submit(req)
        scores = None
        try:
            scores = await stream.get()
        finally:
            self._streams.pop(req.request_id, None)
            if scores is None:  # the caller went away
                self.abort(req.request_id)
        if isinstance(scores, BaseException):
            raise scores
        if isinstance(scores, RequestOutput):  # aborted
            raise EngineError("the classification was aborted")
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()
        by_label = dict(zip(labels, probs))
        return ClassifyResult(task, by_label, max(by_label, key=by_label.get), len(prompt_ids))

    def _submit(self, req: Request) -> asyncio.Queue:
        """Queue `req` in the scheduler (raises QuotaExceeded / Overloaded) and open its stream."""
        stream: asyncio.Queue = asyncio.Queue()
        if self.failure is not None:
            raise RankLost(self.failure)
        with self._lock:
            self.scheduler.add(req)
        self._streams[req.request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """End a request now (thread-safe); its stream, if still read, gets a final ABORT output."""
        with self._lock:
            req = self.scheduler.abort(request_id)
            self._requests_finished_total += req is not None
        if req is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._deliver, [(request_id, self._final(req, FinishReason.ABORT))]
            )

    def stats(self) -> EngineStats:
        """Engine gauges and counters, and each tenant's share (`EngineStats.tenants`)."""
        pc, prompts = self.runner.prefix_cache.stats, self.registry.prompt_stats
        with self._lock:  # the scheduler's numbers only: the registry has its own lock
            queued, running = self.scheduler.num_waiting, len(self.scheduler.running)
            tenants = self.scheduler.tenant_stats()
        return EngineStats(
            queue_depth=queued,
            running=running,
            last_batch_size=self.scheduler.last_batch_size,
            tokens_generated_total=self._tokens_generated_total,
            prefill_tokens_total=self.runner.prefill_tokens_total,
            prefix_cache_hits_total=pc.hits,
            prefix_cache_misses_total=pc.misses,
            prefix_cache_evictions_total=pc.evictions,
            prefix_cache_bytes=pc.bytes,
            prompt_cache_hits_total=prompts.hits,
            prompt_cache_misses_total=prompts.misses,
            prompt_cache_evictions_total=prompts.evictions,
            prompt_cache_bytes=prompts.bytes,
            requests_finished_total=self._requests_finished_total,
            requests_failed_total=self._requests_failed_total,
            tasks=len(self.registry),
            tenants=tenants,
            step_seconds=self._step_seconds.copy(),
        )

    # ------------------------------------------------------------------ validation helpers
    def _check_params(self, p: SamplingParams) -> None:
        """`p` against this engine's limits: the API's own check (`check_sampling`), made again here
        for callers that bypass the API."""
        check_sampling(p, self.config.max_new_tokens_limit)

    async def _tokenize_prompt(
        self, entry: IndexedTask, text: str, raw: bool, max_new: int, cut: int | None = None
    ) -> list[int]:
        """Check and tokenise a prompt, off the event loop (a long prompt takes milliseconds)."""
        if not isinstance(text, str):
            raise InvalidRequest("prompt must be a string", param="prompt")
        max_chars = self.config.max_prompt_tokens * MAX_CHARS_PER_TOKEN
        if len(text) > max_chars:  # refused without tokenising
            raise PromptTooLong(
                f"prompt has {len(text)} characters, the limit is {max_chars}", param="prompt"
            )
        return await asyncio.to_thread(self._prompt_ids, entry, text, raw, max_new, cut)

    def _prompt_ids(
        self, entry: IndexedTask, text: str, raw: bool, max_new: int, cut: int | None = None
    ) -> list[int]:
        """The prompt's token ids: rendered with the task's prefix and template (unless `raw`), and
        with `cut` (the task's `max_input_tokens`) only their last `cut`, as evaluation read its
        examples (`tuner.tasks.input_budget.cut_input`); then checked against the limits."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800": not text a tokenizer takes
            raise InvalidRequest("prompt is not valid Unicode", param="prompt") from None
        ids = cut_input(self._tokens.prompt_ids(entry, render_prompt(entry.meta, text, raw), raw), cut)
        if not ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        if len(ids) > self.config.max_prompt_tokens:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens, the limit is {self.config.max_prompt_tokens}", param="prompt"
            )
        total = entry.num_virtual_tokens + len(ids) + max_new
        if total > self.runner.max_positions:
            raise PromptTooLong(
                f"{entry.num_virtual_tokens} prompt-tuning + {len(ids)} prompt + {max_new} new tokens "
                f"exceed the model's context of {self.runner.max_positions}",
                param="prompt",
            )
        return ids

    def _labels(self, entry: IndexedTask) -> dict[str, list[int]]:
        return self._tokens.label_ids(entry)

    def _decode(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            self._run_steps()
        except RankLost as e:  # tensor-parallel only: a rank died or stalled
            self._lose_replica(e)

    def _lose_replica(self, err: RankLost) -> None:
        """End every request with `err` (503), end the other ranks, and say so (`failure`, `failed`)."""
        log.error("tensor-parallel replica failed, ending every request: %s", err.message)
        self.failure = err.message
        with self._lock:
            left = self.scheduler.abort_all()
        self._fail(left, lambda: RankLost(err.message), failure=True)
        self._ranks.stop(failed=True)
        self.failed.set()

    def _run_steps(self) -> None:
        next_reload = time.monotonic() + self.config.reload_interval_s
        while not self._stopping:
            now = time.monotonic()
            if now >= next_reload:
                self._reload()
                next_reload = now + self.config.reload_interval_s
            self._expire(now)  # O(requests) scan: microseconds next to a model step
            with self._lock:
                out = self.scheduler.schedule() if self.scheduler.has_work else SchedulerOutput()
            if out.empty:
                if self.runner.batch is not None or self.runner.partial:  # all left: free their KV
                    self.runner.reset()
                elif self._ranks is not None:
                    self._ranks.idle()  # the other ranks wait for a plan: prove rank 0 alive
                self._wake.wait(timeout=min(0.25, self.config.reload_interval_s))
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                result = self.runner.step(out)
                self._step_seconds.observe(time.perf_counter() - started)  # engine thread only
            except RankLost:
                raise
            except Exception:  # not a forward (the runner isolates those): a bug; the batch is suspect
                log.exception("engine step failed")
                self.runner.reset()
                with self._lock:
                    failed = [r for r in (*out.prefill, *out.decode) if self.scheduler.abort(r.request_id)]
                self._fail(failed, lambda: EngineError(STEP_FAILED), failure=True)
                continue
            self._finish_step(out, result)

    def _finish_step(self, out: SchedulerOutput, result: StepResult) -> None:
        """Scheduler bookkeeping under the lock, then the output path (text, stop strings) outside it."""
        with self._lock:
            failed = [req for rid in result.failed if (req := self.scheduler.abort(rid)) is not None]
            updates = self.scheduler.update(out, result.tokens)
        items: list[tuple[str, object]] = [
            (r.request_id, result.scores[r.request_id])
            for r in out.prefill
            if r.kind is RequestKind.CLASSIFY and r.finish_reason is FinishReason.STOP
        ]
        outputs, stopped = [], []
        for u in updates:
            try:
                o = to_output(u, self._decode)
            except Exception as e:  # e.g. the tokenizer cannot decode this request's ids: it alone fails
                log.warning("detokenising a request failed (%s): %s", type(e).__name__, str(e)[:300])
                failed.append(u.request)
                continue
            outputs.append(o)
            if o.finished and u.finish_reason is None:
                stopped.append(o.request_id)  # a stop string
        with self._lock:
            for req in failed:
                self.scheduler.abort(req.request_id)  # no-op for those the runner reported
            for rid in stopped:  # leaves before the next schedule
                self.scheduler.finish(rid, FinishReason.STOP)
            self._tokens_generated_total += len(updates)
            self._requests_finished_total += sum(o.finished for o in outputs) + len(items)
        self._fail(failed, lambda: EngineError(STEP_FAILED), failure=True)
        self._deliver_threadsafe(items + [(o.request_id, o) for o in outputs])

    def _reload(self) -> None:
        """On the engine thread (the prefix KV cache is its own): free the prompt KV of the tasks the
        prompt-store loader changed or removed since the last call. Never reads the store."""
        with self._reloaded_lock:
            stale, self._reloaded = self._reloaded, set()
        for name in stale:
            (self._ranks or self.runner.prefix_cache).invalidate(name)

    def _load_store(self, stop: threading.Event) -> None:
        """The prompt-store loader thread: `_refresh_store` every `reload_interval_s` until `stop`."""
        while not stop.wait(self.config.reload_interval_s):
            self._refresh_store()

    def _refresh_store(self) -> None:
        """Rescan the store and load what changed (the registry swaps in checked tasks only), then
        tokenise the new versions' prefixes and hand the stale names to the engine thread."""
        try:
            changes = self.registry.refresh()
        except Exception as e:  # e.g. the store became unreadable: keep serving what is loaded
            log.warning("prompt registry refresh failed (%s): %s", type(e).__name__, str(e)[:300])
            return
        stale = {*changes.changed, *changes.removed}
        self._tokens.forget(stale)
        with self._reloaded_lock:
            self._reloaded |= stale
        for name in changes.changed:  # a task in use: first uses tokenise (warming 100,000 would not pay)
            try:
                self._tokens.warm(self.registry.get(name))
            except UnknownTask:
                pass  # removed by a refresh since
            except Exception as e:  # the tokenizer fails on its text: its requests will say so
                log.warning("tokenising task %s failed (%s): %s", name, type(e).__name__, str(e)[:300])

    def _expire(self, now: float) -> None:
        timeout = self.config.request_timeout_s
        with self._lock:
            expired = self.scheduler.expire(now - timeout)
        self._fail(expired, lambda: RequestTimeout(f"request timed out after {timeout:g}s"))

    def _fail(self, reqs: list[Request], error: Callable[[], Exception], failure: bool = False) -> None:
        """End already-aborted requests by raising `error()` from their streams."""
        with self._lock:
            self._requests_finished_total += len(reqs)
            self._requests_failed_total += len(reqs) if failure else 0
        self._deliver_threadsafe([(r.request_id, error()) for r in reqs])

    def _deliver_threadsafe(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    @staticmethod
    def _final(req: Request, reason: FinishReason) -> RequestOutput:
        return RequestOutput(
            req.request_id, req.task, "", [], True, reason, len(req.prompt_ids), req.num_output_tokens
        )


def render_prompt(meta: TaskMeta | dict, text: str, raw: bool = False) -> str:
    """The model input for a request's `text` under a task's metadata (`raw`: `text` unchanged).

    `TaskMeta.render` fills the task's template with the function training rendered rows with, so
    served and trained inputs cannot drift apart; a request that cannot fill the template is an
    `InvalidRequest` (400). A dict is read as the content of a `promptfleet_task.json`.
    """
    meta = meta if isinstance(meta, TaskMeta) else TaskMeta.from_dict(meta)
    try:
        return meta.render(text, raw)
    except ValueError as e:
        raise InvalidRequest(str(e), param="prompt") from None


def text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """`text -> token ids` (no special tokens), for requests tokenized on the event loop thread.

    A fast tokenizer's `encode_batch` releases the GIL while it runs; its `encode` (what
    `tokenizer(text)` calls) holds it, so a long prompt (~5 ms for 1,500 tokens here) would stall the
    engine thread, which needs the GIL between every two torch ops. Same ids either way.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return lambda text: backend.encode_batch([text], add_special_tokens=False)[0].ids
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids
