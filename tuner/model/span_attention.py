"""Attention for packed rows that computes only the blocks a segment can see.

In a packed row (see `tuner.tasks.batching`) every segment attends to its task's prompt copy and,
causally, to itself; a prompt copy attends causally to itself. A dense `[L, L]` mask over a long
row (512 positions holding a dozen segments) makes SDPA compute every pair and throw most away:
measured on this project's CPU, that wasted attention is a fifth of a training step. Here each
*span* (a prompt copy or a segment) becomes one short attention problem: its queries, and as
keys its prompt copy followed by its own positions. Spans of similar length are batched into one
SDPA call (a few calls per layer), so the work is about the sum over spans of
`len x (P + len)` instead of `rows x L^2`.

The layout is built once per batch (`SpanAttention.from_batch`) and reaches every attention layer
through `tuner.model.attention`, the dispatch point that registers the transformers attention function
and picks this plan as the `sdpa` kernel. It is exact: the same scores and softmax as the dense
mask, so losses and gradients match (tested).

Not here: KV caches and decoding (the serving runner has its own path); the GPU varlen and
FlexAttention plans (`tuner.model.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuner.tasks.batching import MultiTaskBatch, map_tensors

# A span joins a bucket while its length is at least this fraction of the bucket's longest: bounds
# the padding each SDPA call computes, while keeping the number of calls per layer small.
_BUCKET_FILL = 0.6


@dataclass
class _Bucket:
    q_index: torch.Tensor  # [B, Q] flat (row * L + col) query positions, padded with a valid position
    k_index: torch.Tensor  # [B, K] flat key positions: prompt copy, then the span itself
    mask: torch.Tensor  # [B, 1, Q, K] True = attend
    out_index: torch.Tensor  # [n] flat positions whose output this bucket produces
    out_select: torch.Tensor  # [n] where those outputs sit in the flattened [B * Q] result


@dataclass
class SpanAttention:
    """Gather/scatter plan for one batch: every span as its own small attention problem."""

    buckets: list[_Bucket]

    @classmethod
    def from_batch(cls, batch: MultiTaskBatch) -> SpanAttention:
        L = batch.input_ids.shape[1]
        P = batch.num_virtual_tokens
        spans = batch.spans()
        spans.sort(key=lambda s: -s[2])

        buckets = []
        while spans:
            longest = spans[0][2]
            take = [s for s in spans if s[2] >= _BUCKET_FILL * longest]
            spans = spans[len(take) :]
            buckets.append(cls._bucket(take, P, L))
        return cls(buckets)

    @staticmethod
    def _bucket(spans: list[tuple[int, int, int, int]], P: int, L: int) -> _Bucket:
        Q = max(n for _, _, n, _ in spans)
        K = Q + max((P for *_, pre in spans if pre >= 0), default=0)
        q_index = torch.empty(len(spans), Q, dtype=torch.long)
        k_index = torch.empty(len(spans), K, dtype=torch.long)
        mask = torch.zeros(len(spans), 1, Q, K, dtype=torch.bool)
        out_index, out_select = [], []
        causal = torch.ones(Q, Q, dtype=torch.bool).tril()
        for b, (row, start, n, pre) in enumerate(spans):
            base, p = row * L, P if pre >= 0 else 0
            own = torch.arange(start, start + n) + base
            q_index[b] = base + start  # padding queries read (and attend to) the span's first position
            q_index[b, :n] = own
            k_index[b] = base + start
            k_index[b, p : p + n] = own
            mask[b, 0, :n, p : p + n] = causal[:n, :n]
            if p:
                k_index[b, :p] = torch.arange(pre, pre + p) + base
                mask[b, 0, :n, :p] = True
            mask[b, 0, n:, 0] = True  # padding queries: one harmless key keeps the softmax finite
            out_index.append(own)
            out_select.append(torch.arange(n) + b * Q)
        return _Bucket(q_index, k_index, mask, torch.cat(out_index), torch.cat(out_select))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SpanAttention:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
        """query [R, H, L, D], key/value [R, Hkv, L, D] -> output [R, L, H, D] (zeros at padding)."""
        R, H, L, D = query.shape
        q = query.transpose(1, 2).reshape(R * L, H, D)
        k = key.transpose(1, 2).reshape(R * L, key.shape[1], D)
        v = value.transpose(1, 2).reshape(R * L, value.shape[1], D)
        outs, where = [], []
        for b in self.buckets:
            # index_select (not advanced indexing): its backward is index_add, where advanced indexing's
            # is an accumulating index_put that runs several times slower with more than one thread.
            n, Q = b.q_index.shape
            K = b.k_index.shape[1]
            o = F.scaled_dot_product_attention(
                q.index_select(0, b.q_index.view(-1)).view(n, Q, H, D).transpose(1, 2),  # [n, H, Q, D]
                k.index_select(0, b.k_index.view(-1)).view(n, K, -1, D).transpose(1, 2),
                v.index_select(0, b.k_index.view(-1)).view(n, K, -1, D).transpose(1, 2),
                attn_mask=b.mask,
                scale=scaling,
                enable_gqa=key.shape[1] != H,
            )
            outs.append(o.transpose(1, 2).reshape(-1, H, D).index_select(0, b.out_select))
            where.append(b.out_index)
        out = query.new_zeros(R * L, H, D).index_copy(0, torch.cat(where), torch.cat(outs))
        return out.view(R, L, H, D)
