"""Benchmark: the model runner's host time per step, 64 rows over 64 tasks vs the same rows of 1 task.

On a GPU a small backbone's step is as fast as the host can issue it, so whatever the runner does
per row or per task in Python (a copy per row's prefix KV, a draw per sampled row) is the step's
cost. This times `ModelRunner.step` directly (no engine, no HTTP) on a tiny random Llama on the
CPU, where the forward costs little and the host's work shows, for:

* `tasks`: 64 rows of 64 distinct tasks (one row each) or of one task (same prompts, same lengths);
* `sampling`: all greedy, or all sampled (temperature 0.8, top_p 0.9 on half the rows, seeded);
* `impl`: `batched` (this tree: every row's prefix KV in one indexed copy, `KVBatch.from_prefixes`;
  the new rows' ids / positions / mask by a fixed number of ops, `prefill_layout`; sampling in one
  vectorised pass, `serving.sampler.sample`) or `per_row` (the code they replaced, kept below as
  the baseline: a copy per row's prefix, slice writes per row, a generator call per sampled row
  per step, and any top_p row sorting every sampled row).

Every arm starts from a warm prefix cache (every task's prompt KV computed before timing), prefills
its 64 rows in one step, then decodes `--steps` steps; arms are interleaved repetition by
repetition, in a rotating order, with one torch thread; medians over repetitions are reported of
the prefill step and of the median decode step, in CPU time of the stepping thread (on the CPU
the host runs the kernels too, so this is host time including the small model's own compute, the
same in every arm; CPU time rather than wall-clock, which on a shared machine mostly measures the
wait for a core). One
more untimed pass per arm counts the tensor ops of each step (`OpCount`): on a GPU each is a
kernel launch or a host tensor op, the host's share of a small model's step whatever the device.

Run: `python -m bench.serving_step [--reps 7] [--steps 16] [--config tiny] [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import markdown_table, write_result
from bench.gpu_models import llama, task_mix
from bench.stats import median
from serving import runner as runner_module
from serving.kv_batch import KVBatch, to_device
from serving.registry import TaskEntry
from serving.runner import ModelRunner
from serving.scheduler import Request, Scheduler, SchedulerConfig
from serving.types import SamplingParams

ROWS, P = 64, 20


# ---------------------------------------------------------------- the baseline: the per-row code
def per_row_from_prefixes(cls, prefixes: list[torch.Tensor], capacity: int) -> KVBatch:
    """`KVBatch.from_prefixes` as a copy per row (what `ModelRunner.forward_new` did before)."""
    ref, pmax = prefixes[0], max(p.shape[3] for p in prefixes)
    out = cls.empty(ref.shape[0], len(prefixes), ref.shape[2], ref.shape[4], capacity, ref.dtype, ref.device)
    for i, p in enumerate(prefixes):
        out.kv[:, :, i, :, pmax - p.shape[3] : pmax] = p
        out.first[i] = pmax - p.shape[3]
    out.length = pmax
    return out


def per_row_layout(prefix_lengths: list[int], seqs: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """`serving.kv_batch.prefill_layout` as slice writes per row (what `forward_new` did before)."""
    n, pmax, lmax = len(seqs), max(prefix_lengths), max(len(s) for s in seqs)
    ids = torch.zeros(n, lmax, dtype=torch.long)
    pos = torch.zeros(n, lmax, dtype=torch.long)
    mask = torch.zeros(n, pmax + lmax, dtype=torch.long)
    for i, (P, s) in enumerate(zip(prefix_lengths, seqs)):
        L = len(s)
        mask[i, pmax - P : pmax] = 1
        mask[i, pmax + lmax - L :] = 1
        ids[i, lmax - L :] = torch.tensor(s)
        pos[i, lmax - L :] = torch.arange(P, P + L)
    return ids, pos, mask


def per_row_sample(logits: torch.Tensor, samplers) -> torch.Tensor:
    """`serving.sampler.sample` as it was: one generator call per sampled row per step."""
    tokens = logits.argmax(-1)
    rows = [i for i, s in enumerate(samplers) if s.generator is not None]
    if not rows:
        return tokens
    device = logits.device
    chosen = [samplers[i] for i in rows]
    idx = to_device(rows, device)
    temp = to_device([s.temperature for s in chosen], device, logits.dtype)
    probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)
    if any(s.top_p < 1.0 for s in chosen):
        top_p = to_device([s.top_p for s in chosen], device, logits.dtype)
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p[:, None], 0.0)
    else:
        sorted_p, order = probs, None
    cdf = sorted_p.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float64) for s in chosen])
    target = to_device(u, device).to(cdf.dtype) * cdf[:, -1]
    pick = torch.searchsorted(cdf, target[:, None]).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        pick = order.gather(1, pick)
    return tokens.index_copy(0, idx, pick[:, 0])


@contextlib.contextmanager
def implementation(impl: str):
    if impl == "batched":
        yield
        return
    with (
        mock.patch.object(KVBatch, "from_prefixes", classmethod(per_row_from_prefixes)),
        mock.patch.object(runner_module, "sample", per_row_sample),
        mock.patch.object(runner_module, "prefill_layout", per_row_layout),
    ):
        yield


class OpCount(TorchDispatchMode):
    """Counts the tensor operations run inside it: on a GPU, each is a kernel the host launches."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- one arm
