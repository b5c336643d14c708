"""Incremental detokenisation and stop-string handling for one request's output stream.

Decoding the whole output every step would cost O(n) per token (O(n^2) per request). Like TGI and
vLLM, `IncrementalText.append` decodes only a short window `ids[prefix_offset:]` and emits the new
text once it no longer ends in an incomplete UTF-8 sequence. Stop strings are searched only in the
tail that the new text can have completed; text that might be the start of a stop string is held
back from the stream until it is known not to be one (OpenAI never streams the stop string).
Two kinds of stop strings: the request's own (`stop`, OpenAI: they match anywhere) and its task's
(`task_stop`, evaluation's rule `tuner.tasks.stops.find_stop`: whitespace before the answer never stops
it), so a served answer ends where the task's evaluation cut it.

Pure Python: the tokenizer enters as a `decode(ids) -> str` callable. It does not decide when a
request finishes for other reasons (EOS, max_tokens): that is the scheduler's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tuner.tasks.stops import find_stop

Decode = Callable[[list[int]], str]


@dataclass
class IncrementalText:
    """The text of one request's output so far, grown one token at a time."""

    decode: Decode
    stop: list[str] = field(default_factory=list)  # the request's (OpenAI `stop`)
    task_stop: list[str] = field(default_factory=list)  # the task's (`TaskMeta.stop`)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # full output text (cut before a stop string once one matched)
    sent: int = 0  # characters of `text` already streamed
    prefix_offset: int = 0
    read_offset: int = 0
    stopped: bool = False  # a stop string matched

    def append(self, token_id: int) -> None:
        """Add a token; sets `stopped` when the output now contains a stop string."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        delta = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = len(self.text)
        self.text += delta
        self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        hits = []
        for s in self.stop:
            # A match must end inside the new text, so it starts at most len(s)-1 characters before it.
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0:
                hits.append(i)
        if (i := find_stop(self.text, self.task_stop, since=start)) >= 0:
            hits.append(i)
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """Text not yet streamed; keeps back a possible stop-string prefix unless `final`."""
        end = len(self.text)
        stops = self.stop + self.task_stop
        if not final and stops:
            end = max(self.sent, end - (max(len(s) for s in stops) - 1))
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
