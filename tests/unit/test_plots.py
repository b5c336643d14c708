"""tuner.plots: the training-curves PNG of a search job (a line per variant row) lays out cleanly."""

from __future__ import annotations

import warnings

from tuner.metrics import RunHistory, StepMetrics
from tuner.plots import plot_curves


def test_curves_of_a_search_job_fit_their_legend(tmp_path):
    # 8 tasks x 6 variants = 48 loss lines: the legend used to overflow the panel and matplotlib
    # warned "Tight layout not applied" at the end of every search run
    history = RunHistory()
    rows = [f"task{t}~{k}" for t in range(8) for k in range(6)]
    for step in range(1, 20):
        history.steps.append(StepMetrics(step, 1.0, 0.01, 100, {r: 1.0 / step for r in rows}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_curves(history, tmp_path / "curves.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
