"""Benchmark: does a step cost more with more tasks in the batch, or more tasks registered?

One fixed global batch of real examples (SST-2 + AG News + TREC, drawn by the recipe's sampler)
is relabelled to synthetic task ids, so every configuration runs exactly the same tokens
through the same packed rows; only the task structure changes:

    A  1 task per batch,   10 tasks registered
    B  1 task per batch,   10,000 tasks registered      (A vs B: registered tasks)
    C  64 tasks per batch, 10,000 tasks registered      (B vs C: tasks per batch)
    B', C'  as B and C with one prompt copy per example (`data.share_prompts=false`)

With shared prompt copies (the default) a row holds one copy per distinct task in it, so a batch
of 64 one-example tasks computes 63 more prompt copies than a batch of one task; B' vs C' holds
the positions fixed and isolates what the task structure itself costs.

Each configuration is a recipe of its own on one shared backbone (`MultiTaskPromptTuningRecipe`
with `lm=`, the relabelled `tasks=` and its `registered=` tasks), and each step is its own
`train_step` (gather the batch's prompt rows, forward/backward, SparseRowAdam on those rows,
scatter back). The optimiser already holds state for every registered task, as after a long run. Configurations are interleaved, repetition by
repetition; medians of wall-clock and of process CPU time are reported, with one torch thread
by default (the comparison is within ours; one thread keeps other load from stalling OpenMP
barriers, the main source of noise on a shared 2-core machine). The prompt-bank + optimiser
part of the step is also timed on its own (it is what could scale with tasks; the backbone's
work cannot).

`--methods` times that part alone for every prompt method (tuner/prompts/methods.py; ULPT's and
SuperPos's fixed part frozen, as in a run), and gives each one's per-task state, with 10 and
with 10,000 registered tasks (optimiser state for all of them) and the same tasks in the batch:
gather the batch's rows and the shared part, compose the prompts, backward a fixed gradient
through the composition, Adam on the rows and on the shared part, scatter back. It needs no
backbone (the backbone's work does not depend on the method's parameters) and runs in a minute.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import time

import torch
from tqdm.auto import tqdm

from bench.common import bench_config, draw_batches, markdown_table, setup_recipe, write_result
from bench.stats import median, median_ratio
from tuner.prompts.bank import PromptBank
from tuner.prompts.methods import DEFAULT_RANK, METHODS, SharedParams, make_layout, state_per_task
from tuner.prompts.optim import SparseRowAdam
from tuner.recipe import MultiTaskPromptTuningRecipe
from tuner.tasks.batching import collate
from tuner.tasks.data import TaskData


def task_names(n: int) -> list[str]:
    return [f"task{i:05d}" for i in range(n)]


def warm_state(names: list[str], shape: tuple[int, ...]) -> dict:
    """A `SparseRowAdam` state dict with moments for every task in `names`, as after a long run."""
    return {
        "state": {
            n: {"step": 1, "exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)} for n in names
        }
    }


def relabel(reference: dict[str, TaskData], draw, per_batch: int) -> tuple[dict[str, TaskData], list]:
    """(tasks, global batch): the examples of `draw` spread round-robin over `per_batch` task ids.

    Every relabelled task holds all of the examples (with its name on those it owns) and the batch
    picks each example once, under the task it was dealt to.
    """
    examples = [reference[t].train[i] for t, i in draw]
    names = task_names(per_batch)
    relabelled = [dataclasses.replace(ex, task=names[j % per_batch]) for j, ex in enumerate(examples)]
    spec = next(iter(reference.values())).spec  # any one, renamed: a training step reads nothing of it
    tasks = {
        n: TaskData(
            spec=dataclasses.replace(spec, name=n), prefix="", train=relabelled, eval=[], eval_text=[]
        )
        for n in names
    }
    return tasks, [(ex.task, j) for j, ex in enumerate(relabelled)]


def bank_and_optimiser_time(bank: PromptBank, opt: SparseRowAdam, names: list[str], reps: int = 20) -> float:
    """Median seconds of the step's task-dependent part: gather rows, Adam step, scatter back."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rows = bank.rows_of(names)
        prompts = bank.gather(rows)
        new = opt.step(names, prompts.detach(), torch.ones_like(prompts))
        bank.scatter_(rows, new)
        ts.append(time.perf_counter() - t0)
    return median(ts)


