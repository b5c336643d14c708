"""On a GPU with flash-attn: packed mixed-task batches under FlashAttention-2 (varlen) match SDPA. Skips elsewhere."""

import importlib.util

import pytest
import torch
from conftest import tiny_llama

from tuner.backbone import pick_attention
from tuner.batching import TokenizedExample, collate
from tuner.model import PromptTunedLM

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_packed_matches_sdpa():
    assert pick_attention("auto", torch.device("cuda")) == "flash_attention_2"
    g = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample("ab"[i % 2], torch.randint(3, 128, (n,), generator=g).tolist(), [5, 6])
        for i, n in enumerate([5, 17, 9, 30, 2, 11])
    ]
    batch = collate(examples, {"a": 0, "b": 1}, 4, max_len=64, pad_id=0, share_prompts=False).to("cuda")
    prompts = torch.randn(2, 4, 32, device="cuda")
    losses = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = tiny_llama().to("cuda", torch.bfloat16)
        model.config._attn_implementation = impl
        losses[impl] = PromptTunedLM(model)(batch, prompts).seg_loss
    torch.testing.assert_close(losses["flash_attention_2"], losses["sdpa"], rtol=2e-2, atol=2e-2)
