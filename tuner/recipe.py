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
                JSON, Markdown report, loss/score curves (PNG)

With `search.space` set, every task trains several variants (bank rows `<task>~<k>`, `tuner.search.state`):
the sampler's draw is expanded to each task's live variants, each row steps with its own settings,
rungs drop the weaker variants on a held-out slice, and each task's best variant is its prompt.

Every rank draws the same global batch (same sampler seed) and keeps the full (small) prompt bank,
so after the all-reduce all ranks apply identical updates; only the frozen backbone is sharded.
The recipe knows nothing of Ray: `cluster.launch` runs it on Ray Train workers and passes hooks.
It does not claim the run directory: the entry point does that once (`tuner.job.prepare_job`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tuner import checkpoint as ckpt
from tuner.config import ConfigError, JobConfig, to_dict
from tuner.evaluate import (
    classification_metrics,
    evaluate_task,
    label_nlls,
    one_token_labels,
    score_labels,
    target_losses,
)
from tuner.export import TaskAdapter, TaskMeta, save_adapter
from tuner.job import prepare_job
from tuner.metrics import CheckpointRecord, EvalPoint, RunHistory, StepMetrics
from tuner.model.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype, resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.model.zero import allreduce_rows_grad, world, zero_setup
from tuner.prompts.bank import PromptBank, init_prompts
from tuner.prompts.continual import SourceRun, carry_adapters, choose_sources, load_source
from tuner.prompts.methods import SharedParams, compose_rows, make_layout, prompt_of
from tuner.prompts.optim import SparseRowAdam, lr_at
from tuner.run_dir import mark_finished
from tuner.search.state import (
    MIN_PREQUENTIAL,
    Evidence,
    SearchState,
    describe_base_check,
    plot_search,
    render_search_report,
)
from tuner.tasks.batching import collate
from tuner.tasks.data import MultiTaskSampler, TaskData

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
    resume_from: Path | None = None  # a checkpoint directory to resume from (overrides the run dir's newest)


class MultiTaskPromptTuningRecipe:
    def __init__(self, cfg: JobConfig, hooks: RecipeHooks | None = None, progress: bool = True):
        self.cfg = cfg
        self.hooks = hooks or RecipeHooks()
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.run_dir = Path(cfg.output_dir).resolve() / cfg.name
        self.step = 0
        self.history = RunHistory()
        self._bar = None  # the progress bar while train() runs (rank 0, progress=True)
        self.search: SearchState | None = None  # in-batch variants (search.space set)
        # task -> its labels' token ids where each is one token (prequential scoring reads their logits)
        self._label_token_cache: dict[str, list[int] | None] = {}
        self.heldout: dict[str, TaskData] = {}  # task -> its held-out slice (search only)
        self.search_scoring_s = 0.0  # wall time this process spent scoring variants at rungs

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

        names = job.task_names
        self.tasks = {
            s.name: TaskData.load(
                s,
                self.tokenizer,
                max_train=cfg.data.max_train_examples,
                max_eval=cfg.data.max_eval_examples,
                seed=cfg.data.seed,
            )
            for s in job.specs
        }
        self.sampler = MultiTaskSampler(
            {n: len(t.train) for n, t in self.tasks.items()},
            cfg.optim.batch_size,
            cfg.data.mixing,
            cfg.data.temperature,
            cfg.data.seed,
        )
        if cfg.search.enabled:
            self._setup_search(names)

        # Replicate or ZeRO-3 (cluster.zero_stage, auto by default); under ZeRO-3 this must run
        # before loading so weights are partitioned while they load.
        self._zero = zero_setup(cfg, path, self.dtype, self.world_size, log=self._log)
        # DeepSpeed print()s while it sets up (op builds, configs): keep the console to the progress bar.
        with _quiet_stdout(self._zero.settings is not None):
            backbone = load_backbone(
                path,
                self.dtype,
                pick_attention(cfg.model.attn_implementation, self.device),
                self.device,
                activation_checkpointing=self._zero.choice.activation_checkpointing,
            )
            self._zero.wrap(backbone)
        self.lm = PromptTunedLM(backbone, kernel=cfg.model.attn_implementation)
        self.backbone_path = path

        if self.search:  # variant rows of the independent parameterisation (config refuses the others)
            self._setup_variant_prompts(backbone.config.hidden_size)
        else:
            self._setup_prompts(names, backbone.config.hidden_size)
        torch.manual_seed(cfg.data.seed)

        resume = self.hooks.resume_from or (
            ckpt.latest_checkpoint(self.run_dir / "checkpoints") if cfg.resume else None
        )
        if resume is None and cfg.prompt.init == "transfer":
            self._transfer_init()
        if resume is not None:
            state = ckpt.load_checkpoint(
                resume,
                bank=self.bank,
                optimizer=self.optimizer,
                sampler=self.sampler,
                method=cfg.prompt.method,
                shared=self.shared,
            )
            self.step, self.history = state["step"], RunHistory.from_json(state["history"])
            if self.search:
                self.search.load_json(state["search"])
            self._log(f"resumed from {resume} at step {self.step}")

    def _setup_prompts(self, names: list[str], hidden: int) -> None:
        """The prompt method's parameters (tuner/prompts/methods.py), initialised, and their optimisers;
        with `prompt.init_from`, the finished run's rows and frozen shared part next to them."""
        cfg, p, o = self.cfg, self.cfg.prompt, self.cfg.optim
        self.layout = make_layout(
            p.method, p.num_virtual_tokens, hidden, rank=p.rank, bottleneck=p.bottleneck
        )
        self.source: SourceRun | None = None
        if p.init_from:
            self.source = load_source(p.init_from, p.method, self.layout.row_shape, cfg.model.name, names)
        carried = sorted(self.source.rows) if self.source else []
        # Carried rows are registered (so this run's checkpoint can be an init_from too) but never
        # in a batch: they are not in the sampler, so nothing ever updates them.
        self.bank = PromptBank(names + carried, *self.layout.row_shape)

        def fill(bank: PromptBank) -> None:
            init_prompts(
                bank,
                self.lm.embed,
                self.tokenizer,
                "vocab" if p.init == "transfer" else p.init,  # transfer overwrites every new row later
                label_words={n: list(t.spec.verbaliser.values()) for n, t in self.tasks.items()},
                text=p.init_text,
                std=p.init_std,
                seed=cfg.data.seed,
            )

        def adam() -> SparseRowAdam:
            return SparseRowAdam(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip)

        shared = self.layout.initialise(self.bank, fill, torch.Generator().manual_seed(cfg.data.seed))
        self.shared = None if shared is None else SharedParams(shared, adam(), p.shared_lr_scale)
        if self.source:
            for name in carried:
                self.bank.set_prompt(name, self.source.rows[name])
            if self.shared is not None:
                self.shared.values = self.source.shared.float().clone()
                self.shared.frozen = True  # old tasks' prompts stay exactly as exported
        self.bank.to(self.device)  # fp32 master copy and Adam moments stay on the device
        if self.shared is not None:
            self.shared.to(self.device)
        self.optimizer = adam()

    def _transfer_init(self) -> None:
        """Start each new task from the source row whose prompt fits its examples best (tuner/prompts/continual.py)."""
        carried = sorted(self.source.rows)
        candidates = dict(zip(carried, compose_rows(self.layout, self.bank, self.shared, carried)))
        k = self.cfg.prompt.transfer_examples
        chosen = choose_sources(
            self.lm,
            {n: t.train[:k] for n, t in self.tasks.items()},
            candidates,
            max_len=self.cfg.model.max_seq_len,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
        )
        for task, (src, loss) in chosen.items():
            self.bank.set_prompt(task, self.source.rows[src])
            self._log(f"transfer init: {task} starts from {src} (zero-shot loss {loss:.3f} on {k} examples)")

    def prompt(self, name: str) -> torch.Tensor:
        """Row `name`'s final [P, H] prompt (composed from its row and the shared part): what is evaluated and exported."""
        return prompt_of(self.layout, self.bank, self.shared, name)

    # ------------------------------------------------------------------------------------ train

    def train(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=o.max_steps, initial=self.step, desc="prompt tuning", unit="step", dynamic_ncols=True
            )
        if self.step == 0 and cfg.eval_zero_shot:
            self.history.zero_shot = self._evaluate(tuned=False)
            self._record_eval(EvalPoint(0, self._scores(self.history.zero_shot), zero_shot=True))
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
            if self.search and self.search.is_rung(self.step):
                self._search_rung()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < o.max_steps:
                self._record_eval(EvalPoint(self.step, self._scores(self._evaluate(tuned=True))))
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == o.max_steps:
                self.save_checkpoint()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def train_step(self, global_batch: GlobalBatch) -> StepMetrics:
        """One optimiser step on `global_batch` (identical on every rank); advances `self.step`."""
        t0 = time.perf_counter()
        o = self.cfg.optim
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        micro = len(global_batch) // o.grad_accum
        micro_batches = [global_batch[m * micro : (m + 1) * micro] for m in range(o.grad_accum)]
        # (task, example) as drawn, before variants multiply them
        draws = [x for mb in micro_batches for x in mb]
        # prequential search: each forward also scores its examples (before this step's update)
        preq = bool(self.search) and self.search.wants_prequential()
        if self.search:  # each drawn example once per live variant of its task, in the same micro-batch
            micro_batches = [self.search.expand(mb) for mb in micro_batches]
        global_batch = [x for mb in micro_batches for x in mb]
        names = sorted({t for t, _ in global_batch})  # identical on every rank
        rows = self.bank.rows_of(names)
        task_params = self.bank.gather(rows)  # leaf: the batch's per-task rows (independent: prompts)
        shared = self.shared.gather() if self.shared is not None else None  # leaf unless frozen
        pos = {n: i for i, n in enumerate(names)}
        # Each task's prompt gets the mean loss over *its* examples in the global batch, as if it
        # trained alone on them: a task's update does not depend on which other tasks share the step.
        per_task = Counter(t for t, _ in global_batch)
        task_weight = torch.tensor([1.0 / per_task[n] for n in names], device=self.device)
        if o.loss_weighting == "token":  # ... or the mean over all of its target tokens in the global batch
            task_tokens = Counter()
            for t, i in global_batch:  # targets are never cut (`segment_layout`): count them here
                task_tokens[t] += len(self._train_example(t, i).target_ids)
            per_token = torch.tensor([1.0 / max(task_tokens[n], 1) for n in names], device=self.device)
        # per task: (sum of losses, examples), on the device: read back once per step, not per micro-batch
        loss_sum = torch.zeros(len(names), 2, dtype=torch.float64, device=self.device)
        tokens = 0
        drawn = torch.zeros(len(global_batch) if preq else 0, dtype=torch.float64, device=self.device)
        offset = 0  # of the micro-batch in `global_batch`
        for mb in micro_batches:
            shard = mb[self.rank :: self.world_size]
            examples = [self._train_example(t, i) for t, i in shard]
            batch = collate(
                examples,
                pos,
                self.cfg.prompt.num_virtual_tokens,
                max_len=self.cfg.model.max_seq_len,
                pad_id=self.tokenizer.pad_token_id,
                packing=self.cfg.data.packing,
                share_prompts=self.cfg.data.share_prompts and self.lm.supports_shared_prompts,
                row_len=self.cfg.data.row_len,
            ).to(self.device)
            # Composed per micro-batch: backward frees the graph (independent: the leaf itself, no graph).
            prompts = self.layout.compose(task_params, shared)  # [U, P, H]
            if o.loss_weighting == "token":  # a segment's mean NLL x its targets / its task's targets
                seg_targets = torch.bincount(batch.target_seg, minlength=batch.num_segments)
                seg_weight = seg_targets.to(per_token.dtype) * per_token[batch.seg_task]
            else:
                seg_weight = task_weight[batch.seg_task]
            out = self.lm(batch, prompts, seg_weight=seg_weight, return_logits=preq)
            out.loss.backward()
            if preq:  # this rank's examples: positions rank, rank + world, ... of the micro-batch
                mine = torch.arange(self.rank, len(mb), self.world_size, device=self.device) + offset
                drawn[mine] = self._prequential_results(batch, out, examples)
            offset += len(mb)
            seg_task = batch.seg_task
            loss_sum[:, 0].index_add_(0, seg_task, out.seg_loss.double())
            loss_sum[:, 1].index_add_(0, seg_task, torch.ones_like(seg_task, dtype=torch.float64))
            tokens += batch.num_text_tokens
        allreduce_rows_grad(task_params)
        lr = lr_at(self.step, o.lr, o.warmup_steps, o.max_steps, o.schedule)
        if self.search:  # every variant row with its own learning rate, decay and clipping
            hp = self.search.row_hparams(names, self.step, o.max_steps)
            new = self.optimizer.step(
                names, task_params.detach(), task_params.grad, hp.lr, hp.weight_decay, hp.grad_clip
            )
        else:
            new = self.optimizer.step(
                names, task_params.detach(), task_params.grad, lr=lr
            )  # on the bank's device
        self.bank.scatter_(rows, new)
        if shared is not None and shared.requires_grad:
            allreduce_rows_grad(shared)  # the sum over ranks of the sum over tasks
            self.shared.step(shared, lr)
        tokens_t = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        stats = torch.cat([loss_sum.flatten(), tokens_t, drawn])  # every rank filled its own `drawn`
        if self.world_size > 1:
            dist.all_reduce(stats)  # a device tensor: NCCL reduces CUDA tensors only
        stats = stats.cpu()  # the step's one read-back: metrics for the log
        n = loss_sum.numel()
        loss_sum, tokens = stats[:n].view(-1, 2), int(stats[n])
        if preq:
            gold = [self._gold_index(t, i) for t, i in draws]
            self.search.record(self.step + 1, draws, stats[n + 1 :].tolist(), gold)
        self.step += 1
        return StepMetrics(
            step=self.step,
            loss=float(loss_sum[:, 0].sum() / loss_sum[:, 1].sum()),
            lr=lr,
            tokens=tokens,
            task_loss={n: float(loss_sum[i, 0] / loss_sum[i, 1]) for i, n in enumerate(names)},
            step_time_s=time.perf_counter() - t0,
            # peak device memory of the step (weights + activations + prompt state); 0 on CPU
            max_memory_allocated=torch.cuda.max_memory_allocated(self.device) if cuda else 0,
        )

    # ------------------------------------------------------------------------------------ eval

    def _evaluate(self, tuned: bool) -> dict[str, dict]:
        out = {}
        for name, data in self.tasks.items():
            prompt = self.prompt(self.prompt_row(name)).to(self.device) if tuned else None
            out[name] = evaluate_task(
                self.lm, self.tokenizer, data, prompt, self.cfg.model.max_seq_len, self.device
            )
        return out

    @staticmethod
    def _scores(results: dict[str, dict]) -> dict[str, float]:
        return {n: r["score"] for n, r in results.items() if r}

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
                search=self.search.to_json() if self.search else None,
            )
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(CheckpointRecord(self.step, time.perf_counter() - t0), path)

    # ------------------------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """Final eval, adapters, summary, report and curves. Returns the summary."""
        if self.search:
            self._search_rung(final=True)  # each task keeps one variant: its prompt from here on
        final = self._evaluate(tuned=True)
        self._record_eval(EvalPoint(self.step, self._scores(final)))
        zero = self.history.zero_shot
        summary = {
            "name": self.cfg.name,
            "backbone": self.cfg.model.name,
            "steps": self.step,
            "world_size": self.world_size,
            "num_virtual_tokens": self.cfg.prompt.num_virtual_tokens,
            "prompt_method": self.cfg.prompt.method,
            # tasks of prompt.init_from, re-published unchanged (not trained, not re-evaluated)
            "carried_tasks": sorted(self.source.adapters) if self.source else [],
            "tokens_per_s": self.history.mean_tokens_per_s(),
            "evals": [asdict(e) for e in self.history.evals],  # every evaluation's scores, by step
            "tasks": {
                n: {
                    "kind": self.tasks[n].spec.kind,
                    "metric": self.tasks[n].spec.metric,
                    "zero_shot": zero.get(n, {}),
                    "tuned": final[n],
                }
                for n in self.tasks
            },
            "config": to_dict(self.cfg),
        }
        if self.search:
            summary["search"] = self.search.summary()
            for task, t in summary["search"].items():  # what its held-out numbers are
                by = self.rung_criterion(task)
                t["criterion"] = f"-{by}" if by != "metric" else self.tasks[task].spec.metric
            summary["search_scoring_s"] = self.search_scoring_s  # since this process started (or resumed)
        if self.is_main:
            for name, data in self.tasks.items():
                spec = data.spec
                save_adapter(
                    self.run_dir / "adapters",
                    TaskAdapter(
                        name,
                        self.prompt(self.prompt_row(name)),
                        self.cfg.model.name,
                        TaskMeta.from_spec(spec, data.prefix, final[name].get("score")),
                    ),
                    self.lm.backbone.config,
                )
            if self.source:
                carry_adapters(self.source, self.run_dir / "adapters", self.lm.backbone.config)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            (self.run_dir / "report.md").write_text(render_report(summary))
            from tuner.plots import plot_curves

            plot_curves(self.history, self.run_dir / "curves.png")
            if self.search:
                plot_search(summary["search"], self.run_dir / "search.png")
            mark_finished(self.run_dir)
        return summary

    # ------------------------------------------------------------------------------------ search

    def _setup_search(self, names: list[str]) -> None:
        """Variants of every task, and each task's held-out slice: the last examples of its first-epoch
        order, which the sampler then never draws (so every draw before them is the plain job's)."""
        s = self.cfg.search
        labelled = {n for n in names if self.tasks[n].spec.verbaliser}  # class_labels has words to use
        self.search = SearchState.build(self.cfg, names, labelled)
        for n in names:
            try:
                k = self.tasks[n].heldout_count(s.heldout_examples, s.heldout_fraction)
            except ValueError as e:
                raise ConfigError(f"search: {e}") from None
            self.heldout[n] = self.tasks[n].heldout_view(self.sampler.hold_out(n, k))

    def _setup_variant_prompts(self, hidden: int) -> None:
        """The bank of every task's variant rows, each initialised by its own settings, and the optimiser."""
        cfg, o = self.cfg, self.cfg.optim
        self.layout = make_layout("independent", cfg.prompt.num_virtual_tokens, hidden)
        self.source, self.shared = None, None
        self.bank = PromptBank(self.search.rows(), *self.layout.row_shape)
        self._init_variant_prompts({n: list(t.spec.verbaliser.values()) for n, t in self.tasks.items()})
        self.bank.to(self.device)  # fp32 master copy and Adam moments stay on the device
        self.optimizer = SparseRowAdam(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip)

    def _init_variant_prompts(self, label_words: dict[str, list[str]]) -> None:
        """Each variant row initialised by its own prompt settings (rows sharing them in one call)."""
        groups: dict[tuple, list[str]] = {}
        for row in self.search.rows():
            p = self.search.variant(row).settings.prompt
            groups.setdefault((p.init, p.init_text, p.init_std), []).append(row)
        for (init, text, std), rows in groups.items():
            part = PromptBank(rows, self.bank.num_virtual_tokens, self.bank.hidden_size)
            task_of = {r: self.search.variant(r).task for r in rows}
            words = {r: label_words[task_of[r]] for r in rows}
            init_prompts(
                part,
                self.lm.embed,
                self.tokenizer,
                init,
                label_words=words,
                text=text,
                std=std,
                seed=self.cfg.data.seed,
                streams=task_of,  # a task's variants start from its own prompt (under their init settings)
            )
            for r in rows:
                self.bank.set_prompt(r, part.prompt(r))

    def _train_example(self, row: str, i: int):
        """Example `i` of the task behind bank row `row` (a task, or one of its variants)."""
        if not self.search:
            return self.tasks[row].train[i]
        return dataclasses.replace(self.tasks[self.search.variant(row).task].train[i], task=row)

    def prompt_row(self, task: str) -> str:
        """The bank row that is `task`'s prompt: the task itself, or its best variant so far."""
        return self.search.leader(task) if self.search else task

    def rung_criterion(self, task: str) -> str:
        """`metric`, `loss` or `label_loss`: what ranks `task`'s variants at a rung (`search.criterion`;
        auto: the metric where it is one forward per example, the loss where it would decode greedily)."""
        c = self.cfg.search.criterion
        classification = self.tasks[task].spec.kind == "classification"
        if c == "auto":
            return "metric" if classification else "loss"
        if c == "label_loss" and not classification:
            return "loss"  # no label set to renormalise over
        return c

    def _label_tokens(self, task: str) -> list[int] | None:
        """The first token of each of `task`'s labels (in `spec.labels` order) where every label is one
        distinct token, as `score_labels` ranks them; else None."""
        if task not in self._label_token_cache:
            spec = self.tasks[task].spec  # spec.labels: the verbaliser's keys, in its order
            classification = spec.kind == "classification"
            ids = one_token_labels(self.tokenizer, spec.verbaliser) if classification else None
            self._label_token_cache[task] = ids
        return self._label_token_cache[task]

    def prequential_criterion(self, task: str) -> str:
        """What a prequential rung ranks `task`'s variants by: its `rung_criterion` where the training
        forward has it (the metric and label_loss of one-token labels: the logits at the first target),
        else the loss."""
        by = self.rung_criterion(task)
        return by if by in ("metric", "label_loss") and self._label_tokens(task) else "loss"

    def _gold_index(self, task: str, i: int) -> int:
        """Example `i` of `task`: its gold label's index in `spec.labels` (-1 where no label ranks it)."""
        if self.prequential_criterion(task) == "loss":
            return -1
        return self.tasks[task].spec.labels.index(self.tasks[task].train[i].label)

    def _prequential_results(self, batch, out, examples) -> torch.Tensor:
        """Each segment's result under its own row's prompt, from the forward that trains on it (so before
        this step's update): the predicted label's index (ranked by the metric), the log-probability of
        the gold label among the labels (label_loss), or minus its mean target NLL (loss)."""
        res = -out.seg_loss.double()
        n = batch.target_ids.numel()
        first = torch.full((batch.num_segments,), n, dtype=torch.long, device=res.device)
        first.scatter_reduce_(0, batch.target_seg, torch.arange(n, device=res.device), reduce="amin")
        by_task: dict[str, list[int]] = {}
        for j, ex in enumerate(examples):
            by_task.setdefault(self.search.variant(ex.task).task, []).append(j)
        for task, segs in by_task.items():
            by = self.prequential_criterion(task)
            if by == "loss":
                continue
            idx = torch.tensor(segs, device=res.device)
            logits = out.target_logits[first[idx]][:, self._label_tokens(task)].double()
            if by == "metric":
                res[idx] = logits.argmax(-1).double()
            else:
                labels = self.tasks[task].spec.labels
                gold = torch.tensor([labels.index(examples[j].label) for j in segs], device=res.device)
                res[idx] = torch.log_softmax(logits, -1).gather(1, gold[:, None])[:, 0]
        return res

    def _score_prequential(self, task: str) -> dict[str, tuple] | None:
        """Like `_score_variants`, on the window of `task`'s drawn examples (`SearchState.window`); None
        when it holds fewer than MIN_PREQUENTIAL."""
        gold, results = self.search.window(task, self.step)
        if len(gold) < MIN_PREQUENTIAL:
            return None
        spec, out = self.tasks[task].spec, {}
        for k, v in results.items():
            row = self.search.variants[task][k].row
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

    def _score_variants(self, task: str, rows: list[str], held: TaskData) -> dict[str, tuple]:
        """row -> (its score on `held` by `rung_criterion`, higher is better; its per-example `Evidence`,
        None where the score is a decoded corpus metric)."""
        by, spec = self.rung_criterion(task), held.spec
        if by == "loss":  # every live variant in the same forwards
            loss = target_losses(
                self.lm,
                held.eval,
                {r: self.prompt(r).to(self.device) for r in rows},
                max_len=self.cfg.model.max_seq_len,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
            )
            return {r: (-sum(v) / len(v), Evidence(-np.array(v))) for r, v in loss.items()}
        out = {}
        for row in rows:
            prompt = self.prompt(row).to(self.device)
            args = (self.lm, self.tokenizer, held.eval, spec.verbaliser, prompt, self.cfg.model.max_seq_len)
            if by == "label_loss":
                nll = label_nlls(*args, device=self.device)
                out[row] = (-sum(nll) / len(nll), Evidence(-np.array(nll)))
            elif spec.kind == "classification":  # the metric, from one forward per example
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
                    evaluate_task(
                        self.lm, self.tokenizer, held, prompt, self.cfg.model.max_seq_len, self.device
                    )["score"],
                    None,
                )
        return out

    def _search_rung(self, final: bool = False) -> None:
        """Score the live variants of every task on its held-out slice (or, with prequential scoring, on
        the window of its drawn examples) and drop the weaker ones."""
        t0 = time.perf_counter()
        scores, evidence, by_task, examples, sources = {}, {}, {}, {}, {}
        for row in self.search.rows_to_score(final):
            by_task.setdefault(self.search.variant(row).task, []).append(row)
        for task, rows in by_task.items():
            if len(rows) > 1 and self.search.prequential and (got := self._score_prequential(task)):
                for row, (score, ev) in got.items():
                    scores[row], evidence[row] = score, ev
                examples[task], sources[task] = len(next(iter(got.values()))[1].values), "prequential"
                continue
            full = self.heldout[task]
            n = examples[task] = self.search.heldout_size(self.step, len(full.eval), final)
            held = dataclasses.replace(full, eval=full.eval[:n], eval_text=full.eval_text[:n])
            for row, (score, ev) in self._score_variants(task, rows, held).items():
                scores[row] = score
                if ev is not None:
                    evidence[row] = ev
        recent = self.history.steps[-10:]  # every rank logs the same all-reduced losses
        train_loss = {
            row: sum(v) / len(v)
            for row in scores
            if (v := [m.task_loss[row] for m in recent if row in m.task_loss])
        }
        results = self.search.apply_rung(
            self.step,
            scores,
            final=final,
            train_loss=train_loss,
            examples=examples,
            evidence=evidence,
            sources=sources,
        )
        self.search.forget_before(self.step)
        for r in results:
            if len(r.scores) == 1:
                continue  # a one-variant task's held-out number at the end: nothing to choose
            kept = ", ".join(str(k) for k in r.kept)
            why = ""
            if c := r.base_check:
                why = (
                    f"; the job's own configuration ({self.search.base}) "
                    + ("stays" if c["kept"] else "goes")
                    + f": {describe_base_check(c, self.search.base_margin)}"
                )
            self._log(
                f"search rung {r.rung} @ step {r.step}: {r.task} keeps variant(s) {kept} "
                f"({r.examples} {'drawn' if r.source == 'prequential' else 'held-out'} examples{why})"
            )
        self.search_scoring_s += time.perf_counter() - t0

    def cleanup(self) -> None:
        self._zero = None

    def _log(self, msg: str) -> None:
        if not self.is_main:
            return
        if (
            self.hooks.on_message
        ):  # e.g. to the Ray driver's console (workers' own output stays in Ray's logs)
            self.hooks.on_message(msg)
        else:
            # Not print(): inside a Ray Train worker print is patched to log *and* tee to the redirected
            # stdout, so every line would reach the driver twice.
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


