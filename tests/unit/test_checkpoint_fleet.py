"""Delta checkpoints in the recipe, at fleet size: 10,000 registered tasks, a run killed after a delta
and resumed ends bit for bit where the uninterrupted run ends (tuner/checkpoint_chain.py)."""

import pytest
import torch
from conftest import tiny_job_yaml, write_tiny_tasks

from tuner import checkpoint as ckpt
from tuner.config import load_job_config
from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks

FLEET = [f"fleet.c{i:05d}" for i in range(10_000)]


class Killed(Exception):
    pass


def test_resume_from_a_delta_with_10000_tasks_is_bitwise_the_uninterrupted_run(tmp_path, tiny_backbone_dir):
    tasks = write_tiny_tasks(tmp_path, n_train=16, n_eval=4, names=("pos_neg", "colors", "sizes"))
    job = tiny_job_yaml(
        tmp_path,
        tiny_backbone_dir,
        tasks,
        **{"optim.max_steps": 6, "optim.batch_size": 4, "checkpoint_every": 1, "checkpoint_full_every": 3},
    )

    def recipe(name, hooks=None):
        cfg = load_job_config(job, [f"name={name}", "cluster.num_workers=1"])
        r = MultiTaskPromptTuningRecipe(cfg, hooks, progress=False, registered=FLEET)
        r.setup()
        return r

    straight = recipe("straight")
    straight.train()

    def kill_after_step_5(record, path):
        if record.step == 5:
            raise Killed

    first = recipe("killed", RecipeHooks(on_checkpoint=kill_after_step_5))
    with pytest.raises(Killed):
        first.train()
    root = tmp_path / "runs" / "killed" / "checkpoints"
    # full at 1 and 4, deltas between; the two newest are kept (4 is what 5 is a delta of)
    kept = ckpt.list_checkpoints(root)
    assert [(p.name, ckpt.is_full(p)) for p in kept] == [("step_00000004", True), ("step_00000005", False)]
    assert len(ckpt.read_state(root / "step_00000005").task_names) == 10_003
    second = recipe("killed")
    assert second.step == 5
    second.train()
    assert ckpt.is_full(root / "step_00000006")  # the final checkpoint is a full snapshot
    assert torch.equal(second.bank.weight, straight.bank.weight)
    assert second.bank.task_names == straight.bank.task_names
    a, b = straight.optimizer.state, second.optimizer.state
    assert {n: s["step"] for n, s in a.items()} == {n: s["step"] for n, s in b.items()}
    for n in a:
        assert torch.equal(a[n]["exp_avg"], b[n]["exp_avg"]) and torch.equal(
            a[n]["exp_avg_sq"], b[n]["exp_avg_sq"]
        )
    assert second.sampler.state_dict()["cursor"] == straight.sampler.state_dict()["cursor"]
