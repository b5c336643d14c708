"""In-batch search under ZeRO-3 on 2 Ray Train ranks: a killed worker resumes mid-search.

The tiny job trains 4 variants per task (2 learning rates x 2 initialisations) with rungs at steps
3 and 9 of 12, ranked by held-out loss (the ranks split its forwards), ZeRO-3 forced (the tiny
backbone would be replicated by `auto`). A worker killed after the first reported checkpoint
(step 4, after rung 0) makes Ray Train restart the group from a reported checkpoint; the run must end with every step applied once, the same rung results and
winners as an uninterrupted run, and bitwise the same adapters (same ranks, fp32, gloo). With
`search.scoring: prequential` the ranks' scored shards of the drawn examples are gathered at every step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from local_ray import shared_cluster
from test_fault_tolerance import applied_steps, prompts, run_train, train_killing_a_worker
from tiny_job import write_tiny_backbone, write_tiny_job

pytestmark = pytest.mark.distributed

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-ft")
    return write_tiny_job(
        root / "job",
        write_tiny_backbone(root / "backbone"),
        optim={"max_steps": STEPS},
        checkpoint_every=EVERY,
        cluster={"num_workers": 2, "zero_stage": "3", "max_failures": 1},
        search={
            "space": {"optim.lr": [0.03, 0.3], "prompt.init": ["random", "vocab"]},
            "rungs": [3, 9],
            "eta": 2,
            "heldout_examples": 4,
            "criterion": "loss",  # the ranks split the held-out forwards (mean_target_loss) and must agree
        },
    )


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The 2-CPU local Ray cluster these tests share with other modules (`local_ray.shared_cluster`)."""
    yield from shared_cluster(request)


@pytest.mark.slow
def test_killed_worker_resumes_a_zero3_search_to_the_same_winners(job, ray_cluster):
    run_train(job, ray_cluster, "name=reference")
    reference = job.parent / "runs" / "reference"
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert ref_summary["config"]["cluster"]["zero_stage"] == "3"

    run_dir, text, _ = train_killing_a_worker(job, ray_cluster, "killed")
    resumed = re.findall(r"resumed from \S+ at step (\d+)", text)
    assert len(set(resumed)) == 1 and int(resumed[0]) % EVERY == 0, text[-3000:]
    assert applied_steps(run_dir) == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["search"] == ref_summary["search"]
    for t in summary["search"].values():
        assert [v["outcome"] for v in t["variants"]].count("won") == 1
    ref = prompts(reference)
    for task, p in prompts(run_dir).items():
        torch.testing.assert_close(p, ref[task], rtol=0, atol=0)


@pytest.mark.slow
def test_a_prequential_zero3_search_ranks_on_every_ranks_examples(job, ray_cluster):
    """`search.scoring: prequential` under ZeRO-3: each rank scores its shard of the drawn examples and the
    step's all-reduce gathers them, so 2 ranks rank each task's variants on what 1 process ranks them on
    (the same window of examples and the same results, to float rounding), and pick the same winners."""
    over = ("search.scoring=prequential", "optim.batch_size=16")  # 8 draws per task a step: windows >= 16
    run_train(job, ray_cluster, "name=preq2", *over)
    run_train(job, ray_cluster, "name=preq1", "cluster.num_workers=1", *over)
    two, one = (
        json.loads((job.parent / "runs" / n / "summary.json").read_text()) for n in ("preq2", "preq1")
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    for task, t in two["search"].items():
        ref = one["search"][task]
        assert set(t["scored_on"].values()) == {"prequential"}, t["scored_on"]
        assert t["heldout_examples"] == ref["heldout_examples"]  # every rank's examples, none twice
        assert t["chosen"] == ref["chosen"]
        for v, w in zip(t["variants"], ref["variants"]):
            assert [s for s, _ in v["heldout"]] == [s for s, _ in w["heldout"]]
            assert [x for _, x in v["heldout"]] == pytest.approx(
                [x for _, x in w["heldout"]], rel=1e-4, abs=1e-5
            )
