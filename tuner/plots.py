"""Training curves as one PNG: per-task loss (smoothed) and per-task eval score over steps."""

from __future__ import annotations

import math
from pathlib import Path

from tuner.metrics import RunHistory


def plot_curves(history: RunHistory, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for task, pts in sorted(scores.items()):
        steps, vals = zip(*pts)
        line = ax_eval.plot(steps, vals, marker="o", label=task)[0]
        if task in zero:
            ax_eval.axhline(zero[task], color=line.get_color(), linestyle=":", linewidth=1)
    ax_eval.set(title="eval score per task (dotted: zero-shot)", xlabel="step", ylabel="score")
    for ax in (ax_loss, ax_eval):
        n = len(ax.get_legend_handles_labels()[0])
        if n:  # a search job has a line per variant row (8 tasks x 6 variants): columns keep it inside
            ax.legend(fontsize=8 if n <= 12 else 5, ncol=math.ceil(n / 16))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _ema(vals: list[float], alpha: float = 0.2) -> list[float]:
    out, cur = [], None
    for v in vals:
        cur = v if cur is None else alpha * v + (1 - alpha) * cur
        out.append(cur)
    return out
