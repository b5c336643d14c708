"""bench.quality's PEFT baseline with its learning rate tuned per task on a held-out slice (issue 39).

A baseline at one hand-set learning rate flatters whatever it is compared with; the literature's
comparisons that matter (ULPT, DePT, SuperPos-Prompt) are against a *tuned* prompt. So for every
learning rate of a grid (`--peft-lr-grid`), PEFT prompt tuning trains each task on the seed's draws
(the same examples, steps, schedule shape, warm-up and clipping as every other method), and each task
keeps the learning rate whose prompt does best on its **held-out slice**: the last examples of its
first-epoch order, which the sampler then never draws (`MultiTaskSampler.hold_out`), so no method
trains on them and the eval split is never looked at to choose. "Best" is the task's own metric
where that is one forward per example (classification: accuracy or macro-F1; ties go to the lower
held-out loss, then to the grid's order), else the held-out target loss (generation and NER, whose
metric would decode greedily). Only the chosen prompt is scored on the eval split: that is PEFT.
Our methods' rate can be tuned the same way (`--lr-grid`, `tune`): one joint run per rate, the same
slices, the same rule.

This module trains and chooses; bench.quality evaluates, records and tabulates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bench.common import PeftPromptTuning, examples_by_task, points
from bench.quality_stages import Stages
from tuner.evaluate import mean_target_loss
from tuner.prompts.optim import lr_at
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_task, kind_of

HELDOUT_FRACTION = 0.2  # at most this share of a task's training examples is held out


def parse_grid(arg: str, option: str = "--peft-lr-grid") -> list[float]:
    """`option` (`--peft-lr-grid`, `--lr-grid`): comma-separated positive learning rates, distinct, in order."""
    try:
        grid = [float(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {arg!r}") from None
    if not grid or any(not (x > 0) for x in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"{option} needs distinct positive learning rates, got {arg!r}")
    return grid


def hold_out_slices(ref, n: int) -> dict[str, TaskData]:
    """Each task's held-out slice (at most `n` examples, at most a fifth of its training examples),
    taken out of `ref`'s sampler before it draws: task -> a view whose eval split is the slice."""
    out = {}
    for t, data in ref.tasks.items():
        k = data.heldout_count(n, HELDOUT_FRACTION)
        out[t] = data.heldout_view(ref.sampler.hold_out(t, k))
    return out


@dataclass
class Tuned:
    """A learning-rate grid's held-out results and each task's chosen rate and prompt (PEFT's or ours)."""

    lr: dict[str, float]  # task -> the chosen learning rate
    heldout_score: dict[str, dict[str, float | None]]  # lr (str) -> task -> held-out score (None: by loss)
    heldout_loss: dict[str, dict[str, float]]  # lr (str) -> task -> held-out mean target loss
    prompts: dict[str, torch.Tensor]  # task -> its prompt trained at its chosen learning rate


def choose(grid: list[float], score: dict[str, float | None], loss: dict[str, float]) -> float:
    """The learning rate with the best held-out result: highest score, ties to the lower loss, then the
    grid's order; by loss alone where there is no score (`score` and `loss`: lr (str) -> value)."""

    def key(j: int):
        s = score[str(grid[j])]
        return (-(s if s is not None else 0.0), loss[str(grid[j])], j)

    return grid[min(range(len(grid)), key=key)]


def heldout_results(
    recipe, prompts: dict[str, torch.Tensor], heldout: dict[str, TaskData]
) -> tuple[dict[str, float | None], dict[str, float]]:
    """Each task's held-out score in points (None where the task is chosen by loss) and held-out mean
    target loss, for its prompt in `prompts`, on `recipe`'s backbone (see the module docstring)."""
    L, pad = recipe.cfg.model.max_seq_len, recipe.tokenizer.pad_token_id
    score: dict[str, float | None] = {}
    loss: dict[str, float] = {}
    for t, p in prompts.items():
        loss[t] = mean_target_loss(
            recipe.lm, heldout[t].eval, {t: p}, max_len=L, pad_id=pad, device=recipe.device
        )[t]
        by_metric = kind_of(recipe.tasks[t].spec.kind).rung_criterion("auto") == "metric"
        score[t] = (
            points(
                recipe.tasks[t].spec.metric,
                evaluate_task(recipe.lm, recipe.tokenizer, heldout[t], p, L)["score"],
            )
            if by_metric
            else None
        )
    return score, loss


def tune(
    grid: list[float],
    train: Callable[[float], tuple[object, dict[str, torch.Tensor]]],
    heldout: dict[str, TaskData],
    stages: Stages | None = None,
    name: str = "",
    scorer: Callable[[], object] | None = None,
) -> Tuned:
    """`train(lr)` -> (a recipe holding the backbone, task -> prompt) for every rate of `grid`; each task
    keeps the rate whose prompt does best on its held-out slice (`choose`), with that rate's prompt.

    With `stages` every finished rate's prompts are kept as run `name`, and a rate already kept there
    is not trained again: its prompts are scored on `scorer()`'s recipe (the same backbone)."""
    score: dict[str, dict[str, float | None]] = {}
    loss: dict[str, dict[str, float]] = {}
    prompts: dict[str, dict[str, torch.Tensor]] = {}
    tasks = list(heldout)
    for lr in grid:
        kept = stages.get(name, lr, tasks) if stages is not None else None
        if kept is not None:
            print(f"{name} lr={lr}: trained before, taken from {stages.path(name, lr)}", flush=True)
            recipe, prompts[str(lr)] = scorer(), kept
        else:
            recipe, prompts[str(lr)] = train(lr)
            if stages is not None:
                stages.put(name, lr, prompts[str(lr)])
        score[str(lr)], loss[str(lr)] = heldout_results(recipe, prompts[str(lr)], heldout)
    chosen = {t: choose(grid, {k: score[k][t] for k in score}, {k: loss[k][t] for k in loss}) for t in tasks}
    return Tuned(chosen, score, loss, {t: prompts[str(chosen[t])][t] for t in tasks})


def tune_peft(
    ref,
    draws,
    initial: dict[str, torch.Tensor],
    heldout: dict[str, TaskData],
    grid: list[float],
    seed: int,
    stages: Stages | None = None,
) -> Tuned:
    """PEFT on `ref`'s tasks for every learning rate of `grid` on `draws` from the `initial` prompts;
    each task's best by its held-out slice (see the module docstring); `stages`: see `tune`."""
    o, L, pad = ref.cfg.optim, ref.cfg.model.max_seq_len, ref.tokenizer.pad_token_id
    tasks = list(ref.tasks)

    def train(lr: float):
        peft = PeftPromptTuning(
            ref.lm.backbone, tasks, initial, lr=lr, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip
        )
        for k, draw in enumerate(tqdm(draws, desc=f"seed {seed}: PEFT lr={lr}", unit="step")):
            peft.step(
                examples_by_task(ref, draw), lr_at(k, lr, o.warmup_steps, o.max_steps, o.schedule), L, pad
            )
        return ref, {t: peft.prompt(t) for t in tasks}

    return tune(grid, train, {t: heldout[t] for t in tasks}, stages, "peft", lambda: ref)
