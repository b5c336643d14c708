"""The search's report: its Markdown section, its plot (`search.png`) and the base-variant rule in words.

Everything here reads `SearchState.summary()` (as written to `summary.json` under `search`) or a
`RungResult.base_check`; it renders and decides nothing.
"""

from __future__ import annotations

import math
from typing import Any


def describe_base_check(check: dict[str, Any], margin: float) -> str:
    """Why the base variant stayed at a rung, or went (`RungResult.base_check`), in words."""
    se = f"paired SE {check['se']:.4f}" if check.get("se") is not None else "no paired SE"
    if check.get("early"):
        return f"kept before the last rung (the leader's lead {check['gap']:.4f}, {se})"
    sign = "<=" if check["kept"] else ">"
    return f"the leader's lead {check['gap']:.4f} {sign} {margin:g} x {se}"


def render_search_report(search: dict[str, dict]) -> str:
    """Markdown: a table per task of its variants, held-out scores at each rung, and their outcome."""
    parts = ["## Hyperparameter search (in-batch variants, successive halving)", ""]
    for task, t in search.items():
        steps = sorted({s for v in t["variants"] for s, _ in v["heldout"]})
        head = "| variant | " + " | ".join(t["variants"][0]["values"]) + " | "
        head += " | ".join(f"held-out @ {s}" for s in steps) + " | outcome |"
        by = t.get("criterion", "score")
        by = {
            "-loss": "minus the mean target NLL",
            "-label_loss": "minus the mean NLL of the gold label among the task's labels",
        }.get(by, by)
        on = t.get("scored_on", {})
        where = {
            "heldout": "the task's held-out slice",
            "prequential": "the training examples drawn in the latter half of the steps before the rung, each "
            "scored before its update (prequential)",
        }
        sources = sorted(set(on.values())) or ["heldout"]
        n_held = f"ranked at each rung by {by} on " + " or ".join(where[x] for x in sources)
        n_held += " (higher is better)"
        if counts := t.get("heldout_examples"):
            n_held += "; examples scored: " + ", ".join(
                f"{n} @ step {s}" + (f" ({on[s]})" if len(sources) > 1 else "") for s, n in counts.items()
            )
        parts += [f"### {task}: chose {_fmt_values(t['chosen'])}", "", n_held, "", head]
        parts.append("|---" * (2 + len(t["variants"][0]["values"]) + len(steps)) + "|")
        for v in t["variants"]:
            at = dict((s, x) for s, x in v["heldout"])
            cells = [str(x) for x in v["values"].values()] + [
                f"{at[s]:.4f}" if s in at else "" for s in steps
            ]
            parts.append(f"| {v['index']} | " + " | ".join(cells) + f" | {v['outcome']} |")
        parts.append("")
    return "\n".join(parts)


def _fmt_values(values: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in values.items())


def plot_search(search: dict[str, dict], path) -> None:
    """One panel per task: every variant's held-out score at each rung (dropped variants end early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(search))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, t) in zip(axes.flat, search.items()):
        for v in t["variants"]:
            if v["heldout"]:
                steps, vals = zip(*v["heldout"])
                style = "-" if v["outcome"].startswith("won") else "--"
                ax.plot(steps, vals, style, marker="o", label=f"{v['index']}: " + _short(v["values"]))
        ax.set(title=task, xlabel="step", ylabel="held-out score")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(search) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
