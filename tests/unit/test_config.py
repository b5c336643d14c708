"""Every shipped YAML loads and validates; bad configs fail with one line and a non-zero exit."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA

from tuner.config import ConfigError, JobConfig, from_dict, load_job_config
from tuner.tasks.spec import TaskSpec

JOB_FILES = sorted(p for p in (REPO / "configs").glob("*.yaml"))
TASK_FILES = sorted((REPO / "configs" / "tasks").glob("*.yaml"))


def test_shipped_configs_exist():
    assert len(JOB_FILES) >= 2 and len(TASK_FILES) >= 6
    first_lines = [p.read_text().splitlines()[0] for p in JOB_FILES]
    assert all(
        line.startswith("#") for line in first_lines
    )  # every job file starts with what it is / how to run it


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_config_loads(path):
    cfg = load_job_config(path)
    assert cfg.tasks and all(Path(t).is_file() for t in cfg.tasks)


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_every_task_config_loads(path):
    spec = TaskSpec.load(path)
    assert spec.name == path.stem
    if SHARED_DATA.is_dir():
        spec.check_files()
        assert str(SHARED_DATA.resolve()) in spec.data.train  # shared data by path, never copied


def test_overrides_and_strictness(tmp_path):
    cfg = load_job_config(
        REPO / "configs/quickstart.yaml", ["optim.lr=0.05", "cluster.num_workers=1", "name=x1"]
    )
    assert cfg.optim.lr == 0.05 and cfg.cluster.num_workers == 1 and cfg.name == "x1"
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_job_config(REPO / "configs/quickstart.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_job_config(REPO / "configs/quickstart.yaml", ["optim.max_steps=many"])
    with pytest.raises(ConfigError, match="not a valid name"):
        from_dict(JobConfig, {"name": "../escape"})
    with pytest.raises(ConfigError, match="divisible"):
        load_job_config(REPO / "configs/quickstart.yaml", ["optim.batch_size=10", "optim.grad_accum=3"])


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("case", ["unknown_key", "missing_data", "missing_file", "bad_yaml", "bad_override"])
def test_cli_bad_config_is_one_line_error(tmp_path, case):
    job = (REPO / "configs/quickstart.yaml").read_text()
    path = tmp_path / "job.yaml"
    task_dir = REPO / "configs" / "tasks"
    job = job.replace("tasks: [tasks/", f"tasks: [{task_dir}/").replace(", tasks/", f", {task_dir}/")
    args = ["train", str(path), "--no-ray"]
    if case == "unknown_key":
        path.write_text(job + "\nbogus_key: 1\n")
    elif case == "missing_data":
        bad_task = tmp_path / "bad.yaml"
        bad_task.write_text(
            (task_dir / "sst2.yaml")
            .read_text()
            .replace("sst2/train.tsv", "sst2/nope.tsv")
            .replace("../../../shared", str(REPO.parent / "shared"))
        )
        path.write_text(job.replace(f"{task_dir}/sst2.yaml", str(bad_task)))
    elif case == "missing_file":
        args = ["train", str(tmp_path / "absent.yaml")]
    elif case == "bad_yaml":
        path.write_text("name: [unclosed\n")
    else:
        path.write_text(job)
        args.append("optim.max_steps=-3")
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("promptfleet: error:"), res.stderr
    assert "Traceback" not in res.stderr


def test_cli_help_explains_commands():
    res = _cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "eval", "validate"):
        assert cmd in res.stdout
    res = _cli("train", "--help")
    assert "key=value" in res.stdout and "--address" in res.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        # each of these used to be accepted: inf and betas outside [0, 1) trained NaN prompts to rc=0
        ("optim.lr=.inf", "optim.lr=inf: must be > 0"),
        ("optim.betas=[1, 2]", "optim.betas"),
        ("optim.eps=0", "optim.eps"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.weight_decay=-5", "optim.weight_decay"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.max_steps=.inf", "optim.max_steps: expected int"),  # was an OverflowError
        ("data.temperature=.inf", "data.temperature"),
        ("data.max_train_examples=-1", "data.max_train_examples"),
        ("data.max_eval_examples=-1", "data.max_eval_examples"),
        ("prompt.init_std=-1", "prompt.init_std"),
        ("log_every=0", "log_every"),  # was a ZeroDivisionError at step 0, after the run dir was claimed
        ("eval_every=-1", "eval_every"),
        ("checkpoint_every=-1", "checkpoint_every"),
        ("model.name=", "model.name is empty"),
        ("name=~", "not a valid name"),  # YAML null: was the run name "None"
        ("optim.lr=[1", "not valid YAML"),  # was "ParserError: ^"
    ],
)
def test_values_that_cannot_train_are_refused_by_the_config(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job_config(REPO / "configs/quickstart.yaml", [override])


def test_yaml_null_is_an_empty_string_not_none():
    cfg = load_job_config(REPO / "configs/quickstart.yaml", ["prompt.init_text=~", "cluster.address="])
    assert cfg.prompt.init_text == "" and cfg.cluster.address == ""