def method_step(method: str, registered: int, batch_tasks: int, P: int, H: int, seed: int = 0):
    """A function that runs one prompt-parameter step of `method` and returns its seconds."""
    layout = make_layout(method, P, H)
    names = task_names(registered)
    bank = PromptBank(names, *layout.row_shape)
    bank.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    opt = SparseRowAdam(0.03, grad_clip=1.0)
    opt.load_state_dict(warm_state(names, layout.row_shape))
    shared = None
    if layout.shared_size:
        gen = torch.Generator().manual_seed(seed)
        if layout.fixed_shared:  # ULPT's projection, SuperPos's vocabulary sample: any fixed values
            init = torch.randn(layout.shared_size, generator=gen) * 0.1
        else:
            init = layout.init_shared(gen)
        shared = SharedParams(init, SparseRowAdam(0.03, grad_clip=1.0))
        shared.frozen = layout.fixed_shared  # as `PromptParams.build` sets it
    batch = names[:: max(1, registered // batch_tasks)][:batch_tasks]  # spread over the table
    cotangent = torch.randn(len(batch), P, H, generator=torch.Generator().manual_seed(1))

    def step() -> float:
        t0 = time.perf_counter()
        rows = bank.rows_of(batch)
        leaf = bank.gather(rows)
        sh = shared.gather() if shared is not None else None
        prompts = layout.compose(leaf, sh)
        prompts.backward(cotangent)  # what the backbone's backward hands the prompts
        bank.scatter_(rows, opt.step(batch, leaf.detach(), leaf.grad))
        if shared is not None:
            shared.step(sh, 0.03)
        return time.perf_counter() - t0

    return step


def methods_main(args) -> dict:
    """Per-step prompt-parameter cost of every method at 10 and at `--registered` tasks."""
    P, H = 16, 576  # the quickstart's virtual tokens; SmolLM2-135M's hidden size
    reps = 20 if args.quick else 200
    many = 1000 if args.quick else args.registered
    k = 10  # 10 registered tasks can put at most 10 distinct tasks in a batch
    rows, results = [], {}
    for method in METHODS:
        few, lots = method_step(method, 10, k, P, H), method_step(method, many, k, P, H)
        few(), lots()  # warm-up
        few_t, many_t = [], []
        for _ in range(reps):  # interleaved: a slow spell of the shared machine hits both
            few_t.append(few())
            many_t.append(lots())
        ratio = median_ratio(few_t, many_t) - 1
        state = state_per_task(make_layout(method, P, H))
        results[method] = {
            "registered_10_s": median(few_t),
            f"registered_{many}_s": median(many_t),
            "median_ratio_minus_1": ratio,
            "state_per_task": state,  # numbers: the task's row and its two Adam moments
        }
        rows.append(
            [method, 1000 * median(few_t), 1000 * median(many_t), f"{100 * ratio:+.1f}%", f"{state:,}"]
        )
        del few, lots
    table = markdown_table(
        [
            "method",
            "10 registered (ms)",
            f"{many:,} registered (ms)",
            "per-rep ratio - 1 (median)",
            "state per task (row + Adam)",
        ],
        rows,
    )
    print(table)
    out = {
        "benchmark": "task_scaling_methods",
        "quick": args.quick,
        "setup": {
            "tasks_per_batch": k,
            "num_virtual_tokens": P,
            "hidden": H,
            "reps": reps,
            "threads": torch.get_num_threads(),
            "rank": {m: DEFAULT_RANK[m] for m in ("multitask", "ulpt")},  # prompt.rank 0: each method's own
            "bottleneck": 128,
            "superpos_tokens": 128,
        },
        "results": results,
        "table": table,
    }
    write_result("task_scaling_methods", out, args.quick)
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: small batch, 1 repetition, nothing recorded"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--batch-size", type=int, default=64, help="examples per step; also the most tasks per batch"
    )
    ap.add_argument("--registered", type=int, default=10_000)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: no OpenMP barrier stalls, so far less noise on a shared machine)",
    )
    ap.add_argument(
        "--methods",
        action="store_true",
        help="only the prompt-parameter step of every prompt method (no backbone)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.methods:
        return methods_main(args)
    batch, reps, many = (16, 1, 1000) if args.quick else (args.batch_size, args.reps, args.registered)
    cfg = bench_config(
        "task-scaling", batch_size=batch, max_steps=10**6, max_train=400 if args.quick else 4000
    )
    configs = {  # name: (tasks per batch, registered tasks, shared prompt copies)
        "A: 1 task/batch, 10 registered": (1, 10, True),
        f"B: 1 task/batch, {many:,} registered": (1, many, True),
        f"C: {batch} tasks/batch, {many:,} registered": (batch, many, True),
        "B': B, one prompt per example": (1, many, False),
        "C': C, one prompt per example": (batch, many, False),
    }
    reference = setup_recipe(cfg)
    setups = configuration_recipes(reference, configs)
    times, cpu, tokens = time_steps(setups, reps)
    assert len(set(tokens.values())) == 1, f"configurations must run the same tokens: {tokens}"
    results = {}
    for name, (k, n, share) in configs.items():
        recipe, draw = setups[name]
        results[name] = {
            "tasks_per_batch": k,
            "registered_tasks": n,
            "shared_prompts": share,
            "positions": positions_computed(recipe, draw),
            "median_step_s": median(times[name]),
            "median_step_cpu_s": median(cpu[name]),
            "step_times_s": times[name],
            "step_cpu_s": cpu[name],
            "bank_and_optimiser_s": bank_and_optimiser_time(
                recipe.bank, recipe.optimizer, sorted(recipe.tasks)
            ),
        }
    comparisons = compare(*results.values())
    table = results_table(results)
    print(table)
    print(
        "; ".join(f"{k}: {100 * v:+.1f}%" for k, v in comparisons.items())
        + f" (target: within 5%; {reps} reps)"
    )
    out = {
        "benchmark": "task_scaling",
        "quick": args.quick,
        "setup": {
            "batch_size": batch,
            "text_tokens_per_step": next(iter(tokens.values())),
            "reps": reps,
            "max_seq_len": cfg.model.max_seq_len,
            "num_virtual_tokens": cfg.prompt.num_virtual_tokens,
            "dtype": "fp32",
            "attention": "sdpa",
            "threads": torch.get_num_threads(),
        },
        "results": results,
        "comparisons": comparisons,
        "table": table,
    }
    write_result("task_scaling", out, args.quick)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return out


def configuration_recipes(
    reference: MultiTaskPromptTuningRecipe, configs: dict[str, tuple[int, int, bool]]
) -> dict[str, tuple[MultiTaskPromptTuningRecipe, list]]:
    """Per configuration, a recipe on `reference`'s backbone and its global batch: `reference`'s
    first draw relabelled to the configuration's tasks, with its registered tasks in the bank and
    optimiser state for every one of them."""
    (draw,) = draw_batches(reference, 1)
    shape = (reference.cfg.prompt.num_virtual_tokens, reference.lm.backbone.config.hidden_size)
    states = {n: warm_state(task_names(n), shape) for n in {n for _, n, _ in configs.values()}}
    out = {}
    for name, (per_batch, registered, share) in configs.items():
        cfg = copy.deepcopy(reference.cfg)
        cfg.data.share_prompts = share
        cfg.prompt.init = "random"  # prompt values do not change the step's cost
        tasks, batch = relabel(reference.tasks, draw, per_batch)
        recipe = MultiTaskPromptTuningRecipe(
            cfg, progress=False, lm=reference.lm, tasks=tasks, registered=task_names(registered)
        )
        recipe.setup()
        recipe.optimizer.load_state_dict(states[registered])
        out[name] = recipe, batch
    return out


def time_steps(setups: dict, reps: int) -> tuple[dict, dict, dict]:
    """Each configuration's `train_step` on its batch, interleaved repetition by repetition (the first
    one warms up): (wall seconds, process CPU seconds, text tokens), by configuration."""
    times: dict[str, list[float]] = {n: [] for n in setups}  # wall-clock seconds
    cpu: dict[str, list[float]] = {n: [] for n in setups}  # process CPU seconds (robust to other load)
    tokens = {}
    for r in tqdm(range(reps + 1), desc="task scaling (reps x configs)", unit="rep"):  # rep 0 warms up
        order = list(setups)[r % len(setups) :] + list(setups)[: r % len(setups)]
        for name in order:
            recipe, batch = setups[name]
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name] = recipe.train_step(batch).tokens
            if r:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return times, cpu, tokens


