"""Prompt methods (tuner/prompts/methods.py): mixed-batch equivalence, composition against a direct
computation (ULPT's and SuperPos's fixed parts regenerated from the seed here), initialisation, and
per-task state."""

import math

import pytest
import torch
from conftest import tiny_llama

from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompts.bank import PromptBank
from tuner.prompts.methods import (
    Multitask,
    Residual,
    SharedParams,
    Superpos,
    Ulpt,
    make_layout,
    prompt_of,
    state_per_task,
)
from tuner.prompts.optim import SparseRowAdam
from tuner.tasks.batching import TokenizedExample, collate

P, H = 4, 32
METHODS = ["independent", "residual", "multitask", "ulpt", "superpos"]


def _layout(method):
    return make_layout(method, P, H, rank=2, bottleneck=8, superpos_tokens=8)


def _params(layout, names=("a", "b", "c"), seed=1):
    """Rows and a shared vector far from their initialisation (so every part of `compose` matters)."""
    g = torch.Generator().manual_seed(seed)
    bank = PromptBank(list(names), *layout.row_shape)
    bank.weight.normal_(0.0, 0.5, generator=g)
    shared = None
    if layout.shared_size:
        shared = torch.randn(layout.shared_size, generator=g) * 0.5
    if isinstance(layout, Multitask):
        bank.weight.add_(1.0)  # modulation around 1, as after its initialisation
    return bank, shared


def _examples():
    g = torch.Generator().manual_seed(0)
    spec = [("a", 5, 1), ("b", 9, 2), ("a", 3, 1), ("c", 12, 3), ("b", 4, 1), ("c", 7, 1), ("a", 20, 2)]
    return [
        TokenizedExample(
            t,
            torch.randint(3, 128, (n,), generator=g).tolist(),
            torch.randint(3, 128, (k,), generator=g).tolist(),
        )
        for t, n, k in spec
    ]


def _run(lm, layout, bank, shared, examples, packing, share=False):
    """The recipe's step path: gather the batch's rows, compose, forward, backward."""
    tasks = sorted({e.task for e in examples})
    batch = collate(
        examples,
        {t: i for i, t in enumerate(tasks)},
        P,
        max_len=64,
        pad_id=0,
        packing=packing,
        share_prompts=share,
    )
    rows = bank.gather(bank.rows_of(tasks))
    sh = None if shared is None else shared.clone().requires_grad_(True)
    out = lm(batch, layout.compose(rows, sh))
    out.loss.backward()
    grads = {t: rows.grad[i] for i, t in enumerate(tasks)}
    return out, grads, None if sh is None else sh.grad


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_task_alone(method, share, one_thread):
    """A task's loss and its own rows' gradient in a mixed packed batch equal those of its examples
    alone; the shared part's gradient equals the sum of the tasks' gradients computed alone."""
    lm = PromptTunedLM(tiny_llama())
    layout = _layout(method)
    bank, shared = _params(layout)
    examples = _examples()
    mixed, mixed_grad, mixed_shared = _run(lm, layout, bank, shared, examples, packing=True, share=share)
    shared_sum = None if shared is None else torch.zeros_like(shared)
    for task in "abc":
        idx = [i for i, e in enumerate(examples) if e.task == task]
        alone, grad, shared_grad = _run(lm, layout, bank, shared, [examples[i] for i in idx], packing=False)
        torch.testing.assert_close(mixed.seg_loss[idx], alone.seg_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed_grad[task], grad[task], rtol=1e-4, atol=1e-6)
        if shared is not None:
            assert shared_grad.abs().sum() > 0
            shared_sum += shared_grad
    if shared is not None:
        torch.testing.assert_close(mixed_shared, shared_sum, rtol=1e-4, atol=1e-6)


def test_compose_matches_the_formulas_written_out():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, P, H, generator=g)
    res = Residual(P, H, 8)
    shared = torch.randn(res.shared_size, generator=g)
    p = res.unflatten(shared)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(H, 8), torch.nn.ReLU(), torch.nn.Linear(8, H), torch.nn.LayerNorm(H)
    )
    with torch.no_grad():
        mlp[0].weight.copy_(p["w_down"]), mlp[0].bias.copy_(p["b_down"])
        mlp[2].weight.copy_(p["w_up"]), mlp[2].bias.copy_(p["b_up"])
        mlp[3].weight.copy_(p["ln_weight"]), mlp[3].bias.copy_(p["ln_bias"])
        torch.testing.assert_close(res.compose(rows, shared), rows + mlp(rows))

    mt = Multitask(P, H, 2)
    flat = torch.randn(3, *mt.row_shape, generator=g)
    shared = torch.randn(mt.shared_size, generator=g)
    for k in range(3):
        u, v = flat[k, 0, : P * 2].view(P, 2), flat[k, 0, P * 2 :].view(2, H)
        torch.testing.assert_close(mt.compose(flat, shared)[k], shared.view(P, H) * (u @ v))


@pytest.mark.parametrize("method", ["residual", "multitask"])
def test_initial_prompt_is_the_configured_initialisation(method):
    """Training starts from the configured init: residual from each E_k, multitask from the shared prompt."""
    layout = _layout(method)
    names = ["a", "b"]
    bank = PromptBank(names, *layout.row_shape)
    init = {"a": torch.randn(P, H), "b": torch.randn(P, H), "shared": torch.randn(P, H)}

    def fill(b):
        for n in b.task_names:
            b.set_prompt(n, init[n])

    shared = layout.initialise(bank, fill, torch.Generator().manual_seed(0))

    sp = SharedParams(shared, SparseRowAdam(0.1))
    for n in names:
        want = init[n] if method == "residual" else init["shared"]
        # multitask: u v^T = 1 up to the symmetry-breaking noise
        tol = {"rtol": 0, "atol": 0} if method == "residual" else {"rtol": 0.1, "atol": 0.05}
        torch.testing.assert_close(prompt_of(layout, bank, sp, n), want, **tol)


