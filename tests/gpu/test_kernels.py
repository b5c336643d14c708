"""On a GPU: every packed-attention kernel of `tuner.model.attention` against the dense-mask reference.

The reference is written here: the decoder under transformers' eager attention with the layout's
dense mask (`MultiTaskBatch.attention_mask`), fp32. Kernels that run fp32 (span SDPA, FlexAttention)
must match tightly; the FlashAttention-2 kernels (torch's `varlen_attn`, flash-attn) run bf16 only
and are held to a bf16 tolerance. Loss per segment and the prompt gradient are compared, for both
layouts (shared prompt copies, one copy per segment).
"""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuner.model import attention
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample, collate

pytestmark = pytest.mark.gpu
P, HIDDEN, VOCAB = 8, 256, 1000


def _model(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64, as SmolLM2
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="eager",
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    model.requires_grad_(False)
    return model


def _batch(share: bool):
    g = torch.Generator().manual_seed(3)
    lengths = [1, 40, 7, 3, 25, 12, 9, 30, 2, 18, 5, 11, 60, 33]
    examples = [
        TokenizedExample("abc"[i % 3], torch.randint(3, VOCAB, (n,), generator=g).tolist(), [5, 6])
        for i, n in enumerate(lengths)
    ]
    batch = collate(
        examples,
        {t: i for i, t in enumerate("abc")},
        P,
        max_len=128,
        pad_id=0,
        share_prompts=share,
        row_len=160,
    )
    assert batch.input_ids.shape[0] > 1 and batch.shared_prompts == share
    return batch.to("cuda")


def _prompts():
    return torch.randn(3, P, HIDDEN, generator=torch.Generator().manual_seed(1)).cuda() * 0.5


def _reference(batch):
    """fp32 eager attention with the dense layout mask, computed directly: per-segment loss, prompt grad."""
    lm = PromptTunedLM(_model(torch.float32))
    prompts = _prompts().requires_grad_(True)
    allowed = batch.attention_mask()
    mask = torch.zeros(allowed.shape, device="cuda").masked_fill(~allowed, float("-inf"))
    hidden = lm.decoder(
        inputs_embeds=lm.embed_with_prompts(batch, prompts),
        attention_mask=mask,
        position_ids=batch.position_ids,
    ).last_hidden_state
    nll = torch.nn.functional.cross_entropy(
        lm.target_logits(hidden, batch), batch.target_ids, reduction="none"
    )
    seg = torch.zeros(batch.num_segments, device="cuda").index_add(0, batch.target_seg, nll)
    seg = seg / torch.bincount(batch.target_seg, minlength=batch.num_segments)
    seg.sum().backward()
    return seg.detach(), prompts.grad


def _run(kernel: str, dtype: torch.dtype, batch):
    lm = PromptTunedLM(_model(dtype), kernel=kernel)
    prompts = _prompts().requires_grad_(True)
    out = lm(batch, prompts)
    out.loss.backward()
    return out.seg_loss, prompts.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_fp32_kernels_match_dense_reference_tightly(kernel, share):
    batch = _batch(share)
    ref_loss, ref_grad = _reference(batch)
    loss, grad = _run(kernel, torch.float32, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


BF16_KERNELS = ["varlen", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("kernel", BF16_KERNELS)
def test_bf16_kernels_match_dense_reference(kernel, share):
    batch = _batch(share)
    ref_loss, ref_grad = _reference(batch)
    loss, grad = _run(kernel, torch.bfloat16, batch)
    assert _rel(loss, ref_loss) < 2e-2, (kernel, _rel(loss, ref_loss))
    assert _rel(grad, ref_grad) < 5e-2, (kernel, _rel(grad, ref_grad))


def test_varlen_top_left_plan_matches_too(monkeypatch):
    """The plan for kernels that align causal masks top-left (prompt queries repeated) is also exact."""
    batch = _batch(True)
    ref_loss, ref_grad = _reference(batch)
    bottom_right = attention.aligns_bottom_right
    bottom_right.cache_clear()
    monkeypatch.setattr(attention, "aligns_bottom_right", lambda kernel, device: False)
    loss, grad = _run("varlen", torch.bfloat16, batch)
    assert _rel(loss, ref_loss) < 2e-2 and _rel(grad, ref_grad) < 5e-2


def test_auto_picks_varlen_and_the_alignment_probe_answers():
    assert attention.pick_kernel("auto", "cuda") == "varlen"
    # FlashAttention-2 (>= 2.1) aligns causal masks bottom-right; both answers are handled (see the
    # top-left test above), and bench.gpu_check records which one this torch gives.
    assert attention.aligns_bottom_right("varlen", torch.device("cuda", torch.cuda.current_device())) in (
        True,
        False,
    )
