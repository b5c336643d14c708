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


def _batch(share: bool):
    g = torch.Generator().manual_seed(3)
    examples = [
        TokenizedExample(t, torch.randint(3, 128, (n,), generator=g).tolist(), [5, 6])
        for t, n in zip("abcabcabcaab", [1, 40, 7, 3, 25, 12, 9, 30, 2, 18, 5, 11])
    ]
    rows = {t: i for i, t in enumerate("abc")}
    return collate(examples, rows, P, max_len=64, pad_id=0, row_len=96, share_prompts=share)


def _sequences(plan, R: int, L: int):
    """Per varlen sequence: (query positions, key positions, where each query's output lands or -1)."""
    q_pos = plan.q_index if plan.q_index is not None else torch.arange(R * L)
    k_pos = plan.k_index if plan.k_index is not None else q_pos
    written = torch.full((len(q_pos),), -1, dtype=torch.long)
    if plan.out_index is None:
        written = q_pos.clone()
    else:
        written[plan.out_select] = plan.out_index
    for i in range(len(plan.cu_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (plan.cu_q[i], plan.cu_q[i + 1], plan.cu_k[i], plan.cu_k[i + 1]))
        yield q_pos[q0:q1], k_pos[k0:k1], written[q0:q1]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("bottom_right", [True, False])
def test_varlen_plan_equals_layout_mask(share, bottom_right):
    """Each varlen sequence, read with the kernel's causal alignment, sees exactly what the mask allows,
    and every real position's output is written once."""
    batch = _batch(share)
    plan = attention.VarlenLayout.from_batch("varlen", batch, torch.device("cpu"), bottom_right=bottom_right)
    R, L = batch.input_ids.shape
    seen = torch.zeros(R * L, R * L, dtype=torch.bool)
    writes = torch.zeros(R * L, dtype=torch.long)
    for q, k, out in _sequences(plan, R, L):
        assert len(q) <= plan.max_q and len(k) <= plan.max_k
        for j in range(len(q)):
            visible = j + 1 + (len(k) - len(q) if bottom_right else 0)  # causal, as the kernel aligns it
            if out[j] >= 0:
                assert q[j] == out[j]
                seen[out[j], k[:visible]] = True
                writes[out[j]] += 1
    used = _used(batch).view(-1)
    expected = torch.block_diag(*batch.attention_mask()[:, 0])
    assert torch.equal(seen[used][:, used], expected[used][:, used])
    assert torch.equal(writes[used], torch.ones(int(used.sum()), dtype=torch.long))


def test_bottom_right_varlen_reads_the_rows_as_they_are():
    """Queries are never gathered nor outputs scattered; keys only where a prompt copy is shared."""
    cpu = torch.device("cpu")
    for share in (True, False):
        plan = attention.VarlenLayout.from_batch("varlen", _batch(share), cpu, bottom_right=True)
        assert plan.q_index is None and plan.out_index is None
        assert (plan.k_index is None) == (not share)
    top_left = attention.VarlenLayout.from_batch("varlen", _batch(True), cpu, bottom_right=False)
    assert top_left.q_index is not None and top_left.out_index is not None


def _varlen_reference(kernel, q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    """The kernel's contract written out: per sequence, softmax attention with a causal mask aligned to
    the bottom right (query j of nq sees keys up to nk - nq + j), GQA by repetition."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
        qs, ks, vs = q[q0:q1], k[k0:k1].repeat_interleave(groups, 1), v[k0:k1].repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * (scaling or q.shape[-1] ** -0.5)
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(k1 - k0 - (q1 - q0))
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


@pytest.mark.parametrize("share", [True, False])
def test_varlen_plan_forward_and_backward_match_dense_reference(share, prompts, monkeypatch):
    """The varlen plan end to end on CPU, the CUDA kernel replaced by its contract written out above."""
    batch = _batch(share)
    ref_loss, ref_grad = _reference(batch, prompts)
    monkeypatch.setattr(attention, "varlen_call", _varlen_reference)
    lm = PromptTunedLM(tiny_llama(), kernel="sdpa")
    monkeypatch.setattr(lm, "kernel_for", lambda device: "varlen")
    for ahead in (False, True):  # plan built in the forward, or on the host with the batch
        b = attention.host_layout("varlen", batch, "cpu") if ahead else batch
        assert (b.attn_plan is not None) == ahead
        p = prompts.clone().requires_grad_(True)
        out = lm(b, p)
        out.loss.backward()
        torch.testing.assert_close(out.seg_loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_plan_built_ahead_gives_the_same_bits(batch, prompts, kernel):
    """`host_layout` moves plan building off the forward; the forward computes exactly the same."""
    lm = PromptTunedLM(tiny_llama(), kernel=kernel)
    ahead = attention.host_layout(kernel, batch, "cpu")
    assert ahead.attn_kernel == kernel and batch.attn_plan is None
    results = []
    for b in (batch, ahead.to("cpu")):
        p = prompts.clone().requires_grad_(True)
        out = lm(b, p)
        out.loss.backward()
        results.append((out.seg_loss, p.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
