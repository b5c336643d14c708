"""2-process DeepSpeed ZeRO-3 (real deepspeed, gloo) trains the same prompts as 1 process.

Both runs see the same global batches (same sampler seed); the 2-rank run splits every
micro-batch across ranks and all-reduces the prompt-row gradients. Each rank must hold about
half of the backbone's parameters.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_job_yaml, write_tiny_tasks

from tuner.config import load_job_config
from tuner.export import load_adapter

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, job: str, runs: list[list[str]], out: str) -> None:
    """Train each of `runs` (override lists) in turn on this rank, in one process group."""
    import torch.distributed as dist

    from tuner.model.zero import partitioned_numel
    from tuner.recipe import MultiTaskPromptTuningRecipe

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    for i, overrides in enumerate(runs):
        recipe = MultiTaskPromptTuningRecipe(load_job_config(job, overrides), progress=False)
        recipe.setup()
        local, total = partitioned_numel(recipe.lm.backbone)
        with open(f"{out}/rank{rank}-{i}.json", "w") as f:
            json.dump(
                {
                    "local": local,
                    "total": total,
                    "zero": hasattr(next(recipe.lm.backbone.parameters()), "ds_id"),
                },
                f,
            )
        recipe.train()
        recipe.finish()
        recipe.cleanup()
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("zero3")
    tasks = write_tiny_tasks(root, n_train=48, names=("pos_neg", "colors", "sizes"))
    return root, tiny_job_yaml(
        root,
        tiny_backbone_dir,
        tasks,
        **{
            "optim.grad_accum": 2,
            "optim.max_steps": 3,
            "checkpoint_every": 0,
            "cluster.zero_stage": 3,  # auto would replicate a model this small
        },
    )


METHODS = ["independent", "residual", "multitask", "ulpt", "superpos"]


def _method(method: str) -> list[str]:
    return [f"prompt.method={method}", "prompt.rank=2", "prompt.bottleneck=8"]


def test_two_rank_zero3_equals_one_process(job):
    """For every prompt method (tuner/prompts/methods.py): shared parts are replicated and all-reduced too.
    The methods train one after another in the same two processes (one process group start)."""
    root, path = job
    out = root / "ranks"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, 2, port, str(path), [[f"name=two-{m}", *_method(m)] for m in METHODS], str(out)),
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]

    # ZeRO-3 really partitioned the backbone: each rank holds ~1/2 of it.
    ranks = [
        json.loads((out / f"rank{r}-{i}.json").read_text()) for r in range(2) for i in range(len(METHODS))
    ]
    assert all(r["zero"] for r in ranks)
    for r in ranks:
        assert 0.45 <= r["local"] / r["total"] <= 0.55, r

    from tuner.recipe import MultiTaskPromptTuningRecipe, run

    for method in METHODS:
        m = _method(method)
        run(load_job_config(path, [f"name=one-{method}", "cluster.num_workers=1", *m]), progress=False)
        initial = MultiTaskPromptTuningRecipe(
            load_job_config(path, [f"name=init-{method}", *m]), progress=False
        )
        initial.setup()  # same seed -> the prompts both runs started from
        for task in ("pos_neg", "colors", "sizes"):
            two = load_adapter(root / "runs" / f"two-{method}" / "adapters" / task).prompt
            one = load_adapter(root / "runs" / f"one-{method}" / "adapters" / task).prompt
            start = initial.prompt(task)
            assert (one - start).abs().max() > 0.05, (
                f"{method}: training did not move the prompt; the comparison would be vacuous"
            )
            torch.testing.assert_close(two, one, rtol=0, atol=1e-4, msg=f"{method} {task}")
        s_two = json.loads((root / "runs" / f"two-{method}" / "summary.json").read_text())
        s_one = json.loads((root / "runs" / f"one-{method}" / "summary.json").read_text())
        assert (s_two["world_size"], s_one["world_size"]) == (2, 1)
