"""What every task kind answers: the one interface the recipe, evaluation, export and serving ask.

A kind (classification, generation, NER, ...) is one module of this package with one `TaskKind`
subclass, registered in `tuner.tasks.kinds.KINDS`. It owns the fields a row needs, the text the
model should write, the references an answer is scored against, how a task is evaluated (scoring
labels, or decoding and scoring the text), what a search ranks variants by, and what serving may do
with the task. Code outside this package never tests a kind's name: it asks the kind.

It does not read files, tokenise or batch (`tuner.tasks.readers`, `tuner.tasks.data`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tuner.evaluate import TaskScores, generate_greedy

if TYPE_CHECKING:
    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskExample, TaskSpec


@dataclass(frozen=True)
class EvalSetup:
    """What evaluating any task needs besides the task: the model, its tokenizer, the length budget."""

    lm: PromptTunedLM
    tokenizer: Any
    max_len: int  # longest [prompt][input][answer] (inputs are cut from the left to fit)
    device: Any = "cpu"
    batch_size: int = 32


# What serving may do with a task: `complete` (the completion and chat routes), `classify`
# (`/v1/classify`: label probabilities from its verbaliser).
COMPLETE, CLASSIFY = "complete", "classify"


class TaskKind:
    """One kind of task. Subclasses set the class attributes and the methods their kind needs."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the headline metrics it may report; the first is the default
    serves: ClassVar[frozenset[str]] = frozenset({COMPLETE})
    # Its metric is read off the label scores of one forward per example (no decoding), and each
    # label has verbaliser words (`class_labels` initialisation uses them; serving can classify).
    label_scored: ClassVar[bool] = False
    # Training targets end with end-of-sequence: answers of free length learn where to stop.
    eos_target: ClassVar[bool] = True

    def check_spec(self, spec: TaskSpec) -> None:
        """Raise `ConfigError` for a task definition this kind cannot train (beyond the common checks)."""

    def required_fields(self, spec: TaskSpec, split: str) -> list[str]:
        """The fields (after renaming) a row of `split` needs besides the template's."""
        raise NotImplementedError

    def target_text(self, spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
        """The text the model should write for `row`, and its label key (None where there is none)."""
        raise NotImplementedError

    def references(self, spec: TaskSpec, row: dict[str, Any]) -> list[str]:
        """Every reference an eval row's answer is scored against ([]: the kind scores otherwise)."""
        return []

    def fill_example(self, example: TaskExample, row: dict[str, Any]) -> None:
        """Copy what evaluation needs beyond the text from `row` onto `example` (e.g. NER's gold tags)."""

    def evaluate(self, setup: EvalSetup, data: TaskData, prompt: torch.Tensor | None) -> TaskScores:
        """The task's scores on `data.eval` under `prompt` (None: zero-shot)."""
        raise NotImplementedError

    def rung_criterion(self, requested: str) -> str:
        """What a search rung ranks this kind's variants by, given `search.criterion`: `metric`, `loss`
        or `label_loss` (`auto`: the metric where it costs one forward per example, else the loss)."""
        if requested == "auto":
            return "metric" if self.label_scored else "loss"
        if requested == "label_loss" and not self.label_scored:
            return "loss"  # no label set to renormalise over
        return requested


def text(value: Any) -> str:
    """A data value as text, stripped (None -> "")."""
    return "" if value is None else str(value).strip()


def decoded_scores(
    setup: EvalSetup,
    data: TaskData,
    prompt: torch.Tensor | None,
    score: Callable[[TaskData, list[str]], dict],
) -> TaskScores:
    """Greedy answers to every eval example, scored by `score(data, answers)`, with three samples."""
    spec = data.spec
    hyps = generate_greedy(
        setup.lm,
        setup.tokenizer,
        data.eval,
        prompt,
        spec.max_new_tokens,
        setup.max_len,
        max(1, setup.batch_size // 2),
        setup.device,
        spec.stop,
    )
    m = score(data, hyps)
    refs = [e.target.strip() for e in data.eval_text]
    m["samples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]
    return TaskScores.of(spec.metric, m)