def run_arm(
    model,
    tasks: list[TaskEntry],
    examples,
    impl: str,
    num_tasks: int,
    sampled: bool,
    steps: int,
    count: bool = False,
):
    """(prefill step, decode steps each) of one arm: seconds, or tensor ops with `count`."""
    runner = ModelRunner(model)
    runner.next_token_logits(tasks[:num_tasks], [[5]] * num_tasks)  # warm prefix cache: not timed
    sched = Scheduler(SchedulerConfig(max_batch_size=ROWS, max_step_tokens=1 << 20))
    for i, e in enumerate(examples):
        params = (
            SamplingParams(max_tokens=steps + 1, temperature=0.8, top_p=0.9 if i % 2 else 1.0, seed=i)
            if sampled
            else SamplingParams(max_tokens=steps + 1)
        )
        task = tasks[i % num_tasks]
        sched.add(Request(f"r{i}", task.name, e.input_ids, params, 0.0, frozenset(), task))
    times = []
    with implementation(impl):
        while sched.has_work:
            out = sched.schedule()
            if count:
                with OpCount() as ops:
                    result = runner.step(out)
                times.append(ops.ops)
            else:
                t0 = time.thread_time()
                result = runner.step(out)
                times.append(time.thread_time() - t0)
            sched.update(out, result.tokens)
    assert len(times) == steps + 1, times
    return times[0], times[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per arm")
    ap.add_argument("--config", default="tiny", help="a bench.gpu_models config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, 4 steps; not recorded")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.steps = 2, 4
    torch.set_num_threads(args.threads)
    model = llama(args.config, torch.float32, "cpu")
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    tasks = [
        TaskEntry(f"task{i}", torch.randn(P, hidden, generator=g) * 0.02, None, (i,)) for i in range(ROWS)
    ]
    examples = task_mix(ROWS, seed=5, vocab=vocab)
    arms = list(itertools.product(("per_row", "batched"), (ROWS, 1), (False, True)))
    run_arm(model, tasks, examples, "batched", ROWS, True, 2)  # warm-up: first-call costs, not timed
    samples: dict[tuple, dict[str, list[float]]] = {a: {"prefill": [], "decode": []} for a in arms}
    for rep in range(args.reps):
        for arm in arms[rep % len(arms) :] + arms[: rep % len(arms)]:
            prefill, decode = run_arm(model, tasks, examples, *arm, args.steps)
            samples[arm]["prefill"].append(prefill)
            samples[arm]["decode"].append(median(decode))
    ops = {arm: run_arm(model, tasks, examples, *arm, args.steps, count=True) for arm in arms}
    results = {
        f"{impl}/{tasks_}tasks/{'sampled' if sampled else 'greedy'}": {
            "prefill_cpu_ms": 1e3 * median(s["prefill"]),
            "decode_step_cpu_ms": 1e3 * median(s["decode"]),
            "prefill_ops": ops[(impl, tasks_, sampled)][0],
            "decode_step_ops": median(ops[(impl, tasks_, sampled)][1]),
            "prefill_cpu_ms_reps": [1e3 * x for x in s["prefill"]],
            "decode_step_cpu_ms_reps": [1e3 * x for x in s["decode"]],
        }
        for (impl, tasks_, sampled), s in samples.items()
    }
    rows = []
    for impl, sampled in itertools.product(("per_row", "batched"), (False, True)):
        mode = "sampled" if sampled else "greedy"
        many, one = results[f"{impl}/{ROWS}tasks/{mode}"], results[f"{impl}/1tasks/{mode}"]
        rows.append(
            [impl, mode]
            + [
                r[k]
                for k in ("prefill_cpu_ms", "prefill_ops", "decode_step_cpu_ms", "decode_step_ops")
                for r in (many, one)
            ]
            + [one["decode_step_cpu_ms"] / many["decode_step_cpu_ms"]]
        )
    header = ["impl", "sampling", "prefill CPU ms: 64 tasks", "1 task", "prefill ops: 64 tasks", "1 task"]
    header += ["decode CPU ms/step: 64 tasks", "1 task", "ops/step: 64 tasks", "1 task", "64 vs 1 (rate)"]
    print(markdown_table(header, rows))
    write_result(
        "serving_step",
        {"config": args.config, "rows": ROWS, "prompt_tokens": P, "args": vars(args), "results": results},
        args.quick,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
