"""The vectorised sampler against a per-row reference written here: token for token, on many rows
with mixed settings (greedy, temperature, top_p 1 / tiny / middling, top_k, fixed seeds), over more
steps than a row draws ahead; and its per-step work does not grow with the number of rows."""

from __future__ import annotations

import pytest
import torch

from bench.serving_step import OpCount
from serving.sampler import DRAW_AHEAD, MIN_TEMPERATURE, RowSampler, sample
from serving.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300


class ReferenceRow:
    """One row sampled alone, the way the per-row sampler did it: one float64 draw per step from the
    row's own generator, inverse transform over the probabilities in vocabulary order (nothing
    truncated) or in descending order after top-k and then top-p of what top-k kept."""

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator().manual_seed(seed % 2**64)

    def token(self, logits: torch.Tensor) -> int:  # logits [vocab] fp32
        if not self.temperature >= MIN_TEMPERATURE:
            return int(logits.argmax())
        probs = torch.softmax(logits[None] / torch.tensor([self.temperature]), dim=-1)[0]
        order = None
        if self.top_p < 1.0 or self.top_k > 0:
            probs, order = probs.sort(descending=True)
            cum = probs.cumsum(0)
            k = min(self.top_k, VOCAB) if self.top_k > 0 else VOCAB
            mass = float(cum[k - 1]) if self.top_k > 0 else 1.0
            threshold = torch.tensor(self.top_p, dtype=torch.float32) * torch.tensor(mass)
            drop = (torch.arange(VOCAB) >= k) | (cum - probs >= threshold)
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.cumsum(0)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64)
        target = u.float() * cdf[-1]
        pick = int(torch.searchsorted(cdf, target).clamp(max=VOCAB - 1))
        return int(order[pick]) if order is not None else pick


def settings(n: int) -> list[tuple[float, float, int, int]]:
    """(temperature, top_p, top_k, seed) for `n` rows, cycling through the edge cases."""
    temps = [0.0, 1.0, 0.7, 1.5, 1e-4, 0.3]
    top_ps = [1.0, 1e-9, 0.9, 0.5, 1.0, 0.999]
    top_ks = [0, 0, 0, 5, 40, 1, 0, 2 * VOCAB]
    return [(temps[i % 6], top_ps[(i // 2) % 6], top_ks[(i // 3) % 8], 1000 + i) for i in range(n)]


def test_vectorised_sampling_equals_each_row_sampled_alone():
    rows = settings(48)
    refs = [ReferenceRow(*s) for s in rows]
    samplers = []
    for t, p, k, seed in rows:
        s = RowSampler.for_params(SamplingParams(temperature=t, top_p=p, seed=seed))
        s.top_k = k if s.generator is not None else 0
        samplers.append(s)
    g = torch.Generator().manual_seed(0)
    steps = DRAW_AHEAD * 2 + 7  # past two refills of every row's draws
    for step in range(steps):
        # Sharp and flat rows: near-ties at low temperature, spread-out mass at high temperature.
        logits = torch.randn(len(rows), VOCAB, generator=g) * (1 + 4 * (step % 3))
        # Rows come and go: a different subset (and order) of the rows each step.
        live = [i for i in range(len(rows)) if (i + step) % 5 != 0]
        if step % 2:
            live = live[::-1]
        got = sample(logits[live], [samplers[i] for i in live]).tolist()
        want = [refs[i].token(logits[i]) for i in live]
        assert got == want, f"step {step}"


def test_a_seeded_row_gives_the_same_tokens_whatever_its_batch_truncates():
    """A row that truncates nothing reads the probabilities in vocabulary order even when another
    row of its batch needs them sorted (the per-batch switch once gave it other tokens)."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))

    def tokens(with_other: bool) -> list[int]:
        row = RowSampler.for_params(SamplingParams(temperature=1.0, seed=7))
        other = RowSampler.for_params(SamplingParams(temperature=1.0, top_p=0.5, seed=8))
        batch, rows = ([row, other], logits) if with_other else ([row], logits[:1])
        return [int(sample(rows, batch)[0]) for _ in range(20)]

    assert tokens(with_other=True) == tokens(with_other=False)


def test_a_sampling_step_costs_the_same_ops_for_4_rows_and_for_64():
    def ops(n: int) -> int:
        samplers = [
            RowSampler.for_params(SamplingParams(temperature=0.8, top_p=0.9 if i % 2 else 1.0, seed=i))
            for i in range(n)
        ] + [RowSampler.for_params(SamplingParams())]  # and a greedy row
        logits = torch.randn(n + 1, VOCAB)
        sample(logits, samplers)  # the first step draws ahead for every row
        with OpCount() as count:
            sample(logits, samplers)
        return count.ops

    assert ops(4) == ops(64)
