"""A 2-rank ZeRO-3 run on CPU compiles no DeepSpeed op (issue 38, observation 6).

DeepSpeed's CPU comm backend used to JIT-build its `shm_comm` op with g++ on every rank on first use
(about 2 minutes, into a torch_extensions directory shared by every environment), which a pod with a
read-only root filesystem and no compiler cannot do. `tuner.model.zero.skip_shm_comm_op` switches it off:
nothing here uses the one collective it serves. Each rank points TORCH_EXTENSIONS_DIR at an empty
directory of its own, sets up the recipe (the backbone partitioned while it loads), trains a step and
reports whether DeepSpeed's backend holds the op and what was written there.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import tiny_job_yaml, write_tiny_tasks

from bench.ranks import leave_gloo
from tuner.config import load_job_config

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, job: str, out: str) -> None:
    ext = f"{out}/torch_extensions-{rank}"
    os.makedirs(ext)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        TORCH_EXTENSIONS_DIR=ext,
        DS_ACCELERATOR="cpu",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed.comm.comm

    from tuner.recipe import MultiTaskPromptTuningRecipe

    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["optim.max_steps=1"]), progress=False)
    recipe.setup()
    recipe.train()
    backend = deepspeed.comm.comm.cdb  # the comm backend DeepSpeed started (None: it never did)
    report = {
        "zero": hasattr(next(recipe.lm.backbone.parameters()), "ds_id"),
        "backend": backend is not None,
        "shm_comm_op": backend is not None and backend.shm_comm_op is not None,
        "written": sorted(str(p) for p in Path(ext).rglob("*")),
    }
    recipe.cleanup()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    leave_gloo()


def test_two_rank_zero3_builds_no_deepspeed_op(tmp_path, tiny_backbone_dir):
    tasks = write_tiny_tasks(tmp_path, n_train=16, names=("pos_neg", "colors"))
    job = tiny_job_yaml(
        tmp_path, tiny_backbone_dir, tasks, **{"checkpoint_every": 0, "cluster.zero_stage": 3}
    )
    out = tmp_path / "ranks"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(job), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        report = json.loads((out / f"rank{r}.json").read_text())
        assert report["zero"] and report["backend"], "DeepSpeed's comm backend never started"
        assert report["shm_comm_op"] is False and report["written"] == [], report
