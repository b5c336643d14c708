"""Evaluation scores each example where it is, whatever order packing put the segments in."""

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama

from tuner.backbone import load_tokenizer
from tuner.batching import TokenizedExample
from tuner.evaluate import classification_metrics, score_labels
from tuner.model import PromptTunedLM


@pytest.mark.parametrize(
    "verbaliser", [{"0": " no", "1": " yes"}, {"0": " very negative", "1": " quite positive"}]
)
def test_packed_scores_equal_one_at_a_time(verbaliser):
    """Single-token labels take the fast path (one segment per example), multi-token ones the per-label path."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(0)
    # lengths chosen so that packing reorders the segments (longest first)
    examples = [
        TokenizedExample("t", torch.randint(10, 4000, (n,), generator=g).tolist(), [0])
        for n in (3, 17, 8, 30, 5)
    ]
    prompt = torch.randn(4, 32, generator=g)
    batched = score_labels(lm, tok, examples, verbaliser, prompt, max_len=64, batch_size=8)
    for ex, scores in zip(examples, batched):
        alone = score_labels(lm, tok, [ex], verbaliser, prompt, max_len=64, batch_size=1)[0]
        assert scores == pytest.approx(alone, abs=1e-4)


def test_classification_metrics():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