def step_postfix(m: StepMetrics) -> dict[str, str]:
    """What the progress bar shows after a step (the recipe's own bar and the Ray driver's)."""
    return {"loss": f"{m.loss:.3f}", "tok_s": f"{m.tokens_per_s:.0f}", "lr": f"{m.lr:.3g}"}


def describe_eval(point: EvalPoint) -> str:
    """One line for the console: which evaluation, and every task's score."""
    what = "zero-shot" if point.zero_shot else f"eval @ step {point.step}"
    return f"{what}: " + ", ".join(f"{t} {v:.3f}" for t, v in point.scores.items())


def _quiet_stdout(quiet: bool):
    """Send stdout to nowhere for the block when `quiet` (errors still raise; stderr is untouched)."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def render_table(summary: dict) -> str:
    lines = ["| task | metric | zero-shot | tuned |", "|---|---|---:|---:|"]
    for name, t in summary["tasks"].items():
        z = t["zero_shot"].get("score")
        lines.append(
            f"| {name} | {t['metric']} | {'' if z is None else f'{z:.4f}'} | {t['tuned'].get('score', 0):.4f} |"
        )
    return "\n".join(lines)


def render_report(summary: dict) -> str:
    parts = [
        f"# Run `{summary['name']}`",
        "",
        f"Backbone `{summary['backbone']}`, {summary['steps']} steps on {summary['world_size']} rank(s), "
        f"{summary['num_virtual_tokens']} virtual tokens per task, {summary['tokens_per_s']:.0f} tokens/s.",
        "",
        render_table(summary),
        "",
    ]
    for name, t in summary["tasks"].items():
        per = t["tuned"].get("per_label")
        if per:
            parts += [
                f"## {name}: per-label (tuned)",
                "",
                "| label | precision | recall | F1 | support |",
                "|---|---:|---:|---:|---:|",
            ]
            parts += [
                f"| {lab} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                for lab, v in per.items()
            ]
            parts.append("")
    if summary.get("search"):
        parts.append(render_search_report(summary["search"]))
    return "\n".join(parts)


def run(cfg: JobConfig, hooks: RecipeHooks | None = None, progress: bool = True) -> dict:
    """Set up, train and finish one job on this process (one rank)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = MultiTaskPromptTuningRecipe(cfg, hooks, progress)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()
