"""Token sampling for a batch of rows, each with its own settings, on the batch's device.

Greedy rows take the argmax. Sampled rows (temperature > 0) divide their logits by the temperature,
keep the top-p nucleus, and pick a token by inverse transform: one uniform number per row from the
row's own CPU `torch.Generator` (seeded by the request's seed), compared with the nucleus's
cumulative probabilities. So a seeded request gives the same tokens alone or in any batch, and the
whole batch is sampled with a few tensor ops and no host synchronisation (the caller reads the
tokens once per step).

Extreme but valid settings cannot break a step: any integer seed is reduced into the generator's
64-bit range, temperatures below `MIN_TEMPERATURE` are greedy (their limit; dividing by a denormal
would turn logits into inf and the probabilities into NaN), and the picked index is clamped to the
vocabulary. It does not run the model nor decide when a request stops.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from serving.kv_batch import to_device
from serving.types import SamplingParams

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy: the distribution is one-hot to float precision


@dataclass
class RowSampler:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # None when greedy

    @classmethod
    def for_params(cls, p: SamplingParams) -> RowSampler:
        if not p.temperature >= MIN_TEMPERATURE:  # also catches NaN
            return cls(0.0, 1.0, None)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        # manual_seed takes a uint64; reducing keeps every seed valid and distinct seeds distinct below 2**64.
        return cls(float(p.temperature), float(p.top_p), torch.Generator().manual_seed(seed % 2**64))


def sample(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """One token per row of `logits [n, vocab]` (fp32), as a long tensor on the logits' device."""
    tokens = logits.argmax(-1)
    rows = [i for i, s in enumerate(samplers) if s.generator is not None]
    if not rows:
        return tokens
    device = logits.device
    chosen = [samplers[i] for i in rows]
    idx = to_device(rows, device)
    temp = to_device([s.temperature for s in chosen], device, logits.dtype)
    probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)
    if any(s.top_p < 1.0 for s in chosen):
        top_p = to_device([s.top_p for s in chosen], device, logits.dtype)
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the top token always stays).
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p[:, None], 0.0)
    else:
        sorted_p, order = probs, None
    cdf = sorted_p.cumsum(-1)
    # Drawn last, after every op that could fail, so a retried step draws the same numbers.
    u = torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float64) for s in chosen])
    target = to_device(u, device).to(cdf.dtype) * cdf[:, -1]
    pick = torch.searchsorted(cdf, target[:, None]).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        pick = order.gather(1, pick)
    return tokens.index_copy(0, idx, pick[:, 0])
