"""The recipe end to end in one process on a tiny backbone: outputs, learning, resume rules, `promptfleet eval`."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_job_yaml, write_tiny_tasks

from cluster.launch import train_local
from tuner.config import ConfigError, load_job_config


def run(cfg, progress=False):
    """The job as `promptfleet train --no-ray` runs it: prepared (run directory claimed) once, then trained."""
    return train_local(cfg, progress=progress)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("recipe")
    tasks = write_tiny_tasks(root, n_train=64)
    job = tiny_job_yaml(
        root,
        tiny_backbone_dir,
        tasks,
        **{"optim.max_steps": 30, "optim.lr": 1.0, "eval_zero_shot": True, "eval_every": 15},
    )
    summary = run(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    return root, job, summary


def test_outputs(finished):
    root, _, summary = finished
    run_dir = root / "runs" / "tiny"
    adapters = [p.name for p in (run_dir / "adapters").iterdir() if not p.name.startswith(".")]
    assert sorted(adapters) == ["colors", "pos_neg"]  # hidden: the versions behind the published links
    assert (run_dir / "curves.png").is_file() and (run_dir / "report.md").is_file()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 30 and set(saved["tasks"]) == {"pos_neg", "colors"}
    for task in saved["tasks"].values():
        assert {"accuracy", "macro_f1", "per_label"} <= set(task["tuned"]) and task["zero_shot"]["n"] == 8


def test_loss_goes_down(finished):
    root, _, _ = finished
    state = json.loads(
        sorted((root / "runs" / "tiny" / "checkpoints").glob("step_*/state.json"))[-1].read_text()
    )
    losses = [h["loss"] for h in state["history"]["steps"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    evals = state["history"]["evals"]
    # zero-shot at step 0, then the periodic eval (the final one is added by finish())
    assert [(h["step"], h["zero_shot"]) for h in evals] == [(0, True), (15, False)]


def test_finished_and_foreign_runs_are_refused(finished):
    root, job, _ = finished
    with pytest.raises(ConfigError, match="finished run"):
        run(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    with pytest.raises(ConfigError, match="another job"):
        run(load_job_config(job, ["cluster.num_workers=1", "prompt.num_virtual_tokens=3"]), progress=False)


def test_eval_cli_rescoring_matches_training_summary(finished):
    root, _, summary = finished
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "eval", str(root / "runs" / "tiny"), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # --json: stdout is JSON alone (pipe it to jq)
    for name, task in summary["tasks"].items():
        assert out["tasks"][name]["tuned"]["accuracy"] == pytest.approx(task["tuned"]["accuracy"])


def test_eval_cli_reads_a_run_whose_adapters_are_a_packed_store(finished, tmp_path):
    """A fleet run exports a packed store (`tuner.prompt_store`): `eval` reads it as it reads directories."""
    import shutil

    root, _, summary = finished
    run_dir = tmp_path / "packed-run"
    shutil.copytree(root / "runs" / "tiny", run_dir, symlinks=True)
    shutil.move(run_dir / "adapters", tmp_path / "dirs")
    cli = [sys.executable, "-m", "cluster.cli"]
    res = subprocess.run(
        [*cli, "export", str(tmp_path / "dirs"), "--packed", str(run_dir / "adapters")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert (run_dir / "adapters" / "index.json").is_file()
    res = subprocess.run(
        [*cli, "eval", str(run_dir), "--json"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for name, task in summary["tasks"].items():
        assert out["tasks"][name]["tuned"]["accuracy"] == pytest.approx(task["tuned"]["accuracy"])


@pytest.mark.parametrize("damage", ["truncated_weights", "wrong_width", "bad_summary"])
def test_eval_of_a_damaged_run_directory_is_one_line_naming_the_file(finished, tmp_path, damage):
    """These used to end in a bare SafetensorError, a broadcast RuntimeError or a KeyError: 'config'."""
    import shutil

    from safetensors.torch import save_file

    root, _, _ = finished
    run_dir = tmp_path / "copy"
    shutil.copytree(root / "runs" / "tiny", run_dir, symlinks=True)
    weights = (run_dir / "adapters" / "colors").resolve() / "adapter_model.safetensors"
    if damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:40])
        expected = "adapter .*colors is unreadable"
    elif damage == "wrong_width":
        save_file({"prompt_embeddings": torch.zeros(4, 64)}, str(weights))
        expected = "64 wide"
    else:
        (run_dir / "summary.json").write_text("{}")
        expected = "summary.json is damaged"
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "eval", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert re.search(expected, lines[0]), lines[0]


def test_a_tasks_gradient_is_the_mean_over_its_own_examples(tmp_path, tiny_backbone_dir):
    """Each task's prompt gets the mean loss over its examples in the step: other tasks in the batch change nothing."""
    from tuner.recipe import MultiTaskPromptTuningRecipe

    tasks = write_tiny_tasks(tmp_path, n_train=16)

    def gradient_of_pos_neg(draw):
        job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **{"optim.batch_size": len(draw)})
        recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
        recipe.setup()
        seen = {}
        step = recipe.optimizer.step

        def capture(names, values, grads, lr):
            seen.update(zip(names, grads.clone()))
            return step(names, values, grads, lr=lr)

        recipe.optimizer.step = capture  # a spy on the optimiser: the gradient it is handed
        recipe.train_step(draw)
        return seen["pos_neg"]

    alone = gradient_of_pos_neg([("pos_neg", i) for i in range(3)])
    mixed = gradient_of_pos_neg(
        [("colors", 0), ("pos_neg", 0), ("colors", 1), ("pos_neg", 1), ("pos_neg", 2)]
    )
    assert alone.abs().sum() > 0
    # fp32 sums in another order (other rows in the packed batch): relative to the gradient's scale
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))


