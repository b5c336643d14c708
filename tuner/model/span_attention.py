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
        # In tensor ops over all the bucket's spans at once: a forward of a fleet's examples holds
        # thousands of spans (each example and each prompt copy is one), so no Python work per span.
        row, start, n, pre = torch.tensor(spans, dtype=torch.long).unbind(1)
        Q = int(n.max())
        p = torch.where(pre >= 0, P, 0)  # [B] prompt keys each span reads (its prompt copy's P, or none)
        K = Q + (P if bool((pre >= 0).any()) else 0)
        base = row * L
        i = torch.arange(Q)[None, :]  # [1, Q] query offset in the span
        valid = i < n[:, None]  # [B, Q] the span's own queries; the rest pad the bucket
        # padding queries read (and attend to) the span's first position
        q_index = base[:, None] + start[:, None] + torch.where(valid, i, 0)
        j = torch.arange(K)[None, :]  # [1, K] key slots: the prompt copy, then the span itself
        own = j - p[:, None]  # [B, K] offset in the span of an own key
        in_prompt = j < p[:, None]
        in_own = (own >= 0) & (own < n[:, None])
        own_or_first = start[:, None] + torch.where(in_own, own, 0)  # unused slots read the first position
        k_index = base[:, None] + torch.where(in_prompt, pre[:, None] + j, own_or_first)
        causal = own[:, None, :] <= i[:, :, None]  # [B, Q, K]
        mask = valid[:, :, None] & (in_prompt[:, None, :] | (in_own[:, None, :] & causal))
        mask[:, :, 0] |= ~valid  # padding queries: one harmless key keeps the softmax finite
        out_select = (i + Q * torch.arange(len(spans))[:, None])[valid]
        return _Bucket(q_index, k_index, mask[:, None], q_index[valid], out_select)

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
