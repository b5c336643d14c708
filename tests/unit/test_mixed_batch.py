"""Mixed-task and packed batches: each task's loss and prompt gradient equal those of its examples run alone.

Covers both layouts of `tuner.tasks.batching`: one prompt copy per segment, and segments of a task sharing
one prompt copy per packed row (the default).
"""

import pytest
import torch
from conftest import tiny_llama

from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample, collate

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


def _run(lm, bank, examples, packing, max_len=64, share=True):
    tasks = sorted({e.task for e in examples})
    rows = {t: i for i, t in enumerate(tasks)}
    batch = collate(examples, rows, P, max_len=max_len, pad_id=0, packing=packing, share_prompts=share)
    prompts = torch.stack([bank[t] for t in tasks]).clone().requires_grad_(True)
    out = lm(batch, prompts)
    out.loss.backward()
    return out, {t: prompts.grad[i] for t, i in rows.items()}, batch


@pytest.fixture
def setup():
    lm = PromptTunedLM(tiny_llama())
    g = torch.Generator().manual_seed(1)
    bank = {t: torch.randn(P, H, generator=g) for t in "abc"}
    return lm, bank


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing,share", [(True, True), (True, False), (False, False)])
def test_mixed_batch_equals_each_task_alone(setup, packing, share, attn):
    lm, bank = setup
    lm.backbone.config._attn_implementation = attn
    examples = _examples()
    mixed, mixed_grad, batch = _run(lm, bank, examples, packing, share=share)
    if packing:
        assert batch.input_ids.shape[0] < len(examples)  # segments really share rows
    if share:
        assert batch.num_prompts < batch.num_segments  # and prompt copies
        assert batch.shared_prompts
    else:
        assert batch.num_prompts == batch.num_segments
    for task in "abc":
        idx = [i for i, e in enumerate(examples) if e.task == task]
        alone, alone_grad, _ = _run(lm, bank, [examples[i] for i in idx], packing=False, share=False)
        torch.testing.assert_close(mixed.seg_loss[idx], alone.seg_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed_grad[task], alone_grad[task], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("share", [True, False])
def test_packed_segments_do_not_attend_to_each_other(setup, share):
    lm, bank = setup
    examples = _examples()
    base, _, _ = _run(lm, bank, examples, packing=True, share=share)
    changed = list(examples)
    changed[1] = TokenizedExample("b", [7] * 9, examples[1].target_ids)  # alter one segment's tokens only
    other, _, batch = _run(lm, bank, changed, packing=True, share=share)
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
    from tuner.prompts.bank import PromptBank

    bank = PromptBank(["a", "b"], P, H)
    with pytest.raises(KeyError, match="'zzz' is not registered"):
        bank.rows_of(["a", "zzz"])


def test_shared_prompt_layout():
    """Same-task segments in a row sit behind one prompt copy; positions continue after it."""
    a1, a2, b1 = (
        TokenizedExample("a", [5, 6, 7], [8]),
        TokenizedExample("a", [9, 10], [11, 12]),
        TokenizedExample("b", [13], [14]),
    )
    batch = collate([a1, a2, b1], {"a": 0, "b": 1}, P, max_len=64, pad_id=0)
    assert batch.input_ids.shape[0] == 1 and batch.num_prompts == 2  # one row; one copy per task
    assert batch.prompt_task.tolist() == [0, 1]
    assert batch.input_ids[0].tolist() == [0] * P + [5, 6, 7, 9, 10, 11] + [0] * P + [13]
    assert batch.position_ids[0].tolist() == list(range(P + 3)) + list(range(P, P + 3)) + list(range(P + 1))
    m = batch.attention_mask()[0, 0]
    a2_first, b_first = P + 3, 2 * P + 6
    assert m[a2_first, :P].all() and not m[a2_first, P : P + 3].any()  # a2 sees a's prompt, not a1
    assert not m[b_first, : P + 6].any()  # b sees nothing of task a's group
    assert m[b_first, P + 6 : b_first + 1].all()  # only its own prompt copy and itself
    assert m[b_first - 1, P + 6 : b_first].all()  # b's prompt attends within itself


def test_span_attention_equals_dense_mask(setup):
    """SDPA over spans (tuner.model.span_attention) == SDPA over the layout's dense mask, values and gradients."""
    lm, bank = setup
    g = torch.Generator().manual_seed(3)
    examples = [
        TokenizedExample(t, torch.randint(3, 128, (n,), generator=g).tolist(), [5, 6])
        for t, n in zip("abcabcabcaab", [1, 40, 7, 3, 25, 12, 9, 30, 2, 18, 5, 11])
    ]
    batch = collate(examples, {t: i for i, t in enumerate("abc")}, P, max_len=64, pad_id=0, row_len=96)
    assert batch.shared_prompts and batch.input_ids.shape[0] > 1
    used = torch.zeros(batch.input_ids.shape, dtype=torch.bool)  # positions that are not padding
    for r, s in zip(batch.prompt_row.tolist(), batch.prompt_start.tolist()):
        used[r, s : s + P] = True
    for r, s, n in zip(batch.seg_row.tolist(), batch.seg_start.tolist(), batch.seg_len.tolist()):
        used[r, s : s + n] = True

    weights = torch.randn(int(used.sum()), H, generator=g)

    def run(dense: bool):
        prompts = torch.stack([bank[t] for t in "abc"]).clone().requires_grad_(True)
        if dense:
            out = lm.decoder(
                inputs_embeds=lm.embed_with_prompts(batch, prompts),
                attention_mask=batch.attention_mask(),
                position_ids=batch.position_ids,
            ).last_hidden_state
        else:
            out = lm.hidden_states(batch, prompts)
        (out[used] * weights).sum().backward()  # a random projection: final RMSNorm output has fixed norm
        return out[used].detach(), prompts.grad

    span_h, span_grad = run(dense=False)
    dense_h, dense_grad = run(dense=True)
    torch.testing.assert_close(span_h, dense_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(span_grad, dense_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing,share", [(True, True), (True, False), (False, False)])
def test_last_layer_at_targets_equals_the_full_layer(setup, packing, share, attn):
    """`tuner.model.target_layer`: the last layer computed at target positions only gives the same target
    logits and prompt gradients as the whole layer, in every layout (multi-token targets, several rows)."""
    lm, bank = setup
    lm.backbone.config._attn_implementation = attn
    examples = _examples()
    tasks = sorted({e.task for e in examples})
    batch = collate(
        examples,
        {t: i for i, t in enumerate(tasks)},
        P,
        max_len=64,
        pad_id=0,
        packing=packing,
        share_prompts=share,
        row_len=40,
    )
    assert batch.input_ids.shape[0] > 1 and batch.target_ids.numel() > len(examples)

    def run(targets_only: bool):
        prompts = torch.stack([bank[t] for t in tasks]).clone().requires_grad_(True)
        logits = lm.target_logits(lm.hidden_states(batch, prompts, targets_only=targets_only), batch)
        torch.nn.functional.cross_entropy(logits, batch.target_ids).backward()
        return logits.detach(), prompts.grad

    fast_logits, fast_grad = run(targets_only=True)
    full_logits, full_grad = run(targets_only=False)
    torch.testing.assert_close(fast_logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, full_grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(
        lm.hidden_states(batch, fast_grad, targets_only=True), lm.hidden_states(batch, fast_grad)
    )
