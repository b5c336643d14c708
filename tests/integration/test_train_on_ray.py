"""The full path: `promptfleet train` -> embedded Ray -> 2 Ray Train workers -> DeepSpeed ZeRO-3 on the real
SmolLM2 backbone and the real shared data -> per-task PEFT adapters that load in `peft.PeftModel`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_runs")
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "train",
        "configs/quickstart.yaml",
        "name=ci",
        f"output_dir={out}",
        "optim.max_steps=2",
        "optim.batch_size=8",
        "data.max_train_examples=64",
        "data.max_eval_examples=8",
        "checkpoint_every=1",
        "cluster.zero_stage=3",  # the sharded path (auto would replicate a backbone this small)
    ]
    # The embedded Ray inherits this environment: Ray Train's controller polls its workers every 0.5 s
    # (default 2 s), so the run's start and end are noticed sooner (as on `tests/distributed/local_ray.py`).
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "ci"


def test_outputs_are_complete(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert set(summary["tasks"]) == {"sst2", "ag_news", "trec"}
    for t in summary["tasks"].values():
        assert t["zero_shot"]["n"] == 8 and t["tuned"]["n"] == 8
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "| sst2 | accuracy |" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_adapters_load_in_peft_with_equal_logits(run_dir):
    from peft import PeftModel

    from tuner.export import load_adapter
    from tuner.model.backbone import load_backbone, load_tokenizer
    from tuner.model.model_cache import resolve_backbone
    from tuner.model.prompt_lm import PromptTunedLM

    path = resolve_backbone("smollm2-135m")
    tok = load_tokenizer(path)
    ids = tok("Review: a charming and often affecting journey\nSentiment:").input_ids
    lm = PromptTunedLM(load_backbone(path, torch.float32))
    for task in ("sst2", "ag_news", "trec"):
        adapter = load_adapter(run_dir / "adapters" / task)
        assert adapter.prompt.shape == (16, 576) and adapter.backbone == "smollm2-135m"
        from tuner.tasks.batching import TokenizedExample, collate

        batch = collate(
            [TokenizedExample(task, ids, [0])], {task: 0}, 16, max_len=256, pad_id=tok.pad_token_id
        )
        with torch.no_grad():
            ours = lm.lm_head(lm.hidden_states(batch, adapter.prompt[None])[0, 16 : 16 + len(ids)])
            peft_model = PeftModel.from_pretrained(
                load_backbone(path, torch.float32), str(run_dir / "adapters" / task)
            )
            theirs = peft_model(input_ids=torch.tensor([ids])).logits[0, 16:]
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
