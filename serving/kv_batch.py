"""The running batch's KV cache: one preallocated tensor, left-padded, joined and filtered between steps.

`KVBatch` keeps the keys/values of all layers and all rows in `kv[L, 2, B, kv_heads, capacity,
head_dim]`; `mask[B, capacity]` says which columns of a row hold real tokens (rows are left-padded,
and a row may also have holes where its task prompt is shorter than another row's). A decode step
writes the new column in place (no per-step concatenation, unlike `DynamicCache`); new rows start
from their prefixes (task prompt KV, earlier chunks) gathered in one indexed copy (`from_prefixes`),
their ids / positions / mask laid out by `prefill_layout`; between steps `gather` makes the next
batch's KV from rows of several batches in one copy (rows leave and join:
`serving.decode_batch.DecodeBatch` does its filter and concatenate with it). None of these costs a
tensor op per row or per task: on a GPU a small model's step is as fast as the host issues it.
It implements the transformers `Cache` interface, so it is passed to the model as
`past_key_values`; the caller advances `length` after each forward (all layers write at the same
offset during it). Everything lives on the model's device; `to_device` brings host data there
without stalling the stream.

It does not run the model, and knows nothing of tasks, requests or sampling (see `serving.runner`).
"""

from __future__ import annotations

import itertools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def to_device(data: list | torch.Tensor, device: torch.device | str, dtype=torch.long) -> torch.Tensor:
    """Host data (a list or CPU tensor) on `device`, without waiting for the device: a CUDA copy from
    pageable memory first synchronises the stream, so it goes through pinned memory, asynchronously."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def prefill_layout(prefix_lengths: list[int], seqs: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Host tensors `ids [n, max L]`, `positions [n, max L]`, `mask [n, max P + max L]` of new rows laid
    out as `[pad][prefix: P_i][pad][text: L_i]` (prefixes right-aligned at column max P, texts at
    the end; a row's text sits at positions P_i..P_i+L_i-1). Built by a fixed number of tensor ops
    from the flattened token ids, whatever the number of rows (a per-row loop of slice writes cost
    ~0.15 ms a row).
    """
    n = len(seqs)
    P = torch.tensor(prefix_lengths, dtype=torch.long)
    L = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    pmax, lmax = max(prefix_lengths), max(len(s) for s in seqs)
    flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(n), L)  # each token's row
    k = torch.arange(flat.numel()) - (L.cumsum(0) - L)[row]  # each token's place in its row
    col = lmax - L[row] + k
    ids = torch.zeros(n, lmax, dtype=torch.long)
    ids[row, col] = flat
    pos = torch.zeros(n, lmax, dtype=torch.long)
    pos[row, col] = P[row] + k
    c = torch.arange(pmax + lmax)[None]
    mask = ((c >= (pmax - P)[:, None]) & (c < pmax)) | (c >= (pmax + lmax - L)[:, None])
    return ids, pos, mask.long()


def row_index(rows: list[int], total: int, device: torch.device | str) -> torch.Tensor | slice:
    """An index of `rows` out of `total` rows: a slice when they are all of them, in order (no copy to
    the device, no gather), else a long tensor on `device`."""
    return slice(None) if rows == list(range(total)) else to_device(rows, device)


class _LayerView(CacheLayerMixin):
    """One layer's slice of the shared tensor, as the transformers attention code expects."""

    is_sliding = False

    def __init__(self, owner: KVBatch, idx: int):
        super().__init__()
        self.owner, self.idx, self.is_initialized = owner, idx, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self.idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return -1


