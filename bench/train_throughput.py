"""Benchmark: training throughput on a real three-task mix, ours vs PEFT prompt tuning.

Every global step is drawn once by the recipe's sampler (SST-2 + AG News + TREC, temperature
mixing) and then run by every method on the same examples, in rotating order (the machine is
shared, so interleaving spreads noise evenly). Methods:

* `ours`: the recipe's own `train_step` (mixed-task packed rows in which a task's examples share
  one prompt copy, LM head at target positions only, SparseRowAdam on the rows of the tasks in
  the batch);
* `ours, one prompt per example`, `ours, no packing` and `ours, full-vocab head`: the same step
  with ideas switched off, to show where the speedup comes from (each a recipe of its own, with
  its own `data.*` settings, on ours' backbone and tasks);
* `ours, prefetch`: ours with each step's batches collated (and their attention plan built) in the
  recipe's background thread while the steps before it run (`tuner.tasks.prefetch`), where `ours`
  builds them in the step: the same batches and results, less host work on the critical path;
* `PEFT`: `PeftPromptTuning` (see `bench.common`): one padded batch per task, full-vocab loss,
  AdamW.

"host s/step on critical path" is the time a step spends getting its batches before its first
forward (collate + attention plan + copy to the device, or waiting for the prefetch thread). On this
benchmark the thread also overlaps the other methods' steps (they run in turn), so `ours, prefetch`
shows the overlap at its best; the step times say what it costs the other work on a shared CPU.

Throughput counts real text tokens (input + target; no virtual tokens, no padding), identical
for all methods. MFU divides the *useful* model FLOPs of a step (formula in `useful_flops`: every
example run as `[prompt][example]`, no padding) by the step time and by a matmul peak measured in
the same run (fp32 and bf16). Shared prompt copies compute fewer positions than that numerator
counts, so ours' "computed / useful positions" can fall below 1.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from functools import partial

import torch
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
from bench.stats import median, median_ratio
from tuner.model.prompt_lm import PromptTunedLM
from tuner.recipe import MultiTaskPromptTuningRecipe
from tuner.tasks.batching import collate, segment_layout


class FullVocabHeadLM(PromptTunedLM):
    """Ours with the LM head over every position (as Hugging Face models compute logits), then
    the same target-only loss: isolates what the target-only head saves."""

    def target_logits(self, hidden, batch):
        return self.lm_head(hidden).float()[batch.target_row, batch.target_col]  # [R, L, V], then gather


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul in `dtype` (this machine's practical peak)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_shape(backbone) -> dict:
    cfg = backbone.config
    layers = getattr(backbone, backbone.base_model_prefix).layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "linear_params": linear,
        "layers": cfg.num_hidden_layers,
        "attn_width": cfg.num_attention_heads * head_dim,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
    }


def useful_flops(examples, P: int, max_len: int, shape: dict) -> float:
    """Model FLOPs one training step needs, counted on useful positions only (no padding).

    Per segment of n = P + input + target - 1 positions and t target tokens, with frozen weights
    (backward computes activation gradients only, no weight gradients):
        linear layers   4 * N_linear * n              (forward 2 N n, backward dX 2 N n)
        attention       6 * layers * d_attn * n^2     (causal: forward QK^T + AV = 2 n^2 d,
                                                       backward dP, dV, dQ, dK = 4 n^2 d)
        LM head         4 * hidden * vocab * t        (forward + dX, target positions only)
    Embedding lookups, norms, activations and rotary embeddings are not counted.
    """
    total = 0.0
    for ex in examples:
        inp, tgt = segment_layout(ex, P, max_len)
        n, t = P + len(inp) + len(tgt) - 1, len(tgt)
        total += 4 * shape["linear_params"] * n + 6 * shape["layers"] * shape["attn_width"] * n * n
        total += 4 * shape["hidden"] * shape["vocab"] * t
    return total


def ours_and_ablations(
    ours: MultiTaskPromptTuningRecipe, ablations: bool
) -> dict[str, MultiTaskPromptTuningRecipe]:
    """`ours` and, with `ablations`, the same step with one idea switched off: each a recipe of its
    own on ours' backbone and tasks."""
    recipes = {"ours": ours}
    cfg = copy.deepcopy(ours.cfg)
    cfg.data.prefetch = 1
    recipes["ours, prefetch"] = MultiTaskPromptTuningRecipe(cfg, progress=False, lm=ours.lm, tasks=ours.tasks)
    recipes["ours, prefetch"].setup()
    if not ablations:
        return recipes
    for name, packing, share, lm in (
        ("ours, one prompt per example", True, False, ours.lm),
        ("ours, no packing", False, False, ours.lm),
        ("ours, full-vocab head", True, True, FullVocabHeadLM(ours.lm.backbone)),
    ):
        cfg = copy.deepcopy(ours.cfg)
        cfg.data.packing, cfg.data.share_prompts = packing, share
        recipes[name] = MultiTaskPromptTuningRecipe(cfg, progress=False, lm=lm, tasks=ours.tasks)
        recipes[name].setup()
    return recipes


