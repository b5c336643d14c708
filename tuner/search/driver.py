"""The in-batch search's side of a training run: the hooks the recipe calls, and the scoring at rungs.

`SearchDriver` holds the `SearchState` (`tuner.search.state`), every task's held-out slice and what
ranks its variants, and answers the recipe (`tuner.recipe`) at each of its hooks:

    bank_rows / init_prompts   the prompt bank's rows (every task's variants), each initialised by its
                               own prompt settings
    task_of / expand           a row's task; a micro-batch's draws once per live variant of their task
    row_hparams                each row's learning rate, weight decay and clipping at a step
    scores_forwards / forward_results / record_forwards
                               prequential scoring: each training forward's result on each example
                               (before its update), kept for the next rung's window
    after_step / finish        rungs: score the live variants, drop the weaker ones, log which stay
    prompt_row                 the row that is a task's prompt (its best variant so far)
    to_json / load_json        its state in checkpoints
    summary / plot             its part of the run's summary, and `search.png`

It computes on the model only through what it is handed (the backbone, the tokenizer, the recipe's
composed prompt of a row); it never draws batches or steps an optimiser.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tuner.evaluate import label_nlls, one_token_labels, score_labels, target_losses
from tuner.prompts.bank import PromptBank, init_prompts
from tuner.schema import ConfigError
from tuner.scores import classification_metrics
from tuner.search.evidence import Evidence
from tuner.search.report import describe_base_check, plot_search
from tuner.search.state import MIN_PREQUENTIAL, RowHParams, RungResult, SearchState
from tuner.tasks.kinds import evaluate_task

if TYPE_CHECKING:
    from tuner.metrics import StepMetrics
    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.search.space import SearchedJob
    from tuner.tasks.data import MultiTaskSampler, TaskData
    from tuner.tasks.spec import TaskExample

Draws = list[tuple[str, int]]  # (task or variant row, example index in its train split)
Scored = dict[str, tuple[float, Evidence | None]]  # row -> (score, higher is better; its per-example results)


class SearchDriver:
    """A job's in-batch search during training: variants, held-out slices, rung scoring and logging."""

    def __init__(
        self,
        state: SearchState,
        tasks: dict[str, TaskData],
        heldout: dict[str, TaskData],
        criteria: dict[str, str],
        tokenizer,
        *,
        prompt_of: Callable[[str], torch.Tensor],
        device: torch.device,
        max_len: int,
        seed: int,
        log: Callable[[str], None],
    ):
        """Args:
        state: every task's variants, live sets and rung results.
        tasks: the tasks by name (their train examples and specs).
        heldout: task -> its held-out slice (as an eval split).
        criteria: task -> what ranks its variants at a rung (`metric`, `loss`, `label_loss`).
        tokenizer: the backbone's.
        prompt_of: a bank row's final [P, H] prompt, as the run evaluates and exports it.
        device: where scoring forwards run.
        max_len: `model.max_seq_len`.
        seed: `data.seed` (prompt initialisation).
        log: rank 0's console.
        """
        self.state = state
        self.tasks = tasks
        self.heldout = heldout
        self.criteria = criteria
        self.tokenizer = tokenizer
        self.prompt_of = prompt_of
        self.device = device
        self.max_len = max_len
        self.seed = seed
        self.log = log
        self.lm: PromptTunedLM | None = None  # the backbone variants are scored with (`attach`)
        self.scoring_s = 0.0  # wall time this process spent scoring variants at rungs
        # task -> its labels' token ids where each is one token (prequential scoring reads their logits)
        self._label_token_cache: dict[str, list[int] | None] = {}

    @classmethod
    def build(
        cls,
        job: SearchedJob,
        tasks: dict[str, TaskData],
        sampler: MultiTaskSampler,
        tokenizer,
        criteria: dict[str, str],
        **parts,
    ) -> SearchDriver:
        """Variants of every task, and each task's held-out slice: the last examples of its first-epoch
        order, which `sampler` then never draws (so every draw before them is the plain job's). `parts`:
        the keyword arguments of `SearchDriver`."""
        s, names = job.search, list(tasks)
        labelled = {n for n in names if tasks[n].spec.verbaliser}  # class_labels has words to use
        state = SearchState.build(job, names, labelled)
        heldout = {}
        for n in names:
            try:
                k = tasks[n].heldout_count(s.heldout_examples, s.heldout_fraction)
            except ValueError as e:
                raise ConfigError(f"search: {e}") from None
            heldout[n] = tasks[n].heldout_view(sampler.hold_out(n, k))
        return cls(state, tasks, heldout, criteria, tokenizer, **parts)

    def attach(self, lm: PromptTunedLM) -> None:
        """The backbone variants are initialised and scored with, once it is loaded."""
        self.lm = lm

    # ------------------------------------------------------------------ the prompt bank

    def bank_rows(self) -> list[str]:
        """Every variant's prompt-bank row, task by task."""
        return self.state.rows()

    def init_prompts(self, bank: PromptBank, label_words: dict[str, list[str]]) -> None:
        """Each variant row of `bank` initialised by its own prompt settings (rows sharing them in one
        call); `label_words`: task -> its verbaliser's words."""
        groups: dict[tuple, list[str]] = {}
        for row in self.state.rows():
            p = self.state.variant(row).settings.prompt
            groups.setdefault((p.init, p.init_text, p.init_std), []).append(row)
        for (init, text, std), rows in groups.items():
            part = PromptBank(rows, bank.num_virtual_tokens, bank.hidden_size)
            task_of = {r: self.state.variant(r).task for r in rows}
            words = {r: label_words[task_of[r]] for r in rows}
            init_prompts(
                part,
                self.lm.embed,
                self.tokenizer,
                init,
                label_words=words,
                text=text,
                std=std,
                seed=self.seed,
                streams=task_of,  # a task's variants start from its own prompt (under their init settings)
            )
            for r in rows:
                bank.set_prompt(r, part.prompt(r))

    def prompt_row(self, task: str) -> str:
        """The bank row that is `task`'s prompt: its best variant so far."""
        return self.state.leader(task)

    # ------------------------------------------------------------------ a training step

    def task_of(self, row: str) -> str:
        """The task behind variant row `row`."""
        return self.state.variant(row).task

    def expand(self, draws: Draws) -> Draws:
        """Each drawn (task, example) once per live variant of its task, in order: (row, example)."""
        return self.state.expand(draws)

    def row_hparams(self, rows: Sequence[str], step: int, max_steps: int) -> RowHParams:
        """Each row's learning rate at `step`, weight decay and clipping: its variant's own."""
        return self.state.row_hparams(rows, step, max_steps)

    def scores_forwards(self) -> bool:
        """Whether this step's training forwards should score their examples (`forward_results`):
        prequential scoring, and a task still undecided."""
        return self.state.wants_prequential()

    def forward_results(self, batch, out, examples: list[TaskExample]) -> torch.Tensor:
        """Each segment's result under its own row's prompt, from the forward that trains on it (so before
        this step's update): the predicted label's index (ranked by the metric), the log-probability of
        the gold label among the labels (label_loss), or minus its mean target NLL (loss)."""
        res = -out.seg_loss.double()
        n = batch.target_ids.numel()
        first = torch.full((batch.num_segments,), n, dtype=torch.long, device=res.device)
        first.scatter_reduce_(0, batch.target_seg, torch.arange(n, device=res.device), reduce="amin")
        by_task: dict[str, list[int]] = {}
        for j, ex in enumerate(examples):
            by_task.setdefault(self.task_of(ex.task), []).append(j)
        for task, segs in by_task.items():
            by = self.prequential_criterion(task)
            if by == "loss":
                continue
            idx = torch.tensor(segs, device=res.device)
            logits = out.target_logits[first[idx]][:, self.label_tokens(task)].double()
            if by == "metric":
                res[idx] = logits.argmax(-1).double()
            else:
                labels = self.tasks[task].spec.labels
                gold = torch.tensor([labels.index(examples[j].label) for j in segs], device=res.device)
                res[idx] = torch.log_softmax(logits, -1).gather(1, gold[:, None])[:, 0]
        return res

    def record_forwards(self, step: int, draws: Draws, values: Sequence[float]) -> None:
        """Keep step `step`'s `forward_results` (all ranks', all-reduced) of its `draws` (task, example)
        for the windows of the rungs to come."""
        gold = [self._gold_index(t, i) for t, i in draws]
        self.state.record(step, draws, values, gold)

    # ------------------------------------------------------------------ what ranks a task's variants

    def label_tokens(self, task: str) -> list[int] | None:
        """The first token of each of `task`'s labels (in `spec.labels` order) where every label is one
        distinct token, as `score_labels` ranks them; else None."""
        if task not in self._label_token_cache:
            spec = self.tasks[task].spec  # spec.labels: the verbaliser's keys, in its order
            ids = one_token_labels(self.tokenizer, spec.verbaliser) if spec.task_kind.label_scored else None
            self._label_token_cache[task] = ids
        return self._label_token_cache[task]

    def prequential_criterion(self, task: str) -> str:
        """What a prequential rung ranks `task`'s variants by: its rung criterion where the training
        forward has it (the metric and label_loss of one-token labels: the logits at the first target),
        else the loss."""
        by = self.criteria[task]
        return by if by in ("metric", "label_loss") and self.label_tokens(task) else "loss"

    def _gold_index(self, task: str, i: int) -> int:
        """Example `i` of `task`: its gold label's index in `spec.labels` (-1 where no label ranks it)."""
        if self.prequential_criterion(task) == "loss":
            return -1
        return self.tasks[task].spec.labels.index(self.tasks[task].train[i].label)

    # ------------------------------------------------------------------ rungs

    def after_step(self, step: int, steps: Sequence[StepMetrics]) -> None:
        """The recipe's step-end hook: after a rung step, score the live variants of every task and drop
        the weaker ones. `steps`: the run's logged step metrics (ties go to the lower recent loss)."""
        if self.state.is_rung(step):
            self._rung(step, steps)

    def finish(self, step: int, steps: Sequence[StepMetrics]) -> None:
        """After the last step: each task still undecided keeps one variant, its prompt from here on."""
        self._rung(step, steps, final=True)

    def _rung(self, step: int, steps: Sequence[StepMetrics], final: bool = False) -> None:
        """Score the live variants of every task on its held-out slice (or, with prequential scoring, on
        the window of its drawn examples) and drop the weaker ones."""
        t0 = time.perf_counter()
        scores, evidence, by_task, examples, sources = {}, {}, {}, {}, {}
        for row in self.state.rows_to_score(final):
            by_task.setdefault(self.task_of(row), []).append(row)
        for task, rows in by_task.items():
            if len(rows) > 1 and self.state.prequential and (got := self._score_prequential(task, step)):
                examples[task], sources[task] = len(next(iter(got.values()))[1].values), "prequential"
            else:
                full = self.heldout[task]
                n = examples[task] = self.state.heldout_size(step, len(full.eval), final)
                held = dataclasses.replace(full, eval=full.eval[:n], eval_text=full.eval_text[:n])
                got = self._score_variants(task, rows, held)
            for row, (score, ev) in got.items():
                scores[row] = score
                if ev is not None:
                    evidence[row] = ev
        recent = steps[-10:]  # every rank logs the same all-reduced losses
        train_loss = {
            row: sum(v) / len(v)
            for row in scores
            if (v := [m.task_loss[row] for m in recent if row in m.task_loss])
        }
        results = self.state.apply_rung(
            step,
            scores,
            final=final,
            train_loss=train_loss,
            examples=examples,
            evidence=evidence,
            sources=sources,
        )
        self.state.forget_before(step)
        self._log_rung(results)
        self.scoring_s += time.perf_counter() - t0

    def _log_rung(self, results: list[RungResult]) -> None:
        for r in results:
            if len(r.scores) == 1:
                continue  # a one-variant task's held-out number at the end: nothing to choose
            kept = ", ".join(str(k) for k in r.kept)
            why = ""
            if c := r.base_check:
                why = (
                    f"; the job's own configuration ({self.state.base}) "
                    + ("stays" if c["kept"] else "goes")
                    + f": {describe_base_check(c, self.state.base_margin)}"
                )
            self.log(
                f"search rung {r.rung} @ step {r.step}: {r.task} keeps variant(s) {kept} "
                f"({r.examples} {'drawn' if r.source == 'prequential' else 'held-out'} examples{why})"
            )

    def _score_prequential(self, task: str, step: int) -> Scored | None:
        """Like `_score_variants`, on the window of `task`'s drawn examples (`SearchState.window`); None
        when it holds fewer than MIN_PREQUENTIAL."""
        gold, results = self.state.window(task, step)
        if len(gold) < MIN_PREQUENTIAL:
            return None
        spec, out = self.tasks[task].spec, {}
        for k, v in results.items():
            row = self.state.variants[task][k].row
            if self.prequential_criterion(task) != "metric":
                out[row] = (float(v.mean()), Evidence(v))
                continue
            pred = v.astype(np.int64)
            names = spec.labels
            score = classification_metrics([names[g] for g in gold], [names[p] for p in pred], names)[
                spec.metric
            ]
            if spec.metric == "accuracy":
                out[row] = (score, Evidence((pred == gold).astype(np.float64)))
            else:
                out[row] = (score, Evidence(pred, gold, len(names)))
        return out

    def _score_variants(self, task: str, rows: list[str], held: TaskData) -> Scored:
        """row -> (its score on `held` by the task's rung criterion, higher is better; its per-example
        `Evidence`, None where the score is a decoded corpus metric)."""
        by, spec = self.criteria[task], held.spec
        if by == "loss":  # every live variant in the same forwards
            loss = target_losses(
                self.lm,
                held.eval,
                {r: self.prompt_of(r).to(self.device) for r in rows},
                max_len=self.max_len,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
            )
            return {r: (-sum(v) / len(v), Evidence(-np.array(v))) for r, v in loss.items()}
        out = {}
        for row in rows:
            prompt = self.prompt_of(row).to(self.device)
            args = (self.lm, self.tokenizer, held.eval, spec.verbaliser, prompt, self.max_len)
            if by == "label_loss":
                nll = label_nlls(*args, device=self.device)
                out[row] = (-sum(nll) / len(nll), Evidence(-np.array(nll)))
            elif spec.task_kind.label_scored:  # the metric, from one forward per example
                pred = [max(s, key=s.get) for s in score_labels(*args, device=self.device)]
                gold = [e.label for e in held.eval]
                score = classification_metrics(gold, pred, spec.labels)[spec.metric]
                if spec.metric == "accuracy":
                    ev = Evidence(np.array([float(g == p) for g, p in zip(gold, pred)]))
                else:
                    code = {lab: j for j, lab in enumerate(spec.labels)}
                    ev = Evidence(
                        np.array([code[p] for p in pred]), np.array([code[g] for g in gold]), len(code)
                    )
                out[row] = (score, ev)
            else:  # decodes: a corpus metric
                out[row] = (
                    evaluate_task(self.lm, self.tokenizer, held, prompt, self.max_len, self.device).score,
                    None,
                )
        return out

    # ------------------------------------------------------------------ checkpoint and report

    def to_json(self) -> dict:
        """Its state for a checkpoint (`SearchState.to_json`)."""
        return self.state.to_json()

    def load_json(self, data: dict) -> None:
        """Restore the state a checkpoint of this job saved."""
        self.state.load_json(data)

    def summary(self) -> dict[str, dict]:
        """Per task: its chosen variant and every variant's outcome (`SearchState.summary`), and what its
        held-out numbers are (`criterion`: the metric's name, or minus the loss ranked by)."""
        out = self.state.summary()
        for task, t in out.items():
            by = self.criteria[task]
            t["criterion"] = f"-{by}" if by != "metric" else self.tasks[task].spec.metric
        return out

    def plot(self, path: Path) -> None:
        """Every variant's held-out score at each rung, a panel per task (`plot_search`)."""
        plot_search(self.summary(), path)