def _regenerated_projection(seed, r, hidden):
    """ULPT's R [r, H], drawn here as the method documents: N(0, 1/r) from a generator seeded by `seed`."""
    return torch.randn(r * hidden, generator=torch.Generator().manual_seed(seed)).view(r, hidden) / math.sqrt(
        r
    )


def _regenerated_sample(seed, table, m, limit):
    """SuperPos's S [m, H]: m distinct ids of the first `limit`, a permutation seeded by `seed`."""
    ids = torch.randperm(limit, generator=torch.Generator().manual_seed(seed))[:m]
    assert len(set(ids.tolist())) == m
    return table[ids]


def _fill_with(prompts):
    def fill(b):
        for n in b.task_names:
            b.set_prompt(n, prompts[n])

    return fill


def test_ulpt_composes_as_written_out_with_the_projection_regenerated_from_the_seed():
    """P_k = (Z_k R) * s_k + b_k, token by token, with R regenerated from the seed: the fixed part the
    layout drew is that R, and the composition (after moving every part off its start) matches."""
    r, seed = 3, 7
    layout = Ulpt(P, H, r)
    bank = PromptBank(["a", "b", "c"], *layout.row_shape)
    g = torch.Generator().manual_seed(1)
    init = {n: torch.randn(P, H, generator=g) for n in "abc"}
    shared = layout.initialise(bank, _fill_with(init), torch.Generator().manual_seed(seed))
    R = _regenerated_projection(seed, r, H)
    torch.testing.assert_close(shared.view(r, H), R, rtol=0, atol=0)
    bank.weight.add_(torch.randn(bank.weight.shape, generator=g) * 0.3)  # every part moved
    composed = layout.compose(bank.weight, shared)
    for k in range(3):
        flat = bank.weight[k, 0]
        Z = flat[: P * r].view(P, r)
        s, b = flat[P * r : P * r + H], flat[P * r + H :]
        for i in range(P):
            lifted = sum(Z[i, j] * R[j] for j in range(r))
            torch.testing.assert_close(composed[k, i], lifted * s + b, rtol=1e-5, atol=1e-6)


def test_superpos_composes_as_written_out_with_the_sample_regenerated_from_the_seed():
    m, seed = 6, 3
    emb = torch.nn.Embedding(40, H)
    layout = Superpos(P, H, m, vocab_limit=30)
    bank = PromptBank(["a", "b"], *layout.row_shape)
    g = torch.Generator().manual_seed(2)
    init = {n: torch.randn(P, H, generator=g) for n in "ab"}
    shared = layout.initialise(bank, _fill_with(init), torch.Generator().manual_seed(seed), embed=emb)
    S = _regenerated_sample(seed, emb.weight.detach(), m, 30)
    torch.testing.assert_close(shared.view(m, H), S, rtol=0, atol=0)
    bank.weight.add_(torch.randn(bank.weight.shape, generator=g))
    composed = layout.compose(bank.weight, shared)
    for k in range(2):
        for i in range(P):
            mix = sum(bank.weight[k, i, j] * S[j] for j in range(m))
            torch.testing.assert_close(composed[k, i], mix, rtol=1e-5, atol=1e-6)


def test_ulpt_and_superpos_start_from_the_configured_prompt_where_their_layout_can_hold_it():
    """A configured initial prompt the layout can express exactly (b + Z R for ULPT, W S for SuperPos) is
    the composed start; ULPT's shift starts at the prompt's token mean and its scale at 1."""
    r, m = 2, 5
    ulpt = Ulpt(P, H, r)
    R = _regenerated_projection(0, r, H)
    g = torch.Generator().manual_seed(3)
    b0 = torch.randn(H, generator=g)
    z0 = torch.randn(P, r, generator=g)
    z0 -= z0.mean(0)  # so b0 is the prompt's token mean
    want = {"a": z0 @ R + b0}
    bank = PromptBank(["a"], *ulpt.row_shape)
    shared = ulpt.initialise(bank, _fill_with(want), torch.Generator().manual_seed(0))
    torch.testing.assert_close(ulpt.compose(bank.weight, shared)[0], want["a"], rtol=1e-4, atol=1e-5)
    _, s, b = ulpt.split(bank.weight)
    torch.testing.assert_close(b[0], want["a"].mean(0))
    torch.testing.assert_close(s[0], torch.ones(H))

    emb = torch.nn.Embedding(20, H)
    sp = Superpos(P, H, m, vocab_limit=20)
    S = _regenerated_sample(0, emb.weight.detach(), m, 20)
    want = {"a": torch.randn(P, m, generator=g) @ S}
    bank = PromptBank(["a"], *sp.row_shape)
    shared = sp.initialise(bank, _fill_with(want), torch.Generator().manual_seed(0), embed=emb)
    torch.testing.assert_close(sp.compose(bank.weight, shared)[0], want["a"], rtol=1e-4, atol=1e-5)


def test_ulpt_per_task_state_is_under_a_fifth_of_a_free_prompts_at_the_default_rank():
    """Issue 39's target at SmolLM2's shape (20 virtual tokens x 576): parameters + Adam moments."""
    free = state_per_task(make_layout("independent", 20, 576))
    ulpt = make_layout("ulpt", 20, 576)  # rank 0: the method's default
    assert ulpt.r == 32 and state_per_task(ulpt) == 3 * (20 * 32 + 2 * 576)
    assert state_per_task(ulpt) <= free / 5
    assert state_per_task(make_layout("superpos", 20, 576)) == 3 * 20 * 128
