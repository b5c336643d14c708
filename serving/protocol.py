"""The OpenAI wire format: request bodies (pydantic) and the JSON / SSE shapes of responses.

Request models accept the fields this server uses; an OpenAI field it does not implement (logprobs,
echo, best_of > 1, logit_bias, n > 1, tools...) is a 400 naming it unless it carries its neutral value
(clients send `n: 1`, `logprobs: null`), and harmless bookkeeping fields (`user`, `metadata`) are
ignored. A known field with a wrong type is a validation error, which `serving.api` answers with
400 and `param` = that field. Here sampling values are only typed: numbers are numbers (finite: no
NaN or inf), a temperature is 0 (greedy) or not denormal, and every string is valid unicode (no lone
surrogates). Their ranges against the engine's limits (max_tokens, seed, top_p, stop...) are
`serving.types.check_sampling`, the one check the API and the engine both make.
This module does not talk to the engine or know about HTTP status codes.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serving.types import FinishReason, InvalidRequest, RequestOutput

# ------------------------------------------------------------------------------------ requests


MIN_TEMPERATURE = 1e-2  # below this (but > 0) logits / T overflow to inf and sampling meets NaN

# OpenAI fields this server does not implement -> the values that mean "not used" (accepted).
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _valid_unicode(text: str) -> str:
    """JSON may spell a lone surrogate ("\\ud800"); no tokenizer or encoder can take one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid unicode (it contains a lone surrogate)") from None
    return text


def _temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return value


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
# Strict: a JSON number only (an integer is one), never "0.5" or true, as max_tokens and seed.
Temperature = Annotated[StrictFloat, Field(allow_inf_nan=False), AfterValidator(_temperature)]
TopP = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI bookkeeping fields (user, metadata) are not used

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """A field we would otherwise silently ignore changes what the client gets: refuse it."""
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and not any(data[name] == v and type(data[name]) is type(v) for v in neutral):
                    # `serving.api` reads ctx["param"] to name the field in the 400.
                    raise PydanticCustomError(
                        UNSUPPORTED_ERROR,
                        "{param} is not supported by this server (omit it or send its default)",
                        {"param": name},
                    )
        return data


UNSUPPORTED_ERROR = "unsupported_parameter"


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Body):
    model: Text
    max_tokens: StrictInt | None = None
    temperature: Temperature | None = None  # None: greedy (tasks want repeatable answers)
    top_p: TopP | None = None
    n: StrictInt = Field(1, ge=1, le=1)  # one choice per request
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # OpenAI: one string (any length) is one stop sequence; a list holds up to 4.
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    raw: StrictBool = False  # promptfleet extension: send the prompt as is, without the task's template

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(_SamplingFields):
    prompt: Text | list[Text]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidRequest(
                "exactly one prompt per request (send several requests concurrently instead)", "prompt"
            )
        return self.prompt[0]


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None

    def prompt_text(self) -> str:
        """A task is single-turn: its input is the last user message (system turns are not used)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise InvalidRequest("messages needs at least one message with role 'user'", "messages")


class ClassifyBody(_Body):
    model: Text
    input: Text = Field(min_length=1)
    raw: StrictBool = False


# ------------------------------------------------------------------------------------ responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    reason = out.finish_reason or FinishReason.STOP
    return reason.value if isinstance(reason, FinishReason) else str(reason)


def completion(request_id: str, task: str, text: str, last: RequestOutput) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": task,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(last)}],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def chat_completion(request_id: str, task: str, text: str, last: RequestOutput) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": task,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish(last),
            }
        ],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def completion_chunk(request_id: str, task: str, out: RequestOutput) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": task,
        "choices": [{"text": out.text, "index": 0, "logprobs": None, "finish_reason": _finish(out)}],
    }


def chat_chunk(request_id: str, task: str, out: RequestOutput, first: bool) -> dict:
    delta = (
        {"role": "assistant", "content": out.text} if first else ({"content": out.text} if out.text else {})
    )
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": task,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(out)}],
    }


def usage_chunk(request_id: str, task: str, obj: str, last: RequestOutput) -> dict:
    """The extra last chunk OpenAI sends when `stream_options.include_usage` is set."""
    return {
        "id": request_id,
        "object": obj,
        "created": int(time.time()),
        "model": task,
        "choices": [],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def classification(
    request_id: str, task: str, label: str, labels: dict[str, float], prompt_tokens: int
) -> dict:
    return {
        "id": request_id,
        "object": "classification",
        "created": int(time.time()),
        "model": task,
        "label": label,
        "labels": labels,
        "usage": usage(prompt_tokens, 0),
    }


def model_card(task: str) -> dict:
    return {"id": task, "object": "model", "created": 0, "owned_by": "promptfleet"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the end marker)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
