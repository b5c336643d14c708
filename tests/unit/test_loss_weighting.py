"""`optim.loss_weighting`: what a task's loss in a step averages, checked against a direct computation.

token (the default): the mean over all of the task's target tokens in the step (PEFT's and Hugging
Face's causal-LM loss); example: the mean over the task's examples of each one's mean target-token NLL.
The reference is a plain forward of the backbone per example, prompt embeddings in front.
"""

import pytest
import torch
from conftest import tiny_job_yaml, write_generation_task, write_tiny_tasks

from tuner.config import ConfigError, OptimConfig, load_job_config


@pytest.mark.parametrize("weighting", ["example", "token", None])  # None: the config's default (token)
def test_a_tasks_gradient_is_its_weighted_mean_target_nll(tmp_path, tiny_backbone_dir, weighting):
    from tuner.recipe import MultiTaskPromptTuningRecipe

    tasks = [write_generation_task(tmp_path), *write_tiny_tasks(tmp_path, n_train=16, names=("pos_neg",))]
    job = tiny_job_yaml(
        tmp_path,
        tiny_backbone_dir,
        tasks,
        **{"optim.batch_size": 6, "optim.grad_clip": 0.0},
        **({"optim.loss_weighting": weighting} if weighting else {}),
    )
    weighting = weighting or "token"
    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    recipe.setup()
    try:
        draw = [("echo", 0), ("pos_neg", 1), ("echo", 3), ("echo", 5), ("pos_neg", 2), ("echo", 4)]
        examples = [recipe.tasks["echo"].train[i] for t, i in draw if t == "echo"]
        assert len({len(ex.target_ids) for ex in examples}) == 4  # targets of four lengths
        before = recipe.bank.prompt("echo").clone()
        seen = {}
        step = recipe.optimizer.step

        def spy(names, values, grad, *args, **kwargs):
            seen.update(zip(names, grad.clone()))
            return step(names, values, grad, *args, **kwargs)

        recipe.optimizer.step = spy
        recipe.train_step(draw)

        lm = recipe.lm
        prompt = before.clone().requires_grad_()
        nll = []  # per example: the NLL of each target token, from a plain forward
        for ex in examples:
            ids = torch.tensor(ex.input_ids + ex.target_ids[:-1])
            logits = lm.backbone(inputs_embeds=torch.cat([prompt, lm.embed(ids[None])[0]])[None]).logits[0]
            start = prompt.shape[0] + len(ex.input_ids) - 1
            nll.append(
                torch.nn.functional.cross_entropy(
                    logits[start : start + len(ex.target_ids)].float(),
                    torch.tensor(ex.target_ids),
                    reduction="none",
                )
            )
        if weighting == "token":
            want = torch.cat(nll).sum() / sum(len(x) for x in nll)
        else:
            want = torch.stack([x.mean() for x in nll]).mean()
        (grad,) = torch.autograd.grad(want, prompt, retain_graph=True)
        # fp32 sums in another order (packed vs one example at a time): entries of ~1e-2 differ by up to
        # ~1e-6 on some CPUs (atol 1e-7 failed on a 2-core AMD EPYC without AMX, before any other change)
        torch.testing.assert_close(seen["echo"], grad, rtol=1e-4, atol=2e-6)
        other = torch.cat(nll).sum() / sum(len(x) for x in nll) if weighting == "example" else None
        if other is not None:  # the two weightings differ on these targets
            (g2,) = torch.autograd.grad(other, prompt)
            assert not torch.allclose(g2, grad, rtol=1e-3, atol=1e-6)
    finally:
        recipe.cleanup()


def test_unknown_loss_weighting_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.loss_weighting"):
        OptimConfig(loss_weighting="sequence")