def _cli_train(job, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            str(job),
            "--no-ray",
            "cluster.num_workers=1",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_false_on_a_new_directory_trains_and_on_an_existing_one_refuses(tmp_path, tiny_backbone_dir):
    """The run directory is claimed exactly once (by the entry point), so resume=false works on a new run."""
    job = tiny_job_yaml(
        tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=8), **{"optim.max_steps": 2}
    )
    first = _cli_train(job, "resume=false", "name=fresh")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "fresh" / "run.json").read_text())["status"] == "finished"
    again = _cli_train(job, "resume=false", "name=fresh")
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "finished run" in lines[0], again.stderr


def test_train_step_takes_its_batch_and_returns_a_typed_record(tmp_path, tiny_backbone_dir):
    from tuner.metrics import StepMetrics
    from tuner.recipe import MultiTaskPromptTuningRecipe

    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=8))
    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    recipe.setup()
    before = recipe.bank.prompt("colors").clone()
    m = recipe.train_step([("colors", 0), ("pos_neg", 1), ("colors", 2)])
    assert isinstance(m, StepMetrics) and m.step == recipe.step == 1
    assert set(m.task_loss) == {"colors", "pos_neg"} and m.loss > 0 and m.tokens > 0 and m.step_time_s > 0
    assert recipe.sampler.step == 0  # the step trained the batch it was given; the sampler drew nothing
    assert not torch.equal(recipe.bank.prompt("colors"), before)


def test_a_non_empty_directory_that_holds_no_run_is_never_written_over(tmp_path, tiny_backbone_dir):
    """`claim_run_dir` used to claim any directory without a run.json: a user's report.md and
    summary.json there were overwritten and their adapters/ moved aside."""
    job = tiny_job_yaml(
        tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=8), **{"optim.max_steps": 2}
    )
    mine = tmp_path / "runs" / "mywork"
    mine.mkdir(parents=True)
    (mine / "report.md").write_text("MY REPORT")
    res = _cli_train(job, "name=mywork")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no run" in lines[0], res.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    assert (mine / "report.md").read_text() == "MY REPORT"


def test_a_diverged_loss_stops_the_run_and_exports_nothing(tmp_path, tiny_backbone_dir):
    """A finite but absurd learning rate makes the loss non-finite within a few steps. The run used to
    finish with rc 0 and publish NaN adapters (that eval and serving then refuse)."""
    from tuner.recipe import TrainingDiverged

    job = tiny_job_yaml(
        tmp_path,
        tiny_backbone_dir,
        write_tiny_tasks(tmp_path, n_train=16),
        **{"optim.max_steps": 50, "optim.lr": 1e38, "checkpoint_every": 1},
    )
    with pytest.raises(TrainingDiverged, match="training loss is"):
        run(load_job_config(job, ["cluster.num_workers=1"]))
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "adapters").exists()
    for state in run_dir.glob("checkpoints/step_*/state.json"):  # every checkpoint kept is finite
        assert all(math.isfinite(h["loss"]) for h in json.loads(state.read_text())["history"]["steps"])


def test_a_backbone_stored_as_a_pickle_is_never_unpickled(tmp_path):
    """Safetensors only: a checkpoint directory with pytorch_model.bin used to load through torch.load."""
    from conftest import tiny_llama

    from tuner.model.backbone import load_backbone

    model, path = tiny_llama(), tmp_path / "pickled"
    model.save_pretrained(path)  # then its weights as a pickle instead, as an older checkpoint has them
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(str(tmp_path / "pickled"))


def test_a_task_without_an_eval_split_trains_and_exports(tmp_path, tiny_backbone_dir):
    """A task with no eval file has no scores: the run still finishes, its summary records `{}` and its
    adapter carries no score (the evaluation's `None`, not a crash at export)."""
    tasks = write_tiny_tasks(tmp_path, n_train=8)
    spec = tasks[0].read_text()
    tasks[0].write_text(re.sub(r", eval: \w+_eval\.jsonl", "", spec))
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **{"optim.max_steps": 2, "eval_zero_shot": True})
    summary = run(load_job_config(job, ["cluster.num_workers=1"]))
    assert summary.tasks["pos_neg"].tuned is None and summary.tasks["colors"].tuned is not None
    meta = json.loads(
        (tmp_path / "runs" / summary.name / "adapters" / "pos_neg" / "promptfleet_task.json").read_text()
    )
    assert meta["score"] is None
    written = json.loads((tmp_path / "runs" / summary.name / "summary.json").read_text())
    assert written["tasks"]["pos_neg"]["tuned"] == {} and written["tasks"]["pos_neg"]["zero_shot"] == {}