def run_batch_size(args, batch_size: int, steps: int, ablations: bool) -> dict:
    """Time every method on the same `steps` global steps of `batch_size` examples; results by method."""
    warmup = 1
    cfg = bench_config(
        "train-throughput",
        batch_size=batch_size,
        max_steps=10**6,
        max_seq_len=args.max_seq_len,
        num_virtual_tokens=args.virtual_tokens,
        max_train=400 if args.quick else 4000,
    )
    ours = setup_recipe(cfg)
    L, pad = cfg.model.max_seq_len, ours.tokenizer.pad_token_id
    names = list(ours.tasks)
    peft = PeftPromptTuning(ours.lm.backbone, names, {t: ours.prompt(t) for t in names}, lr=cfg.optim.lr)
    recipes = ours_and_ablations(ours, ablations)
    methods = {name: recipe.train_step for name, recipe in recipes.items()}
    methods["PEFT"] = lambda draw: peft.step(examples_by_task(ours, draw), cfg.optim.lr, L, pad)
    draws = draw_batches(ours, warmup + steps)
    recipes["ours, prefetch"].batches.start(draws, depth=1)  # the steps it will be handed, in order
    host_clocks = {name: (lambda r=recipe: r.batches.critical_s) for name, recipe in recipes.items()}
    desc = f"train throughput, batch {batch_size} (steps x methods)"
    times, cpu, peaks, host = time_methods(methods, tqdm(draws, desc=desc, unit="step"), warmup, host_clocks)
    for recipe in recipes.values():
        recipe.cleanup()
    shape = model_shape(ours.lm.backbone)
    per_step = [step_work(ours, peft, draw, shape, ablations) for draw in draws[warmup:]]
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return {
        "setup": {
            "tasks": names,
            "batch_size": batch_size,
            "max_seq_len": L,
            "num_virtual_tokens": cfg.prompt.num_virtual_tokens,
            "row_len": cfg.data.row_len,
            "timed_steps": steps,
            "warmup_steps": warmup,
            "dtype": "fp32",
            "attention": "sdpa",
            "threads": torch.get_num_threads(),
            "backbone": cfg.model.name,
            "model_shape": shape,
        },
        "matmul_peak_flops": peaks,
        "tokens_per_step": sum(s["text_tokens"] for s in per_step) / len(per_step),
        "flops_per_step": sum(s["flops"] for s in per_step) / len(per_step),
        "results": method_results(times, cpu, peaks, per_step, host),
        "per_step": per_step,
    }


def time_methods(methods: dict, draws, warmup: int, host_clocks: dict | None = None) -> tuple[dict, ...]:
    """Every method on every draw, in rotating order (who goes first changes each step): wall and
    process CPU seconds per timed step by method, the best matmul peaks sampled between steps, and per
    method with a clock in `host_clocks` (seconds so far on its critical path's host work) that time per step."""
    host_clocks = host_clocks or {}
    times: dict[str, list[float]] = {m: [] for m in methods}  # wall-clock seconds per step
    cpu: dict[str, list[float]] = {m: [] for m in methods}  # process CPU seconds per step (all threads)
    host: dict[str, list[float]] = {m: [] for m in host_clocks}  # host seconds on the critical path
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for k, draw in enumerate(draws):
        order = list(methods)[k % len(methods) :] + list(methods)[: k % len(methods)]
        for m in order:
            h0 = host_clocks[m]() if m in host_clocks else 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            methods[m](draw)
            if k >= warmup:
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
                if m in host_clocks:
                    host[m].append(host_clocks[m]() - h0)
        # The peak is sampled between steps, under the same load; the best sample is the peak.
        peaks = {
            "fp32": max(peaks["fp32"], matmul_peak(torch.float32)),
            "bf16": max(peaks["bf16"], matmul_peak(torch.bfloat16)),
        }
    return times, cpu, peaks, host


