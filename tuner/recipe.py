"""Multi-task prompt tuning: the training recipe. Read this file top to bottom.

    setup()       -> tokenizer, tasks, frozen backbone (ZeRO-3 partitioned at load), prompt
                     parameters (per-task rows in the bank + a method's shared part), optimisers,
                     sampler, a finished run to continue from (`prompt.init_from`), and the newest
                     checkpoint if there is one
    train()       -> for each step: draw a global mixed-task batch, `train_step` it; log, evaluate,
                     checkpoint
    train_step(b) -> one optimiser step on global batch `b`: take this rank's shard of every
                     micro-batch, pack it, compose the batch's prompts from their rows (and the
                     shared part), forward/backward, all-reduce the gradients, step the rows and the
                     shared part; returns a `StepMetrics`
    finish() -> final evaluation beside the zero-shot scores, per-task PEFT adapters, summary
                JSON, Markdown report, per-example predictions, loss/score curves (PNG)

Every evaluation pass (zero-shot, every `eval_every` steps, final) shows a bar of its own on rank 0
and leaves its time out of the training bar's rate (`tuner.progress`).

With `search.space` set, every task trains several variants (bank rows `<task>~<k>`): the recipe
hands its hooks to the search's driver (`tuner.search.driver`), which expands the sampler's draw to
each task's live variants, gives each row its own settings, drops the weaker variants at rungs and
names each task's best variant, its prompt. The recipe reads nothing else of the search.

Every rank draws the same global batch (same sampler seed) and keeps the full (small) prompt bank,
so after the all-reduce all ranks apply identical updates; only the frozen backbone is sharded.
The recipe knows nothing of Ray: `cluster.launch` runs it on Ray Train workers and passes hooks.
It does not claim the run directory: the entry point does that once (`tuner.job.prepare_job`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tuner import checkpoint as ckpt
from tuner.config import ConfigError, JobConfig, to_dict
from tuner.fleet_summary import render_fleet_summary
from tuner.job import PreparedJob, prepare_job, zero_setup
from tuner.metrics import CheckpointRecord, EvalPoint, EvalProgress, RestartRecord, RunHistory, StepMetrics
from tuner.model.backbone import load_tokenizer, pick_attention, pick_dtype
from tuner.model.model_cache import resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.model.zero import ZeroChoice, ZeroSettings, allreduce_rows_grad, world
from tuner.progress import EvalPass, describe_eval, step_postfix
from tuner.prompts.optim import lr_at
from tuner.prompts.params import PromptParams
from tuner.report import RunSummary, TaskSummary, collapse_warnings, render_report
from tuner.run_adapters import export_run
from tuner.run_dir import PREDICTIONS_DIR, mark_finished, write_predictions
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_tasks, kind_of
from tuner.tasks.prefetch import draws_ahead, recipe_step_batches, split_micro_batches
from tuner.zero_shot import zero_shot_scores

if TYPE_CHECKING:
    from tuner.scores import TaskScores
    from tuner.search.driver import SearchDriver

GlobalBatch = list[tuple[str, int]]  # (task, example index in its train split), as the sampler draws


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the prompts are garbage from this step on, so nothing is saved."""


@dataclass
class RecipeHooks:
    """Optional callbacks for the orchestration layer (Ray reporting, metrics export, progress)."""

    on_step: Callable[[StepMetrics], None] | None = None  # every rank, after each step
    on_eval: Callable[[EvalPoint], None] | None = None  # every rank, after each evaluation
    # every rank; the checkpoint directory on rank 0 only
    on_checkpoint: Callable[[CheckpointRecord, Path | None], None] | None = None
    on_message: Callable[[str], None] | None = None  # rank 0's console lines (default: its stdout)
    on_eval_progress: Callable[[EvalProgress], None] | None = None  # rank 0, as an evaluation pass goes
    resume_from: Path | None = None  # a checkpoint directory to resume from (overrides the run dir's newest)
    restarts: Sequence[RestartRecord] = ()  # worker groups lost before this one (Ray), for the summary


@dataclass
class StepPlan:
    """One step's global batch laid out for its forward/backward passes (identical on every rank)."""

    micro_batches: list[GlobalBatch]  # as trained: with a search, each draw once per live variant
    draws: GlobalBatch  # (task, example) as drawn, before variants multiply them
    names: list[str]  # the bank rows in the step, sorted: the order of the gathered rows
    rows: torch.Tensor  # their indices in the bank
    task_weight: torch.Tensor  # [rows] 1 / a row's examples in the step (loss_weighting example)
    per_token: torch.Tensor | None  # [rows] 1 / a row's target tokens in the step (loss_weighting token)
    scored: bool  # each forward also scores its examples for the search (prequential)


