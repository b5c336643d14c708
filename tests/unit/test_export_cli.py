"""`promptfleet export` and the run's export format: a packed run's task written as a PEFT adapter
loads with `peft.PeftModel.from_pretrained` and gives our wrapper's logits; either store format
converts to the other; continual training reads a packed source; mistakes are one line, exit 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_job_yaml, tiny_llama, write_tiny_tasks
from test_export_peft import our_logits, peft_logits

from cluster.cli import main
from cluster.launch import train_local
from tuner.config import ConfigError, JobConfig, load_job_config
from tuner.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TASK_META,
    TaskAdapter,
    TaskMeta,
    load_adapter,
    save_adapter,
)
from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompt_store import PackedIndex, is_packed_store, write_packed_store
from tuner.run_adapters import AUTO_PACKED_TASKS, AdapterStore, use_packed


def _store(root, names, packed=True, seed=0):
    backbone = tiny_llama()
    g = torch.Generator().manual_seed(seed)
    adapters = [
        TaskAdapter(
            n,
            torch.randn(5, 32, generator=g),
            "tiny",
            TaskMeta(kind="classification", verbaliser={"0": " a"}),
        )
        for n in names
    ]
    if packed:
        write_packed_store(root, adapters, backbone.config)
    else:
        for a in adapters:
            save_adapter(root, a, backbone.config)
    return {a.name: a for a in adapters}


def test_a_packed_task_exported_for_peft_gives_our_logits(tmp_path, capsys):
    store = tmp_path / "run" / "adapters"
    written = _store(store, ["t0", "fam.1", "t2"])
    out = tmp_path / "peft" / "fam.1"
    assert main(["export", str(tmp_path / "run"), "--task", "fam.1", "--peft", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META]
    prompt = PackedIndex.open(store).read_prompt("fam.1")
    assert torch.equal(load_adapter(out, "fam.1").prompt, prompt) and torch.equal(
        prompt, written["fam.1"].prompt
    )
    assert json.loads((out / TASK_META).read_text())["verbaliser"] == {"0": " a"}
    ids = [5, 17, 33, 90, 4]
    with torch.no_grad():
        ours = our_logits(PromptTunedLM(tiny_llama()), prompt, ids)
    torch.testing.assert_close(peft_logits(tiny_llama(), out, ids), ours, rtol=1e-4, atol=1e-5)
    # from a per-task store the same command writes the same files
    _store(tmp_path / "dirs", ["t0", "fam.1"], packed=False)  # the same prompts as the packed store
    assert main(["export", str(tmp_path / "dirs"), "--task", "fam.1", "--peft", str(tmp_path / "p2")]) == 0
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META):
        assert (tmp_path / "p2" / f).read_bytes() == (out / f).read_bytes()


def test_export_mistakes_are_one_line_with_exit_2(tmp_path, capsys):
    _store(tmp_path / "s", ["a", "b", "c", "d"])
    out = tmp_path / "out"

    def error(*argv):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "no task zz in" in error(str(tmp_path / "s"), "--task", "zz", "--peft", str(out))
    assert "it has 4 tasks (a, b, c, ...)" in error(str(tmp_path / "s"), "--task", "zz", "--peft", str(out))
    assert "'zz\\u200b'" in error(str(tmp_path / "s"), "--task", "zz\u200b", "--peft", str(out))
    assert "--peft needs --task" in error(str(tmp_path / "s"), "--peft", str(out))
    assert "not a directory" in error(str(tmp_path / "nope"), "--task", "a", "--peft", str(out))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "is not empty" in error(str(tmp_path / "s"), "--task", "a", "--peft", str(out))
    assert main(["export", str(tmp_path / "s"), "--task", "a", "--peft", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / ADAPTER_WEIGHTS).is_file()
    assert "is the store being read" in error(str(tmp_path / "s"), "--packed", str(tmp_path / "s"))
    assert main(["export", str(tmp_path / "s"), "--packed", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    assert "is a packed prompt store" in error(str(tmp_path / "s"), "--dirs", str(tmp_path / "s2"))


def test_either_store_converts_to_the_other(tmp_path):
    written = _store(tmp_path / "dirs", ["a", "b", "c"], packed=False)
    assert main(["export", str(tmp_path / "dirs"), "--packed", str(tmp_path / "packed")]) == 0
    assert main(["export", str(tmp_path / "packed"), "--dirs", str(tmp_path / "back")]) == 0
    packed, back = AdapterStore(tmp_path / "packed"), AdapterStore(tmp_path / "back")
    assert packed.index is not None and back.index is None and sorted(back.names) == sorted(written)
    for name, a in written.items():
        for store in (packed, back):
            got = store.adapter(name)
            assert torch.equal(got.prompt, a.prompt) and got.meta == a.meta and got.backbone == "tiny"


def test_auto_packs_families_and_large_jobs_only():
    plain, member = SimpleNamespace(family_member=None), SimpleNamespace(family_member=object())
    assert not use_packed("auto", [plain] * AUTO_PACKED_TASKS)
    assert use_packed("auto", [plain] * (AUTO_PACKED_TASKS + 1)) and use_packed("auto", [plain, member])
    assert use_packed("packed", [plain]) and not use_packed("dirs", [plain] * 1000)
    with pytest.raises(ConfigError, match="export_format"):
        JobConfig(export_format="zip")


def test_a_packed_run_feeds_a_continual_run_that_carries_its_tasks_unchanged(tmp_path, tiny_backbone_dir):
    src_root, new_root = tmp_path / "src", tmp_path / "new"
    src_root.mkdir()
    new_root.mkdir()
    src_tasks = write_tiny_tasks(src_root, n_train=8, names=("pos_neg", "colors"))
    job = tiny_job_yaml(src_root, tiny_backbone_dir, src_tasks, export_format="packed")
    train_local(load_job_config(job, ["cluster.num_workers=1", "optim.max_steps=2"]), progress=False)
    src = src_root / "runs" / "tiny" / "adapters"
    assert is_packed_store(src) and sorted(PackedIndex.open(src).entries) == ["colors", "pos_neg"]
    job = tiny_job_yaml(
        new_root,
        tiny_backbone_dir,
        write_tiny_tasks(new_root, n_train=8, names=("sizes",)),
        export_format="packed",
        name="more",
        **{"prompt.init_from": str(src_root / "runs" / "tiny")},
    )
    summary = train_local(
        load_job_config(job, ["cluster.num_workers=1", "optim.max_steps=2"]), progress=False
    )
    assert summary["carried_tasks"] == ["colors", "pos_neg"]
    old, new = PackedIndex.open(src), PackedIndex.open(new_root / "runs" / "more" / "adapters")
    assert sorted(new.entries) == ["colors", "pos_neg", "sizes"]
    for task in ("colors", "pos_neg"):
        assert new.entries[task].version == old.entries[task].version
        assert torch.equal(new.read_prompt(task), old.read_prompt(task))
