"""SparseRowAdam touches only the tasks in the batch; the sampler is deterministic and resumable."""

import torch

from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam, lr_at
from tuner.tasks.data import MultiTaskSampler


def test_sparse_adam_matches_torch_adam_per_task():
    torch.manual_seed(0)
    init = torch.randn(2, 3, 4)
    ref = [torch.nn.Parameter(init[i].clone()) for i in range(2)]
    ref_opt = [torch.optim.Adam([p], lr=0.1) for p in ref]
    ours = SparseRowAdam(lr=0.1)
    values = {"a": init[0].clone(), "b": init[1].clone()}
    # Task a is in every step, task b only in steps 0 and 3: b's Adam must behave as if trained alone.
    for step in range(5):
        names = ["a", "b"] if step in (0, 3) else ["a"]
        grads = torch.randn(len(names), 3, 4)
        new = ours.step(names, torch.stack([values[n] for n in names]), grads)
        for i, n in enumerate(names):
            values[n] = new[i]
            k = "ab".index(n)
            ref[k].grad = grads[i].clone()
            ref_opt[k].step()
    torch.testing.assert_close(values["a"], ref[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values["b"], ref[1].detach(), rtol=1e-5, atol=1e-5)
    assert ours.state["b"]["step"] == 2


def test_step_touches_only_present_rows():
    bank = PromptBank([f"t{i}" for i in range(1000)], 2, 3)
    bank.weight.normal_()
    before = bank.weight.clone()
    opt = SparseRowAdam(lr=0.1)
    rows = bank.rows_of(["t5", "t900"])
    values = bank.gather(rows)
    (values**2).sum().backward()
    bank.scatter_(rows, opt.step(["t5", "t900"], values.detach(), values.grad))
    changed = (bank.weight != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [5, 900]
    assert set(opt.state) == {"t5", "t900"}  # optimiser state only for tasks that trained


def test_per_task_grad_clipping_is_independent():
    opt = SparseRowAdam(lr=1.0, grad_clip=1.0)
    g = torch.zeros(2, 1, 2)
    g[0, 0, 0] = 100.0  # an outlier task
    g[1, 0, 0] = 0.5
    opt.step(["x", "y"], torch.zeros(2, 1, 2), g)
    assert torch.isclose(opt.state["x"]["exp_avg"][0, 0], torch.tensor(0.1))  # clipped to norm 1
    assert torch.isclose(opt.state["y"]["exp_avg"][0, 0], torch.tensor(0.05))  # untouched by x's clip


def test_lr_schedule_shapes():
    assert lr_at(0, 1.0, 4, 100, "cosine") == 0.25
    assert lr_at(4, 1.0, 4, 100, "cosine") == 1.0
    assert abs(lr_at(100, 1.0, 4, 100, "cosine") - 0.1) < 1e-9
    assert lr_at(52, 1.0, 4, 100, "linear") == 0.5


def test_sampler_resume_draws_the_same_batches():
    sizes = {"a": 5, "b": 50, "c": 500}
    s1 = MultiTaskSampler(sizes, 16, "temperature", 2.0, seed=3)
    for _ in range(7):
        s1.next_batch()
    state = s1.state_dict()
    expected = [s1.next_batch() for _ in range(5)]
    s2 = MultiTaskSampler(sizes, 16, "temperature", 2.0, seed=3)
    s2.load_state_dict(state)
    assert [s2.next_batch() for _ in range(5)] == expected


def test_sampler_mixing_and_epochs():
    sizes = {"small": 10, "big": 1000}
    uni = MultiTaskSampler(sizes, 2000, "uniform", seed=0).next_batch()
    prop = MultiTaskSampler(sizes, 2000, "proportional", seed=0).next_batch()
    frac = lambda b: sum(t == "small" for t, _ in b) / len(b)  # noqa: E731
    assert 0.4 < frac(uni) < 0.6 and frac(prop) < 0.03
    # every example of a task is seen once per epoch
    s = MultiTaskSampler({"only": 10}, 10, seed=0)
    assert sorted(i for _, i in s.next_batch()) == list(range(10))
