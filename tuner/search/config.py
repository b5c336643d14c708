"""The `search:` section of a job: which variants every task trains side by side, and how rungs rank them.

`SearchConfig` checks its own values when built and, through `check`, its space against the job it
belongs to (the job's `optim` / `prompt` sections are the settings the variants start from). What the
search then does with it is `tuner.search.state` (halving) and `tuner.search.driver` (the recipe's side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuner.schema import ConfigError, check_choice, check_positive, documented
from tuner.search.space import ROW_ONLY_METHODS, expand_space

if TYPE_CHECKING:
    from tuner.search.space import SearchedJob

SEARCH_CRITERIA = ("auto", "metric", "loss", "label_loss")
HELDOUT_SCHEDULES = ("grow", "fixed")
SEARCH_SCORING = ("heldout", "prequential")


@dataclass
class SearchConfig:
    """In-batch hyperparameter search (`tuner.search.state`): every task trains several variants side by side."""

    space: dict[str, Any] = documented(
        {},
        "Per-task variants: setting -> list of values, e.g. {optim.lr: [0.003, 0.01, 0.03], prompt.init: "
        "[class_labels, vocab]}; every task gets the cartesian product. Empty: no search. Settings that cannot "
        "vary inside one job (prompt length, steps, batch) are searched with `promptfleet tune`.",
    )
    eta: int = documented(
        3, "Successive halving: of a task's n variants the best ceil(n / eta^k) are live after rung k."
    )
    rungs: list[int] = documented(
        [],
        "Steps after which weaker variants are dropped; empty: ceil(log_eta(variants)) rungs at "
        "max_steps / eta^k (the last at max_steps / eta).",
    )
    heldout_examples: int = documented(
        64, "Train examples per task held out (never trained on) to score variants at each rung."
    )
    heldout_fraction: float = documented(
        0.2, "Cap on the held-out share of a task's train split (small tasks keep most of it for training)."
    )
    heldout_schedule: str = documented(
        "grow",
        "How many held-out examples a rung scores: grow (the first heldout_examples x step / last-rung step "
        "of the shuffled slice, at least 16: the many variants of early rungs have trained little and are "
        "scored on fewer examples, as successive halving gives them fewer steps, so scoring stays a bounded "
        "share of the run; the last rung and the end score the whole slice) or fixed (every rung, all of it).",
    )
    criterion: str = documented(
        "auto",
        "What ranks a task's variants at a rung, on its held-out slice: metric (the task's eval metric; "
        "generation and NER tasks decode greedily), loss (mean target NLL: one teacher-forced forward per "
        "example, a task's live variants batched together), label_loss (classification: the NLL of the gold "
        "label among the task's labels, from the metric's own forward; other kinds: loss. Smooth, but early on "
        "it favours low learning rates, whose prompts are still unconfident: BENCHMARKS.md, hp_search run 5), "
        "or auto: the metric for classification tasks, the loss for tasks whose metric needs decoding.",
    )
    scoring: str = documented(
        "heldout",
        "What a rung scores variants on: heldout (the task's held-out slice: forwards of every live variant at "
        "each rung) or prequential (the training examples drawn in the latter half of the steps so far, each "
        "scored by the forward that trains on it, before its update: examples no prompt has seen yet, no "
        "extra forwards; a task with fewer than 16 such examples is scored on its held-out slice). Prequential "
        "frees the scoring's share of a run for later rungs (`rungs`): BENCHMARKS.md, hp_search run 13.",
    )
    base_margin: float = documented(
        1.0,
        "The job's own configuration (its optim / prompt values, when the space holds them) stays at a rung "
        "while the leader beats it by no more than this many standard errors of their paired difference on "
        "the held-out examples (bootstrap; the one-standard-error rule). 0: rank by score alone. Not applied "
        "where the criterion decodes (criterion metric on a generation task).",
    )
    base_rungs: str = documented(
        "last",
        "Rungs at which the job's own configuration can be dropped at all (with base_margin > 0): last (the "
        "last rung; at earlier ones it always stays: after a ninth of the schedule a low learning rate still "
        "near its start outranks it by more than sampling noise and ends worse, BENCHMARKS.md hp_search "
        "run 9) or every.",
    )

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ConfigError(f"search.eta={self.eta!r}: must be >= 2")
        check_positive("search.heldout_examples", self.heldout_examples)
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"search.heldout_fraction={self.heldout_fraction!r}: must be in (0, 1)")
        if any(r <= 0 for r in self.rungs) or sorted(set(self.rungs)) != list(self.rungs):
            raise ConfigError(f"search.rungs={self.rungs!r}: must be increasing positive steps")
        check_choice("search.heldout_schedule", self.heldout_schedule, HELDOUT_SCHEDULES)
        check_choice("search.base_rungs", self.base_rungs, ("last", "every"))
        check_choice("search.scoring", self.scoring, SEARCH_SCORING)
        if not (isinstance(self.base_margin, int | float) and 0 <= self.base_margin < math.inf):
            raise ConfigError(f"search.base_margin={self.base_margin!r}: must be a finite number >= 0")
        if self.criterion not in SEARCH_CRITERIA:
            raise ConfigError(
                f"search.criterion={self.criterion!r}: must be one of {', '.join(SEARCH_CRITERIA)}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.space)

    def check(self, job: SearchedJob) -> None:
        """Refuse, in one line, a space `job` cannot search (this section is `job.search`): variants are
        rows of the independent parameterisation, and `expand_space` refuses unknown or job-level
        settings and invalid values."""
        if not self.enabled:
            return
        if job.prompt.method not in ROW_ONLY_METHODS or job.prompt.init_from:
            raise ConfigError(
                "search.space works with prompt.method=independent (or ulpt, superpos) and no "
                "prompt.init_from (variants are prompt rows with no trainable shared part)"
            )
        expand_space(job)
