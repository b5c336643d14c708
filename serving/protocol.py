"""The OpenAI wire format: request bodies (pydantic) and the JSON / SSE shapes of responses.

Request models accept the fields this server uses and ignore the other OpenAI fields a client may
send (logprobs, user, ...); a known field with a wrong type or an out-of-range value is a
validation error, which `serving.api` answers with 400 and `param` = that field. Limits that depend
on the engine's config (max_tokens upper bound) are checked by the API, not here.
This module does not talk to the engine or know about HTTP status codes.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serving.types import FinishReason, InvalidRequest, RequestOutput

# ------------------------------------------------------------------------------------ requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: greedy (tasks want repeatable answers)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=1)  # one choice per request
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, max_length=4)
    seed: StrictInt | None = None
    raw: StrictBool = False  # promptfleet extension: send the prompt as is, without the task's template

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(_SamplingFields):
    prompt: StrictStr | list[StrictStr]

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
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def prompt_text(self) -> str:
        """A task is single-turn: its input is the last user message (system turns are not used)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise InvalidRequest("messages needs at least one message with role 'user'", "messages")


class ClassifyBody(_Body):
    model: StrictStr
    input: StrictStr = Field(min_length=1)
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
