"""`tuner.model.attention`: kernel choice, and every CPU-runnable kernel against the dense-mask reference.

The reference is the decoder run with the layout's dense mask (`MultiTaskBatch.attention_mask`)
under transformers' eager attention. The varlen plan's index construction is checked on CPU
against that mask (the kernels themselves run in tests/gpu); FlexAttention runs forward-only on
CPU (torch has no CPU backward for it).
"""

import pytest
import torch
from conftest import tiny_llama

from tuner.model import attention
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample, collate

P, H = 4, 32


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    examples = [
        TokenizedExample(t, torch.randint(3, 128, (n,), generator=g).tolist(), [5, 6])
        for t, n in zip("abcabcabcaab", [1, 40, 7, 3, 25, 12, 9, 30, 2, 18, 5, 11])
    ]
    b = collate(examples, {t: i for i, t in enumerate("abc")}, P, max_len=64, pad_id=0, row_len=96)
    assert b.shared_prompts and b.input_ids.shape[0] > 1
    return b


@pytest.fixture(scope="module")
def prompts():
    return torch.randn(3, P, H, generator=torch.Generator().manual_seed(1))


def _used(batch) -> torch.Tensor:
    """[R, L] positions that are not padding."""
    used = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for row, start, n, _ in batch.spans():
        used[row, start : start + n] = True
    return used


def _reference(batch, prompts):
    """Loss, per-segment losses and prompt gradient with the dense layout mask under eager attention."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    lm = PromptTunedLM(model)
    p = prompts.clone().requires_grad_(True)
    embeds = lm.embed_with_prompts(batch, p)
    mask = torch.zeros(batch.attention_mask().shape).masked_fill(~batch.attention_mask(), float("-inf"))
    hidden = lm.decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids
    ).last_hidden_state
    logits = lm.target_logits(hidden, batch)
    nll = torch.nn.functional.cross_entropy(logits, batch.target_ids, reduction="none")
    seg = torch.zeros(batch.num_segments).index_add(0, batch.target_seg, nll)
    seg = seg / torch.bincount(batch.target_seg, minlength=batch.num_segments)
    seg.sum().backward()
    return seg.detach(), p.grad


def test_pick_kernel():
    assert attention.pick_kernel("auto", torch.device("cpu")) == "sdpa"
    for name in ("sdpa", "eager", "flex"):
        assert attention.pick_kernel(name, "cpu") == name
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.pick_kernel("varlen", "cpu")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        attention.pick_kernel("ring", "cpu")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        PromptTunedLM(tiny_llama(), kernel="ring")


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_kernel_matches_dense_reference(batch, prompts, kernel):
    ref_loss, ref_grad = _reference(batch, prompts)
    lm = PromptTunedLM(tiny_llama(), kernel=kernel)
    p = prompts.clone().requires_grad_(True)
    out = lm(batch, p)
    out.loss.backward()
    torch.testing.assert_close(out.seg_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_flex_forward_matches_dense_reference(batch, prompts):
    ref_loss, _ = _reference(batch, prompts)
    lm = PromptTunedLM(tiny_llama(), kernel="flex")
    with torch.no_grad():
        out = lm(batch, prompts)
        again = lm(batch, prompts)  # second call: the cached BlockMask
    torch.testing.assert_close(out.seg_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.seg_loss, out.seg_loss)


def test_flex_mask_mod_equals_layout_mask(batch):
    doc, prefix = attention.span_ids(batch)
    R, L = doc.shape
    mod = attention.document_mask_mod(doc, prefix)
    b, q, kv = (
        torch.arange(R)[:, None, None],
        torch.arange(L)[None, :, None],
        torch.arange(L)[None, None, :],
    )
    allowed = mod(b, 0, q, kv)
    used = _used(batch)
    expected = batch.attention_mask()[:, 0]
    assert torch.equal(allowed[used], expected[used])


@pytest.mark.parametrize("bottom_right", [True, False])
def test_varlen_plan_equals_layout_mask(batch, bottom_right):
    """Each varlen sequence, read with the kernel's causal alignment, sees exactly what the mask allows."""
    plan = attention.VarlenLayout.from_batch("varlen", batch, torch.device("cpu"), bottom_right=bottom_right)
    R, L = batch.input_ids.shape
    seen = torch.zeros(R * L, R * L, dtype=torch.bool)
    written = torch.zeros(int(plan.cu_q[-1]), dtype=torch.long).fill_(-1)
    written[plan.out_select] = plan.out_index
    for i in range(len(plan.cu_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (plan.cu_q[i], plan.cu_q[i + 1], plan.cu_k[i], plan.cu_k[i + 1]))
        nq, nk = q1 - q0, k1 - k0
        assert nq <= plan.max_q and nk <= plan.max_k
        keys = plan.k_index[k0:k1]
        for j in range(nq):
            visible = j + 1 + (nk - nq if bottom_right else 0)  # causal, aligned as the kernel aligns it
            if written[q0 + j] >= 0:
                assert plan.q_index[q0 + j] == written[q0 + j]
                seen[written[q0 + j], keys[:visible]] = True
    used = _used(batch).view(-1)
    expected = torch.block_diag(*batch.attention_mask()[:, 0])
    assert torch.equal(seen[used][:, used], expected[used][:, used])
    assert torch.equal(torch.sort(plan.out_index).values, used.nonzero().view(-1))  # every position once
