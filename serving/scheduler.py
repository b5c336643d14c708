"""Iteration-level continuous batching across all tasks and tenants (pure Python, no torch).

Every request, generation or classification (`RequestKind`), enters through `add()`: one admission
path, one queue limit, one per-step token budget. `add()` refuses at once a request over its
tenant's limits (`TenantLimits`: concurrent requests, tokens per rolling minute) with `QuotaExceeded`
and a Retry-After for that tenant, and any request when the waiting queue is full (`Overloaded`).
Each tenant has its own queue; `schedule()` admits across tenants by weighted round-robin (stride
scheduling: the backlogged tenant that has been served least, per unit of weight, goes next), so a
tenant with a deep backlog delays nobody else's admission beyond its share. Once tenants are named
(`set_tenant_limits`), each may also hold only its weighted share of the waiting queue, so one
tenant's flood ends in its own 429s, not in `Overloaded` for the others.

`schedule()` returns a `SchedulerOutput`: the running generations to decode one token each, and the
admitted requests to prefill this step (a classification is scored in its prefill and leaves). After
the model step the engine hands the sampled token ids to `update()`, which appends them and applies
the token-level stop rules (EOS, max_tokens); detokenising and stop strings are the engine's output
path, which calls `finish()` when a stop string matched. Finished requests leave at once, so the
next `schedule()` no longer lists them and the runner drops their rows.

The scheduler is not thread-safe (the engine serialises calls with a lock) and knows nothing of
tensors, KV memory, text or HTTP. Shaped after vLLM's `vllm/v1/core/sched/` (GPU-free tests).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from serving.types import (
    FinishReason,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    SamplingParams,
    TenantLimits,
    TenantStats,
)

if TYPE_CHECKING:  # the engine's state on a request; the scheduler never reads it
    from serving.detokenizer import IncrementalText
    from serving.registry import TaskEntry

RATE_WINDOW_S = 60.0  # `TenantLimits.tokens_per_minute` counts tokens admitted in this rolling window


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class RequestKind(str, Enum):
    GENERATE = "generate"  # prefill, then one token per step until a stop rule
    CLASSIFY = "classify"  # one prefill that scores `continuations`, then done


@dataclass
class Request:
    """One request's state from admission to its last token."""

    request_id: str
    task: str
    prompt_ids: list[int]  # text tokens (the task's virtual tokens are not counted here)
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    adapter: TaskEntry | None = None  # the task's prompt, for the runner; the scheduler never reads it
    kind: RequestKind = RequestKind.GENERATE
    continuations: list[list[int]] = field(default_factory=list)  # CLASSIFY: token ids to score
    tenant: str = ""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    output_ids: list[int] = field(default_factory=list)
    output: IncrementalText | None = None  # the output path's detokeniser; the scheduler never reads it
    task_stop: list[str] = field(default_factory=list)  # the task's stop strings, for the output path
    charge: list[float] | None = None  # [time, tokens]: this request's entry in its tenant's rate window

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def prefill_tokens(self) -> int:
        """Tokens its prefill computes (a classification: one row per distinct continuation prefix)."""
        if self.kind is RequestKind.GENERATE:
            return len(self.prompt_ids)
        prefixes = {tuple(c[:-1]) for c in self.continuations if c}
        return sum(len(self.prompt_ids) + len(p) for p in prefixes)

    @property
    def max_tokens(self) -> int:
        """The most tokens it can use: what its tenant's token rate is charged at admission."""
        if self.kind is RequestKind.GENERATE:
            return len(self.prompt_ids) + self.params.max_tokens
        return self.prefill_tokens


@dataclass
class TokenUpdate:
    """A generation request's token from one step, and the stop rule it met (if any)."""

    request: Request
    token: int
    finish_reason: FinishReason | None = None


@dataclass
class SchedulerOutput:
    """What the runner does this step."""

    prefill: list[Request] = field(default_factory=list)  # newly admitted: prompt -> first token / scores
    decode: list[Request] = field(default_factory=list)  # running generations: one more token each

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass
class SchedulerConfig:
    max_batch_size: int = 32  # running requests decoded together in one forward
    max_queue: int = 256  # waiting requests before `add` raises Overloaded
    max_step_tokens: int = 4096  # prefill + decode tokens per step (one long prompt may exceed it alone)


