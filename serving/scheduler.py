"""Iteration-level continuous batching across all tasks and tenants, shared fairly (pure Python, no torch).

Every request, generation or classification (`RequestKind`), enters through `add()`: one admission
path, one queue limit, one per-step token budget. `add()` refuses at once a request over its
tenant's limits (`TenantLimits`: concurrent requests, tokens per rolling minute) with `QuotaExceeded`
and a Retry-After for that tenant, and any request when the waiting queue is full (`Overloaded`).
Once tenants are named (`set_tenant_limits`), each may also hold only its weighted share of the
waiting queue, so one tenant's flood ends in its own 429s, not in `Overloaded` for the others.

Each engine step is shared between the tenants that have work (running or waiting), by weight:
* Batch slots. Each tenant's fair share of `max_batch_size` is its weighted water-filling share
  (`water_fill`: a tenant that needs less leaves the rest to the others, so one tenant alone gets
  the whole batch). When the batch is full and a tenant with a waiting generation holds less than
  its share, the running generation of the tenant furthest above its share that is cheapest to
  recompute is preempted: it goes back to the head of its tenant's queue and later re-runs its
  prompt and the tokens it already produced as one prefill (recompute, as vLLM V1 does). Its KV is
  not kept: preemption exists to free a row of the batch, and the rows picked are the shortest, so
  the recompute is a small, chunked prefill; its sampler (`Request.sampler`) and output are kept.
* Prefill tokens. The step's token budget (`max_step_tokens`), after one token per decoding row,
  is water-filled between the tenants with waiting work; each spends its allotment on its own queue
  in order. A tenant with more prefill waiting than `flood_steps` (4) whole steps is flooding: while
  another tenant has work (or had some in the last `shared_hold_s` seconds), the flooding tenants
  share `shared_step_tokens` of each step, so a flood of long prompts advances in short steps, while
  a busy tenant whose prompts take a few steps (a burst of short requests) has them computed whole.
  No step exceeds `max_step_tokens`: that bounds what one tenant's work costs another's steps.
  Except while no row decodes and one tenant alone has had work for `alone_after_s` (30 s): then a
  step may take up to `alone_step_tokens` (larger matrix multiplies cost less per token on a CPU); a
  tenant that arrives then waits for that step first, and the next step is shared.
  A prompt longer than what is left is chunked (`SchedulerOutput.chunks`): the runner keeps its
  partial KV and the request stays at the head of its queue, so one request's prefill cannot hold a
  step. All but its last prompt token may go in chunks; the step that completes it computes the
  rest and its first token (or its scores).
Within a step the order of admission is: tenants below their slot share first, then the one served
least per unit of weight (tokens scheduled / weight, a virtual token counter as in VTC, Sheng et
al. 2024; a newly backlogged tenant starts at the current virtual time, without credit for idling).

`schedule()` returns a `SchedulerOutput` (decode rows, completing prefills, chunks, preempted rows);
after the model step `update()` appends the sampled tokens and applies EOS / max_tokens (stop strings
are the engine's output path, which calls `finish()`). Each request records the engine steps it
waited before it was first scheduled (`TenantStats.queue_wait_steps`, the step in flight counts).

Not thread-safe (the engine serialises calls with a lock); knows nothing of tensors, text or HTTP.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from serving.fairness import SchedulerConfig, step_tokens, water_fill
from serving.types import (
    WAIT_STEP_BUCKETS,
    FinishReason,
    Histogram,
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
    sampler: object | None = (
        None  # the runner's sampler, kept across preemption; the scheduler never reads it
    )
    num_computed: int = 0  # tokens of `prefill_ids` whose KV the runner holds from earlier chunks
    arrival_step: int = 0  # the scheduler's step count when it was added
    wait_steps: int | None = None  # steps it waited before it was first scheduled
    preemptions: int = 0
    admitted: bool = False  # its prefill has completed once (it may have been preempted since)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def prefill_ids(self) -> list[int]:
        """What its prefill runs: the prompt, and for a preempted generation the tokens it had produced."""
        return self.prompt_ids + self.output_ids if self.kind is RequestKind.GENERATE else self.prompt_ids

    @property
    def prefill_tokens(self) -> int:
        """Tokens its first prefill computes (a classification: one row per distinct continuation prefix)."""
        return self._rows_cost(len(self.prompt_ids))

    @property
    def completion_cost(self) -> int:
        """Tokens the step that completes its prefill computes (after its chunks so far)."""
        return self._rows_cost(len(self.prefill_ids) - self.num_computed)

    @property
    def chunkable(self) -> int:
        """Tokens it may still compute in chunks: all but the last one of `prefill_ids` (the
        completing step reads that token's logits)."""
        return max(0, len(self.prefill_ids) - 1 - self.num_computed)

    def _rows_cost(self, rest: int) -> int:
        if self.kind is RequestKind.GENERATE:
            return rest
        prefixes = {tuple(c[:-1]) for c in self.continuations if c}
        return sum(rest + len(p) for p in prefixes)

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

    prefill: list[Request] = field(default_factory=list)  # prefill completes: first token / scores
    decode: list[Request] = field(default_factory=list)  # running generations: one more token each
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens) of a longer prefill
    preempted: list[Request] = field(default_factory=list)  # left the batch to wait (rows to drop)
    partial: frozenset[str] = frozenset()  # requests whose partial KV the runner keeps after this step

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode and not self.chunks


