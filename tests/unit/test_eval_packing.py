"""Classification scoring lays a fleet's examples out at the least cost (tuner/evaluate.py, `_MixedForward`):
a task's examples side by side whatever order they come in, each forward one packed row (no padding) with
one prompt copy per task in it; scores equal a plain forward of each example with its prompt prepended."""

import random

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama

from tuner.evaluate import _MixedForward, score_labels_of_tasks
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample

P = 4


def _examples(g: torch.Generator, tasks: str, per_task: int) -> list[TokenizedExample]:
    """`per_task` examples of each task, of random lengths, shuffled so that tasks interleave."""
    out = [
        TokenizedExample(
            t,
            torch.randint(10, 4000, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist(),
            [0],
        )
        for t in tasks
        for _ in range(per_task)
    ]
    random.Random(0).shuffle(out)
    return out


def test_a_forward_is_one_unpadded_row_with_one_prompt_copy_per_task():
    tok = load_tokenizer(smollm2_tokenizer_dir())
    g = torch.Generator().manual_seed(0)
    prompts = {t: torch.randn(P, 32, generator=g) for t in "abc"}
    segs = _examples(g, "abc", 3)
    forward = _MixedForward(PromptTunedLM(tiny_llama(vocab_size=49152)), tok, prompts, 64, "cpu")
    batch, table = forward.batch(segs)
    assert batch.input_ids.shape == (1, sum(len(s.input_ids) for s in segs) + 3 * P)  # nothing is padding
    assert batch.num_prompts == 3 and table.shape == (3, P, 32)
    # the dense reference kernel pays L x L per row: it keeps rows of at most max_len
    eager = _MixedForward(
        PromptTunedLM(tiny_llama(vocab_size=49152), kernel="eager"), tok, prompts, 64, "cpu"
    )
    assert eager.batch(segs)[0].input_ids.shape[1] <= 64


def test_interleaved_tasks_share_prompt_copies_and_score_as_a_direct_computation(monkeypatch):
    """Four tasks' examples, shuffled: each forward holds whole tasks (one prompt copy each), and every
    example's label log-probabilities equal a plain forward of [its task's prompt][input][label]."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(1)
    verbalisers = {
        "a": {"0": " no", "1": " yes"},
        "b": {"x": " red", "y": " blue", "z": " green"},
        "c": {"0": " no", "1": " yes"},
        "d": {"0": " very negative", "1": " quite positive"},  # several tokens: one segment per label
    }
    prompts = {t: torch.randn(P, 32, generator=g) for t in verbalisers}
    examples = _examples(g, "abcd", 4)
    copies = []
    batch_of = _MixedForward.batch

    def spy(self, segments):
        batch, table = batch_of(self, segments)
        copies.append((batch.num_prompts, len({s.task for s in segments})))
        return batch, table

    monkeypatch.setattr(_MixedForward, "batch", spy)
    got = score_labels_of_tasks(lm, tok, examples, verbalisers, prompts, max_len=64, batch_size=4)
    # one-token tasks a, b, c: 4 examples each, one task per forward; d: 4 x 2 label segments, one forward
    assert copies == [(1, 1)] * 4

    def label_logp(ex: TokenizedExample, word: str) -> float:
        target = tok(word, add_special_tokens=False).input_ids
        ids = torch.tensor(ex.input_ids + target[:-1])
        emb = torch.cat([prompts[ex.task], lm.embed(ids[None])[0]])
        logp = torch.log_softmax(lm.backbone(inputs_embeds=emb[None]).logits[0], dim=-1)
        start = P + len(ex.input_ids) - 1
        return sum(logp[start + i, t].item() for i, t in enumerate(target))

    with torch.no_grad():
        for ex, scores in zip(examples, got, strict=True):
            want = {lab: label_logp(ex, w) for lab, w in verbalisers[ex.task].items()}
            assert scores == pytest.approx(want, abs=1e-4)
