"""`promptfleet submit` / `promptfleet jobs` against a real local Ray cluster (token auth on).

The cluster has 2 CPUs; each test job asks for both (1 worker x 2 CPUs), so two submitted jobs
can only run one after the other: Ray queues the second until the first frees its workers.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from local_ray import REPO, LocalRayCluster, free_port, shared_cluster
from prometheus_client.parser import text_string_to_metric_families
from tiny_job import write_tiny_backbone, write_tiny_job

from cluster.jobs import build_submission, connect, wait_for
from cluster.jobs import submit as submit_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WHOLE_CLUSTER = {"num_workers": 1, "cpus_per_worker": 2, "zero_stage": 0}


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The 2-CPU local Ray cluster these tests share with other modules (`local_ray.shared_cluster`)."""
    yield from shared_cluster(request)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return write_tiny_backbone(tmp_path_factory.mktemp("backbone"))


def submit(cluster: LocalRayCluster, *args: str):
    proc = cluster.promptfleet("submit", *args, "--address", cluster.address)
    return proc, proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None


def status(cluster: LocalRayCluster, job_id: str) -> str:
    proc = cluster.promptfleet("jobs", "status", job_id, "--address", cluster.address)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(":")[0].strip()


def test_auth_and_unknown_jobs_are_one_line_errors(ray_cluster):
    proc = ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address, token=False)
    assert (
        proc.returncode == 2 and "pass --token" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    proc = ray_cluster.promptfleet(
        "jobs", "list", "--address", ray_cluster.address, "--token", ray_cluster.token, token=False
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ID"), proc.stderr
    proc = ray_cluster.promptfleet("jobs", "status", "no-such-job", "--address", ray_cluster.address)
    assert proc.returncode == 2 and "no job 'no-such-job'" in proc.stderr


def test_two_jobs_queue_and_succeed(ray_cluster, backbone, tmp_path):
    job = write_tiny_job(tmp_path, backbone, cluster=WHOLE_CLUSTER)
    ids = []
    for name in ("first", "second"):
        proc, job_id = submit(ray_cluster, str(job), f"name={name}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "absolute paths" in proc.stderr  # the config lies outside the project: told, not hidden
        ids.append(job_id)
    for job_id, name in zip(ids, ("first", "second")):
        proc = ray_cluster.promptfleet("jobs", "logs", job_id, "--follow", "--address", ray_cluster.address)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert f"run directory: {tmp_path}/runs/{name}" in proc.stdout
        assert json.loads((tmp_path / "runs" / name / "summary.json").read_text())["steps"] == 6
    listing = ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address).stdout
    for job_id in ids:
        (line,) = [x for x in listing.splitlines() if x.startswith(job_id)]
        assert "SUCCEEDED" in line and "cluster.cli train" in line


def test_remote_style_submit_reads_and_writes_on_shared_storage(ray_cluster, backbone, tmp_path):
    """A job built for a remote cluster names no path of the submitting checkout; its outputs land
    under `cluster.storage` (here a directory standing for storage every node mounts)."""
    shutil.copytree(backbone, tmp_path / "backbone")
    job = write_tiny_job(
        tmp_path / "job",
        tmp_path / "backbone",
        output_dir="runs",
        cluster={**WHOLE_CLUSTER, "storage": str(tmp_path)},
    )
    sub = build_submission(job, ["name=remote"], remote=True)
    assert str(REPO) not in sub.entrypoint and "output_dir" not in sub.entrypoint
    client = connect(ray_cluster.address, ray_cluster.token)
    job_id = submit_job(client, sub)
    state = wait_for(client, job_id, timeout_s=300, poll_s=0.2)
    assert state == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    listing = ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address).stdout
    (line,) = [x for x in listing.splitlines() if x.startswith(job_id)]
    assert str(REPO) not in line and "output_dir" not in line, line
    assert json.loads((tmp_path / "runs" / "remote" / "summary.json").read_text())["steps"] == 6
    assert list(tmp_path.glob("remote-*/checkpoint_*"))  # Ray Train's checkpoints on the storage too


def test_remote_submit_from_elsewhere_uploads_the_job_and_maps_the_data(ray_cluster, backbone, tmp_path):
    """The README's port-forward recipe, on a cluster that is this machine: `submit --remote` from a
    directory that is not the project, the job's YAMLs only on the submitting side (uploaded), its data
    and backbone only where `cluster.path_map` says the cluster has them; the outputs land under
    `cluster.storage`. Submitting prints the job id and promptfleet's notes, none of Ray's log lines."""
    laptop, cluster, storage = tmp_path / "laptop", tmp_path / "cluster", tmp_path / "storage"
    storage.mkdir()
    path_map = {"data": str(cluster / "data"), str(backbone): str(cluster / "backbone")}
    write_tiny_job(
        laptop,
        backbone,
        name="mapped",
        output_dir="runs",
        cluster={**WHOLE_CLUSTER, "storage": str(storage), "path_map": path_map},
    )
    shutil.move(laptop / "data", cluster / "data")  # the data is on the cluster only
    shutil.copytree(backbone, cluster / "backbone")
    proc = ray_cluster.promptfleet(
        "submit",
        "mapped.yaml",
        "--remote",
        "--follow",
        "--address",
        ray_cluster.address,
        cwd=laptop,
        timeout_s=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    notes = proc.stderr.strip().splitlines()
    assert [x for x in notes if not x.startswith(("note: ", "job "))] == [], notes  # no Ray INFO/WARNING
    assert f"note: outputs go to {storage}/runs/mapped" in notes
    assert json.loads((storage / "runs" / "mapped" / "summary.json").read_text())["steps"] == 6
    assert list(storage.glob("mapped-*/checkpoint_*"))  # Ray Train's checkpoints on the storage too
    listing = ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address).stdout
    (line,) = [x for x in listing.splitlines() if " mapped " in x]
    assert str(laptop) not in line and str(REPO) not in line and "model.name=" in line, line


def _head(src: Path, dst: Path, lines: int) -> None:
    """The first `lines` lines of `src` (a TSV's header included) at `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open(encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")


def test_the_readmes_port_forward_recipe_submits_the_quickstart(ray_cluster, tmp_path):
    """README "submit to a remote cluster": `submit configs/quickstart.yaml output_dir=... --cluster-root`
    from a directory that is not the project. The cluster's copy of the shared data (beside the project
    there) is cut to 3 eval rows per task, so the evaluated counts show which copy the job read."""
    laptop, storage = tmp_path / "laptop", tmp_path / "storage"
    cluster_root = tmp_path / "cluster" / "promptfleet"
    for d in (laptop, storage, cluster_root):
        d.mkdir(parents=True)
    for task in ("sst2", "ag_news", "trec"):
        spec = yaml.safe_load((REPO / "configs" / "tasks" / f"{task}.yaml").read_text())
        for split, lines in (("train", 41), ("eval", 4 if spec["data"]["format"] == "tsv" else 3)):
            rel = Path(spec["data"][split])  # ../../../shared/data/<task>/<file>, from configs/tasks/
            _head(REPO / "configs" / "tasks" / rel, cluster_root / "configs" / "tasks" / rel, lines)
    overrides = ["output_dir=runs", "optim.max_steps=2", "optim.batch_size=4", "optim.warmup_steps=0"]
    overrides += ["data.max_eval_examples=8", "eval_every=0", "checkpoint_every=2", "model.max_seq_len=64"]
    overrides += [f"cluster.{k}={v}" for k, v in WHOLE_CLUSTER.items()] + [f"cluster.storage={storage}"]
    proc = ray_cluster.promptfleet(
        *[
            "submit",
            str(REPO / "configs" / "quickstart.yaml"),
            *overrides,
            "--cluster-root",
            str(cluster_root),
        ],
        *["--follow", "--address", ray_cluster.address],
        cwd=laptop,
        timeout_s=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((storage / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert {t: s["tuned"]["n"] for t, s in summary["tasks"].items()} == {"sst2": 3, "ag_news": 3, "trec": 3}


def test_failing_jobs_report_their_error(ray_cluster, backbone, tmp_path):
    job = write_tiny_job(tmp_path, backbone, cluster=WHOLE_CLUSTER)
    # A bad key never reaches the cluster: the config is checked before submission.
    before = ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address).stdout
    proc, _ = submit(ray_cluster, str(job), "optim.no_such_key=1")
    assert proc.returncode == 2 and "unknown key 'optim.no_such_key'" in proc.stderr
    assert ray_cluster.promptfleet("jobs", "list", "--address", ray_cluster.address).stdout == before

    # A data file that is missing where the job runs fails the job, with the reason in its logs.
    (tmp_path / "data" / "topic.jsonl").unlink()
    proc = ray_cluster.promptfleet("submit", str(job), "--follow", "--address", ray_cluster.address)
    assert proc.returncode == 1, proc.stdout[-2000:]
    job_id = proc.stdout.strip().splitlines()[0]
    assert "promptfleet: error: task topic: data file not found" in proc.stdout
    assert status(ray_cluster, job_id) == "FAILED"
    logs = ray_cluster.promptfleet("jobs", "logs", job_id, "--address", ray_cluster.address)
    assert "data file not found" in logs.stdout


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def test_stop_a_running_job_and_scrape_its_metrics(ray_cluster, backbone, tmp_path):
    port = free_port()
    job = write_tiny_job(
        tmp_path,
        backbone,
        name="endless",
        cluster={**WHOLE_CLUSTER, "metrics_port": port},
        optim={"max_steps": 1_000_000},
        checkpoint_every=5,
    )
    proc, job_id = submit(ray_cluster, str(job))
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoints = tmp_path / "runs" / "endless" / "checkpoints"
    client = connect(ray_cluster.address, ray_cluster.token)  # polled in-process: a CLI call per poll
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts Ray Train workers slowly
    while not list(checkpoints.glob("step_*")):  # training is under way
        assert time.monotonic() < deadline and str(client.get_job_status(job_id)) in ("PENDING", "RUNNING")
        time.sleep(0.2)

    # The driver serves the metrics (cluster.launch), from rank 0's records: they reach it through its
    # queue, so the checkpoint on disk may be a moment ahead of them.
    while (families := scrape(port))["promptfleet_train_last_checkpoint_step"].samples[0].value < 5:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {s.labels["task"] for s in families["promptfleet_train_task_loss"].samples} == {"tone", "topic"}
    assert families["promptfleet_train_step"].samples[0].value >= 5
    # ... and it is the job's driver process that listens, not a Ray Train worker (on a KubeRay cluster
    # the driver runs on the head pod, the one k8s/monitoring.yaml scrapes).
    driver = client.get_job_info(job_id).driver_info
    listening = [
        c
        for c in psutil.Process(int(driver.pid)).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening, f"driver {driver.pid} does not listen on {port}"

    proc = ray_cluster.promptfleet("jobs", "stop", job_id, "--wait", "--address", ray_cluster.address)
    assert proc.returncode == 0 and f"{job_id}: STOPPED" in proc.stdout, proc.stdout + proc.stderr
    assert status(ray_cluster, job_id) == "STOPPED"
    assert json.loads((tmp_path / "runs" / "endless" / "run.json").read_text())["status"] == "running"
