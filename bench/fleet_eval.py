"""What part `eval` of `bench.fleet` counts and prints: classification evaluation across a fleet of tasks.

`bench.fleet.bench_eval` spreads the same eval examples in total over N tasks (a family cut from SST-2,
`bench.fleet.write_family`; a random prompt per task, a tuned pass), scores them all at once
(`evaluate_tasks`: examples of many tasks in each forward) and, up to `--per-task-up-to` tasks, one task
at a time as before. Wall time and CPU time (one torch thread: CPU time is the work, whatever else loads
the machine).

Beside the times it counts what the forwards computed (`_MixedForward.batch` watched): positions, of them
virtual tokens (prompt copies) and padding, and the text tokens. A task's prompt must pass through the
backbone at least once per task (`P` positions per task), so the least work of a pass is text + N x P
positions; the bound is the first (smallest) size's least work over this size's: the best examples/s
ratio any layout could reach where time follows positions (SmolLM2; the tiny backbone adds per-example
and per-forward host work that is the same at every size).

It runs nothing itself; generation and NER tasks are `bench.eval_generation_fleet`'s.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

HEADER = [
    "tasks", "examples", "mean input tokens", "forwards", "positions", "virtual", "padding",
    "ex/s", "ex/CPU-s", "ex/CPU-s vs first", "least positions vs first (bound)", "task by task ex/CPU-s",
]  # fmt: skip


@contextlib.contextmanager
def counted_forwards() -> Iterator[Counter]:
    """Within the block, what every forward of the mixed evaluation lays out, summed: forwards, positions
    (rows x row length), virtual (prompt-copy positions), text (segment positions), padding."""
    from tuner.evaluate import _MixedForward

    seen: Counter = Counter()
    batch_of = _MixedForward.batch

    def batch(self, segments):
        b, table = batch_of(self, segments)
        R, L = b.input_ids.shape
        text = int(b.seg_len.sum())
        virtual = b.num_prompts * b.num_virtual_tokens
        seen.update(forwards=1, positions=R * L, virtual=virtual, text=text, padding=R * L - virtual - text)
        return b, table

    _MixedForward.batch = batch
    try:
        yield seen
    finally:
        _MixedForward.batch = batch_of


def table_rows(rows: list[dict]) -> list[list]:
    return [
        [r["tasks"], r["examples"], r["mean_input_tokens"], r["forwards"], r["positions"], r["virtual"],
         r["padding"], r["mixed_examples_per_s"], r["mixed_examples_per_cpu_s"], r["cpu_ratio"],
         r["bound_ratio"], r.get("per_task_examples_per_cpu_s", "")]
        for r in rows
    ]  # fmt: skip