@dataclass
class _Tenant:
    limits: TenantLimits
    queue: deque[Request] = field(default_factory=deque)  # may hold aborted requests, skipped lazily
    queued: int = 0
    active: int = 0  # queued + running
    window: deque[list[float]] = field(default_factory=deque)  # [time, tokens] charges, oldest first
    pass_: float = 0.0  # stride scheduling: admissions so far / weight
    stats: TenantStats = field(default_factory=TenantStats)


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self.running: dict[str, Request] = {}  # generations; insertion order = admission order
        self._requests: dict[str, Request] = {}  # waiting + running + in this step's prefill, for abort
        self._tenants: dict[str, _Tenant] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._default = TenantLimits()
        self._vtime = 0.0  # pass of the latest admission: where a newly backlogged tenant starts
        self.num_waiting = 0
        self.last_batch_size = 0

    # ------------------------------------------------------------------ tenants
    def set_tenant_limits(self, limits: dict[str, TenantLimits], default: TenantLimits | None = None) -> None:
        """Per-tenant limits (tenants not named get `default`: unlimited, weight 1, when None)."""
        self._limits, self._default = dict(limits), default or TenantLimits()
        for name, t in self._tenants.items():
            t.limits = self._limits.get(name, self._default)

    def tenant_stats(self) -> dict[str, TenantStats]:
        now = self._clock()
        out = {}
        for name, t in self._tenants.items():
            out[name] = TenantStats(**vars(t.stats))
            out[name].queued, out[name].tokens_last_minute = t.queued, int(self._window_tokens(t, now))
        return out

    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(self._limits.get(name, self._default))
        return t

    @staticmethod
    def _window_tokens(t: _Tenant, now: float) -> float:
        while t.window and t.window[0][0] <= now - RATE_WINDOW_S:
            t.window.popleft()
        return sum(tokens for _, tokens in t.window)

    def _queue_share(self, t: _Tenant) -> int | None:
        """The waiting requests `t` may hold: its weighted share of the queue, when tenants are named
        (unnamed tenants share the default's weight), so no tenant can fill the queue for the others."""
        if not self._limits:
            return None
        total = sum(lim.weight for lim in self._limits.values()) + self._default.weight
        return max(1, int(self.config.max_queue * t.limits.weight / total))

    def _check_quota(self, t: _Tenant, req: Request, now: float) -> None:
        limits = t.limits
        retry = max(1.0, t.queued / max(1, self.config.max_batch_size))  # its own backlog's turnover
        if limits.max_concurrent and t.active >= limits.max_concurrent:
            raise QuotaExceeded(
                f"tenant limit: {limits.max_concurrent} concurrent requests", retry_after=retry
            )
        share = self._queue_share(t)
        if share is not None and t.queued >= share:
            raise QuotaExceeded(f"tenant limit: {share} waiting requests", retry_after=retry)
        rate = limits.tokens_per_minute
        if not rate:
            return
        if req.max_tokens > rate:
            raise InvalidRequest(
                f"the request may use {req.max_tokens} tokens, more than the tenant's {rate} per minute"
            )
        used = self._window_tokens(t, now)
        if used + req.max_tokens > rate:
            freed, wait = 0.0, RATE_WINDOW_S
            for at, tokens in t.window:  # the wait until enough of the oldest charges leave the window
                freed += tokens
                if used - freed + req.max_tokens <= rate:
                    wait = at + RATE_WINDOW_S - now
                    break
            raise QuotaExceeded(f"tenant limit: {rate} tokens per minute", retry_after=max(1.0, wait))

    # ------------------------------------------------------------------ admission
    def add(self, req: Request) -> None:
        """Queue a request; raises `QuotaExceeded` (its tenant is over a limit) or `Overloaded`."""
        if req.request_id in self._requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use")
        now = self._clock()
        t = self._tenant(req.tenant)
        try:
            self._check_quota(t, req, now)
        except QuotaExceeded:
            t.stats.rejected_total += 1
            raise
        if self.num_waiting >= self.config.max_queue:
            raise Overloaded(
                f"server busy: {self.num_waiting} requests waiting", retry_after=self.retry_after()
            )
        req.status, req.finish_reason, req.output_ids, req.output = RequestStatus.WAITING, None, [], None
        if not t.queued:  # newly backlogged: no credit for the time it was idle
            t.pass_ = max(t.pass_, self._vtime)
        t.queue.append(req)
        t.queued += 1
        t.active += 1
        req.charge = [now, float(req.max_tokens)]
        t.window.append(req.charge)
        self.num_waiting += 1
        self._requests[req.request_id] = req

    def retry_after(self) -> float:
        """A rough wait (seconds) before a rejected client should retry: one batch turnover."""
        return max(1.0, self.num_waiting / max(1, self.config.max_batch_size))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        """Finish a waiting or running request now; unknown/finished ids are ignored."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        # A waiting request stays in its tenant's deque, marked finished; `schedule` skips it (O(1) abort).
        self._release(req, reason)
        return req

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """End a running request for a reason found on the output path (a stop string)."""
        self.abort(request_id, reason)

    def abort_all(self) -> list[Request]:
        """Finish every waiting and running request (engine shutdown)."""
        return [self.abort(rid) for rid in list(self._requests)]

    def expire(self, deadline: float) -> list[Request]:
        """Abort every request that arrived before `deadline` (a monotonic time)."""
        old = [r for r in self._requests.values() if r.arrival_time < deadline]
        return [self.abort(r.request_id) for r in old]

    def _release(self, req: Request, reason: FinishReason) -> None:
        t = self._tenant(req.tenant)
        if req.status is RequestStatus.WAITING:
            self.num_waiting -= 1
            t.queued -= 1
            req.charge[1] = 0.0  # never ran: nothing used
        else:
            t.stats.running -= 1
            req.charge[1] = float(req.prefill_tokens + req.num_output_tokens)  # settle to what it used
        t.active -= 1
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        self.running.pop(req.request_id, None)
        del self._requests[req.request_id]

    # ------------------------------------------------------------------ stepping
    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    def _next(self, batch_full: bool) -> _Tenant | None:
        """The backlogged tenant to admit from next (least pass; with a full batch, only classifications)."""
        best = None
        for t in self._tenants.values():
            while t.queue and t.queue[0].status is RequestStatus.FINISHED:  # aborted while waiting
                t.queue.popleft()
            if not t.queue or (batch_full and t.queue[0].kind is RequestKind.GENERATE):
                continue
            if best is None or t.pass_ < best.pass_:
                best = t
        return best

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decode=list(self.running.values()))
        budget = self.config.max_step_tokens - len(out.decode)
        while (t := self._next(len(self.running) >= self.config.max_batch_size)) is not None:
            req = t.queue[0]
            if req.prefill_tokens > budget and (out.prefill or out.decode):
                break  # wait for a step with room; an idle engine always admits one
            t.queue.popleft()
            budget -= req.prefill_tokens
            t.queued -= 1
            self.num_waiting -= 1
            t.pass_ += 1.0 / max(t.limits.weight, 1e-6)
            self._vtime = t.pass_
            t.stats.running += 1
            t.stats.admitted_total += 1
            t.stats.admitted_tokens_total += req.max_tokens
            req.status = RequestStatus.RUNNING
            if req.kind is RequestKind.GENERATE:
                self.running[req.request_id] = req
            out.prefill.append(req)
        self.last_batch_size = len(out.prefill) + len(out.decode)
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[TokenUpdate]:
        """Append each generation's sampled token and apply EOS / max_tokens; classifications of this
        step are done. Returns the generations' updates (finished ones have left)."""
        results = []
        for req in (*out.prefill, *out.decode):
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted during the model step
            if req.kind is RequestKind.CLASSIFY:
                self._release(req, FinishReason.STOP)
                continue
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_ids.append(token)
            reason = None
            if token in req.eos_token_ids:
                reason = FinishReason.STOP
            elif len(req.output_ids) >= req.params.max_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._release(req, reason)
            results.append(TokenUpdate(req, token, reason))
        return results
