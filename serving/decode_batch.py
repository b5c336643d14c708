"""The running batch: every per-row decode state in one type, as TGI's `CausalLMBatch`.

Row i of a `DecodeBatch` is `requests[i]`: its sampler, the last token it sampled, the position of
its next token, and its keys/values (row i of `kv`). All tensors live on the model's device. A batch
is made by a prefill (`from_prefill`), loses the rows whose requests left (`filter`), and absorbs the
rows of another batch (`concatenate`); `gather` does both at once, so a step copies the KV at most
once. A decode step appends one column to `kv` in place and advances `last_tokens`/`positions`.

It does not run the model (see `serving.runner`) nor decide which requests run (see `serving.scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.kv_batch import KVBatch, row_index, to_device
from serving.sampler import RowSampler
from serving.scheduler import Request


@dataclass
class DecodeBatch:
    requests: list[Request]
    samplers: list[RowSampler]
    kv: KVBatch  # rows in the order of `requests`
    last_tokens: torch.Tensor  # [B] long: each row's latest sampled token, the next decode's input
    positions: torch.Tensor  # [B] long: the position of that token

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    @staticmethod
    def prefill_rows(kv: KVBatch, rows: list[int]) -> KVBatch:
        """Rows `rows` of a prefill's `kv` (its generation rows; the others were classifications)."""
        return kv if rows == list(range(kv.rows)) else KVBatch.gather([(kv, rows)], headroom=0)

    @classmethod
    def from_prefill(
        cls,
        requests: list[Request],
        samplers: list[RowSampler],
        kv: KVBatch,
        tokens: torch.Tensor,
        positions: list[int],
    ) -> DecodeBatch:
        """A batch of the prefilled `requests` (row i of `kv` is requests[i], see `prefill_rows`), with
        their first sampled `tokens` at `positions` (each row's task prompt + text length)."""
        return cls(requests, samplers, kv, tokens, to_device(positions, tokens.device))

    def filter(self, rows: list[int], headroom: int) -> DecodeBatch:
        """The batch of rows `rows` (in that order), in a fresh copy of the KV."""
        return DecodeBatch.gather([(self, rows)], headroom)

    @classmethod
    def concatenate(cls, batches: list[DecodeBatch], headroom: int) -> DecodeBatch:
        """All rows of `batches`, in order, in one KV copy."""
        return cls.gather([(b, list(range(len(b)))) for b in batches], headroom)

    @classmethod
    def gather(cls, parts: list[tuple[DecodeBatch, list[int]]], headroom: int) -> DecodeBatch:
        """Rows `rows` of each batch, stacked in order (a step's leavers and joiners in one copy)."""
        device = parts[0][0].last_tokens.device
        idx = [row_index(rows, len(b), device) for b, rows in parts]
        return cls(
            [b.requests[i] for b, rows in parts for i in rows],
            [b.samplers[i] for b, rows in parts for i in rows],
            KVBatch.gather([(b.kv, rows) for b, rows in parts], headroom, idx),
            torch.cat([b.last_tokens[i] for (b, _), i in zip(parts, idx)]),
            torch.cat([b.positions[i] for (b, _), i in zip(parts, idx)]),
        )