class KVBatch(Cache):
    def __init__(self, kv: torch.Tensor, mask: torch.Tensor, length: int, first: list[int] | None = None):
        super().__init__(layers=[_LayerView(self, i) for i in range(kv.shape[0])])
        self.kv = kv  # [L, 2, B, H, C, D]
        self.mask = mask  # [B, C] int64: 1 = real token
        self.length = length  # columns in use (the same for every row)
        # Each row's first real column, kept on the host so that `gather` trims padding without
        # reading the mask back from the device (0 = unknown: nothing is trimmed).
        self.first = first if first is not None else [0] * kv.shape[2]

    @classmethod
    def empty(
        cls,
        num_layers: int,
        rows: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVBatch:
        # Zeros, not empty: masked columns are still multiplied by 0 in attention, and 0 * NaN = NaN.
        kv = torch.zeros(num_layers, 2, rows, heads, capacity, head_dim, dtype=dtype, device=device)
        return cls(kv, torch.zeros(rows, capacity, dtype=torch.long, device=device), 0)

    @property
    def rows(self) -> int:
        return self.kv.shape[2]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store one layer's new K/V at columns `length:length+n`; return that layer's K/V so far."""
        end = self.length + keys.shape[-2]
        self.kv[layer, 0, :, :, self.length : end] = keys
        self.kv[layer, 1, :, :, self.length : end] = values
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def reserve(self, n: int, headroom: int = 64) -> None:
        """Make room for `n` more columns (reallocating with `headroom` extra when full)."""
        if self.length + n <= self.capacity:
            return
        kv = self.kv.new_zeros(*self.kv.shape[:4], self.length + n + headroom, self.kv.shape[5])
        kv[..., : self.length, :] = self.kv[..., : self.length, :]
        mask = self.mask.new_zeros(self.rows, kv.shape[4])
        mask[:, : self.length] = self.mask[:, : self.length]
        self.kv, self.mask = kv, mask

    @classmethod
    def from_prefixes(cls, prefixes: list[torch.Tensor], capacity: int) -> KVBatch:
        """Rows that start from `prefixes[i]` `[L, 2, kv_heads, P_i, head_dim]` (a task's prompt KV from
        the prefix cache, or a request's KV of its earlier chunks), right-aligned at column max(P),
        in a batch of `capacity` columns whose `length` is max(P). The mask is the caller's to set
        (it knows the columns that follow).

        Rows of one task share one cache entry: the distinct entries of each prompt length are
        stacked once and every row takes its own by index, so the copy is one stack and one indexed
        gather per distinct length (one, in the usual step), however many rows and tasks there are.
        """
        ref = prefixes[0]
        L, _, heads, _, dim = ref.shape
        out = cls.empty(L, len(prefixes), heads, dim, capacity, ref.dtype, ref.device)
        pmax = max(p.shape[3] for p in prefixes)
        by_len: dict[int, tuple[dict[int, int], list[torch.Tensor], list[int], list[int]]] = {}
        for row, p in enumerate(prefixes):  # (entry slot by id, entries, rows, each row's slot)
            slot, entries, rows, picks = by_len.setdefault(p.shape[3], ({}, [], [], []))
            if id(p) not in slot:
                slot[id(p)] = len(entries)
                entries.append(p)
            rows.append(row)
            picks.append(slot[id(p)])
            out.first[row] = pmax - p.shape[3]
        for P, (_, entries, rows, picks) in by_len.items():
            if P == 0:
                continue
            if len(entries) == 1:  # broadcast by the copy itself
                src = entries[0].unsqueeze(2)
            else:
                src = torch.stack(entries, dim=2)  # [L, 2, distinct, H, P, D]
                if picks != list(range(len(picks))):
                    src = src.index_select(2, to_device(picks, ref.device))
            dst = row_index(rows, len(prefixes), ref.device)
            out.kv[:, :, dst, :, pmax - P : pmax] = src
        out.length = pmax
        return out

    @classmethod
    def gather(
        cls,
        parts: list[tuple[KVBatch, list[int]]],
        headroom: int,
        index: list[torch.Tensor | slice] | None = None,
    ) -> KVBatch:
        """Rows `keep` of each batch, stacked in order, in one copy (a step's leavers and joiners at once).

        Each part is right-aligned to the widest; columns that are padding in every kept row of a part
        are dropped first, so the batch does not keep growing to the left as requests come and go.
        `index[i]`, when given, is `row_index` of part i's rows (made once for every per-row tensor).
        """
        spans = []  # (batch, rows kept, row index, first column kept)
        for i, (b, keep) in enumerate(parts):
            idx = index[i] if index is not None else row_index(keep, b.rows, b.kv.device)
            spans.append((b, keep, idx, min((b.first[r] for r in keep), default=b.length)))
        width = max(b.length - first for b, _, _, first in spans)
        ref = parts[0][0].kv
        out = cls.empty(
            ref.shape[0],
            sum(len(keep) for _, keep, _, _ in spans),
            ref.shape[3],
            ref.shape[5],
            width + headroom,
            ref.dtype,
            ref.device,
        )
        row = 0
        for b, keep, idx, first in spans:
            n, start = len(keep), width - (b.length - first)
            out.kv[:, :, row : row + n, :, start:width] = b.kv[:, :, idx, :, first : b.length]
            out.mask[row : row + n, start:width] = b.mask[idx, first : b.length]
            out.first[row : row + n] = [start + b.first[r] - first for r in keep]
            row += n
        out.length = width
        return out
