"""The engine's output path: a generation's sampled tokens -> the text increments its stream gets.

Runs on the engine thread after each step, outside the scheduler's lock. Each request's
`IncrementalText` (created on its first token) detokenises incrementally and watches for stop
strings (the request's and its task's); a stop string ends the request here (the caller then tells the scheduler, `finish`). EOS
counts as a completion token and is never shown. Pure Python: the tokenizer enters as `decode`.
"""

from __future__ import annotations

from serving.detokenizer import Decode, IncrementalText
from serving.scheduler import TokenUpdate
from serving.types import FinishReason, RequestOutput


def to_output(update: TokenUpdate, decode: Decode) -> RequestOutput:
    """The stream increment for `update`; `finished` with STOP when the new text completed a stop string."""
    req, reason = update.request, update.finish_reason
    text = req.output
    if text is None:
        text = req.output = IncrementalText(decode, list(req.params.stop), list(req.task_stop))
    if update.token in req.eos_token_ids:
        text.ids.append(update.token)  # keeps the detokeniser's offsets in step with the output ids
    else:
        text.append(update.token)
        if text.stopped:
            reason = FinishReason.STOP
    return RequestOutput(
        request_id=req.request_id,
        task=req.task,
        text=text.take_delta(final=reason is not None),
        token_ids=[update.token],
        finished=reason is not None,
        finish_reason=reason,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=req.num_output_tokens,
    )
