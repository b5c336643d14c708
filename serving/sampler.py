"""Token sampling for a batch of rows, each with its own settings, in one vectorised pass on the device.

Greedy rows take the argmax. Sampled rows (temperature > 0) divide their logits by the temperature,
keep the top-k tokens (`top_k` > 0) and then the top-p nucleus of what is left, and pick a token by
inverse transform: one uniform number per row from the row's own CPU `torch.Generator` (seeded by
the request's seed), compared with the cumulative probabilities. A row that truncates nothing
(top_p 1, top_k 0) reads them in vocabulary order, a truncating row in descending order: each row
gives exactly the token it gives alone, whatever the other rows of its batch ask for.

Per step, the sampled rows' settings and uniform numbers travel to the device as one small tensor
(one copy; the host's per-row work is building that one list), and every row is sampled by the
same few tensor ops: no tensor op per row, no host synchronisation (the caller reads the tokens
once per step); only rows that truncate pay for sorting the vocabulary. A per-row generator cannot be drawn
from inside a tensor op, so each `RowSampler` draws `DRAW_AHEAD` numbers at a time and hands them
out one per step: the CPU generator's float64 stream is the same drawn 64 at a time as one at a
time (the tests check it token for token against one-at-a-time draws), so a seeded request still
gives the same tokens alone, in any batch, and after a preemption.

Extreme but valid settings cannot break a step: any integer seed is reduced into the generator's
64-bit range, temperatures below `MIN_TEMPERATURE` are greedy (their limit; dividing by a denormal
would turn logits into inf and the probabilities into NaN), and the picked index is clamped to the
vocabulary. It does not run the model nor decide when a request stops.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

import torch

from serving.kv_batch import to_device
from serving.types import SamplingParams

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy: the distribution is one-hot to float precision
DRAW_AHEAD = 64  # uniform numbers a row draws from its generator at once (one draw call per 64 steps)


@dataclass
class RowSampler:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # None when greedy
    top_k: int = 0  # keep the k most likely tokens before top-p; 0 keeps all (no request field sets it yet)
    _drawn: list[float] = field(default_factory=list, repr=False)  # uniforms drawn ahead
    _used: int = 0  # how many of `_drawn` earlier steps consumed

    @classmethod
    def for_params(cls, p: SamplingParams) -> RowSampler:
        if not p.temperature >= MIN_TEMPERATURE:  # also catches NaN
            return cls(0.0, 1.0, None)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        # manual_seed takes a uint64; reducing keeps every seed valid and distinct seeds distinct below 2**64.
        return cls(float(p.temperature), float(p.top_p), torch.Generator().manual_seed(seed % 2**64))

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0

    def next_uniform(self) -> float:
        """The row's next number in [0, 1) from its generator, not yet consumed (see `consume`)."""
        if self._used == len(self._drawn):
            self._drawn = torch.rand(DRAW_AHEAD, generator=self.generator, dtype=torch.float64).tolist()
            self._used = 0
        return self._drawn[self._used]

    def consume(self) -> None:
        self._used += 1


def sample(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """One token per row of `logits [n, vocab]` (fp32), as a long tensor on the logits' device."""
    tokens = logits.argmax(-1)
    rows = [i for i, s in enumerate(samplers) if s.generator is not None]
    if not rows:
        return tokens
    chosen = [samplers[i] for i in rows]
    cut = [j for j, s in enumerate(chosen) if s.truncates]  # rows that need their tokens sorted
    # Each sampled row's index, temperature, top_p, top_k and uniform number of this step, and the
    # truncating rows' places among them (padded), in one copy: float64 holds them all exactly.
    host = torch.tensor(
        [
            [i, s.temperature, s.top_p, s.top_k, s.next_uniform(), c]
            for i, s, c in itertools.zip_longest(rows, chosen, cut, fillvalue=0)
        ],
        dtype=torch.float64,
    )
    idx, temp, top_p, top_k, u, cut_idx = to_device(host, logits.device).T
    idx = idx.long()
    probs = torch.softmax(logits[idx] / temp.to(logits.dtype)[:, None], dim=-1)
    if len(cut) == len(chosen):
        pick = _truncated_pick(probs, top_p, top_k, u)
    else:
        pick = _inverse_transform(probs.cumsum(-1), u)  # in vocabulary order
        if cut:  # only the truncating rows pay for the sort
            c = cut_idx[: len(cut)].long()
            pick = pick.index_copy(0, c, _truncated_pick(probs[c], top_p[c], top_k[c], u[c]))
    # Consumed last, after every op that could fail, so a retried step draws the same numbers.
    for s in chosen:
        s.consume()
    return tokens.index_copy(0, idx, pick[:, 0])


def _truncated_pick(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, u: torch.Tensor):
    """`[n, 1]` token picked from each row's top-k, then from the smallest set whose mass reaches
    top_p of what top-k kept (the top token always stays), in descending order of probability."""
    sorted_p, order = probs.sort(-1, descending=True)
    top_p, top_k = top_p.to(probs.dtype), top_k.long()
    cum = sorted_p.cumsum(-1)
    vocab = sorted_p.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    # A row without top-k compares with top_p itself (not top_p x a total that rounds near 1).
    mass = torch.where(top_k > 0, cum.gather(1, (k - 1)[:, None])[:, 0], 1.0)
    outside = torch.arange(vocab, device=sorted_p.device)[None] >= k[:, None]
    kept = sorted_p.masked_fill(outside | (cum - sorted_p >= (top_p * mass)[:, None]), 0.0)
    return order.gather(1, _inverse_transform(kept.cumsum(-1), u))


def _inverse_transform(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`[n, 1]` index of the first column where each row's (unnormalised) `cdf` reaches `u` of its total."""
    target = u.to(cdf.dtype) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None]).clamp_(max=cdf.shape[-1] - 1)
