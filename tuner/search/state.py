"""In-batch hyperparameter search: several variants of every task trained side by side, halved at rungs.

Every task gets one `Variant` per combination of `search.space` (`tuner.search.space`), each its own
prompt-bank row `<task>~<k>`. The recipe draws a task's examples once and feeds them to all of the
task's live variants (`SearchState.expand`), so the variants see the same examples in the same
mixed batch; each row gets its own learning rate, schedule, weight decay and clipping
(`SearchState.row_hparams`) and its own initialisation (`tuner.search.driver`).

Successive halving (as ASHA's synchronous form): after each rung step the live variants of a task
are scored on a held-out slice of its train split (`tuner.tasks.data.MultiTaskSampler.hold_out`: the last
examples of its first-epoch order, never drawn for training) and of its n variants the best
ceil(n / eta^k) stay after rung k (ties: the lower training loss, then the lower variant index, so every rank
agrees). With `search.heldout_schedule: grow` (the default) a rung scores only the first
n x step / last-rung step of the (shuffled) slice, at least 16 (`SearchState.heldout_size`): scoring is
held-out forwards per live variant, so at fixed n it grows with the number of variants, not with the
training they had; growing n with the steps keeps it a bounded share of the run, as halving does for
training. A rung ranks by `search.criterion` (auto: the task's metric where it is one forward per
example, classification; the target NLL where the metric would decode). At the end each task still
undecided is ranked once more on the whole slice and keeps one variant (a task a rung has cut to one
is not scored again), whose prompt becomes the task's adapter; everything else (export, serving) sees
one adapter per task. The state is plain JSON, saved in every checkpoint.

The job's own configuration (its `optim` / `prompt` sections, when the space holds that combination:
the *base* variant) is what the task would train without a search, so a rung drops it only on
evidence: while the leader beats it by no more than `search.base_margin` standard errors of their
paired difference (`tuner.search.evidence.paired_se`: a bootstrap over the held-out examples, both
variants scored on the same resample), the base variant takes the last place kept (the one-standard-error
rule of CART and the lasso). A rung of a few dozen examples is mostly noise; without the rule a task
leaves a configuration that works for whichever variant was luckiest on them.

With `search.scoring: prequential` a rung scores no held-out forwards: every training forward already
scores each drawn example under each live variant of its task, before the update that example causes
(in the first epoch, an example none of the task's prompts has seen), and `SearchState.record` keeps
those results; a rung ranks the live variants on the examples drawn in the latter half of the steps so
far (`SearchState.window`), paired as held-out examples are (every live variant saw each of them). It
is the progressive validation of online learning. The scoring's share of a run is then free for later
rungs; a task with too few examples in its window is scored on its held-out slice as before.

Variants that would train alike on a task are trained once (`tuner.search.space.effective`: e.g.
`class_labels` and `vocab` are one initialisation for a task without label words); the report says
which they follow.

This module computes nothing on the model: the driver (`tuner.search.driver`) scores variants and
hands the scores in. Settings that cannot vary inside one job (prompt length, steps, batch size) are
searched over whole jobs by `cluster.tune`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tuner.prompts.optim import lr_at
from tuner.search.evidence import Evidence, paired_se
from tuner.search.report import describe_base_check
from tuner.search.space import SEP, Variant, effective, expand_space

if TYPE_CHECKING:
    from tuner.search.space import SearchedJob

MIN_HELDOUT = 16  # the fewest held-out examples a rung scores under search.heldout_schedule grow
MIN_PREQUENTIAL = 16  # the fewest window examples a prequential rung ranks on (fewer: the held-out slice)


@dataclass(frozen=True)
class RowHParams:
    """Per-row optimiser settings for one step, in the order of the rows handed to the optimiser."""

    lr: list[float]
    weight_decay: list[float]
    grad_clip: list[float]


@dataclass
class RungResult:
    """Held-out scores of a task's live variants at one rung, and which of them stayed."""

    rung: int  # 0-based; the final selection after the last step (tasks still undecided) is one rung more
    step: int
    task: str
    scores: dict[int, float]  # variant index -> held-out score
    kept: list[int]
    # variant index -> its mean training loss over its last logged steps: breaks ties of held-out score
    # (a small held-out slice often scores several variants the same)
    train_loss: dict[int, float] = field(default_factory=dict)
    examples: int = 0  # examples scored (0: not recorded, a checkpoint from before the schedule)
    # The base-variant rule, where a rung would have dropped the base variant: the leader, its score
    # minus the base's, the paired standard error of that gap, and whether the base stayed (gap <= margin x se)
    base_check: dict[str, Any] = field(default_factory=dict)
    # what was scored: the held-out slice (heldout), or the window of drawn examples (prequential)
    source: str = "heldout"


