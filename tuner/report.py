"""A finished run's summary (`summary.json`) and the Markdown rendered from it.

`MultiTaskPromptTuningRecipe.finish` builds a `RunSummary` and writes `to_json()`; everything that
reads a run back (`promptfleet eval`, Ray Tune trials, the launchers, the benchmarks) reads it with
`RunSummary.from_json` and its fields, never by string keys. The file's keys and values are what
they have always been (CI reads it as plain JSON); `from_json` also reads the summaries of earlier
releases, which lack the keys added since.

A run on Ray whose worker group was lost and replaced records each restart (`RestartRecord`: how far the
lost group got, the checkpoint step and path the new one resumed from): `restarts`, `lost_steps` and
`restart_log` in the file (absent when none), a **Restarts** table in the report.

A classification task reports two macro-F1s (`tuner.scores.MACRO_F1_DEFINITIONS`): the summary
holds their definitions under `metric_definitions` and the report states them beside the per-label
table. A tuned classifier that gives one label to more than 90 % of its examples has collapsed onto
it: `collapse_warnings` says so, in the report and on the console.

This module renders; it does not evaluate (`tuner.evaluate`) or decide where files go (the recipe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.metrics import EvalPoint, RestartRecord
from tuner.scores import MACRO_F1_DEFINITIONS, TaskScores
from tuner.search.report import render_search_report

SUMMARY_FILE = "summary.json"  # in the run directory


@dataclass
class TaskSummary:
    """One task's line of the summary: what it is and how it scored before and after tuning."""

    kind: str  # classification, generation, ner
    metric: str  # the headline metric
    zero_shot: TaskScores | None  # the untuned backbone's (None: not evaluated; {} in the file)
    tuned: TaskScores | None  # the tuned prompt's (None: the task has no eval examples)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "metric": self.metric,
            "zero_shot": self.zero_shot.to_json() if self.zero_shot else {},
            "tuned": self.tuned.to_json() if self.tuned else {},
        }

    @classmethod
    def from_json(cls, data: dict) -> TaskSummary:
        scores = TaskScores.from_json
        return cls(data["kind"], data["metric"], scores(data["zero_shot"]), scores(data["tuned"]))


@dataclass
class RunSummary:
    """What a finished run reports: its shape, throughput, every evaluation, each task's scores."""

    name: str  # the job's name (its run directory's)
    backbone: str  # model.name as the job gave it
    steps: int  # optimiser steps applied
    world_size: int  # ranks that trained
    num_virtual_tokens: int
    tokens_per_s: float  # mean training throughput over the logged steps
    tasks: dict[str, TaskSummary]  # the tasks this run trained
    config: dict  # the job config (`to_dict`); `from_dict(JobConfig, ...)` reads it
    prompt_method: str = "independent"  # absent before prompt methods
    # tasks of prompt.init_from, re-published unchanged (not trained, not re-evaluated)
    carried_tasks: list[str] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)  # every evaluation's scores, by step
    search: dict | None = None  # per task, the in-batch search's variants and choice (search only)
    search_scoring_s: float | None = None  # wall time spent scoring variants since (re)start (search only)
    restarts: list[RestartRecord] = field(default_factory=list)  # worker groups Ray Train lost and replaced

    def to_json(self) -> dict:
        """The dict `summary.json` holds, keys in the order the file has always had them."""
        out = {
            "name": self.name,
            "backbone": self.backbone,
            "steps": self.steps,
            "world_size": self.world_size,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prompt_method": self.prompt_method,
            "carried_tasks": self.carried_tasks,
            "tokens_per_s": self.tokens_per_s,
            "evals": [asdict(e) for e in self.evals],
            "tasks": {n: t.to_json() for n, t in self.tasks.items()},
            "config": self.config,
        }
        if self.restarts:  # worker groups lost and replaced; the steps they had applied past their checkpoint
            out["restarts"] = len(self.restarts)
            out["lost_steps"] = sum(r.lost_steps for r in self.restarts)
            out["restart_log"] = [r.to_json() for r in self.restarts]
        if self.search is not None:
            out["search"] = self.search
        if self.search_scoring_s is not None:
            out["search_scoring_s"] = self.search_scoring_s
        # which macro-F1 is which; summaries of earlier releases (whose one macro_f1 averaged over every
        # label) have no macro_f1_all_labels, and get no definitions
        if any(
            s is not None and "macro_f1_all_labels" in s.values
            for t in self.tasks.values()
            for s in (t.zero_shot, t.tuned)
        ):
            out["metric_definitions"] = dict(MACRO_F1_DEFINITIONS)
        return out

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        """Raises KeyError, TypeError or AttributeError where `data` is not a run summary."""
        return cls(
            name=data["name"],
            backbone=data["backbone"],
            steps=data["steps"],
            world_size=data["world_size"],
            num_virtual_tokens=data["num_virtual_tokens"],
            tokens_per_s=data["tokens_per_s"],
            tasks={n: TaskSummary.from_json(t) for n, t in data["tasks"].items()},
            config=dict(data["config"]),
            prompt_method=data.get("prompt_method", "independent"),
            carried_tasks=list(data.get("carried_tasks", [])),
            evals=[EvalPoint(**e) for e in data.get("evals", [])],
            search=data.get("search"),
            search_scoring_s=data.get("search_scoring_s"),
            restarts=[RestartRecord.from_json(r) for r in data.get("restart_log", [])],
        )

    def tuned_scores(self) -> dict[str, float]:
        """Each task's headline tuned score (0 where it has none)."""
        return {n: t.tuned.score if t.tuned else 0.0 for n, t in self.tasks.items()}

    def __getitem__(self, key: str) -> Any:
        """The JSON value under `key` (`summary["steps"]`), for code that reads the file's dict."""
        return self.to_json()[key]


