"""Classification: a label per example, written as its verbaliser words; scored by ranking the labels.

Training teaches the words of the gold label (`verbaliser`: label -> words). Evaluation scores every
label's words after the input and predicts the most likely label, so it needs one forward per
example (`tuner.evaluate.score_labels`), and reports accuracy, macro-F1 (over the labels present, and
over every label: `tuner.scores.MACRO_F1_DEFINITIONS`), a per-label table and, per example, the
predicted label beside each label's log-probability.
Serving can complete with such a task and classify with it (`/v1/classify`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tuner.config import ConfigError
from tuner.scores import TaskScores, classification_metrics
from tuner.tasks.kinds.base import CLASSIFY, COMPLETE, EvalSetup, TaskKind, in_pieces, prediction

if TYPE_CHECKING:
    import torch

    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskSpec


class Classification(TaskKind):
    name = "classification"
    metrics = ("accuracy", "macro_f1")
    serves = frozenset({COMPLETE, CLASSIFY})
    label_scored = True
    eos_target = False  # a label's words are the whole answer; the scored positions are fixed

    def check_spec(self, spec: TaskSpec) -> None:
        if len(spec.verbaliser) < 2:
            raise ConfigError(f"task {spec.name}: a classification task needs a verbaliser with >= 2 labels")
        words = list(spec.verbaliser.values())
        if not all(w.strip() for w in words):
            raise ConfigError(f"task {spec.name}: every verbaliser word must be non-empty")
        if len(set(words)) < len(words):
            same = next(w for w in words if words.count(w) > 1)
            raise ConfigError(
                f"task {spec.name}: two labels have the verbaliser word {same!r} (one could never be predicted)"
            )

    def required_fields(self, spec: TaskSpec, split: str) -> list[str]:
        return [spec.label_field]

    def target_text(self, spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
        if spec.label_field not in row:
            raise ConfigError(f"task {spec.name}: label field {spec.label_field!r} not in the data")
        label = str(row[spec.label_field]).strip()
        if label not in spec.verbaliser:
            raise ConfigError(f"task {spec.name}: label {label!r} has no verbaliser entry")
        return spec.verbaliser[label], label

    def evaluate(self, setup: EvalSetup, data: TaskData, prompt: torch.Tensor | None) -> TaskScores:
        from tuner.evaluate import score_labels  # the model side: torch, loaded where a model is

        spec = data.spec
        s = setup

        def score(examples: list) -> list[dict[str, float]]:
            return score_labels(
                s.lm, s.tokenizer, examples, spec.verbaliser, prompt, s.max_len, s.batch_size, s.device
            )

        return self._task_scores(data, in_pieces(setup, data.eval, s.batch_size, score))

    def evaluate_many(
        self, setup: EvalSetup, datas: list[TaskData], prompts: Mapping[str, torch.Tensor] | None
    ) -> dict[str, TaskScores]:
        """Every task's scores, examples of many tasks packed into the same rows (`score_labels_of_tasks`):
        a fleet of tasks with a few eval examples each costs the forwards of its examples, not of its tasks."""
        from tuner.evaluate import score_labels_of_tasks

        s = setup
        verbalisers = {d.spec.name: d.spec.verbaliser for d in datas}
        examples = [e for d in datas for e in d.eval]

        def score(piece: list) -> list[dict[str, float]]:
            return score_labels_of_tasks(
                s.lm, s.tokenizer, piece, verbalisers, prompts, s.max_len, s.batch_size, s.device
            )

        scores = in_pieces(setup, examples, s.batch_size, score)
        out, at = {}, 0
        for d in datas:
            out[d.spec.name] = self._task_scores(d, scores[at : at + len(d.eval)])
            at += len(d.eval)
        return out

    @staticmethod
    def _task_scores(data: TaskData, scores: list[dict[str, float]]) -> TaskScores:
        """A task's scores from each eval example's label log-probabilities (the argmax is its prediction)."""
        spec = data.spec
        pred = [max(s, key=s.get) for s in scores]
        gold = [e.label for e in data.eval]
        predictions = [
            prediction(t, data.prefix, [g], p, g == p, logp)  # scores: each label's log-probability
            for t, g, p, logp in zip(data.eval_text, gold, pred, scores, strict=True)
        ]
        return TaskScores.of(spec.metric, classification_metrics(gold, pred, spec.labels), predictions)
