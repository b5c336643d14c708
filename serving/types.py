"""The serving contract: small dataclasses that carry a request's identity (its task) from the
HTTP layer through the scheduler to the model runner, and the errors each layer may raise.

Nothing here imports torch; the scheduler and the API depend only on this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


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
