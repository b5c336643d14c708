"""A start that fails releases its run directory; a local backbone that is not there is refused at once.

`promptfleet train` claims the run directory (`run.json`, "running") before the model loads; a start
that fails must not leave that claim behind, or the corrected command is refused as another job's
(`tuner.run_dir.released_on_failure`). A run that wrote a checkpoint keeps its claim: it resumes. The
CLI runs `--no-ray` on the tiny backbone (tests/tiny_job.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import write_tiny_job

from tuner.config import ConfigError, ModelConfig
from tuner.run_dir import RUN_FILE, claim_run_dir, released_on_failure

REPO = Path(__file__).resolve().parents[2]


def _train(job: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`promptfleet train JOB --no-ray OVERRIDES`, and whether it had imported torch when it ended."""
    code = (
        "import sys; from cluster.cli import main; rc = main(sys.argv[1:]); "
        "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "train", str(job), "--no-ray", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_local_backbone_is_one_line_before_anything_loads(tmp_path, tiny_backbone_dir):
    job = write_tiny_job(tmp_path, tiny_backbone_dir)
    proc = _train(job, "model.name=/nonexistent/model")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "promptfleet: error: model.name=/nonexistent/model: no such directory (a local backbone is a "
        "checkpoint directory; a Hub id looks like org/name)"
    ]
    assert "torch imported: False" in proc.stdout  # refused before torch, Ray or the model load
    assert not (tmp_path / "runs").exists()  # nothing claimed


@pytest.mark.parametrize("name", ["/no/such/dir", "./missing", "~/no-such-backbone-here", "a/b/c"])
def test_what_looks_like_a_path_must_be_a_directory(name):
    with pytest.raises(ConfigError, match="no such directory"):
        ModelConfig(name=name).check_local_path()


@pytest.mark.parametrize("name", ["smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_names_and_hub_ids_are_not_paths(name):
    ModelConfig(name=name).check_local_path()  # resolved (or downloaded) later, as before


def test_a_failed_start_releases_its_run_directory(tmp_path, tiny_backbone_dir):
    job = write_tiny_job(tmp_path, tiny_backbone_dir, optim={"max_steps": 2})
    broken = tmp_path / "not-a-checkpoint"
    broken.mkdir()  # a directory: passes the path check, fails when the model loads (after the claim)
    proc = _train(job, f"model.name={broken}")
    assert proc.returncode != 0 and "belongs to another job" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # the claim and the directory it made are gone
    fixed = _train(job)  # the corrected command (another backbone: another fingerprint) runs
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "tiny" / RUN_FILE).read_text())["status"] == "finished"


def test_a_started_run_keeps_its_claim_and_an_empty_directory_stays(tmp_path):
    started, empty = tmp_path / "started", tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError), released_on_failure():
        claim_run_dir(started, "a", "fp-a", resume=True)
        claim_run_dir(empty, "b", "fp-b", resume=True)
        (started / "checkpoints" / "step_00000002").mkdir(parents=True)  # it wrote a checkpoint
        (empty / "predictions").mkdir()  # what a failed start left in a directory that was empty
        raise RuntimeError("the worker group was lost")
    assert json.loads((started / RUN_FILE).read_text())["status"] == "running"  # resumable: kept
    assert empty.is_dir() and not any(empty.iterdir())  # released, the user's (empty) directory kept
    claim_run_dir(empty, "c", "fp-c", resume=True)  # another job may have it now
    # A block that succeeds keeps every claim; a resumed claim (not new) is never rolled back.
    with released_on_failure():
        claim_run_dir(tmp_path / "ok", "d", "fp-d", resume=True)
    with pytest.raises(RuntimeError), released_on_failure():
        claim_run_dir(tmp_path / "ok", "d", "fp-d", resume=True)
        raise RuntimeError("failed on resume")
    assert (tmp_path / "ok" / RUN_FILE).is_file()
