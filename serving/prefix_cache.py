"""Task prefix KV cache: each task's soft-prompt keys/values, computed once and reused by every request.

A task's P virtual tokens always sit at positions 0..P-1 and, under causal attention, their keys and
values never depend on the tokens that follow. So one forward of the P prompt vectors gives KV that
every request of that task can start from: at prefill the rows of a step take their tasks' entries
in one indexed copy (`KVBatch.from_prefixes`: rows of one task share its entry, the tensor returned
for each of them) and no request pays prefill for its prompt. Entries are keyed by (task, adapter version), so a reloaded adapter
never hits a stale entry; `invalidate(task)` frees the old one at once. The cache is an LRU bounded
by bytes; with `enabled=False` every lookup recomputes (the equivalent of no cache, for comparison).

It stores tensors and counts; computing the KV is the runner's `compute` callable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

# compute(prompts[n, P, H]) -> kv[L, 2, n, kv_heads, P, head_dim] (all n prompts have the same P)
ComputeKV = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class BytesLRU:
    """Entries by key, least recently used first, bounded by the bytes of their values (`size_of`);
    `capacity_bytes` None: unbounded. `stats` needs `evictions`, `bytes` and `entries`. Shared by the
    prefix KV cache and the prompt cache (`serving.prompt_cache`); hits and misses are the users' to count."""

    def __init__(self, capacity_bytes: int | None, stats, size_of: Callable[[object], int]):
        self.capacity_bytes = capacity_bytes
        self.stats = stats
        self._size_of = size_of
        self._entries: OrderedDict[tuple[str, Hashable], object] = OrderedDict()

    def _put(self, key: tuple[str, Hashable], value) -> None:
        size, cap = self._size_of(value), self.capacity_bytes
        if cap is not None and size > cap:
            return  # larger than the whole cache: served, not kept
        self._drop(key)
        while cap is not None and self.stats.bytes + size > cap:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = value
        self.stats.bytes += size
        self.stats.entries = len(self._entries)

    def _drop(self, key: tuple[str, Hashable]) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.stats.bytes -= self._size_of(value)
            self.stats.entries = len(self._entries)


class PrefixKVCache(BytesLRU):
    def __init__(self, compute: ComputeKV, capacity_bytes: int, enabled: bool = True):
        super().__init__(capacity_bytes, PrefixCacheStats(), lambda kv: kv.numel() * kv.element_size())
        self._compute = compute
        self.enabled = enabled

    def get_many(self, items: list[tuple[str, Hashable, torch.Tensor]]) -> list[torch.Tensor]:
        """KV `[L, 2, kv_heads, P, head_dim]` for each `(task, version, prompt[P, H])`.

        Misses are computed together, one forward per distinct prompt length.
        """
        out = self.lookup_many([(task, version) for task, version, _ in items])
        missing: dict[tuple[str, Hashable], list[int]] = {}  # its rows, for each task not cached
        for i, kv in enumerate(out):
            if kv is None:
                missing.setdefault(items[i][:2], []).append(i)
        by_len: dict[int, list[tuple[str, Hashable]]] = {}
        for key, rows in missing.items():
            by_len.setdefault(items[rows[0]][2].shape[0], []).append(key)
        for keys in by_len.values():
            kv = self._compute(torch.stack([items[missing[k][0]][2] for k in keys]))
            for j, key in enumerate(keys):
                entry = kv[:, :, j].contiguous()
                for i in missing[key]:
                    out[i] = entry
                if self.enabled:
                    self._put(key, entry)
        return out

    def lookup_many(self, items: list[tuple[str, Hashable]]) -> list[torch.Tensor | None]:
        """The cached KV of each `(task, version)`, None where it is not cached: the caller computes
        those (`get_many`, or inside the request's own forward, `ModelRunner.forward_new`) and `put`s
        them. One miss per distinct task; its other rows share that compute and count as hits."""
        out: list[torch.Tensor | None] = []
        missed: set[tuple[str, Hashable]] = set()
        for key in items:
            kv = self._entries.get(key) if self.enabled else None
            if kv is not None:
                self._entries.move_to_end(key)
            elif key not in missed:
                missed.add(key)
                self.stats.misses += 1
                out.append(None)
                continue
            self.stats.hits += 1
            out.append(kv)
        return out

    def put(self, task: str, version: Hashable, kv: torch.Tensor) -> None:
        """Keep `kv` `[L, 2, kv_heads, P, head_dim]`, computed by the caller, as `task`'s prompt KV."""
        if self.enabled:
            self._put((task, version), kv)

    def invalidate(self, task: str) -> None:
        """Forget every cached version of `task` (its adapter changed or was removed)."""
        for key in [k for k in self._entries if k[0] == task]:
            self._drop(key)
