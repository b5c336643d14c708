"""A step's KV assembly: every row's prefix (task prompt KV or earlier chunks) lands where a per-row
copy written here puts it, and the number of tensor ops does not grow with rows or tasks."""

from __future__ import annotations

import pytest
import torch
from test_serving_runner import make_request, make_tasks, sharp_llama

from bench.serving_step import OpCount
from serving.kv_batch import KVBatch, prefill_layout
from serving.runner import ModelRunner
from serving.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

L, H, D = 3, 2, 4


def entry(P: int, seed: int) -> torch.Tensor:
    return torch.randn(L, 2, H, P, D, generator=torch.Generator().manual_seed(seed))


def per_row(prefixes: list[torch.Tensor], capacity: int) -> tuple[torch.Tensor, list[int]]:
    """Each row's prefix copied alone, right-aligned at the longest prefix's end."""
    pmax = max(p.shape[3] for p in prefixes)
    kv = torch.zeros(L, 2, len(prefixes), H, capacity, D)
    for i, p in enumerate(prefixes):
        kv[:, :, i, :, pmax - p.shape[3] : pmax] = p
    return kv, [pmax - p.shape[3] for p in prefixes]


@pytest.mark.parametrize(
    "layout",
    [
        [(5, 0)] * 6,  # one task: every row shares one entry
        [(5, i) for i in range(6)],  # every row its own task, in order
        [(5, i % 3) for i in range(7)][::-1],  # tasks shared by rows, out of order
        [(3 + i % 4, i % 5) for i in range(11)],  # mixed prompt lengths
        [(0, 0), (4, 1), (0, 0), (2, 2), (4, 1)],  # the untuned backbone (no prompt) among others
    ],
)
def test_prefixes_land_where_a_per_row_copy_puts_them(layout):
    entries = {key: entry(*key) for key in set(layout)}
    prefixes = [entries[key] for key in layout]  # the same tensor for rows of one entry, as the cache gives
    capacity = max(P for P, _ in layout) + 3
    b = KVBatch.from_prefixes(prefixes, capacity)
    want, first = per_row(prefixes, capacity)
    torch.testing.assert_close(b.kv, want, rtol=0, atol=0)
    assert b.first == first and b.length == max(P for P, _ in layout) and b.capacity == capacity


def test_prefill_layout_equals_a_per_row_layout():
    g = torch.Generator().manual_seed(3)
    prefix = [5, 0, 3, 5, 1, 2, 5]
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (4, 9, 1, 9, 2, 6, 3)]
    pmax, lmax = max(prefix), max(len(s) for s in seqs)
    ids, pos, mask = (torch.zeros(len(seqs), w, dtype=torch.long) for w in (lmax, lmax, pmax + lmax))
    for i, (P, s) in enumerate(zip(prefix, seqs)):
        ids[i, lmax - len(s) :] = torch.tensor(s)
        pos[i, lmax - len(s) :] = torch.arange(P, P + len(s))
        mask[i, pmax - P : pmax] = 1
        mask[i, pmax + lmax - len(s) :] = 1
    for got, want in zip(prefill_layout(prefix, seqs), (ids, pos, mask)):
        assert torch.equal(got, want)


def test_prefix_assembly_costs_the_same_ops_for_8_rows_and_64():
    def ops(rows: int, tasks: int) -> int:
        entries = [entry(5, t) for t in range(tasks)]
        with OpCount() as count:
            KVBatch.from_prefixes([entries[r % tasks] for r in range(rows)], 9)
        return count.ops

    assert ops(8, 8) == ops(64, 64)  # a row per task: the stack is the batch's prefix
    assert ops(16, 8) == ops(64, 8) == ops(64, 32)  # tasks shared by rows: one gather by index
    assert ops(8, 1) == ops(64, 1)  # one task: the entry is broadcast, nothing stacked


def test_a_runner_step_costs_no_more_ops_for_64_tasks_than_for_one():
    """Prefill and decode of 64 rows: 64 tasks cost at most the stack and gather of their entries
    (two ops) more than one task; a decode step costs exactly the same."""
    model = sharp_llama()
    tasks = [t for t in make_tasks(64) if t.prompt.shape[0] == 5]  # one prompt length
    tasks = (tasks * 64)[:64]

    def step_ops(task_of) -> list[int]:
        runner = ModelRunner(model)
        runner.next_token_logits(tasks, [[5]] * 64)  # warm the prefix cache: no misses below
        sched = Scheduler(SchedulerConfig(max_batch_size=64))
        for i in range(64):
            req = make_request(f"r{i}", task_of(i), text_seed=i % 4, max_tokens=3)
            sched.add(req)
        counts = []
        while sched.has_work:
            out = sched.schedule()
            with OpCount() as count:
                result = runner.step(out)
            sched.update(out, result.tokens)
            counts.append(count.ops)
        return counts

    mixed, single = step_ops(lambda i: tasks[i]), step_ops(lambda i: tasks[0])
    assert len(mixed) == len(single) == 3
    assert single[0] <= mixed[0] <= single[0] + 2
    assert mixed[1:] == single[1:]
