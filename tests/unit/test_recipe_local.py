"""The recipe end to end in one process on a tiny backbone: outputs, learning, resume rules, `promptfleet eval`."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_job_yaml, write_tiny_tasks

from tuner.config import ConfigError, load_job_config
from tuner.recipe import run


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
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    evals = [h for h in state["history"] if "eval" in h]
    assert [h["step"] for h in evals] == [15]  # periodic eval (the final one is added by finish())


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
    out = json.loads(res.stdout[res.stdout.index("{") :])
    for name, task in summary["tasks"].items():
        assert out["tasks"][name]["tuned"]["accuracy"] == pytest.approx(task["tuned"]["accuracy"])


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

        recipe.optimizer.step = capture
        recipe.sampler = type("Replay", (), {"next_batch": lambda self: draw})()
        recipe._train_step()
        return seen["pos_neg"]

    alone = gradient_of_pos_neg([("pos_neg", i) for i in range(3)])
    mixed = gradient_of_pos_neg(
        [("colors", 0), ("pos_neg", 0), ("colors", 1), ("pos_neg", 1), ("pos_neg", 2)]
    )
    assert alone.abs().sum() > 0
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-7)
