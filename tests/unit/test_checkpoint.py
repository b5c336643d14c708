"""Checkpoints: round trip of bank + optimiser + sampler + RNG; partial saves are never loaded."""

import torch

from tuner import checkpoint as ckpt
from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam
from tuner.tasks.data import MultiTaskSampler


def _state():
    bank = PromptBank(["a", "b", "c"], 2, 3)
    bank.weight.normal_()
    opt = SparseRowAdam(lr=0.1)
    opt.step(["a", "c"], bank.weight[[0, 2]], torch.randn(2, 2, 3))
    sampler = MultiTaskSampler({"a": 4, "b": 8, "c": 16}, 4, seed=1)
    sampler.next_batch()
    return bank, opt, sampler


def test_round_trip_restores_everything(tmp_path):
    bank, opt, sampler = _state()
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 7, bank=bank, optimizer=opt, sampler=sampler, history=[{"step": 7}])
    expected_next = sampler.next_batch()
    expected_rand = torch.rand(3)

    bank2 = PromptBank(["c", "a", "b"], 2, 3)  # another row order: loading is by task name
    opt2, sampler2 = SparseRowAdam(lr=0.1), MultiTaskSampler({"a": 4, "b": 8, "c": 16}, 4, seed=1)
    state = ckpt.load_checkpoint(path, bank=bank2, optimizer=opt2, sampler=sampler2)
    assert state["step"] == 7 and state["history"] == [{"step": 7}]
    for name in "abc":
        torch.testing.assert_close(bank2.prompt(name), bank.prompt(name))
    assert set(opt2.state) == {"a", "c"} and opt2.state["a"]["step"] == 1
    torch.testing.assert_close(opt2.state["c"]["exp_avg_sq"], opt.state["c"]["exp_avg_sq"])
    assert sampler2.next_batch() == expected_next
    torch.testing.assert_close(torch.rand(3), expected_rand)


def test_partial_saves_are_ignored_and_old_ones_pruned(tmp_path):
    bank, opt, sampler = _state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path, step, bank=bank, optimizer=opt, sampler=sampler, history=[], keep_last=2
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / ".tmp-killed").mkdir()  # what a save killed mid-way leaves behind
    (tmp_path / ".tmp-killed" / "state.json").write_text("{}")
    (tmp_path / "step_00000009").mkdir()  # a directory without its files is not a checkpoint either
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    ckpt.save_checkpoint(tmp_path, 4, bank=bank, optimizer=opt, sampler=sampler, history=[], keep_last=2)
    assert not (tmp_path / ".tmp-killed").exists()  # the next save clears what a killed one left


def test_checkpoint_for_other_tasks_is_refused(tmp_path):
    bank, opt, sampler = _state()
    path = ckpt.save_checkpoint(tmp_path, 1, bank=bank, optimizer=opt, sampler=sampler, history=[])
    other = PromptBank(["a", "b", "zzz"], 2, 3)
    try:
        ckpt.load_checkpoint(path, bank=other, optimizer=SparseRowAdam(0.1), sampler=sampler)
    except ValueError as e:
        assert "other tasks" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    """A truncated tensors file used to surface as `SafetensorError: ... invalid header length`,
    naming neither the checkpoint nor the way out."""
    import pytest

    bank, opt, sampler = _state()
    path = ckpt.save_checkpoint(tmp_path, 1, bank=bank, optimizer=opt, sampler=sampler, history=[])
    with open(path / "tensors.safetensors", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match=f"checkpoint {path} is damaged .*delete that directory"):
        ckpt.load_checkpoint(path, bank=bank, optimizer=SparseRowAdam(0.1), sampler=sampler)
    (path / "state.json").write_text('{"step": ')
    with pytest.raises(ValueError, match="is damaged"):
        ckpt.read_prompt_state(path)
