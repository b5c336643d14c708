"""Training curves as one PNG: per-task loss (smoothed) and per-task eval score over steps.

The eval panel draws each task's untuned (zero-shot) score as a dotted horizontal line in the task's
colour. Tasks often share a zero-shot score (chance level on balanced labels), and lines at one height
would hide each other: such lines are drawn as interleaved dashes, each task's dash in its own slot of a
common period, so every colour stays visible. Steps are integers on both x axes.
"""

from __future__ import annotations

import math
from pathlib import Path

from tuner.metrics import RunHistory

DASH = 3.0  # points of one task's dash on a zero-shot line; a gap holds the dashes of the tasks that share it


def draw_curves(history: RunHistory):
    """The curves figure (matplotlib `Figure`, Agg backend); `plot_curves` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    losses: dict[str, list[tuple[int, float]]] = {}
    for s in history.steps:
        for task, v in s.task_loss.items():
            losses.setdefault(task, []).append((s.step, v))
    for task, pts in sorted(losses.items()):
        steps, vals = zip(*pts)
        ax_loss.plot(steps, _ema(list(vals)), label=task)
    ax_loss.set(title="training loss per task (EMA)", xlabel="step", ylabel="target NLL")
    scores: dict[str, list[tuple[int, float]]] = {}
    zero = next((e.scores for e in history.evals if e.zero_shot), {})
    for e in history.tuned_evals():
        for task, v in e.scores.items():
            scores.setdefault(task, []).append((e.step, v))
    colours = {}
    for task, pts in sorted(scores.items()):
        steps, vals = zip(*pts)
        colours[task] = ax_eval.plot(steps, vals, marker="o", label=task)[0].get_color()
    drawn = _zero_shot_lines(ax_eval, {t: zero[t] for t in colours if t in zero}, colours)
    title = "eval score per task" + (" (dotted: zero-shot)" if drawn else "")
    ax_eval.set(title=title, xlabel="step", ylabel="score")
    for ax in (ax_loss, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: never 2.5
        n = len(ax.get_legend_handles_labels()[0])
        if n:  # a search job has a line per variant row (8 tasks x 6 variants): columns keep it inside
            ax.legend(fontsize=8 if n <= 12 else 5, ncol=math.ceil(n / 16))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(history: RunHistory, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig = draw_curves(history)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _zero_shot_lines(ax, zero: dict[str, float], colours: dict[str, str]) -> int:
    """Draw a dotted line per task at its zero-shot score; tasks sharing a score (to 1e-9) interleave
    their dashes. Returns how many lines were drawn."""
    groups: dict[float, list[str]] = {}
    for task, score in sorted(zero.items()):
        if math.isfinite(score):
            groups.setdefault(round(score, 9), []).append(task)
    for score, tasks in groups.items():
        period = DASH * len(tasks)
        for i, task in enumerate(tasks):
            # dash i of every period belongs to task i: (offset, (on, off)) in points
            style = ((period - i * DASH) % period, (DASH, period - DASH)) if len(tasks) > 1 else ":"
            ax.axhline(score, color=colours[task], linestyle=style, linewidth=1.2)
    return sum(len(t) for t in groups.values())


def _ema(vals: list[float], alpha: float = 0.2) -> list[float]:
    out, cur = [], None
    for v in vals:
        cur = v if cur is None else alpha * v + (1 - alpha) * cur
        out.append(cur)
    return out
