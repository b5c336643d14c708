"""A fleet's summary: how the gains from tuning are spread over many tasks, and which tasks gained least.

With hundreds of tasks the per-task table of `report.md` is too long to read for the picture, so a run
of at least `FLEET_TASKS` evaluated tasks gets a section more at the end of its report: how many tasks
gained, the distribution of gains (tuned minus zero-shot, in points: metrics on 0-1 times 100, chrF
and ROUGE-L as they are) by kind and metric, and the tasks that gained least and that score lowest.
The per-task report above it is unchanged.

It renders from the run's `RunSummary`; it evaluates nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuner.report import RunSummary

FLEET_TASKS = 20  # from this many evaluated tasks on, the report has a fleet section
WORST = 10  # tasks listed as gaining least and scoring lowest
PERCENT_METRICS = frozenset({"chrf", "rouge_l"})  # already on 0-100


def points(metric: str, value: float) -> float:
    return value if metric in PERCENT_METRICS else 100 * value


def quantile(values: list[float], q: float) -> float:
    """The `q` quantile of sorted `values` (linear between the two nearest ranks)."""
    at = q * (len(values) - 1)
    lo = int(at)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)


def render_fleet_summary(summary: RunSummary, min_tasks: int = FLEET_TASKS) -> str:
    """The report's fleet section (Markdown), or "" for a run of fewer than `min_tasks` evaluated tasks."""
    tuned = {n: t for n, t in summary.tasks.items() if t.tuned is not None}
    if len(tuned) < min_tasks:
        return ""
    gains = {
        n: points(t.metric, t.tuned.score - t.zero_shot.score)
        for n, t in tuned.items()
        if t.zero_shot is not None
    }
    lines = ["", "## Fleet", "", f"{len(summary.tasks)} tasks, {len(tuned)} evaluated."]
    if gains:
        gained = sum(g > 0 for g in gains.values())
        lines += [
            f"{gained} of {len(gains)} gained over zero-shot ({100 * gained / len(gains):.0f} %).",
            "",
            "| kind | metric | tasks | min | 10 % | median | 90 % | max | mean |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, str], list[float]] = {}
        for n, g in gains.items():
            groups.setdefault((tuned[n].kind, tuned[n].metric), []).append(g)
        for (kind, metric), values in sorted(groups.items()):
            v = sorted(values)
            cells = [v[0], quantile(v, 0.1), quantile(v, 0.5), quantile(v, 0.9), v[-1], sum(v) / len(v)]
            lines.append(f"| {kind} | {metric} | {len(v)} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
        lines += [
            "",
            "Gains in points (tuned minus zero-shot).",
            "",
            f"**Least gain** ({min(WORST, len(gains))})",
            "",
        ]
        lines += ["| task | metric | zero-shot | tuned | gain |", "|---|---|---|---|---|"]
        for n in sorted(gains, key=lambda n: (gains[n], n))[:WORST]:
            t = tuned[n]
            z, s = points(t.metric, t.zero_shot.score), points(t.metric, t.tuned.score)
            lines.append(f"| {n} | {t.metric} | {z:.1f} | {s:.1f} | {gains[n]:+.1f} |")
    lines += [
        "",
        f"**Lowest scores** ({min(WORST, len(tuned))})",
        "",
        "| task | metric | tuned |",
        "|---|---|---|",
    ]
    for n in sorted(tuned, key=lambda n: (points(tuned[n].metric, tuned[n].tuned.score), n))[:WORST]:
        lines.append(f"| {n} | {tuned[n].metric} | {points(tuned[n].metric, tuned[n].tuned.score):.1f} |")
    return "\n".join(lines) + "\n"
