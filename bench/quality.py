"""Benchmark: per-task quality after the same budget, for every prompt method against PEFT and zero-shot.

    python -m bench.quality --tasks cb,rte,sst2,trec --seeds 0,1      (JSON: bench/results/quality_methods.json)
    python -m bench.quality --tasks all --seeds 2,3 --add              (add seeds to the recorded ones)
    python -m bench.quality --tasks all --seeds 2,3 --add --resume     (after a stop in seed 2: its finished
                                                                      rate runs are kept, quality_stages)
    python -m bench.quality --quick                                    (smoke run, nothing recorded)
    python -m bench.quality --tasks all --methods ulpt,superpos --peft-lr-grid 0.01,0.03,0.1,0.3 \
        --out quality_prompt_methods                                   (issue 39: against tuned PEFT)
    python -m bench.quality --tasks all --methods ulpt,superpos --lr 0.1 --peft-lr-grid 0.1 \
        --out quality_prompt_methods_lr0.1                             (ours and PEFT at one rate)
    python -m bench.quality --tasks all --methods ulpt --lr-grid 0.03,0.1,0.3 --out quality_ulpt_tuned
                                                                      (ours tuned as PEFT is)
    python -m bench.quality --pool A.json B.json --out quality_methods  (no runs: seeds of one setup, run
                                                                      apart, into one result)

Methods, per seed (`--methods` picks ours; zero-shot and PEFT always run):
* zero-shot: the untuned backbone (no virtual tokens);
* PEFT: Hugging Face PEFT prompt tuning, one adapter per task trained on that task alone
  (`PeftPromptTuning` in `bench.common`, plain PyTorch loop, AdamW), its learning rate tuned per
  task over `--peft-lr-grid` on the task's held-out slice (`bench.quality_peft`; a one-value grid is
  the old hand-set baseline). The held-out slices are taken out of the sampler before it draws, so
  no method ever trains on them;
* ours `independent`, `residual`, `multitask`, `ulpt`, `superpos` (`prompt.method`): the tuner recipe's own
  `train_step`, one run over all tasks (`independent`: two runs, one per half of the tasks, see
  transfer below; its prompts do not interact, so this is the same computation per task);
* ours `transfer` (transfer initialisation, method independent), leave-one-out (`--transfer loo`,
  the default): each task starts from the finished `independent` prompt of one of the *other* tasks
  of the same seed, the one with the lowest zero-shot loss on its first `prompt.transfer_examples`
  training examples (`tuner.prompts.continual.choose_sources`, as `prompt.init=transfer` chooses), and then
  trains with the same budget, all tasks in one joint run. Per task this is "add this task to a
  fleet of the others, trained": `promptfleet train <task> prompt.init=transfer
  prompt.init_from=<run of the others>`. It costs no training beyond the `independent` runs this
  benchmark trains anyway: independent prompts do not interact, so every task's prompt there is the
  one a run of the others alone would have trained. `--transfer halves` (seeds 0-1 of
  bench/results/quality_methods.json) splits the tasks into two alternating halves instead, each
  half transfer-initialised by `prompt.init_from` from the finished `independent` run of the other
  half: a task's candidate sources are then the other half only. Either way what a task adds is its
  source's training: the source task's examples of the same S steps.

Same budget, precisely: the sampler of a recipe over all tasks draws the global batches of S steps
once per seed. Every method trains on them: a joint run on them as drawn, a half run on the draws'
examples of its tasks (a step with none of them advances only the step count, so the learning-rate
schedule stays on the global step), PEFT on each task's examples of each step, one optimiser step
per global step in which the task appears. So per task every method sees the same examples in the
same order with the same number of updates, the same learning-rate schedule, Adam betas/eps and
per-task gradient clipping. PEFT and `independent` start from the same prompts (the tuner's
class-label initialisation of the seed over all tasks), `residual` from the same rows. PEFT's loss
is the token mean of its task batch, and so is ours by default (`optim.loss_weighting: token`);
`--loss-weighting example` gives ours the mean over a task's examples of each example's token mean
instead (the same for single-token verbalisers; they differ for generation and NER targets).

Every task is scored with its own metric (`evaluate_task(...)["score"]`: accuracy, macro-F1,
chrF or entity F1 as its YAML says), in points, on a fixed seeded eval subset per task, the same
for all methods. Replicates (`--seeds`): at this budget a run's score moves by several points under
float-level perturbations, so the tables give every seed, the mean +- sample sd over seeds, and the
paired difference of each of our methods against PEFT with the seeds in which it is >= PEFT. The
verdict line checks issue 14's targets for the best of our methods (highest mean gain over PEFT):
>= PEFT on every task, >= +2 points on the mean over tasks, >= +5 on the low-resource CB and RTE.
This module runs the seeds; the records, tables and verdict are `bench.quality_results`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import (
    REPO,
    RESULTS,
    bench_config,
    draw_batches,
    points,
    setup_recipe,
    write_result,
)
from bench.quality_peft import Tuned, hold_out_slices, parse_grid, tune, tune_peft
from bench.quality_results import (
    PEFT,
    ZERO_SHOT,
    SeedResult,
    earlier_seeds,
    pooled,
    print_result,
    result_of,
)
from bench.quality_stages import Stages
from tuner.config import JobConfig, OptimConfig
from tuner.job import prepare_job
from tuner.prompts.continual import choose_sources
from tuner.prompts.methods import DEFAULT_RANK
from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks
from tuner.tasks.kinds import evaluate_task

TASK_DIR = REPO / "configs" / "tasks"
DEFAULT_TASKS = "sst2,ag_news,trec"
OURS = ("independent", "residual", "multitask", "ulpt", "superpos", "transfer")
JOINT = ("residual", "multitask", "ulpt", "superpos")  # methods trained in one run over all tasks


# ------------------------------------------------------------------------------------ arguments


def shipped_tasks() -> list[str]:
    """Every task config in configs/tasks/ by name (`--tasks all`)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def expand_tasks(arg: str, available: list[str]) -> list[str]:
    """`all` or a comma list of task names -> the names, in order; ValueError with a one-line message."""
    if arg.strip() == "all":
        return list(available)
    names = [x.strip() for x in arg.split(",") if x.strip()]
    if not names:
        raise ValueError("--tasks needs at least one task name (or all)")
    for n in names:
        if n not in available:
            raise ValueError(f"--tasks: no task {n!r} in configs/tasks/ (shipped: {', '.join(available)})")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks names a task twice: {arg!r}")
    return names


