"""The task kinds, by name: `kind_of(name)` is what everything else asks about a task's kind.

Adding a kind is one new module here with a `TaskKind` subclass (see `generation.py`, the shortest),
registered in `KINDS` below, plus its tests; see the README's "Adding a task kind".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tuner.evaluate import TaskScores
from tuner.tasks.kinds.base import EvalSetup, TaskKind
from tuner.tasks.kinds.classification import Classification
from tuner.tasks.kinds.generation import Generation
from tuner.tasks.kinds.ner import Ner

if TYPE_CHECKING:
    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.tasks.data import TaskData

KINDS: dict[str, TaskKind] = {k.name: k for k in (Classification(), Generation(), Ner())}
TASK_KINDS = tuple(KINDS)


def kind_of(name: str) -> TaskKind:
    """The kind called `name`; ValueError naming the known kinds otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {str(name)[:40]!r}") from None


def evaluate_task(
    lm: PromptTunedLM,
    tokenizer,
    data: TaskData,
    prompt: torch.Tensor | None,
    max_len: int,
    device="cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> TaskScores | None:
    """One task's scores on its eval split, as its kind scores them (`prompt=None`: zero-shot), with
    each example's prediction record; None for a task without eval examples. `progress` is told how
    many more examples are scored as each piece of them is (an evaluation pass's bar)."""
    if not data.eval:
        return None
    setup = EvalSetup(lm, tokenizer, max_len, device, batch_size, progress)
    return kind_of(data.spec.kind).evaluate(setup, data, prompt)
