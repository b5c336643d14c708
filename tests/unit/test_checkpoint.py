"""Checkpoints: round trip of bank + optimiser + sampler + RNG; partial saves are never loaded."""

import json

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


# ------------------------------------------------------------------------------------ deltas


def _train(bank, opt, sampler, steps):
    """`steps` sparse Adam steps on the rows the sampler draws (what a recipe step changes)."""
    for _ in range(steps):
        names = sorted({t for t, _ in sampler.next_batch()})
        rows = bank.rows_of(names)
        bank.scatter_(rows, opt.step(names, bank.weight[rows], torch.randn(len(names), 2, 3)))


def _fleet(n=50):
    names = [f"t{i}" for i in range(n)]
    bank = PromptBank(names, 2, 3)
    bank.weight.normal_()
    return bank, SparseRowAdam(lr=0.1), MultiTaskSampler(dict.fromkeys(names, 4), 3, seed=2)


def _loaded(path, n=50):
    bank, opt, sampler = _fleet(n)
    state = ckpt.load_checkpoint(path, bank=bank, optimizer=opt, sampler=sampler)
    return state, bank, opt, sampler


def _assert_same(a, b):
    (state_a, bank_a, opt_a, sampler_a), (state_b, bank_b, opt_b, sampler_b) = a, b
    assert torch.equal(bank_a.weight, bank_b.weight)
    assert {n: s["step"] for n, s in opt_a.state.items()} == {n: s["step"] for n, s in opt_b.state.items()}
    for n, s in opt_a.state.items():
        assert torch.equal(s["exp_avg"], opt_b.state[n]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], opt_b.state[n]["exp_avg_sq"])
    assert sampler_a.state_dict()["cursor"] == sampler_b.state_dict()["cursor"]
    assert sampler_a.next_batch() == sampler_b.next_batch()
    assert state_a.history == state_b.history and state_a.step == state_b.step


def test_a_chain_of_deltas_loads_as_the_full_snapshot_of_the_same_moment(tmp_path):
    """Full at step 1, deltas at 2..4: loading step 4 gives bit for bit what a full snapshot at 4 holds,
    and each delta holds only the rows its steps touched."""
    torch.manual_seed(0)
    bank, opt, sampler = _fleet()
    _train(bank, opt, sampler, 1)
    history = {"steps": [1], "zero_shot": {f"t{i}": 0.5 for i in range(50)}}
    for step in (1, 2, 3, 4):
        if step > 1:
            _train(bank, opt, sampler, 1)
            history = {**history, "steps": [*history["steps"], step]}
        path = ckpt.save_checkpoint(
            tmp_path / "chain", step, bank=bank, optimizer=opt, sampler=sampler, history=history,
            keep_last=10, full_every=5,
        )  # fmt: skip
        assert ckpt.is_full(path) == (step == 1)
    raw = json.loads((path / "state.json").read_text())
    assert 1 <= len(raw["task_names"]) <= 3 and len(raw["adam_steps"]) == len(raw["task_names"])
    assert "zero_shot" not in raw["history"]  # unchanged since the parent: not written again
    full = ckpt.save_checkpoint(
        tmp_path / "full", 4, bank=bank, optimizer=opt, sampler=sampler, history=history, final=True
    )
    assert ckpt.is_full(full)
    from safetensors.torch import load_file

    delta_keys, full_keys = (set(load_file(str(p / "tensors.safetensors"))) for p in (path, full))
    assert len([k for k in delta_keys if k.startswith("adam.")]) == 2 * len(raw["task_names"])
    assert len([k for k in full_keys if k.startswith("adam.")]) == 2 * len(opt.state)
    assert load_file(str(path / "tensors.safetensors"))["bank"].shape[0] == len(raw["task_names"])
    _assert_same(_loaded(path), _loaded(full))


def test_resuming_from_a_delta_extends_its_chain_and_every_kth_is_full(tmp_path):
    torch.manual_seed(1)
    bank, opt, sampler = _fleet()
    kinds = []
    for step in range(1, 8):
        _train(bank, opt, sampler, 1)
        path = ckpt.save_checkpoint(
            tmp_path, step, bank=bank, optimizer=opt, sampler=sampler, history=[], keep_last=0, full_every=3
        )
        kinds.append(ckpt.is_full(path))
    assert kinds == [True, False, False, True, False, False, True]
    # a new process resumes from step 5 (a delta) and goes on: its next checkpoint is a delta of 5
    _, bank2, opt2, sampler2 = _loaded(tmp_path / "step_00000005")
    torch.manual_seed(2)
    _train(bank2, opt2, sampler2, 1)
    path = ckpt.save_checkpoint(
        tmp_path, 6, bank=bank2, optimizer=opt2, sampler=sampler2, history=[], keep_last=0, full_every=3
    )
    assert not ckpt.is_full(path)
    _, bank3, opt3, sampler3 = _loaded(tmp_path / "step_00000005")  # the same again, not saved
    torch.manual_seed(2)
    _train(bank3, opt3, sampler3, 1)
    state, bank6, opt6, sampler6 = _loaded(path)
    _assert_same((state, bank6, opt6, sampler6), (state, bank3, opt3, sampler3))


def test_pruning_keeps_the_full_snapshot_a_kept_delta_needs(tmp_path):
    bank, opt, sampler = _fleet()
    for step in range(1, 5):
        _train(bank, opt, sampler, 1)
        ckpt.save_checkpoint(
            tmp_path, step, bank=bank, optimizer=opt, sampler=sampler, history=[], keep_last=2, full_every=10
        )
    # 3 and 4 are kept; 4 is a delta of 3, 3 of 2, 2 of 1 (the full snapshot): all stay
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    for step in range(5, 13):  # step 11 is the next full snapshot; 12 a delta of it
        _train(bank, opt, sampler, 1)
        ckpt.save_checkpoint(
            tmp_path, step, bank=bank, optimizer=opt, sampler=sampler, history=[], keep_last=2, full_every=10
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000011", "step_00000012"]
    _loaded(tmp_path / "step_00000012")  # loads


def test_a_delta_copied_away_finds_its_base_and_a_replaced_base_is_refused(tmp_path):
    """Ray Train copies the reported directory alone: the delta reads its parent where it was written."""
    import shutil

    import pytest

    bank, opt, sampler = _fleet()
    for step in (1, 2):
        _train(bank, opt, sampler, 1)
        path = ckpt.save_checkpoint(
            tmp_path / "run", step, bank=bank, optimizer=opt, sampler=sampler, history=[], full_every=4
        )
    copy = tmp_path / "ray" / "checkpoint_000001"
    shutil.copytree(path, copy)
    _assert_same(_loaded(copy), _loaded(path))
    other_bank, other_opt, other_sampler = _fleet()  # another chain writes a full step 1 in its place
    ckpt.save_checkpoint(
        tmp_path / "run", 1, bank=other_bank, optimizer=other_opt, sampler=other_sampler, history=[]
    )
    with pytest.raises(
        ValueError, match="is damaged .*delta of step_00000001, which is missing or was replaced"
    ):
        _loaded(path)
