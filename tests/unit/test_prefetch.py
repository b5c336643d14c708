"""`tuner.tasks.prefetch`: batches built ahead in a worker thread change nothing that is computed.

On the tiny backbone: training with batches prepared ahead gives bitwise the prompts of building
them in the step; a run killed after a checkpoint (with steps already drawn ahead) resumes to the
prompts of an uninterrupted run; a step whose micro-batches differ from those drawn ahead builds its
own; an error while preparing ahead is raised by the step that needs the batch.
"""

import pytest
import torch
from conftest import tiny_job_yaml, write_tiny_tasks

from tuner import checkpoint as ckpt
from tuner.config import load_job_config
from tuner.model import attention
from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks
from tuner.tasks.batching import TokenizedExample, collate
from tuner.tasks.data import MultiTaskSampler
from tuner.tasks.prefetch import StepBatches, draws_ahead, split_micro_batches


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tiny_tasks(tmp_path_factory.mktemp("prefetch_tasks"), n_train=24)


def _recipe(root, backbone, tasks, name, prefetch, hooks=None, **overrides):
    job = tiny_job_yaml(
        root,
        backbone,
        tasks,
        **{
            "name": name,
            "optim.max_steps": 6,
            "optim.batch_size": 8,
            "optim.grad_accum": 2,
            "data.prefetch": prefetch,
            "data.row_len": 96,
            "checkpoint_every": 2,
            **overrides,
        },
    )
    recipe = MultiTaskPromptTuningRecipe(
        load_job_config(job, ["cluster.num_workers=1"]), hooks, progress=False
    )
    recipe.setup()
    return recipe


def _train(recipe):
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe.bank.weight.detach().clone(), [m.loss for m in recipe.history.steps]


def test_prefetch_on_and_off_give_bitwise_equal_prompts(tmp_path, tiny_backbone_dir, tasks):
    off = _recipe(tmp_path, tiny_backbone_dir, tasks, "off", prefetch=0)
    on = _recipe(tmp_path, tiny_backbone_dir, tasks, "on", prefetch=2)
    weight_off, loss_off = _train(off)
    weight_on, loss_on = _train(on)
    assert (off.batches.prefetched, on.batches.prefetched) == (0, 6)  # every step's batches came ahead
    assert torch.equal(weight_on, weight_off) and loss_on == loss_off
    assert off.sampler.state_dict()["step"] == on.sampler.state_dict()["step"] == 6


def test_a_run_killed_with_steps_drawn_ahead_resumes_exactly(tmp_path, tiny_backbone_dir, tasks):
    """The worker has drawn steps 5-6 when the run dies after checkpoint 4: the checkpoint holds the
    sampler at step 4 (the last step trained), and the resumed run ends with the uninterrupted prompts."""
    whole, _ = _train(_recipe(tmp_path, tiny_backbone_dir, tasks, "whole", prefetch=2))

    def die_at_4(record, path):
        if record.step == 4:
            raise KeyboardInterrupt("killed after checkpoint 4")

    killed = _recipe(tmp_path, tiny_backbone_dir, tasks, "killed", 2, RecipeHooks(on_checkpoint=die_at_4))
    with pytest.raises(KeyboardInterrupt):
        _train(killed)
    assert ckpt.latest_checkpoint(killed.run_dir / "checkpoints").name == "step_00000004"
    resumed = _recipe(tmp_path, tiny_backbone_dir, tasks, "killed", prefetch=2)
    assert resumed.step == 4 and resumed.sampler.step == 4
    weight, _ = _train(resumed)
    assert torch.equal(weight, whole)


def test_draws_ahead_leaves_the_sampler_where_it_is():
    sampler = MultiTaskSampler({"a": 5, "b": 7}, 4, seed=2)
    ahead = draws_ahead(sampler, 3)  # from where the sampler is now, however late the worker reads it
    assert sampler.step == 0
    drawn = [sampler.next_batch() for _ in range(3)]
    assert list(ahead) == drawn


def _examples():
    g = torch.Generator().manual_seed(0)
    return {
        (t, i): TokenizedExample(t, torch.randint(3, 100, (3 + i,), generator=g).tolist(), [7])
        for t in "ab"
        for i in range(6)
    }


def _builder(examples, fail_on=None):
    def build(micro_batches):
        if fail_on is not None and fail_on in [x for mb in micro_batches for x in mb]:
            raise ValueError(f"example {fail_on} is broken")
        batches = [
            collate([examples[x] for x in mb], {"a": 0, "b": 1}, 2, max_len=32, pad_id=0)
            for mb in micro_batches
        ]
        return [attention.host_layout("sdpa", b, "cpu") for b in batches]

    return build


def test_a_step_other_than_drawn_builds_its_own_batches():
    examples = _examples()
    build = _builder(examples)
    steps = StepBatches(lambda g: split_micro_batches(g, 2), build, "cpu")
    drawn = [[("a", 0), ("b", 1), ("a", 2), ("b", 3)], [("a", 4), ("b", 5), ("a", 1), ("b", 0)]]
    steps.start(drawn, depth=1)
    first = steps.get(split_micro_batches(drawn[0], 2))
    other = [[("b", 2), ("a", 3)], [("a", 5), ("b", 4)]]  # not the step drawn ahead
    got = steps.get(other)
    steps.close()
    assert steps.prefetched == 1 and steps.steps == 2
    for batch, mb in zip(got, other):
        direct = collate([examples[x] for x in mb], {"a": 0, "b": 1}, 2, max_len=32, pad_id=0)
        assert torch.equal(batch.input_ids, direct.input_ids) and torch.equal(
            batch.target_ids, direct.target_ids
        )
    assert first[0].attn_kernel == "sdpa" and first[0].attn_plan is not None


def test_an_error_while_preparing_ahead_is_raised_by_the_step_that_needs_it():
    examples = _examples()
    steps = StepBatches(lambda g: split_micro_batches(g, 1), _builder(examples, fail_on=("b", 5)), "cpu")
    drawn = [[("a", 0), ("b", 1)], [("a", 2), ("b", 5)]]
    steps.start(drawn, depth=2)
    assert len(steps.get([drawn[0]])) == 1
    with pytest.raises(ValueError, match=r"example \('b', 5\) is broken"):
        steps.get([drawn[1]])
    steps.close()
