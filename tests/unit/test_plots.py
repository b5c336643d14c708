"""tuner.plots: the training-curves PNG lays out cleanly (a search job's line per variant row), every
task's zero-shot line stays visible when scores coincide, steps are whole numbers, and the title names
zero-shot lines only when there are some."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb

from tuner.metrics import EvalPoint, RunHistory, StepMetrics
from tuner.plots import draw_curves, plot_curves


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


def _history(zero_shot: dict[str, float] | None, eval_steps=(1, 2, 3)) -> RunHistory:
    history = RunHistory()
    tasks = ("a", "b", "c")
    for step in range(1, 4):
        history.steps.append(
            StepMetrics(step, 1.0, 0.01, 100, {t: (i + 1.0) / step for i, t in enumerate(tasks)})
        )
    if zero_shot is not None:
        history.evals.append(EvalPoint(0, zero_shot, zero_shot=True))
    for step in eval_steps:
        history.evals.append(EvalPoint(step, {"a": 0.6 + step / 100, "b": 0.7, "c": 0.8}))
    return history


def _colours_on_row(fig, ax, y: float, colours: dict[str, tuple]) -> dict[str, int]:
    """Pixels across the axes, on the row of data height `y`, whose nearest task colour is each task's."""
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    box = ax.get_window_extent()
    row = img.shape[0] - round(ax.transData.transform((1, y))[1])
    band = img[row - 2 : row + 3, round(box.x0) + 3 : round(box.x1) - 3].reshape(-1, 3)
    names = list(colours)
    dist = np.stack([np.abs(band - np.array(colours[n])).max(axis=1) for n in names])
    nearest = dist.argmin(axis=0)
    close = dist.min(axis=0) < 0.3
    return {n: int(((nearest == i) & close).sum()) for i, n in enumerate(names)}


def test_coinciding_zero_shot_lines_stay_visible():
    # a and b share a zero-shot score (0.5): a single dotted line per task at one height used to
    # show only the colour drawn last; interleaved dashes keep both
    fig = draw_curves(_history({"a": 0.5, "b": 0.5, "c": 0.3}))
    ax = fig.axes[1]
    colours = {
        ln.get_label(): to_rgb(ln.get_color()) for ln in ax.get_lines() if ln.get_label() in ("a", "b", "c")
    }
    at_half = _colours_on_row(fig, ax, 0.5, colours)
    assert at_half["a"] > 20 and at_half["b"] > 20, at_half
    assert _colours_on_row(fig, ax, 0.3, colours)["c"] > 20
    plt.close(fig)


def test_eval_axis_has_whole_steps_and_title_names_zero_shot_only_when_drawn():
    fig = draw_curves(_history(None, eval_steps=(1, 2)))
    ax_loss, ax_eval = fig.axes
    for ax in (ax_loss, ax_eval):
        ticks = ax.get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    assert "zero-shot" not in ax_eval.get_title()
    plt.close(fig)
    fig = draw_curves(_history({"a": 0.5, "b": 0.4, "c": 0.3}))
    assert "zero-shot" in fig.axes[1].get_title()
    plt.close(fig)
