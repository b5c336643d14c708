"""Ranks leave their gloo group only after every collective they started has finished (`bench.ranks`).

ZeRO-3's prefetch leaves asynchronous all-gathers in flight; a rank that destroyed its group with one
still on gloo's worker thread aborted at exit, now and then, under load (CI: "terminate called without
an active exception", exit -6, after the rank had written its result). Here the in-flight gather is made
on purpose: rank 1 holds its half back (on the store) until rank 0 has seen its gather unfinished, then
rank 0 leaves at once.
"""

import json

import pytest
import torch

from bench.ranks import join_gloo, leave_gloo, run_ranks

pytestmark = pytest.mark.distributed


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    join_gloo(rank, 2, port)
    store = _get_default_store()
    mine = torch.full((1 << 20,), float(rank + 1))
    gathered = torch.empty(2 << 20)
    report = {}
    if rank == 0:
        work = dist.all_gather_into_tensor(gathered, mine, async_op=True)
        report["in_flight_before_leaving"] = not work.is_completed()  # rank 1 has not sent its half yet
        store.set("rank0-started", "1")
        leave_gloo()
        report["completed_after_leaving"] = work.is_completed()
    else:
        store.wait(["rank0-started"])
        dist.all_gather_into_tensor(gathered, mine)
        leave_gloo()
    report["halves"] = [float(gathered[0]), float(gathered[-1])]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)


def test_a_rank_leaves_only_after_its_in_flight_gather_has_finished():
    ranks = run_ranks(_rank_main, 2, (), timeout_s=120, what="teardown")
    assert ranks[0]["in_flight_before_leaving"], "the gather finished before the test could leave with it"
    assert ranks[0]["completed_after_leaving"]
    assert ranks[0]["halves"] == ranks[1]["halves"] == [1.0, 2.0]
