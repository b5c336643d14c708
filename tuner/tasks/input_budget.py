"""How much of a long input the model reads before it writes an answer: one rule for evaluation and
serving.

A decoded answer needs room: `[task prompt: P][input][answer: max_new_tokens]` must fit the job's
`model.max_seq_len`, so an input keeps its last `max_seq_len - P - max_new_tokens` tokens (the text
nearest the answer; a prefix of description and demonstrations is the first to go). Evaluation cuts
its tokenised examples with `cut_input`; export writes the number into the adapter's metadata
(`tuner.export.TaskMeta.max_input_tokens`) and the server cuts a request's rendered, tokenised
prompt with the same function, so a long input is read the same way in both. Label-scored tasks
cut by each label's length at evaluation (`tuner.tasks.batching.segment_layout`), not by this rule.
"""

from __future__ import annotations

from collections.abc import Sequence


def max_input_tokens(max_len: int, virtual_tokens: int, max_new_tokens: int) -> int:
    """The input tokens a decoded answer leaves room for; ValueError when there is no room."""
    budget = max_len - virtual_tokens - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_seq_len={max_len} leaves no room for an input after {virtual_tokens} virtual tokens "
            f"and {max_new_tokens} new tokens"
        )
    return budget


def cut_input(ids: Sequence[int], limit: int | None) -> list[int]:
    """The last `limit` of `ids` (all of them when `limit` is None or they fit)."""
    if limit is None or len(ids) <= limit:
        return list(ids)
    return list(ids[len(ids) - limit :])
