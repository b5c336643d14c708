"""Activation checkpointing of the frozen backbone: the prompt gradients are those of the plain backbone.

The gradient reaches the prompts through `inputs_embeds` only (every backbone weight is frozen),
so this is the case non-reentrant checkpointing must get right; both attention kernels, packed
rows with shared prompt copies (span attention) and one copy per example.
"""

import pytest
import torch
from conftest import tiny_llama

from tuner.model.backbone import checkpoint_layers
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample, collate

P, H = 4, 32


def _batch(share: bool):
    g = torch.Generator().manual_seed(0)
    spec = [("a", 5, 1), ("b", 9, 2), ("a", 3, 1), ("c", 12, 3), ("b", 4, 1), ("a", 20, 2)]
    examples = [
        TokenizedExample(
            t,
            torch.randint(3, 128, (n,), generator=g).tolist(),
            torch.randint(3, 128, (k,), generator=g).tolist(),
        )
        for t, n, k in spec
    ]
    return collate(
        examples, {"a": 0, "b": 1, "c": 2}, P, max_len=64, pad_id=0, packing=True, share_prompts=share
    )


def _loss_and_grad(lm: PromptTunedLM, batch, prompts: torch.Tensor):
    leaf = prompts.clone().requires_grad_(True)
    out = lm(batch, leaf)
    out.loss.backward()
    return out.loss.detach(), leaf.grad


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share", [True, False])
def test_checkpointed_prompt_gradients_equal_plain(attn, share, one_thread):
    plain = PromptTunedLM(tiny_llama(layers=3))
    ckpt = PromptTunedLM(tiny_llama(layers=3))  # same seed: the same weights
    checkpoint_layers(ckpt.backbone)
    for lm in (plain, ckpt):
        lm.backbone.config._attn_implementation = attn
    batch = _batch(share)
    prompts = torch.randn(3, P, H, generator=torch.Generator().manual_seed(1))

    loss, grad = _loss_and_grad(plain, batch, prompts)
    loss_ckpt, grad_ckpt = _loss_and_grad(ckpt, batch, prompts)

    assert grad.abs().sum() > 0
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-5, atol=1e-7)


def test_checkpointing_keeps_fewer_tensors_for_backward(one_thread):
    """What autograd keeps across the forward (saved-tensor bytes) drops with checkpointing."""
    batch = _batch(True)
    prompts = torch.randn(3, P, H, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def saved_bytes(lm: PromptTunedLM) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm(batch, prompts).loss.backward()
        return sum(seen.values())

    plain = PromptTunedLM(tiny_llama(layers=4))
    ckpt = PromptTunedLM(tiny_llama(layers=4))
    checkpoint_layers(ckpt.backbone)
    assert saved_bytes(ckpt) < 0.6 * saved_bytes(plain)


def test_checkpointing_is_off_without_grad(one_thread):
    """Evaluation (no grad) runs the layers as they are: same outputs, nothing recomputed."""
    plain = PromptTunedLM(tiny_llama())
    ckpt = PromptTunedLM(tiny_llama())
    checkpoint_layers(ckpt.backbone)
    batch = _batch(False)
    prompts = torch.randn(3, P, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ckpt(batch, prompts).loss, plain(batch, prompts).loss, rtol=0, atol=0)
