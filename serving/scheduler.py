"""Iteration-level continuous batching across all tasks (pure Python, no torch).

Every engine step calls `schedule()`, which returns a `SchedulerOutput`: the running requests to
decode one token each, and the waiting requests to admit (prefill) this step, chosen FIFO within a
batch-size and per-step token budget. Requests of different tasks share a step freely: the task is
just a per-request attribute the runner uses to pick the soft prompt. After the model step the
engine hands the sampled token ids to `update()`, which appends them, applies the stop rules (EOS,
stop strings, max_tokens) and returns the `RequestOutput` increments; finished requests leave the
running set at once, so the next `schedule()` no longer lists them and the runner drops their rows.

The scheduler is not thread-safe (the engine serialises calls with a lock) and knows nothing of
tensors, KV memory or HTTP. The waiting queue is bounded: `add()` raises `Overloaded` when full.
Shaped after vLLM's `vllm/v1/core/sched/` (scheduler, output dataclass, GPU-free tests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from serving.detokenizer import Decode, IncrementalText
from serving.types import FinishReason, InvalidRequest, Overloaded, RequestOutput, SamplingParams


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One request's state from admission to its last token."""

    request_id: str
    task: str
    prompt_ids: list[int]  # text tokens (the task's virtual tokens are not counted here)
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    adapter: Any = None  # the engine's handle on the task prompt; the scheduler never reads it
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    output: IncrementalText | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output.ids) if self.output else 0


@dataclass
class SchedulerOutput:
    """What the runner does this step."""

    prefill: list[Request] = field(default_factory=list)  # newly admitted: prompt -> first token
    decode: list[Request] = field(default_factory=list)  # running: one more token each

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(r.prompt_ids) for r in self.prefill)


@dataclass
class SchedulerConfig:
    max_batch_size: int = 32  # running requests decoded together in one forward
    max_queue: int = 256  # waiting requests before `add` raises Overloaded
    max_step_tokens: int = 4096  # prefill + decode tokens per step (one long prompt may exceed it alone)


class Scheduler:
    def __init__(self, config: SchedulerConfig, decode: Decode):
        self.config = config
        self._decode = decode
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # insertion order = admission order
        self._requests: dict[str, Request] = {}  # waiting + running, for abort
        self.last_batch_size = 0

    # ------------------------------------------------------------------ admission
    def add(self, req: Request) -> None:
        """Queue a request; raises `Overloaded` when the waiting queue is full."""
        if self.num_waiting >= self.config.max_queue:
            raise Overloaded(
                f"server busy: {self.num_waiting} requests waiting", retry_after=self.retry_after()
            )
        if req.request_id in self._requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.WAITING
        req.output = IncrementalText(self._decode, list(req.params.stop))
        self.waiting.append(req)
        self._requests[req.request_id] = req

    def retry_after(self) -> float:
        """A rough wait (seconds) before a rejected client should retry: one batch turnover."""
        return max(1.0, self.num_waiting / max(1, self.config.max_batch_size))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        """Finish a waiting or running request now; unknown/finished ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        # A waiting request stays in the deque, marked finished; `schedule` skips it (O(1) abort).
        self.running.pop(request_id, None)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        return req

    def abort_all(self) -> list[Request]:
        """Finish every waiting and running request (engine shutdown or a failed model step)."""
        return [self.abort(rid) for rid in list(self._requests)]

    def expire(self, deadline: float) -> list[Request]:
        """Abort every request that arrived before `deadline` (a monotonic time)."""
        old = [r for r in self._requests.values() if r.arrival_time < deadline]
        return [self.abort(r.request_id) for r in old]

    # ------------------------------------------------------------------ stepping
    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._requests) - len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decode=list(self.running.values()))
        budget = self.config.max_step_tokens - len(out.decode)
        while self.waiting and len(self.running) < self.config.max_batch_size:
            req = self.waiting[0]
            if req.status is RequestStatus.FINISHED:  # aborted while waiting
                self.waiting.popleft()
                continue
            if len(req.prompt_ids) > budget and (out.prefill or out.decode):
                break  # wait for a step with room; an idle engine always admits one
            self.waiting.popleft()
            budget -= len(req.prompt_ids)
            req.status = RequestStatus.RUNNING
            self.running[req.request_id] = req
            out.prefill.append(req)
        self.last_batch_size = len(out.prefill) + len(out.decode)
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """Append each request's sampled token; return the stream increments (finished ones leave)."""
        results = []
        for req in (*out.prefill, *out.decode):
            token = sampled.get(req.request_id)
            if token is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted during the model step
            reason = self._append(req, token)
            if reason is not None:
                req.status, req.finish_reason = RequestStatus.FINISHED, reason
                self.running.pop(req.request_id, None)
                self._requests.pop(req.request_id, None)
            results.append(
                RequestOutput(
                    request_id=req.request_id,
                    task=req.task,
                    text=req.output.take_delta(final=reason is not None),
                    token_ids=[token],
                    finished=reason is not None,
                    finish_reason=reason,
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=req.num_output_tokens,
                )
            )
        return results

    @staticmethod
    def _append(req: Request, token: int) -> FinishReason | None:
        text = req.output
        if token in req.eos_token_ids:
            text.ids.append(token)  # counted as a completion token, never shown as text
            return FinishReason.STOP
        text.append(token)
        if text.stopped:
            return FinishReason.STOP
        if len(text.ids) >= req.params.max_tokens:
            return FinishReason.LENGTH
        return None
