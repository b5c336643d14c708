"""Which paths a submitted job may name: this machine's cluster vs a remote one (`cluster.jobs`).

A remote cluster sees only the uploaded project and `cluster.storage`; every other path of the
submitting machine is refused with one line, and the job never carries the submitter's checkout
path. `root` stands in for the project directory, so each test builds its own small project.
No Ray is started: a refused submit fails before any connection (the CLI test uses an address
nothing listens on).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_job import write_tiny_job

from cluster.jobs import build_submission, is_local_address
from cluster.storage import cluster_output_dir, ray_train_storage, storage_path
from tuner.config import ConfigError, load_job_config

REMOTE = "http://10.255.255.1:8265"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def layout(tmp_path) -> tuple[Path, Path]:
    """(project root, shared storage), side by side."""
    (tmp_path / "project").mkdir()
    (tmp_path / "shared" / "backbone").mkdir(parents=True)
    return tmp_path / "project", tmp_path / "shared"


def test_storage_rules():
    assert storage_path("/mnt/shared") == Path("/mnt/shared")
    assert storage_path("file:///mnt/shared") == Path("/mnt/shared")
    assert storage_path("s3://bucket/runs") is None
    assert cluster_output_dir("runs", "/mnt/shared") == "/mnt/shared/runs"
    assert cluster_output_dir("/data/out", "/mnt/shared") == "/data/out"
    assert cluster_output_dir("runs", "s3://bucket") == "runs" == cluster_output_dir("runs", "")
    run_dir = Path("/mnt/shared/runs/demo")
    assert ray_train_storage(run_dir, "demo", "") == ("/mnt/shared/runs/demo/ray", "demo")
    path, name = ray_train_storage(run_dir, "demo", "s3://bucket")
    assert path == "s3://bucket" and name.startswith("demo-")
    assert ray_train_storage(Path("/elsewhere/demo"), "demo", "s3://bucket")[1] != name
    assert is_local_address("http://127.0.0.1:8265") and is_local_address("http://localhost:8265")
    assert not is_local_address(REMOTE)


def test_storage_must_be_absolute_or_a_uri(tmp_path):
    job = write_tiny_job(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="cluster.storage='shared': must be an absolute path"):
        load_job_config(job, ["cluster.storage=shared"])
    assert load_job_config(job, ["cluster.storage=s3://bucket/x"]).cluster.storage == "s3://bucket/x"


def test_local_cluster_keeps_absolute_paths(layout):
    root, shared = layout
    job = write_tiny_job(shared / "job", shared / "backbone")  # output_dir: absolute
    sub = build_submission(job, [], root=root)
    assert str(job) in sub.entrypoint and "output_dir=" not in sub.entrypoint
    rel = build_submission(job, ["output_dir=runs", "prompt.init_from=runs/old"], root=root)
    assert f"output_dir={Path('runs').resolve()}" in rel.entrypoint  # the uploaded copy is temporary
    assert f"prompt.init_from={Path('runs/old').resolve()}" in rel.entrypoint  # read from here, not the copy
    # With shared storage a relative output_dir stays relative: the cluster puts it under the storage.
    stored = build_submission(job, ["output_dir=runs", f"cluster.storage={shared}"], root=root)
    assert f"output_dir={Path('runs').resolve()}" not in stored.entrypoint
    assert f"outputs go to {shared}/runs/tiny" in stored.notes


def test_remote_cluster_refuses_paths_only_this_machine_has(layout, tmp_path):
    root, shared = layout
    elsewhere = write_tiny_job(tmp_path / "laptop", shared / "backbone")
    with pytest.raises(ConfigError) as e:
        build_submission(elsewhere, [f"cluster.storage={shared}"], root=root, remote=True)
    assert str(e.value) == (
        f"config {elsewhere} is on this machine only, the cluster cannot read it: put it in the project "
        f"({root}, uploaded with the job) or under cluster.storage={shared}"
    )
    # Job files on the storage, one data file not: that one is named.
    job = write_tiny_job(shared / "job", shared / "backbone")
    laptop_data = tmp_path / "laptop" / "data" / "topic.jsonl"
    task = yaml.safe_load((shared / "job" / "tasks" / "topic.yaml").read_text())
    task["data"]["train"] = str(laptop_data)
    (shared / "job" / "tasks" / "topic.yaml").write_text(yaml.safe_dump(task))
    with pytest.raises(ConfigError, match=f"^task topic: data file {laptop_data} is on this machine only"):
        build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    # Without cluster.storage nothing outside the project is visible, and the message says what to set.
    with pytest.raises(ConfigError, match=r"every node mounts \(cluster.storage=<its path>\)$"):
        build_submission(job, [], root=root, remote=True)
    # An output directory of this machine.
    ok = write_tiny_job(shared / "ok", shared / "backbone", output_dir=str(tmp_path / "laptop" / "runs"))
    with pytest.raises(ConfigError, match=f"^output_dir {tmp_path}/laptop/runs is on this machine only"):
        build_submission(ok, [f"cluster.storage={shared}"], root=root, remote=True)


def test_remote_cluster_gets_no_path_of_the_submitting_checkout(layout):
    root, shared = layout
    job = write_tiny_job(shared / "job", shared / "backbone", output_dir="runs")
    sub = build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    assert str(root) not in sub.entrypoint and "output_dir=" not in sub.entrypoint
    assert sub.metadata["config"] == str(job)  # a path on the shared storage, read there
    assert sub.notes == [f"outputs go to {shared}/runs/tiny"]
    # A finished run to continue from, on this machine: named too; on the storage: fine.
    laptop_run = root.parent / "laptop" / "runs" / "old"
    with pytest.raises(ConfigError, match=f"^prompt.init_from {laptop_run} is on this machine only"):
        build_submission(
            job, [f"cluster.storage={shared}", f"prompt.init_from={laptop_run}"], root=root, remote=True
        )
    over = [f"cluster.storage={shared}", f"prompt.init_from={shared}/runs/old"]
    assert (
        f"prompt.init_from={shared}/runs/old"
        in build_submission(job, over, root=root, remote=True).entrypoint
    )
    # A relative output_dir without a shared path has no place on a remote cluster.
    inside = write_tiny_job(root / "configs", root / "configs", output_dir="runs")
    with pytest.raises(ConfigError, match="^output_dir=runs is relative and a remote cluster"):
        build_submission(inside, ["cluster.storage=s3://bucket/ckpt"], root=root, remote=True)
    with pytest.raises(
        ConfigError, match=r"on a filesystem every node mounts \(cluster.storage=<its path>\)$"
    ):
        build_submission(job, ["cluster.storage=s3://bucket/ckpt"], root=root, remote=True)


def test_remote_cluster_and_a_config_inside_the_project(layout):
    root, shared = layout
    job = write_tiny_job(root / "configs", shared / "backbone", output_dir="runs")
    sub = build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    assert sub.metadata["config"] == "configs/tiny.yaml"  # read from the uploaded copy
    # Data on the shared storage named relative to a task file of the project: the upload cannot reach it.
    data = shared / "data" / "tone.jsonl"
    data.parent.mkdir()
    data.write_text((root / "configs" / "data" / "tone.jsonl").read_text())
    task = yaml.safe_load((root / "configs" / "tasks" / "tone.yaml").read_text())
    task["data"]["train"] = "../../../shared/data/tone.jsonl"
    (root / "configs" / "tasks" / "tone.yaml").write_text(yaml.safe_dump(task))
    with pytest.raises(
        ConfigError, match="^task tone: data file ../../../shared/data/tone.jsonl lies outside"
    ):
        build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    task["data"]["train"] = str(data)  # named by its path on the storage: fine
    (root / "configs" / "tasks" / "tone.yaml").write_text(yaml.safe_dump(task))
    assert build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True).metadata[
        "config"
    ] == ("configs/tiny.yaml")


def test_cli_refuses_with_one_line_before_contacting_the_cluster(tmp_path):
    job = write_tiny_job(tmp_path, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "submit", str(job), "--address", REMOTE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"config {job} is on this machine only" in line and "cluster.storage" in line
    # A tunnelled cluster (kubectl port-forward) has a local address: --remote applies the same rule.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "submit",
            str(job),
            "--remote",
            "--address",
            "http://127.0.0.1:9",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"config {job} is on this machine only" in proc.stderr, proc.stderr
