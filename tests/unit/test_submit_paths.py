"""Which paths a submitted job may name: this machine's cluster vs a remote one (`cluster.jobs`).

A remote cluster sees only the uploaded project and `cluster.storage`; every other path of the
submitting machine is refused with one line, and the job never carries the submitter's checkout
path. `root` stands in for the project directory, so each test builds its own small project.
No Ray is started: a refused submit fails before any connection (the CLI test uses an address
nothing listens on).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_job import write_tiny_job

from cluster import remote_paths
from cluster.jobs import build_submission, is_local_address
from cluster.remote_paths import UPLOAD_DIR
from cluster.storage import cluster_output_dir, ray_train_storage, storage_path
from tuner.config import ConfigError, load_job_config
from tuner.tasks.spec import TaskSpec

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


def _staged_job(sub, cluster: Path) -> tuple[Path, list]:
    """(the job's working dir on the cluster, its task specs) as the cluster loads the submitted job: the
    staged working dir unpacked at `cluster` (links followed, as Ray's packaging does), the entrypoint's
    config and overrides read inside it (relative paths resolve against it)."""
    argv = shlex.split(sub.entrypoint)
    args = argv[argv.index("train") + 1 : argv.index("--address")]
    shutil.copytree(sub.runtime_env["working_dir"], cluster, symlinks=False)
    config = args[0] if os.path.isabs(args[0]) else cluster / args[0]
    cfg = load_job_config(config, args[1:])
    return cluster, [TaskSpec.load(t) for t in cfg.tasks]


def test_remote_cluster_uploads_the_job_files_only_this_machine_has(layout, tmp_path):
    root, shared = layout
    (root / "tuner").mkdir()
    (root / ".venv").mkdir()
    laptop = tmp_path / "laptop"
    job = write_tiny_job(laptop, shared / "backbone", output_dir="runs")
    sub = build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    staging = Path(sub.runtime_env["working_dir"])
    try:
        assert staging != root and str(laptop) not in sub.entrypoint
        # The project goes as links to its entries (what the upload leaves out is not linked at all) ...
        assert (staging / "tuner").is_symlink() and (staging / "tuner").resolve() == root / "tuner"
        assert not (staging / ".venv").exists()
        # ... the job's own files as copies, their YAMLs naming each other inside the upload.
        assert (staging / UPLOAD_DIR / "tiny.yaml").read_text() == job.read_text()
        cluster, specs = _staged_job(sub, tmp_path / "cluster")
        for spec in specs:
            for path in (spec.data.train, spec.data.eval):
                assert Path(path).is_relative_to(cluster / UPLOAD_DIR), path
                assert Path(path).read_text() == (laptop / "data" / Path(path).name).read_text()
        for staged in (cluster / UPLOAD_DIR).rglob("*.yaml"):
            assert str(laptop) not in staged.read_text()
        assert sub.notes[0].startswith("uploaded with the job: 5 file(s) of this machine")
    finally:
        sub.discard()
    assert not staging.exists()


def test_remote_cluster_refuses_what_it_cannot_get(layout, tmp_path, monkeypatch):
    root, shared = layout
    backbone = tmp_path / "laptop" / "backbone"
    backbone.mkdir(parents=True)
    job = write_tiny_job(tmp_path / "laptop", backbone, output_dir="runs")
    with pytest.raises(ConfigError) as e:
        build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    assert str(e.value) == (
        f"model.name {backbone} is on this machine only, the cluster cannot read it: say where the cluster "
        f"has it (cluster.path_map={{{backbone}: <path on the cluster>}} or submit --cluster-root), put it "
        f"in the project ({root}, uploaded with the job) or under cluster.storage={shared}"
    )
    # Data over the upload limit is named with its size; so is a file that is neither here nor mapped.
    job = write_tiny_job(tmp_path / "laptop", shared / "backbone", output_dir="runs")
    big = tmp_path / "laptop" / "data" / "tone.jsonl"
    big.write_text(big.read_text() * (2**21 // len(big.read_text()) + 1))
    monkeypatch.setattr(remote_paths, "UPLOAD_LIMIT_MB", 1)
    with pytest.raises(
        ConfigError,
        match=rf"^task tone: data file {big} \(2.0 MiB\) is on this machine only and over the job's upload limit \(1 MiB\), the cluster cannot read it: say where",
    ):
        build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    big.unlink()
    with pytest.raises(
        ConfigError, match=f"^task tone: data file {big} does not exist here and is not mapped"
    ):
        build_submission(job, [f"cluster.storage={shared}"], root=root, remote=True)
    # Without cluster.storage the message says what to set.
    with pytest.raises(
        ConfigError, match=r"on a filesystem every node mounts \(cluster.storage=<its path>\)$"
    ):
        build_submission(job, [], root=root, remote=True)
    # An output directory of this machine.
    ok = write_tiny_job(shared / "ok", shared / "backbone", output_dir=str(tmp_path / "laptop" / "runs"))
    with pytest.raises(ConfigError, match=f"^output_dir {tmp_path}/laptop/runs is on this machine only"):
        build_submission(ok, [f"cluster.storage={shared}"], root=root, remote=True)


def _quickstart_like(root: Path, shared: Path) -> Path:
    """A job of the project whose task reads data beside the project by a relative path, as
    configs/tasks/sst2.yaml reads ../../../shared/data (here: ../../../data, from configs/tasks)."""
    job = write_tiny_job(root / "configs", shared / "backbone", output_dir="runs")
    (root.parent / "data").mkdir()
    for task in ("tone", "topic"):
        (root / "configs" / "data" / f"{task}.jsonl").rename(root.parent / "data" / f"{task}.jsonl")
        spec = yaml.safe_load((root / "configs" / "tasks" / f"{task}.yaml").read_text())
        spec["data"] = {
            "format": "jsonl",
            "train": f"../../../data/{task}.jsonl",
            "eval": f"../../../data/{task}.jsonl",
        }
        (root / "configs" / "tasks" / f"{task}.yaml").write_text(yaml.safe_dump(spec))
    return job


def test_paths_the_cluster_has_are_mapped_not_uploaded(layout, tmp_path):
    root, shared = layout
    job = _quickstart_like(root, shared)
    for data in (root.parent / "data").iterdir():
        data.unlink()  # a mapped file need not exist here
    storage = f"cluster.storage={shared}"
    # --cluster-root: the project is at /workspace/promptfleet there, its surroundings as here.
    sub = build_submission(job, [storage], root=root, remote=True, cluster_root="/workspace/promptfleet")
    try:
        _, specs = _staged_job(sub, tmp_path / "cluster1")
        assert sub.metadata["config"] == "configs/tiny.yaml"  # the project's own copy, tasks overridden
        assert {(s.name, s.data.train) for s in specs} == {
            ("tone", "/workspace/data/tone.jsonl"),
            ("topic", "/workspace/data/topic.jsonl"),
        }
        assert sub.notes[1] == "the cluster reads 2 file(s) at mapped paths, e.g. /workspace/data/tone.jsonl"
    finally:
        sub.discard()
    # cluster.path_map, relative to the job file or absolute; the longest key wins over a shorter one and
    # over --cluster-root; a mapped local backbone is passed by its path there.
    mapping = f"cluster.path_map={{../../data: /mnt/data, {root.parent}/data/topic.jsonl: /fast/topic.jsonl, {shared}/backbone: /models/tiny}}"
    sub = build_submission(
        job, [storage, mapping], root=root, remote=True, cluster_root="/workspace/promptfleet"
    )
    try:
        _, specs = _staged_job(sub, tmp_path / "cluster2")
        assert {(s.name, s.data.train) for s in specs} == {
            ("tone", "/mnt/data/tone.jsonl"),
            ("topic", "/fast/topic.jsonl"),
        }
        assert "model.name=/models/tiny" in sub.entrypoint
    finally:
        sub.discard()
    # An absolute output_dir under a mapped folder is written at its path there.
    out = f"output_dir={root.parent}/out"
    sub = build_submission(
        job,
        [storage, out, f"cluster.path_map={{{root.parent}/out: /workspace/runs}}"],
        root=root,
        remote=True,
        cluster_root="/x/promptfleet",
    )
    sub.discard()
    assert "output_dir=/workspace/runs" in shlex.split(sub.entrypoint)
    # A cluster on this machine reads this machine's paths as they are: no mapping, no upload.
    local = build_submission(job, [storage, mapping], root=root)
    assert local.staging is None and local.runtime_env["working_dir"] == str(root)
    with pytest.raises(ConfigError, match="cluster.path_map: 'data': 'mnt': map a path here to an absolute"):
        load_job_config(job, ["cluster.path_map={data: mnt}"])


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
    assert f"model.name {job.parent} is on this machine only" in line and "cluster.path_map" in line
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
    assert proc.returncode == 2 and f"model.name {job.parent} is on this machine only" in proc.stderr, (
        proc.stderr
    )