def expand_methods(arg: str) -> list[str]:
    """Comma list of our prompt methods (default all of `OURS`), in `OURS` order."""
    names = {x.strip() for x in arg.split(",") if x.strip()}
    if not names:
        raise ValueError("--methods needs at least one method")
    unknown = sorted(names - set(OURS))
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(OURS)})")
    return [m for m in OURS if m in names]


TRANSFER_PROTOCOLS = ("loo", "halves")


def halves(names: list[str]) -> tuple[list[str], list[str]]:
    """The two halves of the `--transfer halves` protocol: alternating, so each mixes big and small tasks."""
    return names[0::2], names[1::2]


def leave_one_out_sources(recipe, prompts: dict[str, torch.Tensor]) -> dict[str, tuple[str, float]]:
    """Each of `recipe`'s tasks -> (the other task whose trained prompt in `prompts` fits it best, its loss).

    "Fits best" is `prompt.init=transfer`'s own rule (`choose_sources`: the lowest mean target loss on
    the task's first `prompt.transfer_examples` training examples), over every prompt but the task's own.
    """
    k = recipe.cfg.prompt.transfer_examples
    out = {}
    for task, data in recipe.tasks.items():
        others = {name: p for name, p in prompts.items() if name != task}
        if not others:
            raise ValueError(f"leave-one-out transfer: no other task's prompt for {task}")
        out |= choose_sources(
            recipe.lm,
            {task: data.train[:k]},
            others,
            max_len=recipe.cfg.model.max_seq_len,
            pad_id=recipe.tokenizer.pad_token_id,
            device=recipe.device,
        )
    return out


# ------------------------------------------------------------------------------------ one seed


def clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds."""
    return time.perf_counter(), time.process_time()


class SeedBench:
    """The runs of one seed: a config per run, all on the same draws."""

    def __init__(
        self, args, seed: int, tasks: list[str], steps: int, n_eval: int, stages: Stages | None = None
    ):
        self.args, self.seed, self.tasks, self.steps, self.n_eval = args, seed, tasks, steps, n_eval
        self.stages = stages  # the grids' finished runs, kept for --resume (bench.quality_stages)
        self.dirs: list[str] = []
        # what -> (wall s, process CPU s): a smoke run's basis for estimating a full run on a busy machine
        self.timings: dict[str, tuple[float, float]] = {}

    def timed(self, what: str, since: tuple[float, float]) -> None:
        """Record `what` as the wall and CPU seconds since `since` (`clock()` when it started)."""
        now = clock()
        self.timings[what] = (round(now[0] - since[0], 1), round(now[1] - since[1], 1))
        print(
            f"seed {self.seed} {what}: {self.timings[what][0]} s wall, {self.timings[what][1]} s CPU",
            flush=True,
        )

    def config(self, tasks: list[str], tag: str) -> JobConfig:
        cfg = bench_config(
            f"quality-{tag}",
            batch_size=self.args.batch_size,
            max_steps=self.steps,
            max_seq_len=self.args.max_seq_len,
            max_eval=self.n_eval,
            max_train=400 if self.args.quick else 4000,
            tasks=[str(TASK_DIR / f"{t}.yaml") for t in tasks],
        )
        cfg.data.seed = self.seed  # train/eval subsets, prompt init and the sampler's draws
        cfg.optim.loss_weighting = self.args.loss_weighting  # ours only: PEFT's loss is a token mean
        cfg.optim.lr = self.args.lr  # ours only: PEFT's is its grid's
        cfg.prompt.init = self.args.init  # PEFT starts from the prompts of a run with this config too
        self.dirs.append(cfg.output_dir)
        return cfg

    def score(self, recipe: MultiTaskPromptTuningRecipe, prompt_of, what: str) -> dict[str, float]:
        L = recipe.cfg.model.max_seq_len
        return {
            t: points(
                recipe.tasks[t].spec.metric,
                evaluate_task(recipe.lm, recipe.tokenizer, recipe.tasks[t], prompt_of(t), L)["score"],
            )
            for t in tqdm(list(recipe.tasks), desc=f"seed {self.seed}: evaluate {what}", unit="task")
        }

    def train(
        self,
        tasks: list[str],
        draws,
        method: str,
        tag: str,
        *,
        lr: float | None = None,
        initial: dict[str, torch.Tensor] | None = None,
        source: Path | None = None,
        loo: dict[str, torch.Tensor] | None = None,
    ) -> tuple[MultiTaskPromptTuningRecipe, dict[str, str]]:
        """Train `method` on `tasks` with their examples of `draws` (at `lr`, default `--lr`).

        `initial` (independent only): start each task from this prompt, the one PEFT starts from
        (the same as its own init since each task draws from its own stream; set explicitly all the same).
        `source` (halves): transfer-initialise from that finished run (`prompt.init_from`); `loo`
        (leave-one-out): start each task from the best fitting of the other tasks' prompts in it.
        Returns the trained recipe and each task's source task (with `source` or `loo`).
        """
        cfg = self.config(tasks, tag)
        cfg.prompt.method = method
        cfg.optim.lr = lr or cfg.optim.lr
        if source is not None:
            cfg.prompt.init, cfg.prompt.init_from = "transfer", str(source)
        prepare_job(cfg, claim=True)  # a run directory of its own, as `promptfleet train` makes
        chosen: dict[str, str] = {}

        def note(msg: str) -> None:  # "transfer init: <task> starts from <source> (...)"
            if msg.startswith("transfer init: "):
                task, _, rest = msg.removeprefix("transfer init: ").partition(" starts from ")
                chosen[task] = rest.split(" ", 1)[0]

        recipe = MultiTaskPromptTuningRecipe(cfg, hooks=RecipeHooks(on_message=note), progress=False)
        recipe.setup()
        for t in tasks if initial else []:
            recipe.bank.set_prompt(t, initial[t])
        for t, (src, loss) in (leave_one_out_sources(recipe, loo) if loo else {}).items():
            recipe.bank.set_prompt(t, loo[src])
            note(f"transfer init: {t} starts from {src} (zero-shot loss {loss:.3f})")
        mine = set(tasks)
        for draw in tqdm(draws, desc=f"seed {self.seed}: {tag}", unit="step"):
            batch = [(t, i) for t, i in draw if t in mine]
            if batch:
                recipe.train_step(batch)
            else:
                recipe.step += 1  # no example of these tasks: the schedule still follows the global step
        return recipe, chosen

    def ours(
        self, tasks: list[str], draws, method: str, tag: str, **how
    ) -> tuple[dict[str, float], Path, dict[str, str], dict[str, torch.Tensor]]:
        """`train` (`how`: its keywords), then finish the run (a transfer source): its scores, its
        finished run directory, each task's source task and its final prompts."""
        t0 = clock()
        recipe, chosen = self.train(tasks, draws, method, tag, **how)
        recipe.save_checkpoint()
        summary = recipe.finish()  # evaluates every task with evaluate_task, writes the adapters
        scores = {t: points(summary.tasks[t].metric, summary.tasks[t].tuned.score) for t in tasks}
        print(f"seed {self.seed} {tag}: {scores} sources {chosen}", flush=True)
        final = {t: recipe.prompt(t).detach().cpu().clone() for t in tasks}
        self.timed(tag, t0)
        return scores, recipe.run_dir, chosen, final

    def ours_tuned(self, draws, method: str, heldout) -> tuple[dict[str, float], Tuned]:
        """`method` over all tasks once per rate of `--lr-grid`; each task keeps the rate best on its
        held-out slice (PEFT's rule, `bench.quality_peft.tune`), and only that prompt is scored."""
        t0, last = clock(), []

        def train(lr: float):
            recipe = self.train(self.tasks, draws, method, f"{method}-lr{lr}", lr=lr)[0]
            last[:] = [recipe]
            return recipe, {t: recipe.prompt(t).detach().cpu().clone() for t in self.tasks}

        def scorer():  # a rate trained before (--resume): scored on the same backbone, untrained
            last[:] = last or [setup_recipe(self.config(self.tasks, f"{method}-scoring"))]
            return last[0]

        tuned = tune(self.args.lr_grid, train, heldout, self.stages, method, scorer)
        scores = self.score(last[0], tuned.prompts.__getitem__, method)
        print(f"seed {self.seed} {method}: {scores} (lr {tuned.lr})", flush=True)
        self.timed(method, t0)  # every rate of the grid
        return scores, tuned

    def run(self, methods: list[str]) -> tuple[SeedResult, dict[str, str]]:
        """Zero-shot and PEFT on a reference recipe over all tasks (whose sampler draws the batches), then ours."""
        ref = setup_recipe(self.config(self.tasks, "reference"), progress=True)
        heldout = hold_out_slices(ref, self.args.heldout_examples)  # before the draws: no one trains on them
        draws = draw_batches(ref, self.steps)
        metrics = {t: ref.tasks[t].spec.metric for t in self.tasks}
        t0 = clock()
        scores = {ZERO_SHOT: self.score(ref, lambda t: None, ZERO_SHOT)}
        self.timed(ZERO_SHOT, t0)
        initial = {t: ref.prompt(t).clone() for t in self.tasks}
        t0 = clock()
        peft = tune_peft(ref, draws, initial, heldout, self.args.peft_lr_grid, self.seed, self.stages)
        scores[PEFT] = self.score(ref, peft.prompts.__getitem__, PEFT)
        self.timed(f"PEFT, {len(self.args.peft_lr_grid)} learning rates", t0)
        print(
            f"seed {self.seed}: zero-shot {scores[ZERO_SHOT]}, PEFT {scores[PEFT]} (lr {peft.lr})", flush=True
        )
        del ref

        sources: dict[str, str] = {}
        if "independent" in methods or "transfer" in methods:
            a, b = halves(self.tasks)
            sa, dir_a, _, pa = self.ours(a, draws, "independent", "independent-a", initial=initial)
            sb, dir_b, _, pb = self.ours(b, draws, "independent", "independent-b", initial=initial)
            if "independent" in methods:
                scores["independent"] = {**sa, **sb}
            if "transfer" in methods and self.args.transfer == "loo":
                t_all, _, sources, _ = self.ours(
                    self.tasks, draws, "independent", "transfer", loo={**pa, **pb}
                )
                scores["transfer"] = t_all
            elif "transfer" in methods:
                ta, _, ca, _ = self.ours(a, draws, "independent", "transfer-a", source=dir_b)
                tb, _, cb, _ = self.ours(b, draws, "independent", "transfer-b", source=dir_a)
                scores["transfer"], sources = {**ta, **tb}, {**ca, **cb}
        ours_grid: dict[str, Tuned] = {}
        for m in JOINT:
            if m in methods and self.args.lr_grid:
                scores[m], ours_grid[m] = self.ours_tuned(draws, m, heldout)
            elif m in methods:
                scores[m] = self.ours(self.tasks, draws, m, m)[0]
        print(f"seed {self.seed} (wall s, CPU s): {self.timings}", flush=True)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        for m, s in scores.items():  # in the log as soon as the seed is done
            print(f"seed {self.seed} {m}: " + ", ".join(f"{t} {v:.1f}" for t, v in s.items()), flush=True)
        result = SeedResult(
            self.seed,
            {m: {t: s[t] for t in self.tasks} for m, s in scores.items()},
            dict(Counter(t for d in draws for t, _ in d)),
            dict(Counter(t for d in draws for t in {t for t, _ in d})),
            sources,
            peft_lr=peft.lr,
            peft_heldout_score=peft.heldout_score,
            peft_heldout_loss=peft.heldout_loss,
            heldout_examples={t: len(h.eval) for t, h in heldout.items()},
            ours_lr={m: g.lr for m, g in ours_grid.items()},
            ours_heldout_score={m: g.heldout_score for m, g in ours_grid.items()},
            ours_heldout_loss={m: g.heldout_loss for m, g in ours_grid.items()},
        )
        return result, metrics