def step_work(
    ours: MultiTaskPromptTuningRecipe, peft: PeftPromptTuning, draw, shape: dict, ablations: bool
) -> dict:
    """What one global step computes: text tokens, useful positions and FLOPs, and the positions each
    method computes (ours: the rows it packs, rows x row length)."""
    cfg = ours.cfg
    P, L, pad = cfg.prompt.num_virtual_tokens, cfg.model.max_seq_len, ours.tokenizer.pad_token_id
    examples = [ours.tasks[t].train[i] for t, i in draw]
    task_rows = {t: i for i, t in enumerate(ours.tasks)}
    layout = partial(collate, examples, task_rows, P, max_len=L, pad_id=pad, row_len=cfg.data.row_len)
    packed = layout()
    positions = {"ours": packed.input_ids.numel(), "ours, prefetch": packed.input_ids.numel()}
    if ablations:
        positions["ours, one prompt per example"] = layout(share_prompts=False).input_ids.numel()
        positions["ours, no packing"] = layout(packing=False, share_prompts=False).input_ids.numel()
        positions["ours, full-vocab head"] = positions["ours"]
    positions["PEFT"] = sum(
        len(ex) * (P + peft.collate(ex, L, pad)[0]["input_ids"].shape[1])
        for ex in examples_by_task(ours, draw).values()
    )
    return {
        "text_tokens": packed.num_text_tokens,
        "useful_positions": packed.num_text_tokens + len(examples) * (P - 1),
        "flops": useful_flops(examples, P, L, shape),
        "positions": positions,
    }