@dataclass
class _Tenant:
    limits: TenantLimits
    queue: deque[Request] = field(default_factory=deque)  # may hold aborted requests, skipped lazily
    queued: int = 0
    active: int = 0  # queued + running
    held: int = 0  # batch slots: running generations + generations with a partial prefill
    window: deque[list[float]] = field(default_factory=deque)  # [time, tokens] charges, oldest first
    pass_: float = 0.0  # virtual token counter: tokens scheduled / weight
    last_active: float = float("-inf")  # clock time it last had work (running or waiting)
    stats: TenantStats = field(default_factory=TenantStats)

    @property
    def weight(self) -> float:
        """Its weight from the tenants file, kept above 0 (it divides)."""
        return max(self.limits.weight, 1e-6)

    def head(self) -> Request | None:
        while self.queue and self.queue[0].status is RequestStatus.FINISHED:  # aborted while waiting
            self.queue.popleft()
        return self.queue[0] if self.queue else None


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self.running: dict[str, Request] = {}  # decoding generations; insertion order = admission order
        self._partial: dict[str, Request] = {}  # waiting, with chunks computed (the runner holds their KV)
        self._requests: dict[str, Request] = {}  # waiting + running + in this step's prefill, for abort
        self._tenants: dict[str, _Tenant] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._default = TenantLimits()
        self._vtime = 0.0  # virtual time: where a newly backlogged tenant's counter starts
        self.num_waiting = 0
        self.last_batch_size = 0
        self.steps = 0  # schedule() calls so far

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
            out[name] = TenantStats(**{**vars(t.stats), "queue_wait_steps": t.stats.queue_wait_steps.copy()})
            out[name].queued, out[name].tokens_last_minute = t.queued, int(self._window_tokens(t, now))
        return out

    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(self._limits.get(name, self._default))
            t.stats.queue_wait_steps = Histogram(WAIT_STEP_BUCKETS)
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
        req.num_computed, req.wait_steps, req.arrival_step, req.admitted = 0, None, self.steps, False
        self._enqueue(t, req)
        t.active += 1
        req.charge = [now, float(req.max_tokens)]
        t.window.append(req.charge)
        self._requests[req.request_id] = req

    def _enqueue(self, t: _Tenant, req: Request, front: bool = False) -> None:
        if t.head() is None:  # newly backlogged: no credit for the time it was idle
            t.pass_ = max(t.pass_, self._vtime)
        t.queue.appendleft(req) if front else t.queue.append(req)
        t.queued += 1
        self.num_waiting += 1

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
        used = req.prefill_tokens + req.num_output_tokens if req.admitted else req.num_computed
        if req.status is RequestStatus.WAITING:
            self.num_waiting -= 1
            t.queued -= 1
        else:
            t.stats.running -= 1
        if req.request_id in self.running or (
            req.request_id in self._partial and req.kind is RequestKind.GENERATE
        ):
            t.held -= 1
        req.charge[1] = float(used)  # settle to what it used
        t.active -= 1
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        self.running.pop(req.request_id, None)
        self._partial.pop(req.request_id, None)
        del self._requests[req.request_id]

    # ------------------------------------------------------------------ stepping
    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    def schedule(self) -> SchedulerOutput:
        self.steps += 1
        out = SchedulerOutput()
        active = {n: t for n, t in self._tenants.items() if t.held or t.head() is not None}
        wanted = {n: self._slots_wanted(t) for n, t in active.items()}  # one scan of each queue
        slot_share = self._slot_shares(active, wanted)
        self._preempt(active, slot_share, wanted, out)
        out.decode = list(self.running.values())
        for req in out.decode:
            t = self._tenant(req.tenant)
            t.pass_ += 1.0 / t.weight
        shared = self._shared(active)
        last_active = (t.last_active for t in self._tenants.values())
        budget = max(
            0, step_tokens(self.config, bool(out.decode), last_active, self._clock()) - len(out.decode)
        )
        allot, caps = self._allot(active, budget, shared=shared)
        given = dict(allot)
        budget = self._admit(active, slot_share, allot, budget, out)
        if budget > 0:  # what the fair pass left (a head too big for its allotment): anyone may use it
            spare = {n: caps[n] - (given[n] - allot[n]) if n in caps else budget for n in active}
            self._admit(active, slot_share, spare, budget, out)
        out.partial = frozenset(self._partial)
        self.last_batch_size = len(out.prefill) + len(out.decode) + len(out.chunks)
        return out

    # ------------------------------------------------------------------ sharing one step
    def _shared(self, active: dict[str, _Tenant]) -> bool:
        """More than one tenant has had work within `shared_hold_s` (one between two requests still shares)."""
        now = self._clock()
        for t in active.values():
            t.last_active = now
        recent = [t for t in self._tenants.values() if now - t.last_active <= self.config.shared_hold_s]
        return len(recent) > 1

    def _slots_used(self) -> int:
        return sum(t.held for t in self._tenants.values())

    def _slots_wanted(self, t: _Tenant) -> int:
        """Waiting generations of `t` that would need a batch slot."""
        waiting = (
            r for r in t.queue if r.status is RequestStatus.WAITING and r.request_id not in self._partial
        )
        return sum(r.kind is RequestKind.GENERATE for r in waiting)

    def _slot_shares(self, active: dict[str, _Tenant], wanted: dict[str, int]) -> dict[str, float]:
        demand = {n: float(t.held + wanted[n]) for n, t in active.items()}
        weight = {n: t.weight for n, t in active.items()}
        return water_fill(self.config.max_batch_size, demand, weight)

    def _preempt(
        self,
        active: dict[str, _Tenant],
        share: dict[str, float],
        waiting: dict[str, int],
        out: SchedulerOutput,
    ) -> None:
        """Free batch slots for the tenants below their share that wait for one, from the tenants
        furthest above theirs (each keeps at least its share)."""
        free = self.config.max_batch_size - self._slots_used()
        for name, t in sorted(active.items(), key=lambda kv: kv[1].held / kv[1].weight):
            wanted = min(waiting[name], int(share[name] + 1e-9) - t.held)
            take = min(max(free, 0), max(wanted, 0))
            free, wanted = free - take, wanted - take
            while wanted > 0:
                victim = self._victim(active, share, name)
                if victim is None:
                    return
                self._preempt_one(victim, out)
                wanted -= 1

    def _victim(
        self, active: dict[str, _Tenant], share: dict[str, float], beneficiary: str
    ) -> Request | None:
        """The cheapest-to-recompute generation of the tenant furthest above its share (which stays
        at or above its share without it), or None."""
        over = [
            (t.held - share[n], n)
            for n, t in active.items()
            if n != beneficiary and t.held - 1 >= share[n] - 1e-9 and t.held > 0
        ]
        if not over:
            return None
        tenant = max(over)[1]
        candidates = [
            r
            for r in (*self.running.values(), *self._partial.values())
            if r.tenant == tenant and r.kind is RequestKind.GENERATE
        ]
        # The shortest row loses least work; among equals, the latest admitted.
        return min(
            reversed(candidates),
            key=lambda r: len(r.prefill_ids) if r.status is RequestStatus.RUNNING else r.num_computed,
        )

    def _preempt_one(self, req: Request, out: SchedulerOutput) -> None:
        t = self._tenant(req.tenant)
        t.held -= 1
        if self.running.pop(req.request_id, None) is not None:
            t.stats.running -= 1
            req.status = RequestStatus.WAITING
            self._enqueue(t, req, front=True)  # first of its tenant when a slot is free again
        else:  # a partial prefill: it keeps its place in the queue, not its chunks
            del self._partial[req.request_id]
        req.num_computed = 0
        req.preemptions += 1
        t.stats.preemptions_total += 1
        out.preempted.append(req)

    def _allot(
        self, active: dict[str, _Tenant], budget: int, shared: bool
    ) -> tuple[dict[str, float], dict[str, float]]:
        """The step's prefill tokens, water-filled between the tenants with waiting work, and the caps
        of the flooding tenants: while the engine is shared, the tenants with more prefill waiting than
        `flood_steps` whole steps hold share `shared_step_tokens` between them (by weight), so their
        floods advance in short steps; every other tenant's prompts go in whole (within the budget)."""
        full = self.config.flood_steps * self.config.max_step_tokens
        demand, flooding = {}, {}
        for name, t in active.items():
            need = 0
            for r in t.queue:
                if need > full:
                    break
                if r.status is RequestStatus.WAITING:
                    need += r.completion_cost
            demand[name] = float(min(need, budget))
            if need > full:
                flooding[name] = float(need)
        weight = {n: t.weight for n, t in active.items()}
        caps: dict[str, float] = {}
        if flooding and shared and self.config.shared_step_tokens:
            caps = water_fill(min(self.config.shared_step_tokens, budget), flooding, weight)
            demand.update(caps)
        return water_fill(budget, demand, weight), caps

    def _plan(self, req: Request, left: float, slots: int, idle: bool) -> tuple[int, bool] | None:
        """(tokens, completes) of `req` this step within `left` tokens, or None if it must wait."""
        if req.kind is RequestKind.GENERATE and req.request_id not in self._partial and slots <= 0:
            return None
        cost = req.completion_cost
        if cost <= left:
            return cost, True
        chunk = int(min(left, req.chunkable))
        if chunk > 0 and chunk >= min(self.config.min_chunk_tokens, req.chunkable):
            return chunk, False
        if idle:  # an idle engine always admits one request, however large
            return cost, True
        return None

    def _admit(
        self,
        active: dict[str, _Tenant],
        share: dict[str, float],
        allot: dict[str, float],
        budget: int,
        out: SchedulerOutput,
    ) -> int:
        """Admit (or chunk) queue heads within each tenant's allotment: tenants below their slot share
        first, then the least served per weight. Returns the budget left."""
        slots = self.config.max_batch_size - self._slots_used()
        chunked = {r.request_id for r, _ in out.chunks}  # at most one chunk per request per step
        while True:
            best, best_key = None, None
            for name, t in active.items():
                head = t.head()
                if head is None or head.request_id in chunked or allot[name] < 1:
                    continue
                plan = self._plan(head, min(allot[name], budget), slots, idle=out.empty)
                key = (t.held >= share[name], t.pass_)
                if plan is not None and (best_key is None or key < best_key):
                    best, best_key = (name, t, head, plan), key
            if best is None:
                return budget
            name, t, req, (tokens, completes) = best
            slots -= self._take(t, req, tokens, completes, out)
            if not completes:
                chunked.add(req.request_id)
            allot[name] -= tokens
            budget -= tokens
            t.pass_ += tokens / t.weight
            self._vtime = t.pass_

    def _take(self, t: _Tenant, req: Request, tokens: int, completes: bool, out: SchedulerOutput) -> int:
        """Schedule `tokens` of `req`'s prefill (all of it when `completes`); returns the slots it took."""
        if req.wait_steps is None:
            req.wait_steps = self.steps - req.arrival_step
            t.stats.queue_wait_steps.observe(req.wait_steps)
        new_slot = req.kind is RequestKind.GENERATE and req.request_id not in self._partial
        t.held += new_slot
        if not completes:
            self._partial[req.request_id] = req
            out.chunks.append((req, tokens))
            return int(new_slot)
        t.queue.popleft()
        t.queued -= 1
        self.num_waiting -= 1
        self._partial.pop(req.request_id, None)
        t.stats.running += 1
        if not req.admitted:
            req.admitted = True
            t.stats.admitted_total += 1
            t.stats.admitted_tokens_total += req.max_tokens
        req.status = RequestStatus.RUNNING
        if req.kind is RequestKind.GENERATE:
            self.running[req.request_id] = req
        out.prefill.append(req)
        return int(new_slot)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[TokenUpdate]:
        """Count each chunk computed, append each generation's sampled token and apply EOS /
        max_tokens; classifications of this step are done. Returns the generations' updates
        (finished ones have left)."""
        for req, tokens in out.chunks:
            if req.request_id in self._partial:  # not aborted or preempted meanwhile
                req.num_computed += tokens
        results = []
        for req in out.prefill:
            req.num_computed = 0  # its KV is in the running batch now (or it is done)
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