class MultiTaskPromptTuningRecipe:
    def __init__(
        self,
        cfg: JobConfig,
        hooks: RecipeHooks | None = None,
        progress: bool = True,
        *,
        lm: PromptTunedLM | None = None,
        tasks: dict[str, TaskData] | None = None,
        registered: Sequence[str] = (),
        zero_settings: ZeroSettings | None = None,
    ):
        """The recipe of job `cfg`; `setup()` builds what it trains. The keyword arguments hand in
        what a caller already has, so several recipes (a benchmark's configurations) can share it.

        Args:
            lm: an already-loaded backbone on this process's device, trained instead of loading
                `model.name` (its layout over ranks is the caller's: `backbone_layout` stays None).
            tasks: prepared task data by task name, trained instead of loading `cfg.tasks`.
            registered: further task names with a row in the prompt bank but no data, so never
                drawn: a fleet's other tasks (not with `search.space`).
            zero_settings: ZeRO-3 settings used instead of those read from `cluster.*`.
        """
        if registered and cfg.search.enabled:
            raise ConfigError("search.space trains variant rows only: no further tasks can be registered")
        self.cfg = cfg
        self.hooks = hooks or RecipeHooks()
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.run_dir = Path(cfg.output_dir).resolve() / cfg.name
        self.step = 0
        self.history = RunHistory()
        self._bar = None  # the progress bar while train() runs (rank 0, progress=True)
        self.search_driver: SearchDriver | None = None  # in-batch variants (search.space set)
        self.params: PromptParams | None = None  # what trains: built by setup()
        self.lm: PromptTunedLM | None = lm  # loaded by setup() unless handed in
        self.tasks: dict[str, TaskData] | None = tasks  # loaded by setup() unless handed in
        self.registered = list(registered)
        self.zero_settings = zero_settings
        self._zero = None  # the ZeRO set-up of a backbone setup() loaded
        # How setup() laid the backbone out over ranks, and why (None until then, or when handed in).
        self.backbone_layout: ZeroChoice | None = None
        self.batches = None  # each step's micro-batches, built ahead (`tuner.tasks.prefetch`)

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        micro = cfg.optim.batch_size // cfg.optim.grad_accum
        if micro < self.world_size:
            raise ConfigError(
                f"optim.batch_size / optim.grad_accum = {micro} is fewer examples than ranks ({self.world_size})"
            )
        job = prepare_job(cfg)  # the entry point claimed the run directory; here the tasks are loaded only
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if cfg.cluster.use_gpu and torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.dtype = pick_dtype(cfg.model.dtype, self.device)
        path = resolve_backbone(cfg.model.name)
        self.tokenizer = load_tokenizer(path)

        if self.tasks is None:
            self.tasks = job.load_data(self.tokenizer, log=self._log)
        names = list(self.tasks)
        self.sampler = job.sampler({n: len(t.train) for n, t in self.tasks.items()})
        if cfg.search.enabled:
            self._setup_search()

        if self.lm is None:
            self.lm = self._load_backbone(path, job)
        self.backbone_path = path

        if self.search_driver:  # variant rows of the independent parameterisation (config refuses the others)
            self.search_driver.attach(self.lm)
            rows = self.search_driver.bank_rows()
        else:
            rows = names + [n for n in self.registered if n not in self.tasks]
        self._setup_prompts(rows, self.lm.backbone.config.hidden_size)
        torch.manual_seed(cfg.data.seed)
        self._resume()
        self.batches = recipe_step_batches(self)

    def _load_backbone(self, path: str, job: PreparedJob) -> PromptTunedLM:
        """The frozen backbone at `path`, replicated or ZeRO-3 partitioned over the ranks."""
        cfg = self.cfg
        # Replicate or ZeRO-3 (cluster.zero_stage, auto by default); under ZeRO-3 this must run
        # before loading so weights are partitioned while they load.
        self._zero = zero_setup(
            job, path, self.dtype, self.world_size, log=self._log, settings=self.zero_settings
        )
        self.backbone_layout = self._zero.choice
        attention = pick_attention(cfg.model.attn_implementation, self.device)
        backbone = self._zero.load(path, self.dtype, attention, self.device)
        return PromptTunedLM(backbone, kernel=cfg.model.attn_implementation)

    def _resume(self) -> None:
        """Continue from the newest checkpoint (or `hooks.resume_from`); a fresh run with
        `prompt.init=transfer` starts each task from its best source row instead."""
        cfg = self.cfg
        resume = self.hooks.resume_from or (
            ckpt.latest_checkpoint(self.run_dir / "checkpoints") if cfg.resume else None
        )
        if resume is None and cfg.prompt.init == "transfer":  # each new task from its best source row
            self.params.transfer_init(
                self.lm,
                {n: t.train for n, t in self.tasks.items()},
                cfg.prompt.transfer_examples,
                max_len=cfg.model.max_seq_len,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
                log=self._log,
            )
        if resume is not None:
            state = ckpt.load_checkpoint(
                resume,
                bank=self.bank,
                optimizer=self.optimizer,
                sampler=self.sampler,
                method=cfg.prompt.method,
                shared=self.shared,
            )
            self.step, self.history = state.step, RunHistory.from_json(state.history)
            if self.search_driver:
                self.search_driver.load_json(state.search)
            self._log(f"resumed from {resume} at step {self.step}")

    def _setup_prompts(self, names: list[str], hidden: int) -> None:
        """The prompt method's parameters for bank rows `names`, initialised, and their optimisers
        (`tuner.prompts.params`)."""
        cfg, driver = self.cfg, self.search_driver
        label_words = {n: list(t.spec.verbaliser.values()) for n, t in self.tasks.items()}
        self.params = PromptParams.build(
            cfg.prompt,
            cfg.optim,
            names,
            hidden,
            embed=self.lm.embed,
            tokenizer=self.tokenizer,
            label_words=label_words,
            backbone=cfg.model.name,
            device=self.device,
            seed=cfg.data.seed,
            # a search initialises each variant row by its own prompt settings
            fill=(lambda bank: driver.init_prompts(bank, label_words)) if driver else None,
        )

    # The prompt parameters' parts, as the loop and callers read them.
    layout = property(lambda self: self.params.layout)
    bank = property(lambda self: self.params.bank)
    shared = property(lambda self: self.params.shared)
    optimizer = property(lambda self: self.params.optimizer)
    source = property(lambda self: self.params.source)

    def prompt(self, name: str) -> torch.Tensor:
        """Row `name`'s final [P, H] prompt (composed from its row and the shared part): what is evaluated and exported."""
        return self.params.prompt(name)

    # ------------------------------------------------------------------------------------ train

    def train(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=o.max_steps, initial=self.step, desc="prompt tuning", unit="step", dynamic_ncols=True
            )
        if self.step == 0 and cfg.eval_zero_shot:
            zero_pass = functools.partial(self._evaluate, False, "zero-shot")  # of the tasks not recorded
            zero = zero_shot_scores(self.run_dir, self.tasks, cfg.model, zero_pass, write=self.is_main)
            if self.is_main:
                write_predictions(self.run_dir / PREDICTIONS_DIR / "zero_shot", zero)
            # the history keeps the scores, not every example's prediction (a fleet's would not fit)
            self.history.zero_shot = {
                n: s and dataclasses.replace(s, predictions=None) for n, s in zero.items()
            }
            self._record_eval(EvalPoint(0, self._scores(zero), zero_shot=True))
        ahead = 0 if self.search_driver else cfg.data.prefetch  # a search's variants change between steps
        self.batches.start(draws_ahead(self.sampler, o.max_steps - self.step), ahead)
        while self.step < o.max_steps:
            metrics = self.train_step(self.sampler.next_batch())
            if not math.isfinite(metrics.loss):  # the same all-reduced value on every rank
                raise TrainingDiverged(
                    f"step {self.step}: the training loss is {metrics.loss} (per task: "
                    + ", ".join(f"{t} {v:.4g}" for t, v in metrics.task_loss.items())
                    + "); stopped before checkpointing or exporting it (lower optim.lr?)"
                )
            if self.step % cfg.log_every == 0 or self.step == o.max_steps:
                self.history.steps.append(metrics)
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(step_postfix(metrics))
            if self.hooks.on_step:
                self.hooks.on_step(metrics)
            if self.search_driver:  # at a rung step, the search drops its weaker variants
                self.search_driver.after_step(self.step, self.history.steps)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < o.max_steps:
                scores = self._evaluate(tuned=True, what=f"eval @ step {self.step}")
                self._record_eval(EvalPoint(self.step, self._scores(scores)))
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == o.max_steps:
                self.save_checkpoint()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.batches.close()

    def train_step(self, global_batch: GlobalBatch) -> StepMetrics:
        """One optimiser step on `global_batch` (identical on every rank); advances `self.step`."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        plan = self._plan_step(global_batch)
        task_params = self.bank.gather(plan.rows)  # leaf: the batch's per-task rows (independent: prompts)
        shared = self.shared.gather() if self.shared is not None else None  # leaf unless frozen
        loss_sum, tokens, results = self._forward_backward(plan, task_params, shared)
        lr = self._optimiser_step(plan, task_params, shared)
        tokens_t = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        stats = torch.cat([loss_sum.flatten(), tokens_t, results])  # every rank filled its own `results`
        if self.world_size > 1:
            dist.all_reduce(stats)  # a device tensor: NCCL reduces CUDA tensors only
        stats = stats.cpu()  # the step's one read-back: metrics for the log
        n = loss_sum.numel()
        loss_sum, tokens = stats[:n].view(-1, 2), int(stats[n])
        if plan.scored:
            self.search_driver.record_forwards(self.step + 1, plan.draws, stats[n + 1 :].tolist())
        self.step += 1
        return StepMetrics(
            step=self.step,
            loss=float(loss_sum[:, 0].sum() / loss_sum[:, 1].sum()),
            lr=lr,
            tokens=tokens,
            task_loss={n: float(loss_sum[i, 0] / loss_sum[i, 1]) for i, n in enumerate(plan.names)},
            step_time_s=time.perf_counter() - t0,
            # peak device memory of the step (weights + activations + prompt state); 0 on CPU
            max_memory_allocated=torch.cuda.max_memory_allocated(self.device) if cuda else 0,
        )

    def _plan_step(self, global_batch: GlobalBatch) -> StepPlan:
        """`global_batch` cut into micro-batches (each drawn example once per live variant of its task,
        with a search) and each bank row's share of the step's loss."""
        o = self.cfg.optim
        micro_batches = split_micro_batches(global_batch, o.grad_accum)
        draws = [x for mb in micro_batches for x in mb]
        driver = self.search_driver
        scored = bool(driver) and driver.scores_forwards()
        if driver:  # each drawn example once per live variant of its task, in the same micro-batch
            micro_batches = [driver.expand(mb) for mb in micro_batches]
        global_batch = [x for mb in micro_batches for x in mb]
        names = sorted({t for t, _ in global_batch})  # identical on every rank
        # Each task's prompt gets the mean loss over *its* examples in the global batch, as if it
        # trained alone on them: a task's update does not depend on which other tasks share the step.
        per_task = Counter(t for t, _ in global_batch)
        task_weight = torch.tensor([1.0 / per_task[n] for n in names], device=self.device)
        per_token = None
        if o.loss_weighting == "token":  # ... or the mean over all of its target tokens in the global batch
            task_tokens = Counter()
            for t, i in global_batch:  # targets are never cut (`segment_layout`): count them here
                task_tokens[t] += len(self._train_example(t, i).target_ids)
            per_token = torch.tensor([1.0 / max(task_tokens[n], 1) for n in names], device=self.device)
        rows = self.bank.rows_of(names).to(self.bank.device)  # now: scatter_ then uploads nothing (a sync)
        return StepPlan(micro_batches, draws, names, rows, task_weight, per_token, scored)

    def _forward_backward(
        self, plan: StepPlan, task_params: torch.Tensor, shared: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Forward and backward this rank's shard of every micro-batch: gradients on `task_params` (and
        `shared`); per row (sum of losses, examples) on the device, text tokens, and the search's
        result per example where `plan.scored` (zeros but this rank's; empty otherwise)."""
        # per task: (sum of losses, examples), on the device: read back once per step, not per micro-batch
        loss_sum = torch.zeros(len(plan.names), 2, dtype=torch.float64, device=self.device)
        tokens = 0
        size = sum(len(mb) for mb in plan.micro_batches) if plan.scored else 0
        results = torch.zeros(size, dtype=torch.float64, device=self.device)
        offset = 0  # of the micro-batch in the global batch
        # collated ahead while the previous step ran (or here), already copied to the device
        for mb, batch in zip(plan.micro_batches, self.batches.get(plan.micro_batches)):
            examples = [self._train_example(t, i) for t, i in mb[self.rank :: self.world_size]]
            # Composed per micro-batch: backward frees the graph (independent: the leaf itself, no graph).
            prompts = self.layout.compose(task_params, shared)  # [U, P, H]
            if plan.per_token is not None:  # a segment's mean NLL x its targets / its task's targets
                ones = torch.ones_like(batch.target_seg, dtype=plan.per_token.dtype)  # bincount reads back
                seg_targets = ones.new_zeros(batch.num_segments).index_add_(0, batch.target_seg, ones)
                seg_weight = seg_targets * plan.per_token[batch.seg_task]
            else:
                seg_weight = plan.task_weight[batch.seg_task]
            out = self.lm(batch, prompts, seg_weight=seg_weight, return_logits=plan.scored)
            out.loss.backward()
            if plan.scored:  # this rank's examples: positions rank, rank + world, ... of the micro-batch
                mine = torch.arange(self.rank, len(mb), self.world_size, device=self.device) + offset
                results[mine] = self.search_driver.forward_results(batch, out, examples)
            offset += len(mb)
            seg_task = batch.seg_task
            loss_sum[:, 0].index_add_(0, seg_task, out.seg_loss.double())
            loss_sum[:, 1].index_add_(0, seg_task, torch.ones_like(seg_task, dtype=torch.float64))
            tokens += batch.num_text_tokens
        return loss_sum, tokens, results

    def _optimiser_step(
        self, plan: StepPlan, task_params: torch.Tensor, shared: torch.Tensor | None
    ) -> float:
        """All-reduce the gradients and step the batch's rows (and the shared part); returns the lr."""
        o = self.cfg.optim
        names = plan.names
        allreduce_rows_grad(task_params)
        lr = lr_at(self.step, o.lr, o.warmup_steps, o.max_steps, o.schedule)
        if self.search_driver:  # every variant row with its own learning rate, decay and clipping
            hp = self.search_driver.row_hparams(names, self.step, o.max_steps)
            new = self.optimizer.step(
                names, task_params.detach(), task_params.grad, hp.lr, hp.weight_decay, hp.grad_clip
            )
        else:  # on the bank's device
            new = self.optimizer.step(names, task_params.detach(), task_params.grad, lr=lr)
        self.bank.scatter_(plan.rows, new)
        if shared is not None and shared.requires_grad:
            allreduce_rows_grad(shared)  # the sum over ranks of the sum over tasks
            self.shared.step(shared, lr)
        return lr

    # ------------------------------------------------------------------------------------ eval

    def _evaluate(self, tuned: bool, what: str, tasks: dict | None = None) -> dict[str, TaskScores | None]:
        """Every task's (or `tasks`') scores under its prompt (`tuned`) or zero-shot: one evaluation pass,
        with a bar called `what` whose time the training bar's rate leaves out."""
        tasks = self.tasks if tasks is None else tasks
        total = sum(len(t.eval) for t in tasks.values())
        report = self.hooks.on_eval_progress if self.is_main else None
        # every task at once: a kind packs examples of many tasks into the same rows (`evaluate_tasks`)
        prompts = {n: self.prompt(self.prompt_row(n)).to(self.device) for n in tasks} if tuned else None
        with EvalPass(what, total, show=self.progress, on_progress=report, training_bar=self._bar) as bar:
            args = (self.lm, self.tokenizer, tasks, prompts, self.cfg.model.max_seq_len, self.device)
            return evaluate_tasks(*args, progress=bar.advance)

    @staticmethod
    def _scores(results: dict[str, TaskScores | None]) -> dict[str, float]:
        return {n: r.score for n, r in results.items() if r is not None}

    def _record_eval(self, point: EvalPoint) -> None:
        self.history.evals.append(point)
        if self._bar is not None:
            self._bar.write(describe_eval(point))
        if self.hooks.on_eval:
            self.hooks.on_eval(point)

    # ------------------------------------------------------------------------------------ checkpoint

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                bank=self.bank,
                optimizer=self.optimizer,
                sampler=self.sampler,
                history=self.history.to_json(),
                method=self.cfg.prompt.method,
                shared=self.shared,
                search=self.search_driver.to_json() if self.search_driver else None,
                full_every=self.cfg.checkpoint_full_every,
                final=self.step >= self.cfg.optim.max_steps,
            )
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(CheckpointRecord(self.step, time.perf_counter() - t0), path)

    # ------------------------------------------------------------------------------------ finish

    def finish(self) -> RunSummary:
        """Final eval, adapters, summary, report and curves. Returns the summary."""
        if self.search_driver:  # each task keeps one variant: its prompt from here on
            self.search_driver.finish(self.step, self.history.steps)
        final = self._evaluate(tuned=True, what="final eval")
        self._record_eval(EvalPoint(self.step, self._scores(final)))
        zero = self.history.zero_shot
        summary = RunSummary(
            name=self.cfg.name,
            backbone=self.cfg.model.name,
            steps=self.step,
            world_size=self.world_size,
            num_virtual_tokens=self.cfg.prompt.num_virtual_tokens,
            prompt_method=self.cfg.prompt.method,
            carried_tasks=sorted(self.source.adapters) if self.source else [],
            restarts=list(self.hooks.restarts),
            tokens_per_s=self.history.mean_tokens_per_s(),
            evals=list(self.history.evals),
            tasks={
                n: TaskSummary(t.spec.kind, t.spec.metric, zero_shot=zero.get(n), tuned=final[n])
                for n, t in self.tasks.items()
            },
            config=to_dict(self.cfg),
        )
        if self.search_driver:
            summary.search = self.search_driver.summary()
            summary.search_scoring_s = self.search_driver.scoring_s  # since this process started (or resumed)
        if self.is_main:
            export_run(  # per-task directories or one packed store (`export_format`), then the carried ones
                self.run_dir / "adapters", self.tasks, final, lambda n: self.prompt(self.prompt_row(n)),
                self.lm.backbone.config, backbone=self.cfg.model.name, max_len=self.cfg.model.max_seq_len,
                export_format=self.cfg.export_format, source=self.source,
            )  # fmt: skip
            (self.run_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2, default=float))
            (self.run_dir / "report.md").write_text(render_report(summary) + render_fleet_summary(summary))
            write_predictions(self.run_dir / PREDICTIONS_DIR / "tuned", final)
            for line in collapse_warnings(summary):
                self._log(f"warning: {line}")
            from tuner.plots import plot_curves

            plot_curves(self.history, self.run_dir / "curves.png")
            if self.search_driver:
                self.search_driver.plot(self.run_dir / "search.png")
            mark_finished(self.run_dir)
        return summary

    # ------------------------------------------------------------------------------------ search

    def _setup_search(self) -> None:
        """The in-batch search's driver (`tuner.search.driver`): every task's variants, and its held-out
        slice taken out of the sampler. The one place the recipe reaches into the search: elsewhere it
        only calls the driver's hooks."""
        from tuner.search.driver import SearchDriver

        self.search_driver = SearchDriver.build(
            self.cfg,
            self.tasks,
            self.sampler,
            self.tokenizer,
            {n: self.rung_criterion(n) for n in self.tasks},
            prompt_of=self.prompt,
            device=self.device,
            max_len=self.cfg.model.max_seq_len,
            seed=self.cfg.data.seed,
            log=self._log,
        )

    def rung_criterion(self, task: str) -> str:
        """`metric`, `loss` or `label_loss`: what ranks `task`'s variants at a rung (`search.criterion`;
        auto: the metric where it is one forward per example, the loss where it would decode greedily).
        The search's driver is handed each task's at set-up."""
        return kind_of(self.tasks[task].spec.kind).rung_criterion(self.cfg.search.criterion)

    def prompt_row(self, task: str) -> str:
        """The bank row that is `task`'s prompt: the task itself, or its best variant so far."""
        return self.search_driver.prompt_row(task) if self.search_driver else task

    def _train_example(self, row: str, i: int):
        """Example `i` of the task behind bank row `row` (a task, or one of its variants)."""
        if not self.search_driver:
            return self.tasks[row].train[i]
        return dataclasses.replace(self.tasks[self.search_driver.task_of(row)].train[i], task=row)

    # The search's parts, as callers and tests read them off the recipe: its state (every task's variants,
    # which are live, the rung results), each task's held-out slice, each task's one-token label ids.
    search = property(lambda self: self.search_driver.state if self.search_driver else None)
    heldout = property(lambda self: self.search_driver.heldout if self.search_driver else {})
    _label_tokens = property(lambda self: self.search_driver.label_tokens)

    def cleanup(self) -> None:
        self._zero = None
        if self.batches is not None:
            self.batches.close()

    def _log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.hooks.on_message:  # e.g. the Ray driver's console (workers' output stays in Ray's logs)
            self.hooks.on_message(msg)
        else:
            # Not print(): inside a Ray Train worker print is patched to log *and* tee to the redirected
            # stdout, so every line would reach the driver twice.
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


def run(cfg: JobConfig, hooks: RecipeHooks | None = None, progress: bool = True) -> RunSummary:
    """Set up, train and finish one job on this process (one rank)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = MultiTaskPromptTuningRecipe(cfg, hooks, progress)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()
