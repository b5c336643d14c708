"""`promptfleet tune` on a local Ray cluster: two trials (prompt lengths 2 and 4) of the tiny job,
each a whole Ray Train run inside a Ray Tune trial, composed with in-batch variants.

Checks what a user reads: the results table, `results.json`, one run directory per trial with its
own adapters of the trial's prompt length, the in-batch search inside each trial, and one-line
refusals of bad `--param`s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from local_ray import REPO, LocalRayCluster, shared_cluster
from safetensors.torch import load_file
from tiny_job import write_tiny_backbone, write_tiny_job

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    return write_tiny_job(
        root / "job",
        write_tiny_backbone(root / "backbone"),
        optim={"max_steps": 4},
        eval_every=2,
        checkpoint_every=0,
        cluster={"num_workers": 1, "zero_stage": "0"},
        search={"space": {"optim.lr": [0.03, 0.3]}, "heldout_examples": 4},
    )


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The 2-CPU local Ray cluster these tests share with other modules (`local_ray.shared_cluster`)."""
    yield from shared_cluster(request)


def start_tune(cluster: LocalRayCluster, *args: str) -> subprocess.Popen:
    """`promptfleet tune ARGS --address` this cluster, as a driver on its head node runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "tune", *args, "--address", cluster.gcs_address],
        cwd=REPO,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()  # a no-op once it has exited
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tune(cluster: LocalRayCluster, *args: str) -> subprocess.CompletedProcess:
    return finish(start_tune(cluster, *args))


def test_bad_params_are_refused_in_one_line(job, ray_cluster):
    cases = (
        ("prompt.num_virtual_tokens=0,4", "prompt.num_virtual_tokens=0: must be > 0"),
        ("optim.nope=1,2", "unknown key 'optim.nope'"),
        ("prompt.num_virtual_tokens", "must look like key=value1,value2"),
    )
    # Independent refusals, each in its own CLI process: started side by side (each is mostly imports).
    started = [start_tune(ray_cluster, str(job), "--param", param) for param, _ in cases]
    for (_, message), proc in zip(cases, [finish(p) for p in started]):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_two_trials_run_as_ray_train_jobs_and_are_ranked(job, ray_cluster):
    proc = tune(ray_cluster, str(job), "--param", "prompt.num_virtual_tokens=2,4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| trial | prompt.num_virtual_tokens | steps | mean score | status |" in proc.stdout
    root = job.parent / "runs" / "tiny" / "tune"
    results = json.loads((root / "results.json").read_text())
    assert sorted(r["params"]["prompt.num_virtual_tokens"] for r in results) == [2, 4]
    # ASHA (grace period = eval_every = 2 steps) may stop the trailing trial at its step-2 evaluation;
    # the first trial to reach a rung always continues, so at least one finishes, and it ranks first.
    finished = [r for r in results if r["status"] == "finished"]
    assert finished and results[: len(finished)] == finished
    assert all(r["status"] == "stopped early at step 2" for r in results[len(finished) :])
    scores = [r["score"] for r in finished]
    assert scores == sorted(scores, reverse=True)  # best first
    for r in finished:
        assert r["steps"] == 4 and set(r["task_scores"]) == {"tone", "topic"}
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == root and f"| {run_dir.name} |" in proc.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["num_virtual_tokens"] == r["params"]["prompt.num_virtual_tokens"]
        assert {t: v["tuned"]["score"] for t, v in summary["tasks"].items()} == r["task_scores"]
        assert sum(r["task_scores"].values()) / 2 == pytest.approx(r["score"])
        assert set(summary["search"]) == {"tone", "topic"}  # the in-batch variants ran inside the trial
        adapter = run_dir / "adapters" / "tone" / "adapter_model.safetensors"
        assert (
            load_file(str(adapter))["prompt_embeddings"].shape[0] == r["params"]["prompt.num_virtual_tokens"]
        )


def test_without_early_stopping_every_trial_finishes(job, ray_cluster):
    proc = tune(ray_cluster, str(job), "name=nostop", "--param", "optim.max_steps=2,3", "--grace-steps", "99")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((job.parent / "runs" / "nostop" / "tune" / "results.json").read_text())
    assert sorted((r["status"], r["steps"]) for r in results) == [("finished", 2), ("finished", 3)]
