"""Weighted max-min fair shares (water-filling), as the scheduler splits batch slots and step tokens."""

from __future__ import annotations


def water_fill(capacity: float, demand: dict[str, float], weight: dict[str, float]) -> dict[str, float]:
    """Each key's weighted max-min fair share of `capacity`: never more than its demand, and what a
    key does not need is split between the others by weight (work-conserving)."""
    share = {k: 0.0 for k in demand}
    left, open_ = float(capacity), {k for k, d in demand.items() if d > 0}
    while open_ and left > 1e-9:
        total = sum(weight[k] for k in open_)
        quota = {k: left * weight[k] / total for k in open_}
        done = {k for k in open_ if demand[k] - share[k] <= quota[k]}
        if not done:  # everyone wants more than its quota: split all that is left
            for k in open_:
                share[k] += quota[k]
            break
        for k in done:
            left -= demand[k] - share[k]
            share[k] = demand[k]
        open_ -= done
    return share
