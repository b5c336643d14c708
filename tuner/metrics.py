"""Typed records of a training run: what one step did, what one evaluation scored, and the history.

`MultiTaskPromptTuningRecipe.train_step` returns a `StepMetrics`; evaluations during and after
training become `EvalPoint`s (and, while they run, `EvalProgress` records); `RunHistory` keeps both and is what checkpoints store (as JSON), what
the curves plot and what the summary averages. On Ray, each replaced worker group is a `RestartRecord`
(`cluster.recovery` keeps them; the summary lists them). The Prometheus exporter (`cluster.metrics`), the
plots (`tuner.plots`) and the driver's progress bar read these fields, never string keys.

Nothing here computes metrics (see `tuner.evaluate`) or writes files (see `tuner.checkpoint`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tuner.scores import TaskScores


@dataclass
class StepMetrics:
    """One optimiser step, as every rank sees it after the all-reduce."""

    step: int  # the step this record closes (1-based)
    loss: float  # mean target NLL over the global batch's examples
    lr: float  # learning rate applied in this step
    tokens: int  # real text tokens (input + target) in the global batch
    task_loss: dict[str, float]  # mean target NLL of each task in the batch over its own examples
    step_time_s: float = 0.0  # wall time of the step on this rank
    max_memory_allocated: int = 0  # peak device bytes during the step (CUDA; 0 on CPU)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


@dataclass
class EvalPoint:
    """Headline scores of every task at one step (`zero_shot`: the untuned backbone)."""

    step: int
    scores: dict[str, float]
    zero_shot: bool = False


@dataclass
class EvalProgress:
    """How far an evaluation pass has come: rank 0 reports it as the pass's batches finish (the
    Ray driver draws its bar from these)."""

    what: str  # the pass: "zero-shot", "eval @ step 20", "final eval"
    done: int  # examples scored so far, over every task of the pass
    total: int  # examples the pass scores


@dataclass
class CheckpointRecord:
    """A checkpoint written at `step` (reported to Ray Train and the metrics exporter)."""

    step: int
    checkpoint_time_s: float


@dataclass
class RestartRecord:
    """A worker group Ray Train lost and replaced: how far it had got, and where its replacement resumed."""

    lost_at_step: int  # the last step the lost group finished (as far as the driver's ledger heard)
    resumed_step: int  # the checkpoint step the new group resumed from (0: none yet, it started over)
    checkpoint: str  # that checkpoint's persistent path or URI (Ray Train's storage); "" for none
    workers: int  # workers the new group needed

    @property
    def lost_steps(self) -> int:
        """Steps the lost group had applied after its checkpoint: done again by the new group."""
        return max(0, self.lost_at_step - self.resumed_step)

    def to_json(self) -> dict:
        return {**asdict(self), "lost_steps": self.lost_steps}

    @classmethod
    def from_json(cls, data: dict) -> RestartRecord:
        return cls(data["lost_at_step"], data["resumed_step"], data["checkpoint"], data["workers"])


@dataclass
class RunHistory:
    """Everything logged during a run; saved in every checkpoint so a resumed run keeps its curves."""

    steps: list[StepMetrics] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    # every task's zero-shot scores (None: no eval examples)
    zero_shot: dict[str, TaskScores | None] = field(default_factory=dict)

    def tuned_evals(self) -> list[EvalPoint]:
        return [e for e in self.evals if not e.zero_shot]

    def mean_tokens_per_s(self) -> float:
        rates = [s.tokens_per_s for s in self.steps if s.step_time_s > 0]
        return sum(rates) / len(rates) if rates else 0.0

    def to_json(self) -> dict:
        return {
            "steps": [asdict(s) for s in self.steps],
            "evals": [asdict(e) for e in self.evals],
            "zero_shot": {n: s.to_json() if s else {} for n, s in self.zero_shot.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> RunHistory:
        return cls(
            steps=[StepMetrics(**s) for s in data.get("steps", [])],
            evals=[EvalPoint(**e) for e in data.get("evals", [])],
            zero_shot={n: TaskScores.from_json(s) for n, s in data.get("zero_shot", {}).items()},
        )