def positions_computed(recipe: MultiTaskPromptTuningRecipe, batch: list) -> int:
    """Positions (rows x row length) of the packed rows `recipe` builds for `batch`."""
    cfg = recipe.cfg
    rows = {t: i for i, t in enumerate(recipe.tasks)}
    b = collate(
        [recipe.tasks[t].train[i] for t, i in batch],
        rows,
        cfg.prompt.num_virtual_tokens,
        max_len=cfg.model.max_seq_len,
        pad_id=recipe.tokenizer.pad_token_id,
        share_prompts=cfg.data.share_prompts,
        row_len=cfg.data.row_len,
    )
    return b.input_ids.numel()


def compare(a: dict, b: dict, c: dict, b1: dict, c1: dict) -> dict[str, float]:
    """The pairs of configurations that answer the question, as medians of per-repetition ratios
    minus 1 (configurations ran back to back in each repetition, so a slow spell of the shared
    machine hits both sides of a pair)."""
    return {
        f"{what} ({clock})": median_ratio(x[key], y[key]) - 1
        for what, x, y in (
            ("registered, B vs A", a, b),
            ("tasks per batch, C vs B", b, c),
            ("tasks per batch, one prompt per example, C' vs B'", b1, c1),
            ("shared vs one prompt per example at 64 tasks, C vs C'", c1, c),
        )
        for clock, key in (("wall", "step_times_s"), ("CPU time", "step_cpu_s"))
    }


def results_table(results: dict[str, dict]) -> str:
    a = next(iter(results.values()))
    rows = [
        [
            n,
            r["median_step_s"],
            f"{100 * (r['median_step_s'] / a['median_step_s'] - 1):+.1f}%",
            r["median_step_cpu_s"],
            f"{100 * (r['median_step_cpu_s'] / a['median_step_cpu_s'] - 1):+.1f}%",
            f"{1000 * r['bank_and_optimiser_s']:.2f}",
            r["positions"],
        ]
        for n, r in results.items()
    ]
    return markdown_table(
        [
            "configuration",
            "median step, wall (s)",
            "vs A",
            "median step, CPU (s)",
            "vs A",
            "bank + optimiser (ms)",
            "positions computed",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
