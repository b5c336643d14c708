"""Multi-task prompt tuning: the training recipe. Read this file top to bottom.

    setup()  -> tokenizer, tasks, frozen backbone (ZeRO-3 partitioned at load), prompt bank,
                optimiser, sampler, and the newest checkpoint if there is one
    train()  -> for each step: draw a global mixed-task batch, take this rank's shard of every
                micro-batch, pack it, forward/backward into the rows of the tasks in the batch,
                all-reduce those rows' gradients, step them; log, evaluate, checkpoint
    finish() -> final evaluation beside the zero-shot scores, per-task PEFT adapters, summary
                JSON, Markdown report, loss/score curves (PNG)

Every rank draws the same global batch (same sampler seed) and keeps the full (small) prompt bank,
so after the all-reduce all ranks apply identical updates; only the frozen backbone is sharded.
The recipe knows nothing of Ray: `cluster.launch` runs it on Ray Train workers and passes hooks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tuner import checkpoint as ckpt
from tuner.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype, resolve_backbone
from tuner.batching import collate
from tuner.config import ConfigError, JobConfig, to_dict
from tuner.data import MultiTaskSampler, TaskData
from tuner.evaluate import evaluate_task
from tuner.export import TaskAdapter, save_adapter
from tuner.model import PromptTunedLM
from tuner.optim import SparseRowAdam, lr_at
from tuner.prompt_bank import PromptBank, init_prompts
from tuner.run_dir import claim_run_dir, mark_finished
from tuner.tasks import TaskSpec
from tuner.zero import allreduce_rows_grad, world, zero_setup


@dataclass
class RecipeHooks:
    """Optional callbacks for the orchestration layer (Ray reporting, metrics export)."""

    on_step: Callable[[int, dict], None] | None = None  # (step, metrics) on every rank after each step
    on_checkpoint: Callable[[int, Path | None, dict], None] | None = None  # every rank; path on rank 0 only
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
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        micro = cfg.optim.batch_size // cfg.optim.grad_accum
        if micro < self.world_size:
            raise ConfigError(
                f"optim.batch_size / optim.grad_accum = {micro} is fewer examples than ranks ({self.world_size})"
            )
        if self.is_main:
            claim_run_dir(self.run_dir, cfg)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if cfg.cluster.use_gpu and torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.dtype = pick_dtype(cfg.model.dtype, self.device)
        path = resolve_backbone(cfg.model.name)
        self.tokenizer = load_tokenizer(path)

        specs = [TaskSpec.load(p) for p in cfg.tasks]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"two task files define the same task name: {names}")
        for s in specs:
            s.check_files()
        self.tasks = {
            s.name: TaskData.load(
                s,
                self.tokenizer,
                max_train=cfg.data.max_train_examples,
                max_eval=cfg.data.max_eval_examples,
                seed=cfg.data.seed,
            )
            for s in specs
        }

        # Replicate or ZeRO-3 (cluster.zero_stage, auto by default); under ZeRO-3 this must run
        # before loading so weights are partitioned while they load.
        self._zero = zero_setup(cfg, path, self.dtype, self.world_size, log=self._log)
        backbone = load_backbone(
            path,
            self.dtype,
            pick_attention(cfg.model.attn_implementation, self.device),
            self.device,
            activation_checkpointing=cfg.cluster.activation_checkpointing,
        )
        self._zero.wrap(backbone)
        self.lm = PromptTunedLM(backbone)
        self.backbone_path = path

        hidden = backbone.config.hidden_size
        self.bank = PromptBank(names, cfg.prompt.num_virtual_tokens, hidden)
        init_prompts(
            self.bank,
            self.lm.embed,
            self.tokenizer,
            cfg.prompt.init,
            label_words={n: list(t.spec.verbaliser.values()) for n, t in self.tasks.items()},
            text=cfg.prompt.init_text,
            std=cfg.prompt.init_std,
            seed=cfg.data.seed,
        )
        o = cfg.optim
        self.optimizer = SparseRowAdam(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip)
        self.sampler = MultiTaskSampler(
            {n: len(t.train) for n, t in self.tasks.items()},
            o.batch_size,
            cfg.data.mixing,
            cfg.data.temperature,
            cfg.data.seed,
        )
        torch.manual_seed(cfg.data.seed)

        resume = self.hooks.resume_from or (
            ckpt.latest_checkpoint(self.run_dir / "checkpoints") if cfg.resume else None
        )
        if resume is not None:
            state = ckpt.load_checkpoint(
                resume, bank=self.bank, optimizer=self.optimizer, sampler=self.sampler
            )
            self.step, self.history = state["step"], state["history"]
            self._log(f"resumed from {resume} at step {self.step}")

    # ------------------------------------------------------------------------------------ train

    def train(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        if self.step == 0 and cfg.eval_zero_shot:
            self.history.append({"step": 0, "zero_shot": self._evaluate(tuned=False)})
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=o.max_steps, initial=self.step, desc="prompt tuning", unit="step", dynamic_ncols=True
            )
        while self.step < o.max_steps:
            t0 = time.perf_counter()
            metrics = self._train_step()
            metrics["step_time_s"] = time.perf_counter() - t0
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == o.max_steps:
                self.history.append(
                    {"step": self.step, **{k: v for k, v in metrics.items() if k != "tokens"}}
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                    lr=f"{metrics['lr']:.3g}",
                )
            if self.hooks.on_step:
                self.hooks.on_step(self.step, metrics)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < o.max_steps:
                self.history.append({"step": self.step, "eval": self._scores(self._evaluate(tuned=True))})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == o.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()

    def _train_step(self) -> dict:
        o = self.cfg.optim
        global_batch = self.sampler.next_batch()
        names = sorted({t for t, _ in global_batch})  # identical on every rank
        rows = self.bank.rows_of(names)
        prompts = self.bank.gather(rows).to(self.device)  # leaf [U, P, H]: the only trainable tensor
        pos = {n: i for i, n in enumerate(names)}
        # Each task's prompt gets the mean loss over *its* examples in the global batch, as if it
        # trained alone on them: a task's update does not depend on which other tasks share the step.
        per_task = Counter(t for t, _ in global_batch)
        task_weight = torch.tensor([1.0 / per_task[n] for n in names], device=self.device)
        micro = o.batch_size // o.grad_accum
        loss_sum = torch.zeros(len(names), 2, dtype=torch.float64)  # per task: (sum of losses, examples)
        tokens = 0
        for m in range(o.grad_accum):
            shard = global_batch[m * micro : (m + 1) * micro][self.rank :: self.world_size]
            examples = [self.tasks[t].train[i] for t, i in shard]
            batch = collate(
                examples,
                pos,
                self.bank.num_virtual_tokens,
                max_len=self.cfg.model.max_seq_len,
                pad_id=self.tokenizer.pad_token_id,
                packing=self.cfg.data.packing,
                share_prompts=self.cfg.data.share_prompts and self.lm.supports_shared_prompts,
                row_len=self.cfg.data.row_len,
            ).to(self.device)
            out = self.lm(batch, prompts, seg_weight=task_weight[batch.seg_task])
            out.loss.backward()
            seg_task = batch.seg_task.cpu()
            loss_sum[:, 0].index_add_(0, seg_task, out.seg_loss.cpu().double())
            loss_sum[:, 1].index_add_(0, seg_task, torch.ones_like(seg_task, dtype=torch.float64))
            tokens += batch.num_text_tokens
        allreduce_rows_grad(prompts)
        stats = torch.cat([loss_sum.flatten(), torch.tensor([float(tokens)], dtype=torch.float64)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        loss_sum, tokens = stats[:-1].view(-1, 2), int(stats[-1])
        lr = lr_at(self.step, o.lr, o.warmup_steps, o.max_steps, o.schedule)
        new = self.optimizer.step(names, prompts.detach().cpu(), prompts.grad.cpu(), lr=lr)
        self.bank.scatter_(rows, new)
        task_loss = {n: float(loss_sum[i, 0] / loss_sum[i, 1]) for i, n in enumerate(names)}
        return {
            "loss": float(loss_sum[:, 0].sum() / loss_sum[:, 1].sum()),
            "lr": lr,
            "tokens": tokens,
            "task_loss": task_loss,
        }

    # ------------------------------------------------------------------------------------ eval

    def _evaluate(self, tuned: bool) -> dict[str, dict]:
        out = {}
        for name, data in self.tasks.items():
            prompt = self.bank.prompt(name).to(self.device) if tuned else None
            out[name] = evaluate_task(
                self.lm, self.tokenizer, data, prompt, self.cfg.model.max_seq_len, self.device
            )
        return out

    @staticmethod
    def _scores(results: dict[str, dict]) -> dict[str, float]:
        return {n: r["score"] for n, r in results.items() if r}

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
                history=self.history,
            )
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(
                self.step, path, {"step": self.step, "checkpoint_time_s": time.perf_counter() - t0}
            )

    # ------------------------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """Final eval, adapters, summary, report and curves. Returns the summary."""
        final = self._evaluate(tuned=True)
        self.history.append({"step": self.step, "eval": self._scores(final)})
        zero = next((h["zero_shot"] for h in self.history if "zero_shot" in h), {})
        summary = {
            "name": self.cfg.name,
            "backbone": self.cfg.model.name,
            "steps": self.step,
            "world_size": self.world_size,
            "num_virtual_tokens": self.bank.num_virtual_tokens,
            "tokens_per_s": _mean([h["tokens_per_s"] for h in self.history if "tokens_per_s" in h]),
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
        if self.is_main:
            for name, data in self.tasks.items():
                spec = data.spec
                save_adapter(
                    self.run_dir / "adapters",
                    TaskAdapter(
                        name,
                        self.bank.prompt(name),
                        self.cfg.model.name,
                        {
                            "kind": spec.kind,
                            "description": spec.description,
                            "template": spec.template,
                            "prefix": data.prefix,
                            "verbaliser": spec.verbaliser,
                            "metric": spec.metric,
                            "max_new_tokens": spec.max_new_tokens,
                            "score": final[name].get("score"),
                        },
                    ),
                    self.lm.backbone.config,
                )
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            (self.run_dir / "report.md").write_text(render_report(summary))
            from tuner.plots import plot_curves

            plot_curves(self.history, self.run_dir / "curves.png")
            mark_finished(self.run_dir)
            self._log("\n" + render_table(summary))
            self._log(f"run directory: {self.run_dir}")
        return summary

    def cleanup(self) -> None:
        self._zero = None

    def _log(self, msg: str) -> None:
        if self.is_main:
            # Not print(): inside a Ray Train worker print is patched to log *and* tee to the redirected
            # stdout, so every line would reach the driver twice.
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


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
