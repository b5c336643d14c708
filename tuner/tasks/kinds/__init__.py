"""The task kinds, by name: `kind_of(name)` is what everything else asks about a task's kind.

Adding a kind is one new module here with a `TaskKind` subclass (see `generation.py`, the shortest),
registered in `KINDS` below, plus its tests; see the README's "Adding a task kind".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from tuner.scores import TaskScores
from tuner.tasks.kinds.base import EvalSetup, TaskKind
from tuner.tasks.kinds.classification import Classification
from tuner.tasks.kinds.generation import Generation
from tuner.tasks.kinds.ner import Ner

if TYPE_CHECKING:
    import torch

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


def evaluate_tasks(
    lm: PromptTunedLM,
    tokenizer,
    tasks: Mapping[str, TaskData],
    prompts: Mapping[str, torch.Tensor] | None,
    max_len: int,
    device="cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TaskScores | None]:
    """Every task's scores, as `evaluate_task` gives them, in the order of `tasks`: the tasks of a kind
    are evaluated together (`TaskKind.evaluate_many`: classification packs examples of many tasks into
    the same rows; generation and NER decode them in the same steps, `DecodedKind`). `prompts` by task
    name (None: zero-shot); None for a task without eval examples."""
    setup = EvalSetup(lm, tokenizer, max_len, device, batch_size, progress)
    by_kind: dict[str, list[TaskData]] = {}
    for data in tasks.values():
        if data.eval:
            by_kind.setdefault(data.spec.kind, []).append(data)
    scores: dict[str, TaskScores] = {}
    for kind, datas in by_kind.items():
        scores.update(kind_of(kind).evaluate_many(setup, datas, prompts))
    return {name: scores.get(name) for name in tasks}
