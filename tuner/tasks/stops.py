"""Where a generated answer ends at a task's stop strings: the one rule evaluation
(`tuner.evaluate`) and serving (`serving.detokenizer`) both apply.

The answer begins at the first non-whitespace character of the generated text: whitespace before
it never ends the answer (a model whose first token is "\\n" must not give an empty answer). The
answer ends where the first stop string that begins at or after that character begins. This module
does not decode tokens and does not strip the answer (evaluation strips it; serving keeps the text
as generated, OpenAI-style, without the stop string).
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stop: Sequence[str], since: int = 0) -> int:
    """Index in `text` where the answer ends at a stop string, or -1 if none matched.

    Args:
        text: the generated text so far (without the prompt).
        stop: the task's stop strings.
        since: only matches that end after this index are looked for (an incremental caller passes
            the length the text had when it last looked).
    """
    begin = len(text) - len(text.lstrip())
    hits = [i for s in stop if (i := text.find(s, max(begin, since - len(s) + 1))) >= 0]
    return min(hits, default=-1)