# ------------------------------------------------------------------------------------ main


def _rate_options(ap: argparse.ArgumentParser) -> None:
    """The learning rates (PEFT's grid, ours, our grid), the start and the held-out slice."""
    ap.add_argument(
        "--peft-lr-grid",
        default="0.01,0.03,0.1,0.3",
        help="PEFT's learning rates; each task keeps the one best on its held-out slice (one value: no tuning)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=OptimConfig().lr,
        help="our methods' learning rate (optim.lr; default as in the config). PEFT's comes from "
        "--peft-lr-grid: give both one value to compare the two at the same rate",
    )
    ap.add_argument(
        "--lr-grid",
        help="our joint methods' learning rates (residual, multitask, ulpt, superpos): one run per rate, each "
        "task keeps the one best on its held-out slice, as PEFT's (default: --lr alone)",
    )
    ap.add_argument(
        "--init",
        choices=("class_labels", "vocab", "random"),
        default="class_labels",
        help="every task's starting prompt (prompt.init), for every method and PEFT alike",
    )
    ap.add_argument(
        "--heldout-examples",
        type=int,
        default=64,
        help="each task's held-out slice (at most a fifth of its training examples), trained on by no method",
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 steps, 16 eval examples, one seed, nothing recorded",
    )
    ap.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help="comma list of task names in configs/tasks/, or all (every shipped task config)",
    )
    ap.add_argument(
        "--methods", default=",".join(OURS), help=f"our prompt methods to run (of {', '.join(OURS)})"
    )
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--eval-examples", type=int, default=200, help="seeded eval subset per task")
    _rate_options(ap)
    ap.add_argument(
        "--loss-weighting",
        choices=("example", "token"),
        default=OptimConfig().loss_weighting,
        help="our methods' optim.loss_weighting, default as in the config: token (the mean over a task's "
        "target tokens, as PEFT's loss) or example (the mean of each example's token mean)",
    )
    ap.add_argument(
        "--seeds",
        default="0,1,2,3,4,5",
        help="comma-separated replicates; each seed draws its own train/eval subsets, prompt init and batches",
    )
    ap.add_argument(
        "--transfer",
        choices=TRANSFER_PROTOCOLS,
        default="loo",
        help="the transfer method's sources: loo (each task from the best of every other task's trained "
        "prompt; default) or halves (each half of the tasks from the other half's run, as seeds 0-1 of "
        "bench/results/quality_methods.json)",
    )
    ap.add_argument(
        "--out", help="result name: bench/results/<out>.json (default quality_methods; --pool needs it named)"
    )
    ap.add_argument(
        "--add",
        action="store_true",
        help="keep the seeds already in bench/results/<out>.json (same setup required) and add these; "
        "the file is rewritten after every seed, so a long run can be done a few seeds at a time",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="a seed stopped part-way: take the learning-rate runs it finished (bench/results/partial/<out>/, "
        "same setup required) instead of training them again; use with --add to keep the recorded seeds",
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        metavar="FILE",
        help="no runs: pool the seeds of these result files (one setup, distinct seeds, e.g. run by two "
        "processes side by side) into bench/results/<out>.json; the other options are ignored",
    )
    return ap


