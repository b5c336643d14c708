"""bench.quality --resume: a seed stopped part-way keeps its finished learning-rate runs
(`bench.quality_stages`) and, resumed, records exactly what an uninterrupted seed records.

The end-to-end check runs the benchmark's own `SeedBench.run` on the tiny backbone and tasks; the
"kill" is an exception raised when the last run of ulpt's grid starts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import write_tiny_tasks

import bench.quality as quality
import bench.quality_peft as quality_peft
from bench.quality import parse_args, setup_of
from bench.quality_stages import Stages

TASKS = ["pos_neg", "colors"]


def test_stages_keep_runs_of_one_setup_and_refuse_another(tmp_path):
    folder, setup = tmp_path / "seed0", {"steps": 3, "peft_lr_grid": [0.01, 0.3]}
    stages = Stages(folder, setup, resume=False)
    prompts = {"a": torch.randn(4, 8), "b": torch.randn(4, 8, dtype=torch.float64)}
    assert stages.get("peft", 0.01, ["a", "b"]) is None
    stages.put("peft", 0.01, prompts)
    assert not list(folder.glob(".*"))  # written under a temp name, then renamed
    again = Stages(folder, setup, resume=True).get("peft", 0.01, ["a", "b"])
    assert all(torch.equal(again[t], prompts[t]) and again[t].dtype == prompts[t].dtype for t in prompts)
    with pytest.raises(ValueError, match="prompts for"):  # another task set is not mixed in
        Stages(folder, setup, resume=True).get("peft", 0.01, ["a"])
    with pytest.raises(ValueError, match="another setup"):
        Stages(folder, {**setup, "steps": 4}, resume=True)
    with pytest.raises(ValueError, match="lower-case"):  # a name is never a path
        stages.path("../x", 0.1)
    (folder / ".ulpt-lr0.1.safetensors.partial").write_bytes(b"half")  # a kill mid-write: ignored
    assert Stages(folder, setup, resume=True).get("ulpt", 0.1, ["a", "b"]) is None
    assert Stages(folder, setup, resume=False).get("peft", 0.01, ["a", "b"]) is None  # afresh: emptied
    stages.done()
    assert not folder.exists()


def test_parse_args_resume():
    assert parse_args(["--resume", "--add"])[0].resume and not parse_args([])[0].resume


def test_a_resumed_seed_records_what_an_uninterrupted_seed_records(tmp_path, tiny_backbone_dir, monkeypatch):
    from bench.common import bench_config

    write_tiny_tasks(tmp_path, n_train=40, names=tuple(TASKS))

    def tiny_config(name, **kw):
        cfg = bench_config(name, **{**kw, "max_seq_len": 64})
        cfg.model.name = str(tiny_backbone_dir)
        cfg.prompt.num_virtual_tokens, cfg.prompt.rank = 4, 2
        return cfg

    monkeypatch.setattr(quality, "bench_config", tiny_config)
    monkeypatch.setattr(quality, "TASK_DIR", tmp_path)
    argv = ["--tasks", ",".join(TASKS), "--methods", "ulpt", "--peft-lr-grid", "0.01,0.3"]
    args = parse_args([*argv, "--heldout-examples", "4", "--lr-grid", "0.01,0.3"])[0]
    setup = setup_of(args, TASKS, ["ulpt"], 3, 8)

    def seed_run(folder, resume: bool):
        return quality.SeedBench(args, 0, TASKS, 3, 8, Stages(folder, setup, resume)).run(["ulpt"])[0]

    whole = seed_run(tmp_path / "whole", resume=False)

    trained = []
    real_train = quality.SeedBench.train

    def killed_at_the_last_rate(self, tasks, draws, method, tag, **how):
        trained.append(tag)
        if tag == "ulpt-lr0.3":
            raise KeyboardInterrupt("killed")
        return real_train(self, tasks, draws, method, tag, **how)

    monkeypatch.setattr(quality.SeedBench, "train", killed_at_the_last_rate)
    with pytest.raises(KeyboardInterrupt):
        seed_run(tmp_path / "parts", resume=False)
    kept = sorted(p.name for p in (tmp_path / "parts").glob("*.safetensors"))
    assert kept == ["peft-lr0.01.safetensors", "peft-lr0.3.safetensors", "ulpt-lr0.01.safetensors"]

    trained.clear()
    peft_runs = []
    real_peft = quality_peft.PeftPromptTuning
    monkeypatch.setattr(
        quality_peft, "PeftPromptTuning", lambda *a, **k: peft_runs.append(k) or real_peft(*a, **k)
    )
    monkeypatch.setattr(
        quality.SeedBench, "train", lambda self, *a, **k: trained.append(a[3]) or real_train(self, *a, **k)
    )
    resumed = seed_run(tmp_path / "parts", resume=True)
    assert trained == ["ulpt-lr0.3"] and peft_runs == []  # only the run that had not finished
    assert dataclasses.asdict(resumed) == dataclasses.asdict(whole)
