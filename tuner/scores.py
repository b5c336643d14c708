"""A task's evaluation record (`TaskScores`) and the metrics that fill it, without a model.

`classification_metrics` (accuracy, both macro-F1s, a per-label table) and `generation_metrics`
(chrF, ROUGE-L with `rouge-score`, exact match against every reference) score answers already made;
`TaskScores` is what one task's evaluation reports and how its `summary.json` record reads back.
Producing the answers (scoring labels, decoding) is `tuner.evaluate`'s; this module imports no torch,
so the processes that only read and report scores (a Ray job's driver, `promptfleet report`) load none.

Macro-F1 comes two ways (`MACRO_F1_DEFINITIONS`): `macro_f1` over the labels that occur in the
references or the predictions (scikit-learn's `average="macro"`), `macro_f1_all_labels` over every
verbaliser label. They differ when an eval sample lacks labels: ATIS's 26 labels, 14 of them absent
from a 200-example sample and never predicted, give 0.125 against 0.272.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Keys of a scores record that are not metric values.
_NOT_VALUES = ("metric", "score", "per_label", "samples")

# What each macro-F1 of a classification task averages (`summary.json` and `report.md` say so).
MACRO_F1_DEFINITIONS = {
    "macro_f1": "mean F1 over the labels that occur in the references or the predictions "
    "(scikit-learn's f1_score(average='macro'))",
    "macro_f1_all_labels": "mean F1 over every verbaliser label; a label that never occurs and is "
    "never predicted counts as F1 0",
}
COLLAPSE_SHARE = 0.9  # a classifier predicting one label for more than this share has collapsed onto it


@dataclass(frozen=True, eq=False)  # eq: Mapping's, so a record compares equal to its dict
class TaskScores(Mapping):
    """One task's evaluation: its headline metric and score, every metric, and what the report shows.

    It also reads as its `summary.json` record (a read-only mapping of the same keys, `to_json`), so a
    record written by an earlier version and a fresh evaluation are read alike (`from_json`).
    """

    metric: str  # the headline metric's name (the task's `metric`)
    score: float  # its value
    values: dict[str, float]  # every metric by name, and `n`: the examples scored
    per_label: dict[str, dict] | None = None  # label or entity type -> precision / recall / F1 / support
    samples: list[dict] | None = None  # decoded kinds: the first answers beside their references
    # One record per eval example (input, references, output, correct, scores), in the eval order:
    # what `predictions/` files hold. Not part of the summary record (`to_json`).
    predictions: list[dict] | None = None

    @classmethod
    def of(cls, metric: str, computed: dict[str, Any], predictions: list[dict] | None = None) -> TaskScores:
        """Scores from a metrics function's dict (`classification_metrics`, ...), headlined by `metric`,
        with each example's prediction record."""
        scores = cls.from_json({**computed, "metric": metric, "score": computed[metric]})
        return dataclasses.replace(scores, predictions=predictions)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TaskScores | None:
        """The scores of a `summary.json` record (`{}`, a task without eval examples: None)."""
        if not record:
            return None
        values = {k: v for k, v in record.items() if k not in _NOT_VALUES}
        return cls(record["metric"], record["score"], values, record.get("per_label"), record.get("samples"))

    def to_json(self) -> dict[str, Any]:
        """The record as evaluation has always written it: metric values, per-label table, n, samples."""
        out = {k: v for k, v in self.values.items() if k != "n"}
        if self.per_label is not None:
            out["per_label"] = self.per_label
        if "n" in self.values:
            out["n"] = self.values["n"]
        if self.samples is not None:
            out["samples"] = self.samples
        return {**out, "metric": self.metric, "score": self.score}

    def collapsed_onto(self, share: float = COLLAPSE_SHARE) -> tuple[str, float] | None:
        """(label, its share of the predictions) where one label takes more than `share` of them (a
        classifier that collapsed onto it); None otherwise, or where the record counts no predictions."""
        counts = {lab: v["predicted"] for lab, v in (self.per_label or {}).items() if "predicted" in v}
        total = sum(counts.values())
        if not total:
            return None
        top = max(counts, key=counts.get)
        return (top, counts[top] / total) if counts[top] / total > share else None

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, both macro-F1s (`MACRO_F1_DEFINITIONS`) and a per-label precision / recall / F1 /
    support / predicted (how many examples were given the label) report over every label."""
    every = list(dict.fromkeys([*labels, *gold, *pred]))  # the verbaliser's, then any other that occurs
    per_label = {}
    for lab in every:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_label[lab] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": tp + fn,
            "predicted": tp + fp,
        }
    present = [v["f1"] for v in per_label.values() if v["support"] or v["predicted"]]
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1),
        "macro_f1": sum(present) / max(len(present), 1),
        "macro_f1_all_labels": sum(v["f1"] for v in per_label.values()) / max(len(per_label), 1),
        "per_label": per_label,
        "n": len(gold),
    }


def generation_metrics(refs: Sequence[str | Sequence[str]], hyps: list[str]) -> dict:
    """chrF, ROUGE-L F1 (both 0-100) and exact match of `hyps` against one or several references each.

    With several references an example scores against its best one (sacrebleu's chrF and
    `rouge_score`'s `score_multi` both take the best); exact match needs any one.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    multi = [[r] if isinstance(r, str) else list(r) for r in refs]
    if not multi:
        return {"chrf": 0.0, "rouge_l": 0.0, "exact_match": 0.0, "n": 0}
    # sacrebleu reads references as k parallel streams: pad short lists with their first reference
    # (a duplicate never changes a best-of score).
    k = max(len(r) for r in multi)
    streams = [[r[j] if j < len(r) else r[0] for r in multi] for j in range(k)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(r, h)["rougeL"].fmeasure for r, h in zip(multi, hyps)]
    return {
        "chrf": sacrebleu.corpus_chrf(hyps, streams).score,
        "rouge_l": 100.0 * sum(rouge) / len(rouge),
        "exact_match": sum(any(x.strip() == h.strip() for x in r) for r, h in zip(multi, hyps)) / len(multi),
        "n": len(multi),
    }


def generation_example_scores(refs: Sequence[str | Sequence[str]], hyps: list[str]) -> list[dict[str, float]]:
    """Each example's own chrF, ROUGE-L F1 (0-100) and exact match (0 / 1) against its best reference:
    `generation_metrics` one example at a time (a corpus chrF is not the mean of these), for auditing."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = []
    for r, h in zip(refs, hyps, strict=True):
        multi = [r] if isinstance(r, str) else list(r)
        out.append(
            {
                "chrf": sacrebleu.sentence_chrf(h, multi).score,
                "rouge_l": 100.0 * scorer.score_multi(multi, h)["rougeL"].fmeasure,
                "exact_match": float(any(x.strip() == h.strip() for x in multi)),
            }
        )
    return out
