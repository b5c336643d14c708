"""Generation: free text from a target field; scored by decoding greedily and comparing to references.

Training teaches `target_prefix` + the first target field's text, ended by end-of-sequence.
Evaluation decodes greedily (until end-of-sequence or a `stop` string; the examples of all generation
tasks together, `DecodedKind`) and reports chrF, ROUGE-L and exact match against every reference of an
example (one per target field), and each example's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuner.config import ConfigError
from tuner.scores import generation_example_scores, generation_metrics
from tuner.tasks.kinds.base import DecodedKind, text

if TYPE_CHECKING:
    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskSpec


class Generation(DecodedKind):
    name = "generation"
    metrics = ("chrf", "rouge_l", "exact_match")

    def required_fields(self, spec: TaskSpec, split: str) -> list[str]:
        return spec.target_fields if split == "eval" else spec.target_fields[:1]

    def target_text(self, spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
        first = spec.target_fields[0]
        if first not in row:
            raise ConfigError(f"task {spec.name}: target field {first!r} not in the data")
        return spec.target_prefix + text(row[first]), None

    def references(self, spec: TaskSpec, row: dict[str, Any]) -> list[str]:
        refs = [text(row.get(f)) for f in spec.target_fields]
        return [r for r in refs if r] or refs[:1]

    @staticmethod
    def _refs(data: TaskData) -> list[list[str]]:
        return [e.references or [e.target.strip()] for e in data.eval_text]

    def score(self, data: TaskData, hyps: list[str]) -> dict:
        return generation_metrics(self._refs(data), hyps)

    def judge(self, data: TaskData, hyps: list[str]) -> list[tuple[bool, dict]]:
        return [(s["exact_match"] == 1.0, s) for s in generation_example_scores(self._refs(data), hyps)]
