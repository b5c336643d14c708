"""A variant's per-example results at a rung, and the paired standard error of two variants' gap.

The base-variant rule (`tuner.search.state`) keeps the job's own configuration while the leader beats
it by no more than `search.base_margin` standard errors of their paired difference: `paired_se`
bootstraps the examples both were scored on, each resample scored as the rung's metric would
(`Evidence.scores`: a mean of per-example values, or a macro-F1 of predicted labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_ROUNDS = 1000  # resamples behind a paired standard error (`paired_se`)


@dataclass(frozen=True)
class Evidence:
    """A variant's held-out results example by example, so its score on any resample of the examples follows.

    `values`: each example's own score, higher is better (accuracy's 0 / 1, minus a loss); the
    variant's score is their mean. With `gold`: `values` are predicted label indices, `gold` the gold
    ones, and the score is the macro-F1 over those of the `num_labels` labels that occur in the
    resample's gold or predicted labels (`macro_f1` of `tuner.scores.classification_metrics`).
    """

    values: np.ndarray
    gold: np.ndarray | None = None
    num_labels: int = 0

    def scores(self, idx: np.ndarray) -> np.ndarray:
        """The score on each resample: `idx` [B, n] example indices -> [B]."""
        if self.gold is None:
            return np.asarray(self.values, dtype=np.float64)[idx].mean(axis=1)
        gold, pred = np.asarray(self.gold)[idx], np.asarray(self.values)[idx]
        f1, present = np.zeros(idx.shape[0]), np.zeros(idx.shape[0])
        for lab in range(self.num_labels):
            tp = ((gold == lab) & (pred == lab)).sum(axis=1)
            wrong = ((gold == lab) != (pred == lab)).sum(axis=1)  # false positives + false negatives
            f1 += np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)
            present += (tp + wrong) > 0  # the label occurs in the resample (gold or predicted)
        return f1 / np.maximum(present, 1)


def paired_se(a: Evidence, b: Evidence, seed: int, rounds: int = BOOTSTRAP_ROUNDS) -> float:
    """Standard error of (score of a) - (score of b) on the same examples: the spread of the gap over
    `rounds` bootstrap resamples of the examples, both variants scored on each resample (paired, so
    the examples both get right or both get wrong cancel). Seeded: every rank computes the same."""
    n = len(a.values)
    if n < 2 or len(b.values) != n:
        raise ValueError(
            f"paired_se needs two variants' results on the same >= 2 examples, got {n} and {len(b.values)}"
        )
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    return float(np.std(a.scores(idx) - b.scores(idx), ddof=1))
