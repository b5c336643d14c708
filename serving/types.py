"""The serving contract: small dataclasses that carry a request's identity (its task) from the
HTTP layer through the scheduler to the model runner, and the errors each layer may raise.

Nothing here imports torch; the scheduler and the API depend only on this module (and on
`tuner.schema`'s bounds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from tuner.schema import MAX_SEED, ReadByKey

MAX_STOP = 4  # stop sequences a request may carry (OpenAI's limit)


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # client went away or the request timed out


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the client's; a task's own (`TaskMeta.stop`) apply too


def check_sampling(
    params: SamplingParams, max_tokens_limit: int, max_tokens_param: str = "max_tokens"
) -> None:
    """Refuse values the engine cannot take (`InvalidRequest` naming the field): the one check of
    sampling values, made by every API route that takes them and by the engine.

    Args:
        max_tokens_limit: the largest max_tokens (`EngineConfig.max_new_tokens_limit`).
        max_tokens_param: the request's name for max_tokens (chat calls it `max_completion_tokens`).
    """
    max_tokens, seed, stop = params.max_tokens, params.seed, params.stop
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
        raise InvalidRequest(
            f"{max_tokens_param} must be between 1 and {max_tokens_limit}, got {max_tokens}.",
            param=max_tokens_param,
        )
    if not 0.0 <= params.temperature <= 2.0:  # NaN fails too
        raise InvalidRequest("temperature must be in [0, 2]", param="temperature")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
        raise InvalidRequest("seed must be an integer in [0, 2**63)", param="seed")
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}", param="stop")
    if any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequest("each stop string must be a non-empty string", param="stop")


@dataclass
class GenerationRequest:
    """One completion request. `task` picks the soft prompt; the backbone is shared."""

    request_id: str
    task: str
    prompt: str  # raw user text; the engine applies the task's prefix/template if the adapter has one
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    tenant: str = ""  # quotas, fairness and per-tenant metrics; authorisation happens before the engine
    # True: the prompt goes to the model as is (no task prefix/template) and the task's stop strings
    # do not apply (only `params.stop`): the client owns the input format and the answer's end.
    raw: bool = False


@dataclass
class RequestOutput:
    """A streamed increment (or the final result) of one request."""

    request_id: str
    task: str
    text: str  # new text since the previous output of this request
    token_ids: list[int]  # new token ids since the previous output
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may hold of the engine (from the tenants file); 0 means unlimited."""

    max_concurrent: int = 0  # requests queued or running at once; more get 429 (`QuotaExceeded`)
    tokens_per_minute: int = 0  # prompt + completion tokens admitted per rolling minute
    weight: float = 1.0  # share of admissions under contention (weighted round-robin across tenants)


@dataclass
class Histogram:
    """Observations counted into buckets (upper bounds `bounds`, then +Inf), with their sum: what a
    Prometheus histogram exposes, kept by the engine's own thread and copied out by `stats()`."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), len(bounds) + 1
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)


# Engine steps a request waited for its first schedule (counting the step in flight when it arrived).
WAIT_STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TenantStats:
    """One tenant's share of the engine now, and its counters since start (from the scheduler)."""

    running: int = 0
    queued: int = 0
    tokens_last_minute: int = 0  # charged in the rolling window (settled to the tokens used on finish)
    admitted_total: int = 0  # requests admitted to a model step
    admitted_tokens_total: int = 0  # prompt tokens + max_tokens of those, charged at admission
    rejected_total: int = 0  # requests refused with QuotaExceeded
    preemptions_total: int = 0  # its running generations sent back to wait for another tenant's share
    queue_wait_steps: Histogram = field(default_factory=lambda: Histogram(WAIT_STEP_BUCKETS))


@dataclass
class EngineStats(ReadByKey):
    """What `Engine.stats()` reports: gauges now and counters since start. `serving.metrics`
    exports them at scrape time (`ENGINE_SERIES` names the series of each field)."""

    queue_depth: int = 0  # requests waiting in the scheduler
    running: int = 0  # generations in the running batch
    last_batch_size: int = 0  # rows of the most recent model step
    tokens_generated_total: int = 0
    prefill_tokens_total: int = 0  # prompt tokens run through prefill
    prefix_cache_hits_total: int = 0  # task prompt KV found in the prefix cache
    prefix_cache_misses_total: int = 0
    prefix_cache_evictions_total: int = 0
    prefix_cache_bytes: int = 0  # held by the prefix cache now
    prompt_cache_hits_total: int = 0  # task prompts found loaded (`serving.prompt_cache`)
    prompt_cache_misses_total: int = 0  # task prompts read from the store
    prompt_cache_evictions_total: int = 0
    prompt_cache_bytes: int = 0  # loaded prompts held now
    requests_finished_total: int = 0  # ended any way: done, aborted, timed out or failed
    requests_failed_total: int = 0  # ended because the model failed on them
    tasks: int = 0  # servable tasks
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_SECONDS_BUCKETS))  # model steps
    tenants: dict[str, TenantStats] = field(default_factory=dict)  # each tenant seen since start


@dataclass
class TaskInfo(ReadByKey):
    """What a client may know of a task (`Engine.task_info`), from its adapter's `TaskMeta`."""

    name: str
    kind: str  # the name of its kind (`tuner.tasks.kinds`)
    num_virtual_tokens: int
    serves: frozenset[str]  # what the API may do with it: "complete", "classify" (its kind says)
    description: str = ""
    template: str = ""
    verbaliser: dict[str, str] = field(default_factory=dict)  # label -> its words
    labels: list[str] = field(default_factory=list)  # the verbaliser's labels, in its order
    metric: str = ""
    max_new_tokens: int | None = None
    score: float | None = None  # the tuned headline metric at export
    stop: list[str] = field(default_factory=list)  # where the task's answers end


@dataclass
class ClassifyResult:
    task: str
    labels: dict[str, float]  # label -> probability (softmax over the verbaliser scores)
    label: str  # argmax
    prompt_tokens: int = 0


# ------------------------------------------------------------------------------------ errors


class ServingError(Exception):
    """Base class; `status`, `type` and `code` shape the JSON error the API returns."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownTask(ServingError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class InvalidRequest(ServingError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class PromptTooLong(ServingError):
    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class RetryableError(ServingError):
    """A refusal the client should retry later; the API sends `Retry-After: retry_after`."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RetryableError):
    """The scheduler's queue is full; the API answers 429 with Retry-After."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class QuotaExceeded(RetryableError):
    """This tenant is over its own limits (`TenantLimits`); other tenants are unaffected. 429 + Retry-After."""

    status, type, code = 429, "rate_limit_error", "tenant_quota_exceeded"


class EngineError(ServingError):
    """The model step failed (a bug or out of memory); the requests in that step are ended."""

    status, type, code = 500, "server_error", "internal_error"


class RequestTimeout(RetryableError):
    status, type, code = 503, "timeout_error", "request_timeout"


class PromptUnavailable(ServingError):
    """The task is indexed but its prompt cannot be read or failed its checks on first use (e.g. its
    file became corrupt): this request fails, the task stops being served until its files change."""

    status, type, code = 503, "server_error", "prompt_unavailable"