def read_summary(run_dir: str | os.PathLike) -> RunSummary:
    """The summary a finished run wrote into `run_dir`.

    Raises OSError (no file), ValueError (not JSON), KeyError, TypeError or AttributeError (not a summary).
    """
    return RunSummary.from_json(json.loads((Path(run_dir) / SUMMARY_FILE).read_text()))


def render_table(rows: Iterable[tuple[str, str, float | None, float]]) -> str:
    """A Markdown table of (task, metric, zero-shot score or None: not evaluated, tuned score)."""
    lines = ["| task | metric | zero-shot | tuned |", "|---|---|---:|---:|"]
    for name, metric, zero, tuned in rows:
        lines.append(f"| {name} | {metric} | {'' if zero is None else f'{zero:.4f}'} | {tuned:.4f} |")
    return "\n".join(lines)


def summary_table(summary: RunSummary) -> str:
    """`render_table` of the run's tasks: tuned beside zero-shot."""
    return render_table(
        (n, t.metric, t.zero_shot.score if t.zero_shot else None, t.tuned.score if t.tuned else 0.0)
        for n, t in summary.tasks.items()
    )


def collapse_warning(task: str, scores: TaskScores | None) -> str | None:
    """One line where `scores` (a classifier's) give one label to more than 90 % of the examples."""
    collapsed = scores.collapsed_onto() if scores is not None else None
    if collapsed is None:
        return None
    label, share = collapsed
    return f"task {task}: {100 * share:.0f} % of predictions are {label!r} (collapsed onto one label)"


def collapse_warnings(summary: RunSummary) -> list[str]:
    """`collapse_warning` of every task's tuned scores."""
    lines = (collapse_warning(n, t.tuned) for n, t in summary.tasks.items())
    return [line for line in lines if line]


def render_per_label(name: str, scores: TaskScores) -> list[str]:
    """A task's per-label table (tuned), under both its macro-F1s where it has them."""
    per = scores.per_label
    counted = all("predicted" in v for v in per.values())  # absent from summaries of earlier releases
    parts = [f"## {name}: per-label (tuned)", ""]
    if "macro_f1" in scores.values and "macro_f1_all_labels" in scores.values:
        present = sum(1 for v in per.values() if v["support"] or v.get("predicted"))
        parts += [
            f"macro-F1 {scores.values['macro_f1']:.4f} over the {present} labels present in the references "
            f"or predictions (`macro_f1`); {scores.values['macro_f1_all_labels']:.4f} over all "
            f"{len(per)} labels (`macro_f1_all_labels`, absent labels count 0).",
            "",
        ]
    parts += [
        "| label | precision | recall | F1 | support |" + (" predicted |" if counted else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if counted else ""),
    ]
    parts += [
        f"| {lab} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        + (f" {v['predicted']} |" if counted else "")
        for lab, v in per.items()
    ]
    return [*parts, ""]


def render_restarts(restarts: list[RestartRecord]) -> list[str]:
    """The report's lines on lost worker groups (none for a run that lost none)."""
    if not restarts:
        return []
    lost = sum(r.lost_steps for r in restarts)
    parts = [
        f"**Restarts**: Ray Train lost and replaced the worker group {len(restarts)} time(s); "
        f"{lost} step(s) applied after the last checkpoint were lost and done again.",
        "",
        "| lost after step | resumed from step | steps done again | workers | checkpoint |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in restarts:
        where = f"`{r.checkpoint}`" if r.checkpoint else "none (started over)"
        parts.append(f"| {r.lost_at_step} | {r.resumed_step} | {r.lost_steps} | {r.workers} | {where} |")
    return [*parts, ""]


def render_report(summary: RunSummary) -> str:
    """`report.md`: the run's shape, the score table, warnings, per-label tables, and the search's report."""
    parts = [
        f"# Run `{summary.name}`",
        "",
        f"Backbone `{summary.backbone}`, {summary.steps} steps on {summary.world_size} rank(s), "
        f"{summary.num_virtual_tokens} virtual tokens per task, {summary.tokens_per_s:.0f} tokens/s.",
        "",
        summary_table(summary),
        "",
    ]
    parts += render_restarts(summary.restarts)
    warnings = collapse_warnings(summary)
    if warnings:
        parts += ["**Warnings**", "", *(f"- {w}" for w in warnings), ""]
    for name, t in summary.tasks.items():
        if t.tuned and t.tuned.per_label:
            parts += render_per_label(name, t.tuned)
    if summary.search:
        parts.append(render_search_report(summary.search))
    return "\n".join(parts)
