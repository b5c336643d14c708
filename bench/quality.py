"""Benchmark: per-task accuracy after the same budget, zero-shot vs PEFT per task vs ours multi-task.

* zero-shot: the untuned backbone (no virtual tokens);
* PEFT: Hugging Face PEFT prompt tuning, one adapter per task trained on that task alone
  (`PeftPromptTuning` in `bench.common`, plain PyTorch loop, AdamW);
* ours: the tuner recipe's own training loop (`recipe.train()`), one shared run over the three
  tasks.

Same budget, precisely: the recipe's sampler draws the global batches of S steps once. Ours
trains on them as drawn; PEFT trains each task's prompt on exactly that task's examples of each
global step, one optimiser step per global step in which the task appears. So per task both see
the same examples in the same order, with the same number of optimiser updates, the same
learning-rate schedule (value at global step k), Adam betas/eps, per-task gradient clipping and
the same initial prompt (the tuner's class-label initialisation). What differs is only what each
method is: ours packs all tasks into one forward/backward (shared prompt copies, span attention,
target-only head) and gives each task the mean loss over its examples in the step; PEFT's loss is
the token mean of its task batch (the same thing for single-token verbalisers).

Accuracy is scored with `tuner.evaluate.evaluate_task` (verbaliser log-probabilities) on a fixed,
seeded eval subset per task, for all three methods; PEFT's trained prompt is its adapter's
`prompt_embeddings` table, which our wrapper places exactly where PEFT does.
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter

from tqdm.auto import tqdm

from bench.common import (
    PeftPromptTuning,
    bench_config,
    draw_batches,
    examples_by_task,
    markdown_table,
    setup_recipe,
    write_result,
)
from tuner.evaluate import evaluate_task
from tuner.optim import lr_at


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 3 steps, 16 eval examples, nothing recorded"
    )
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--eval-examples", type=int, default=200, help="seeded eval subset per task")
    args = ap.parse_args(argv)
    steps, n_eval = (3, 16) if args.quick else (args.steps, args.eval_examples)

    cfg = bench_config(
        "quality",
        batch_size=args.batch_size,
        max_steps=steps,
        max_seq_len=args.max_seq_len,
        max_eval=n_eval,
        max_train=400 if args.quick else 4000,
    )
    recipe = setup_recipe(cfg, progress=True)
    o, L = cfg.optim, cfg.model.max_seq_len
    names = list(recipe.tasks)
    initial = {t: recipe.bank.prompt(t).clone() for t in names}
    draws = draw_batches(recipe, steps)

    def evaluate(prompt_of, what: str) -> dict[str, dict]:
        return {
            t: evaluate_task(recipe.lm, recipe.tokenizer, recipe.tasks[t], prompt_of(t), L)
            for t in tqdm(names, desc=f"evaluate {what}", unit="task")
        }

    scores = {"zero-shot": evaluate(lambda t: None, "zero-shot")}
    recipe.train()  # ours: the recipe's own loop over the same draws
    assert recipe.sampler.step == steps
    scores["ours (multi-task)"] = evaluate(recipe.bank.prompt, "ours")

    peft = PeftPromptTuning(
        recipe.lm.backbone, names, initial, lr=o.lr, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip
    )
    for k, draw in enumerate(tqdm(draws, desc="PEFT per-task prompt tuning", unit="step")):
        peft.step(
            examples_by_task(recipe, draw),
            lr_at(k, o.lr, o.warmup_steps, o.max_steps, o.schedule),
            L,
            recipe.tokenizer.pad_token_id,
        )
    scores["PEFT (per task)"] = evaluate(peft.prompt, "PEFT")

    examples = Counter(t for d in draws for t, _ in d)
    updates = Counter(t for d in draws for t in {t for t, _ in d})
    header = ["task", "eval split (n)", *scores, "ours - PEFT"]
    rows = []
    for t in names:
        acc = {m: s[t]["accuracy"] for m, s in scores.items()}
        rows.append(
            [
                t,
                f"{recipe.tasks[t].spec.data.eval.rsplit('/', 1)[-1]} ({scores['zero-shot'][t]['n']})",
                *(f"{100 * a:.1f}" for a in acc.values()),
                f"{100 * (acc['ours (multi-task)'] - acc['PEFT (per task)']):+.1f}",
            ]
        )
    table = markdown_table(header, rows)
    print(table)
    print(
        f"budget: {steps} steps x {o.batch_size} examples; per task examples {dict(examples)}, updates {dict(updates)}"
    )
    out = {
        "benchmark": "quality",
        "quick": args.quick,
        "setup": {
            "steps": steps,
            "batch_size": o.batch_size,
            "lr": o.lr,
            "warmup_steps": o.warmup_steps,
            "schedule": o.schedule,
            "grad_clip": o.grad_clip,
            "max_seq_len": L,
            "num_virtual_tokens": cfg.prompt.num_virtual_tokens,
            "init": cfg.prompt.init,
            "eval_examples_per_task": n_eval,
            "examples_per_task": dict(examples),
            "updates_per_task": dict(updates),
            "dtype": "fp32",
            "attention": "sdpa",
        },
        "accuracy": {m: {t: s[t]["accuracy"] for t in names} for m, s in scores.items()},
        "macro_f1": {m: {t: s[t]["macro_f1"] for t in names} for m, s in scores.items()},
        "table": table,
    }
    write_result("quality", out, args.quick)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