def parse_args(argv: list[str] | None = None):
    """The benchmark's arguments, checked: (args, tasks, methods, seeds)."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.pool:
        if args.add or args.quick:
            ap.error("--pool runs nothing; it takes neither --add nor --quick")
        if not args.out:
            ap.error("--pool needs --out NAME: the pooled result's name")
        return args, [], [], []
    args.out = args.out or "quality_methods"
    try:
        tasks = expand_tasks(args.tasks, shipped_tasks())
        methods = expand_methods(args.methods)
        args.peft_lr_grid = parse_grid(args.peft_lr_grid)
        args.lr_grid = parse_grid(args.lr_grid, "--lr-grid") if args.lr_grid else None
    except ValueError as e:
        ap.error(str(e))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds needs at least one seed")
    if (args.add or args.resume) and args.quick:
        ap.error("--add and --resume keep recorded work; a --quick smoke run records nothing")
    if ("transfer" in methods) and len(tasks) < 2:
        ap.error("--methods transfer needs at least two tasks (each task's source is another task)")
    for name in ("steps", "batch_size", "eval_examples", "heldout_examples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr_grid and not set(methods) & set(JOINT):
        ap.error(f"--lr-grid tunes {', '.join(JOINT)}; none of them is in --methods")
    if not 0 < args.lr < float("inf"):
        ap.error(f"--lr must be a positive number, got {args.lr}")
    return args, tasks, methods, seeds[:1] if args.quick else seeds


def setup_of(args, tasks: list[str], methods: list[str], steps: int, n_eval: int) -> dict:
    """What makes two runs' seeds comparable: everything but the seeds themselves."""
    cfg = bench_config("setup", batch_size=args.batch_size, max_steps=steps)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    o = cfg.optim
    return {
        "tasks": tasks,
        "methods": [ZERO_SHOT, PEFT, *methods],
        "transfer_protocol": "leave-one-out" if args.transfer == "loo" else "halves",
        **({"transfer_halves": list(halves(tasks))} if args.transfer == "halves" else {}),
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "peft_lr_grid": list(args.peft_lr_grid),
        **({"lr_grid": list(args.lr_grid)} if args.lr_grid else {}),  # absent: every joint method at "lr"
        "heldout_examples": args.heldout_examples,
        "rank": {m: DEFAULT_RANK[m] for m in ("multitask", "ulpt")},  # prompt.rank 0: each method's own
        "superpos_tokens": cfg.prompt.superpos_tokens,
        "warmup_steps": o.warmup_steps,
        "schedule": o.schedule,
        "grad_clip": o.grad_clip,
        "loss_weighting": args.loss_weighting,
        "max_seq_len": args.max_seq_len,
        "num_virtual_tokens": cfg.prompt.num_virtual_tokens,
        "init": args.init,
        "eval_examples_per_task": n_eval,
        "dtype": "fp32",
        "attention": "sdpa",
    }


