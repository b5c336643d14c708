"""Mixed-task and packed batches: each task's loss and prompt gradient equal those of its examples run alone."""

import pytest
import torch
from conftest import tiny_llama

from tuner.batching import TokenizedExample, collate
from tuner.model import PromptTunedLM

P, H = 4, 32


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = [("a", 5, 1), ("b", 9, 2), ("a", 3, 1), ("c", 12, 3), ("b", 4, 1), ("c", 7, 1), ("a", 20, 2)]
    return [
        TokenizedExample(
            t,
            torch.randint(3, 128, (n,), generator=g).tolist(),
            torch.randint(3, 128, (k,), generator=g).tolist(),
        )
        for t, n, k in spec
    ]


def _run(lm, bank, examples, packing, max_len=64):
    tasks = sorted({e.task for e in examples})
    rows = {t: i for i, t in enumerate(tasks)}
    batch = collate(examples, rows, P, max_len=max_len, pad_id=0, packing=packing)
    prompts = torch.stack([bank[t] for t in tasks]).clone().requires_grad_(True)
    out = lm(batch, prompts, batch.seg_task)
    out.loss.backward()
    return out, {t: prompts.grad[i] for t, i in rows.items()}, batch


@pytest.fixture
def setup():
    lm = PromptTunedLM(tiny_llama())
    g = torch.Generator().manual_seed(1)
    bank = {t: torch.randn(P, H, generator=g) for t in "abc"}
    return lm, bank


@pytest.mark.parametrize("packing", [True, False])
def test_mixed_batch_equals_each_task_alone(setup, packing):
    lm, bank = setup
    examples = _examples()
    mixed, mixed_grad, batch = _run(lm, bank, examples, packing)
    if packing:
        assert batch.input_ids.shape[0] < len(examples)  # segments really share rows
    for task in "abc":
        idx = [i for i, e in enumerate(examples) if e.task == task]
        alone, alone_grad, _ = _run(lm, bank, [examples[i] for i in idx], packing=False)
        torch.testing.assert_close(mixed.seg_loss[idx], alone.seg_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed_grad[task], alone_grad[task], rtol=1e-4, atol=1e-7)


def test_packed_segments_do_not_attend_to_each_other(setup):
    lm, bank = setup
    examples = _examples()
    base, _, _ = _run(lm, bank, examples, packing=True)
    changed = list(examples)
    changed[1] = TokenizedExample("b", [7] * 9, examples[1].target_ids)  # alter one segment's tokens only
    other, _, batch = _run(lm, bank, changed, packing=True)
    assert batch.input_ids.shape[0] < len(examples)
    keep = [i for i in range(len(examples)) if i != 1]
    torch.testing.assert_close(base.seg_loss[keep], other.seg_loss[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base.seg_loss[1], other.seg_loss[1])


def test_loss_matches_full_forward_reference(setup):
    """Target-only LM head == slicing the full-vocabulary logits of a plain HF forward."""
    lm, bank = setup
    ex = _examples()[3]
    out, _, _ = _run(lm, bank, [ex], packing=True)
    ids = torch.tensor([[0] * P + ex.input_ids + ex.target_ids[:-1]])
    emb = lm.embed(ids).clone()
    emb[0, :P] = bank["c"]
    logits = lm.backbone(inputs_embeds=emb).logits[0]
    start = P + len(ex.input_ids) - 1
    ref = torch.nn.functional.cross_entropy(
        logits[start : start + len(ex.target_ids)], torch.tensor(ex.target_ids)
    )
    torch.testing.assert_close(out.seg_loss[0], ref, rtol=1e-5, atol=1e-6)


def test_truncation_keeps_the_end_of_the_input():
    ex = TokenizedExample("a", list(range(10, 60)), [5, 6])
    batch = collate([ex], {"a": 0}, P, max_len=20, pad_id=0)
    assert batch.input_ids.shape[1] == 20
    assert batch.input_ids[0, P : P + 15].tolist() == list(range(45, 60))  # left-truncated input
    assert batch.target_ids.tolist() == [5, 6]


def test_unknown_task_in_batch_is_a_clear_error():
    from tuner.prompt_bank import PromptBank

    bank = PromptBank(["a", "b"], P, H)
    with pytest.raises(KeyError, match="'zzz' is not registered"):
        bank.rows_of(["a", "zzz"])
