"""The scheduler's sharing rules: its configuration, weighted max-min fair shares (water-filling, as
it splits batch slots and step tokens) and each step's token budget."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    max_batch_size: int = 32  # running requests decoded together in one forward
    max_queue: int = 256  # waiting requests before `add` raises Overloaded
    max_step_tokens: int = 4096  # prefill + decode tokens per step (longer prompts are chunked)
    alone_step_tokens: int = 0  # a step's tokens while one tenant has the engine and none decode (0: max)
    shared_step_tokens: int = 0  # what flooding tenants share of a step while others have work (0: no cap)
    min_chunk_tokens: int = 16  # no chunk smaller than this (unless all that is left of a prompt)
    shared_hold_s: float = 2.0  # a tenant counts as sharing the engine this long after its last work
    alone_after_s: float = 30.0  # `alone_step_tokens` once no other tenant has had work for this long
    flood_steps: int = 4  # a tenant with more prefill waiting than this many whole steps is flooding


def step_tokens(config: SchedulerConfig, decoding: bool, last_active: Iterable[float], now: float) -> int:
    """A step's token budget: `max_step_tokens`, or `alone_step_tokens` when larger while no row
    decodes (a batch of prefills or classifications: no stream's next token waits for the step) and
    at most one tenant had work in the last `alone_after_s` (`last_active`: each tenant's last clock
    time with work). A tenant busy now and then keeps short steps; one that comes back after that long
    waits for one long step first. A larger matrix multiply costs less per token on a CPU: a tenant
    alone gets that throughput."""
    limit = config.max_step_tokens
    if decoding or config.alone_step_tokens <= limit:
        return limit
    recent = sum(now - t <= config.alone_after_s for t in last_active)
    return config.alone_step_tokens if recent <= 1 else limit


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