def pool_main(args) -> dict:
    """`--pool`: the seeds of the given result files into one result, bench/results/<out>.json."""
    paths = [Path(p) for p in args.pool]
    target = RESULTS / f"{args.out}.json"
    try:
        setup, runs, metrics, sources = pooled(paths)  # the files' own errors first
        if target.exists() and not any(p.resolve() == target.resolve() for p in paths):
            raise ValueError(f"--pool: {target} exists and is not one of the pooled files; it would be lost")
    except ValueError as e:
        raise SystemExit(f"bench.quality: {e}") from None
    out = {**result_of(setup, runs, metrics, quick=False), "pooled_from": sources}
    write_result(args.out, out, quick=False)
    print(out["tables"]["means"])
    print(out["tables"]["paired"])
    print(out["tables"]["verdict"])
    return out


def main(argv: list[str] | None = None) -> dict:
    args, tasks, methods, seeds = parse_args(argv)
    if args.pool:
        return pool_main(args)
    steps, n_eval = (3, 16) if args.quick else (args.steps, args.eval_examples)
    setup = setup_of(args, tasks, methods, steps, n_eval)
    runs, metrics = [], {}
    if args.add:
        try:
            runs, metrics = earlier_seeds(RESULTS / f"{args.out}.json", setup, seeds)
        except ValueError as e:
            raise SystemExit(f"bench.quality: {e}") from None
        print(f"--add: keeping seeds {[r.seed for r in runs]} of bench/results/{args.out}.json", flush=True)
    for seed in seeds:
        t0 = time.perf_counter()
        try:  # a seed's finished grid runs, kept until the seed is recorded (--resume takes them)
            stages = (
                None
                if args.quick
                else Stages(RESULTS / "partial" / args.out / f"seed{seed}", setup, args.resume)
            )
        except ValueError as e:
            raise SystemExit(f"bench.quality: {e}") from None
        result, metrics = SeedBench(args, seed, tasks, steps, n_eval, stages).run(methods)
        runs.append(result)
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
        # written after every seed: a run stopped part-way keeps its finished seeds (continue with --add)
        out = result_of(setup, runs, metrics, args.quick)
        write_result(args.out, out, args.quick)
        if stages is not None:
            stages.done()
    print_result(out, runs, steps, args.batch_size)
    return out


if __name__ == "__main__":
    main()