def halving_rungs(max_steps: int, num_variants: int, eta: int, rungs: Sequence[int] = ()) -> list[int]:
    """Steps after which a task's variants are halved (before `max_steps`; the end picks among any left).

    Without explicit `rungs`: successive halving needs R = ceil(log_eta(n)) rounds to reach one
    variant; they happen after max_steps / eta^R, ..., max_steps / eta steps, so the many variants
    of the first rounds train for a small share of the steps and the last (1 - 1/eta) of training
    costs what a single-variant run does (6 variants, eta 3: 1.8x the example-steps of one).
    """
    if rungs:
        return [r for r in rungs if r < max_steps]
    rounds, n = 0, num_variants
    while n > 1:
        n, rounds = math.ceil(n / eta), rounds + 1
    steps = [max_steps // eta ** (rounds - r) for r in range(rounds)]
    return sorted({s for s in steps if 0 < s < max_steps})


@dataclass
class SearchState:
    """Every task's variants, which are live, and the results of each rung (saved in checkpoints)."""

    variants: dict[str, list[Variant]]  # task -> its variants (index = position)
    eta: int
    rungs: list[int]  # steps after which variants are halved
    live: dict[str, list[int]] = field(default_factory=dict)  # task -> live variant indices
    results: list[RungResult] = field(default_factory=list)
    heldout_schedule: str = "fixed"  # `search.heldout_schedule`: grow | fixed
    base: int | None = None  # the variant that is the job's own configuration (None: not in the space)
    base_margin: float = 0.0  # `search.base_margin`: paired standard errors the leader must beat it by
    base_rungs: str = "every"  # `search.base_rungs`: last (earlier rungs always keep the base) | every

    # task -> {variant index: the live variant it trains exactly as, on that task}: not trained twice
    same: dict[str, dict[int, int]] = field(default_factory=dict)
    prequential: bool = False  # `search.scoring: prequential`: `record` the drawn examples' results
    # task -> {"step": [...], "gold": [...], "values": {variant index: [...]}}: one entry per drawn example
    # of the window to come (the step it was drawn at, its gold label index or -1, each live variant's result)
    drawn: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def build(
        cls, job: SearchedJob, tasks: Sequence[str], labelled: Collection[str] | None = None
    ) -> SearchState:
        """Every task's variants of `job.search.space`, halved as `job.search` says over the job's
        `optim.max_steps`. `labelled`: the tasks with label words (default: all); elsewhere `class_labels`
        initialises as `vocab` does, so those variants are one (`effective`)."""
        search = job.search
        settings = expand_space(job)
        variants = {t: [Variant(t, k, s) for k, s in enumerate(settings)] for t in tasks}
        rungs = halving_rungs(job.optim.max_steps, len(settings), search.eta, search.rungs)
        base = next(
            (k for k, s in enumerate(settings) if s.optim == job.optim and s.prompt == job.prompt), None
        )
        live, same = {}, {}
        for t in tasks:
            first: dict[tuple, int] = {}  # effective settings -> the variant that trains them
            order = sorted(range(len(settings)), key=lambda k: (k != base, k))  # the base first: it stays
            for k in order:
                key = effective(settings[k], labelled is None or t in labelled)
                if key in first:
                    same.setdefault(t, {})[k] = first[key]
                else:
                    first[key] = k
            live[t] = sorted(first.values())
        return cls(
            variants,
            search.eta,
            rungs,
            live,
            heldout_schedule=search.heldout_schedule,
            base=base if len(settings) > 1 else None,
            base_margin=search.base_margin,
            base_rungs=search.base_rungs,
            same=same,
            prequential=search.scoring == "prequential",
        )

    # ------------------------------------------------------------------ rows

    def rows(self) -> list[str]:
        """Every variant's prompt-bank row name, task by task."""
        return [v.row for vs in self.variants.values() for v in vs]

    def variant(self, row: str) -> Variant:
        task, _, k = row.rpartition(SEP)
        return self.variants[task][int(k)]

    def live_rows(self, task: str) -> list[str]:
        return [self.variants[task][k].row for k in self.live[task]]

    def leader(self, task: str) -> str:
        """The task's best live variant so far (its first live one before any rung): the task's prompt."""
        scored = [r for r in self.results if r.task == task]
        if not scored or len(self.live[task]) == 1:
            return self.variants[task][self.live[task][0]].row
        if scored[-1].base_check.get("kept"):
            return self.variants[task][self.base].row  # the leader has not beaten it beyond noise
        last = scored[-1]
        best = _ranked({k: last.scores[k] for k in self.live[task] if k in last.scores}, last.train_loss)
        return self.variants[task][best[0] if best else self.live[task][0]].row

    def expand(self, draw: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """(task, example) -> (variant row, example) for each of the task's live variants, in order."""
        return [(row, i) for t, i in draw for row in self.live_rows(t)]

    def row_hparams(self, rows: Sequence[str], step: int, max_steps: int) -> RowHParams:
        """Each row's learning rate at `step` (its own peak, warm-up, schedule), weight decay and clipping."""
        opts = [self.variant(r).settings.optim for r in rows]
        return RowHParams(
            lr=[lr_at(step, o.lr, o.warmup_steps, max_steps, o.schedule) for o in opts],
            weight_decay=[o.weight_decay for o in opts],
            grad_clip=[o.grad_clip for o in opts],
        )

    # ------------------------------------------------------------------ prequential results

    def wants_prequential(self) -> bool:
        """Whether training forwards should score their examples: prequential, and a task still undecided."""
        return self.prequential and any(len(v) > 1 for v in self.live.values())

    def record(
        self, step: int, draws: Sequence[tuple[str, int]], values: Sequence[float], gold: Sequence[int]
    ):
        """Keep the results of step `step`'s draws (task, example), in the order `expand` laid them out:
        `values` holds one result per live variant of each draw (higher is better, or a predicted label
        index where `gold` >= 0), `gold` one gold label index per draw (-1: not a label)."""
        want = sum(len(self.live[t]) for t, _ in draws)
        if want != len(values) or len(gold) != len(draws):
            raise ValueError(
                f"record: {len(values)} results and {len(gold)} gold labels for {len(draws)} draws "
                f"({want} (draw, live variant) pairs)"
            )
        pos = 0
        for (task, _), g in zip(draws, gold):
            live = self.live[task]
            if len(live) > 1:
                d = self.drawn.setdefault(task, {"step": [], "gold": [], "values": {}})
                d["step"].append(step)
                d["gold"].append(int(g))
                for j, k in enumerate(live):
                    d["values"].setdefault(k, []).append(float(values[pos + j]))
            pos += len(live)

    @staticmethod
    def window_start(step: int) -> int:
        """A rung after `step` ranks the examples drawn after step `step // 2`: the latter half so far."""
        return step // 2

    def window(self, task: str, step: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The gold label indices of `task`'s examples drawn in the window of a rung after `step`, and each
        live variant's results on them (every live variant was live for the whole window)."""
        d = self.drawn.get(task, {"step": [], "gold": [], "values": {}})
        keep = np.asarray(d["step"], dtype=np.int64) > self.window_start(step)
        return np.asarray(d["gold"], dtype=np.int64)[keep], {
            k: np.asarray(d["values"].get(k, []), dtype=np.float64)[keep] for k in self.live[task]
        }

    def forget_before(self, step: int) -> None:
        """Drop drawn results no later window reads (a later rung's window starts later), and dropped
        variants' results."""
        start = self.window_start(step)
        for task, d in self.drawn.items():
            keep = [i for i, s in enumerate(d["step"]) if s > start]
            d["step"] = [d["step"][i] for i in keep]
            d["gold"] = [d["gold"][i] for i in keep]
            d["values"] = {k: [v[i] for i in keep] for k, v in d["values"].items() if k in self.live[task]}

    # ------------------------------------------------------------------ halving

    def is_rung(self, step: int) -> bool:
        return step in self.rungs

    def heldout_size(self, step: int, available: int, final: bool = False) -> int:
        """How many of a task's `available` held-out examples the rung after `step` scores (the first ones).

        grow: available x step / last rung step, at least MIN_HELDOUT (never more than there are); the
        last rung and the final selection score all of them. fixed: all of them at every rung.
        """
        if self.heldout_schedule == "fixed" or final or not self.rungs or step >= self.rungs[-1]:
            return available
        return min(available, max(MIN_HELDOUT, math.ceil(available * step / self.rungs[-1])))

    def _to_score(self, task: str, final: bool) -> bool:
        """Whether a rung scores `task`: while it has several live variants. The final selection also
        scores a task no rung has scored (a one-variant search, e.g. one job of a naive search, which is
        compared on its held-out number); a task a rung has cut to one, or whose variants all train alike
        (`same`), is decided and not scored again."""
        if len(self.live[task]) > 1:
            return True
        return final and len(self.variants[task]) == 1 and not any(r.task == task for r in self.results)

    def rows_to_score(self, final: bool = False) -> list[str]:
        """Rows a rung scores: the live variants of the tasks `_to_score`."""
        return [r for t in self.variants if self._to_score(t, final) for r in self.live_rows(t)]

    def apply_rung(
        self,
        step: int,
        scores: dict[str, float],
        final: bool = False,
        train_loss: dict[str, float] | None = None,
        examples: dict[str, int] | None = None,
        evidence: dict[str, Evidence] | None = None,
        sources: dict[str, str] | None = None,
    ) -> list[RungResult]:
        """Record `scores` (row -> held-out score) and keep each task's best `survivors` (1 when `final`).

        Equal scores go to the lower `train_loss` (row -> recent training loss), then the lower index.
        `examples` (task -> examples scored) and `sources` (task -> heldout or prequential, what they were) are
        recorded for the report. With `evidence` (row ->
        its per-example results) the base variant stays while the leader has not beaten it beyond noise
        (the base-variant rule, module docstring); a row without evidence (a decoded generation metric) is ranked by score alone.
        """
        train_loss, examples, evidence, sources = (
            train_loss or {},
            examples or {},
            evidence or {},
            sources or {},
        )
        rung = len({r.step for r in self.results})
        out = []
        for pos, task in enumerate(self.variants):
            if not self._to_score(task, final):
                continue
            live = self.live[task]
            got = {k: scores[self.variants[task][k].row] for k in live}
            loss = {k: train_loss[r] for k in live if (r := self.variants[task][k].row) in train_loss}
            keep = 1 if final else self.survivors(task, rung)
            ranked = _ranked(got, loss)
            kept, check = ranked[:keep], {}
            if self.base in live and self.base not in kept and self.base_margin > 0:
                gap = got[ranked[0]] - got[self.base]
                ev = {k: evidence.get(self.variants[task][k].row) for k in (ranked[0], self.base)}
                if all(e is not None and len(e.values) > 1 for e in ev.values()):
                    se = paired_se(ev[ranked[0]], ev[self.base], seed=step * 100_003 + pos)
                    check = {"leader": ranked[0], "gap": gap, "se": se, "kept": gap <= self.base_margin * se}
                if self.base_rungs == "last" and not final and self.rungs and step < self.rungs[-1]:
                    # before the last rung the base stays whatever the gap: a ranking after a fraction
                    # of the schedule favours what has moved least (short-horizon bias), not noise
                    check = {
                        "leader": ranked[0],
                        "gap": gap,
                        "se": check.get("se"),
                        "kept": True,
                        "early": True,
                    }
                if check.get("kept"):  # the base takes the last place kept
                    kept = kept[:-1] + [self.base]
            self.live[task] = sorted(kept)
            out.append(
                RungResult(
                    rung,
                    step,
                    task,
                    got,
                    sorted(kept),
                    loss,
                    examples.get(task, 0),
                    check,
                    sources.get(task, "heldout"),
                )
            )
        self.results += out
        return out

    def survivors(self, task: str, rung: int) -> int:
        """How many of `task`'s live variants rung `rung` (0-based) keeps: ceil(n / eta^(rung + 1)) of its n
        variants, as halving them rung by rung does; a task with variants that train alike (`same`) has
        fewer live from the start and keeps as many (all, when fewer), so they get the same steps."""
        designed = math.ceil(len(self.variants[task]) / self.eta ** (rung + 1))
        return max(1, min(len(self.live[task]), designed))

    def winner(self, task: str) -> Variant:
        return self.variant(self.leader(task))

    # ------------------------------------------------------------------ persistence and report

    def to_json(self) -> dict:
        return {
            "rows": self.rows(),
            "rungs": list(self.rungs),
            "live": {t: list(v) for t, v in self.live.items()},
            "results": [
                {
                    **dataclasses.asdict(r),
                    "scores": {str(k): v for k, v in r.scores.items()},
                    "train_loss": {str(k): v for k, v in r.train_loss.items()},
                }
                for r in self.results
            ],
            "drawn": {
                t: {**d, "values": {str(k): v for k, v in d["values"].items()}} for t, d in self.drawn.items()
            },
        }

    def load_json(self, data: dict) -> None:
        """Restore live sets and rung results saved by `to_json` (for the same job's variants)."""
        if data.get("rows") != self.rows():
            raise ValueError("the checkpoint was written for another search space (variant rows differ)")
        self.live = {t: list(v) for t, v in data["live"].items()}
        self.results = [
            RungResult(
                r["rung"],
                r["step"],
                r["task"],
                {int(k): v for k, v in r["scores"].items()},
                r["kept"],
                {int(k): v for k, v in r.get("train_loss", {}).items()},
                r.get("examples", 0),
                r.get("base_check", {}),
                r.get("source", "heldout"),
            )
            for r in data["results"]
        ]
        self.drawn = {
            t: {**d, "values": {int(k): v for k, v in d["values"].items()}}
            for t, d in data.get("drawn", {}).items()
        }

    def summary(self) -> dict[str, dict]:
        """Per task: its chosen variant and every variant's values, held-out curve and outcome."""
        out = {}
        for task, variants in self.variants.items():
            results = [r for r in self.results if r.task == task]
            win = self.winner(task)
            rows = []
            for v in variants:
                curve = [[r.step, r.scores[v.index]] for r in results if v.index in r.scores]
                dropped = next((r for r in results if v.index in r.scores and v.index not in r.kept), None)
                if v.index == win.index:
                    outcome = "won"
                    # the rung that decided the task says why: the base kept there by the base-variant
                    # rule, or (no check) ranked first there on its score
                    decided = results[-1] if results else None
                    if decided is not None and v.index == self.base and decided.base_check.get("kept"):
                        why = describe_base_check(decided.base_check, self.base_margin)
                        outcome += f" (the job's own configuration; {why} at step {decided.step})"
                elif v.index in self.same.get(task, {}):
                    outcome = f"trains as variant {self.same[task][v.index]} on this task (not trained twice)"
                elif dropped is not None:
                    outcome = f"dropped at rung {dropped.rung} (step {dropped.step})"
                    if dropped.base_check and v.index == self.base:
                        c = dropped.base_check
                        outcome += (
                            f", beaten by {c['gap']:.4f} > {self.base_margin:g} x paired SE {c['se']:.4f}"
                        )
                else:
                    outcome = "not scored"
                rows.append(
                    {
                        "index": v.index,
                        "row": v.row,
                        "values": v.settings.values,
                        "heldout": curve,
                        "outcome": outcome,
                        "base": v.index == self.base,
                    }
                )
            out[task] = {
                "chosen": win.settings.values,
                "chosen_row": win.row,
                "variants": rows,
                # step -> held-out examples its rung scored (grow: fewer at the early rungs)
                "heldout_examples": {str(r.step): r.examples for r in results if r.examples},
                # step -> what its rung scored: heldout (the slice) or prequential (the window's drawn examples)
                "scored_on": {str(r.step): r.source for r in results},
            }
        return out


def _ranked(scores: dict[int, float], train_loss: dict[int, float] | None = None) -> list[int]:
    """Variant indices, best held-out score first; ties go to the lower training loss, then the lower
    index (every rank holds the same all-reduced numbers, so every rank ranks alike)."""
    loss = train_loss or {}
    return sorted(scores, key=lambda k: (-scores[k], loss.get(k, math.inf), k))
