"""A Ray job's driver loads no model code: it checks the job, claims the run directory, resolves the
backbone, starts Ray Train and prints the summary, so it imports neither transformers nor the tuner's
model, evaluation or recipe modules (only the ranks do). On a 2-core machine that is ~3 s less start-up
for every `promptfleet train` / `submit` driver (BENCHMARKS.md, "Test-suite wall time").

Ray Train's `TorchTrainer` itself imports torch, so torch is not on the list.
"""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from tiny_job import write_tiny_backbone, write_tiny_job

FIXTURE_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "run_aee272d" / "output" / "prev"

# What only a rank needs: the backbone's library and the tuner's model side.
MODEL_SIDE = (
    "transformers",
    "deepspeed",
    "tuner.evaluate",
    "tuner.model.backbone",
    "tuner.model.prompt_lm",
    "tuner.recipe",
    "serving.offline",
)

DRIVER = """
import json, sys
from cluster.cli import build_parser  # the entry point a submitted job runs
from cluster.launch import make_trainer, print_outcome, train_on_ray  # noqa: F401
from tuner.config import load_job_config
from tuner.job import prepare_job
from tuner.report import read_summary

cfg = load_job_config(sys.argv[1], [f"output_dir={sys.argv[2]}"])
job = prepare_job(cfg, claim=True)  # tasks checked, run directory claimed, backbone resolved
print_outcome(read_summary(sys.argv[3]), job.run_dir)  # what the driver prints at the end
print(json.dumps(sorted(m for m in json.loads(sys.argv[4]) if m in sys.modules)))
"""


def test_the_driver_path_imports_no_model_code(tmp_path):
    job = write_tiny_job(tmp_path, write_tiny_backbone(tmp_path / "backbone"))
    args = [str(job), str(tmp_path / "runs"), str(FIXTURE_RUN), json.dumps(MODEL_SIDE)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| pos_neg |" in proc.stdout and "| colors |" in proc.stdout  # the summary table, rendered
    assert (tmp_path / "runs" / "tiny" / "run.json").is_file()  # the run directory was claimed
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