def method_results(
    times: dict, cpu: dict, peaks: dict, per_step: list[dict], host: dict | None = None
) -> dict[str, dict]:
    """Per method: throughput, step times, speedups over PEFT, MFU and positions computed per useful one."""
    tokens = sum(s["text_tokens"] for s in per_step)
    flops = sum(s["flops"] for s in per_step)
    useful = sum(s["useful_positions"] for s in per_step)
    results = {}
    for m, ts in times.items():
        total = sum(ts)
        results[m] = {
            "tokens_per_s": tokens / total,
            "median_step_s": median(ts),
            "speedup_vs_peft": median_ratio(ts, times["PEFT"]),  # per-step ratios: robust to noise
            "cpu_s_per_step": sum(cpu[m]) / len(ts),
            "speedup_vs_peft_cpu_time": sum(cpu["PEFT"]) / sum(cpu[m]),
            "mfu_fp32_peak": flops / total / peaks["fp32"],
            "mfu_bf16_peak": flops / total / peaks["bf16"],
            # the same, over the time the process was on a core (CPU seconds / threads): removes time lost
            # to other processes on this shared machine, but counts spin-waiting as busy
            "mfu_fp32_peak_on_cpu": flops / (sum(cpu[m]) / torch.get_num_threads()) / peaks["fp32"],
            "computed_positions_per_useful": sum(s["positions"][m] for s in per_step) / useful,
            # host seconds per step spent getting its batches before the forward (None: not measured)
            "host_critical_s_per_step": sum(host[m]) / len(ts) if host and m in host else None,
            "step_times_s": ts,
            "step_cpu_s": cpu[m],
        }
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, nothing recorded")
    ap.add_argument(
        "--no-ablations",
        action="store_true",
        help="the main run times ours, ours with prefetch and PEFT only",
    )
    ap.add_argument("--steps", type=int, default=8, help="timed global steps (each run by every method)")
    ap.add_argument(
        "--batch-size", type=int, default=16, help="global batch of the main run (with ablations)"
    )
    ap.add_argument(
        "--sweep",
        default="32,64",
        help="further global batch sizes, comma-separated, timed for ours vs PEFT only ('' for none)",
    )
    ap.add_argument("--sweep-steps", type=int, default=4, help="timed global steps per sweep batch size")
    ap.add_argument("--max-seq-len", type=int, default=160)
    ap.add_argument("--virtual-tokens", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for every method (0: torch's default, one per core); another value is "
        "recorded as train_throughput_<n>thread.json",
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        sweep = [int(b) for b in args.sweep.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--sweep takes comma-separated integers, got {args.sweep!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    steps = 2 if args.quick else args.steps
    main_run = run_batch_size(args, args.batch_size, steps, ablations=not args.no_ablations)
    table = methods_table(main_run["results"])
    print(table)
    peaks = main_run["matmul_peak_flops"]
    print(
        f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
        f"{main_run['tokens_per_step']:.0f} text tokens and {main_run['flops_per_step'] / 1e12:.3f} TFLOP per step"
    )

    # Ours vs PEFT at other global batch sizes: PEFT's per-task batches pad to their longest example,
    # ours shares one prompt copy among more examples, so the ratio depends on the batch size.
    sweep_runs = {args.batch_size: main_run}
    for b in sweep:
        if b not in sweep_runs:
            sweep_runs[b] = run_batch_size(args, b, 2 if args.quick else args.sweep_steps, ablations=False)
    sweep_table = batch_sweep_table(sweep_runs)
    print(sweep_table)

    out = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        **main_run,
        "table": table,
        "batch_sweep": {
            str(b): {
                "setup": run["setup"],
                "tokens_per_step": run["tokens_per_step"],
                "matmul_peak_flops": run["matmul_peak_flops"],
                "results": {m: run["results"][m] for m in ("ours", "PEFT")},
            }
            for b, run in sorted(sweep_runs.items())
        },
        "batch_sweep_table": sweep_table,
    }
    write_result(
        f"train_throughput_{args.threads}thread" if args.threads else "train_throughput", out, args.quick
    )
    return out


def methods_table(results: dict[str, dict]) -> str:
    header = [
        "method",
        "text tokens/s",
        "median step (s)",
        "speedup vs PEFT (wall)",
        "speedup vs PEFT (CPU time)",
        "MFU (fp32 peak)",
        "MFU (bf16 peak)",
        "computed / useful positions",
        "host s/step on critical path",
    ]
    rows = [
        [
            m,
            r["tokens_per_s"],
            r["median_step_s"],
            f"{r['speedup_vs_peft']:.2f}x",
            f"{r['speedup_vs_peft_cpu_time']:.2f}x",
            f"{100 * r['mfu_fp32_peak']:.1f}%",
            f"{100 * r['mfu_bf16_peak']:.1f}%",
            r["computed_positions_per_useful"],
            "-" if r.get("host_critical_s_per_step") is None else f"{r['host_critical_s_per_step']:.4f}",
        ]
        for m, r in results.items()
    ]
    return markdown_table(header, rows)


def batch_sweep_table(sweep_runs: dict[int, dict]) -> str:
    rows = []
    for b in sorted(sweep_runs):
        r = sweep_runs[b]["results"]
        rows.append(
            [
                b,
                sweep_runs[b]["setup"]["timed_steps"],
                r["ours"]["tokens_per_s"],
                r["PEFT"]["tokens_per_s"],
                f"{r['ours']['tokens_per_s'] / r['PEFT']['tokens_per_s']:.2f}x",
                f"{r['ours']['speedup_vs_peft']:.2f}x",
                f"{r['ours']['speedup_vs_peft_cpu_time']:.2f}x",
                f"{r['ours']['computed_positions_per_useful']:.2f} / {r['PEFT']['computed_positions_per_useful']:.2f}",
            ]
        )
    return markdown_table(
        [
            "global batch",
            "timed steps",
            "ours tokens/s",
            "PEFT tokens/s",
            "tokens/s ratio",
            "median per-step ratio",
            "CPU-time ratio",
            "computed / useful positions (ours / PEFT)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
