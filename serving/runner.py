"""The model runner: one frozen backbone, every task's soft prompt, a batched KV cache, sampling.

`ModelRunner.step(SchedulerOutput)` runs one engine step:
  1. drop the rows of requests that left (`KVBatch.filter`),
  2. decode: one forward over all running rows of all tasks (input = each row's last token,
     position = its own next position, attention over its own KV columns only),
  3. prefill the newly admitted requests: each row starts from its task's prompt KV, gathered from
     the task prefix cache (`serving.prefix_cache`) at positions 0..P-1, and only its text tokens
     (positions P..P+L-1) go through the model; the new rows then join the batch
     (`KVBatch.concatenate`).
This computes what PEFT's prompt tuning computes, `inputs_embeds = cat(prompt, embed(ids))` at
positions 0..P+L-1, split into a cached prefix and the rest.

Sampling is greedy at temperature 0, else temperature + top-p with a per-request `torch.Generator`
seeded by the request's seed, so a sampled request gives the same tokens alone or in any batch.
`score` gives the summed log-probs of continuations (classification by verbaliser).

It does not decide which requests run (the scheduler does) nor detokenise or stop them.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from serving.kv_batch import KVBatch
from serving.prefix_cache import PrefixKVCache
from serving.scheduler import Request, SchedulerOutput


class TaskPrompt(Protocol):
    """What the runner needs of a task (`serving.registry.TaskEntry` is one)."""

    name: str
    version: Hashable
    prompt: torch.Tensor  # [P, hidden]


@dataclass
class RowSampler:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # None when greedy

    @classmethod
    def for_request(cls, req: Request) -> RowSampler:
        p = req.params
        if p.temperature <= 0:
            return cls(0.0, 1.0, None)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return cls(p.temperature, p.top_p, torch.Generator().manual_seed(seed))

    def sample(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the top token always stays).
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


class ModelRunner:
    def __init__(self, model, prefix_cache_bytes: int = 256 * 2**20, prefix_cache: bool = True,
                 kv_headroom: int = 64):
        """Args:
            model: a transformers causal LM (frozen, eval mode).
            prefix_cache_bytes: LRU bound of the task prefix KV cache.
            prefix_cache: False recomputes every request's prompt KV (for comparison).
            kv_headroom: free columns reserved when the batch's KV tensor is (re)allocated.
        """
        self.model = model
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.max_positions = getattr(cfg, "max_position_embeddings", 2048)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.headroom = kv_headroom
        self.prefix_cache = PrefixKVCache(self._prompt_kv, prefix_cache_bytes, prefix_cache)
        self.prefill_tokens_total = 0
        # The running batch: row i belongs to row_ids[i].
        self.batch: KVBatch | None = None
        self.row_ids: list[str] = []
        self.samplers: list[RowSampler] = []
        self.last_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ one engine step
    @torch.inference_mode()
    def step(self, out: SchedulerOutput) -> dict[str, int]:
        """Run the step; return each scheduled request's sampled token id."""
        self._keep([r.request_id for r in out.decode])
        sampled: dict[str, int] = {}
        if self.batch is not None:
            tokens = self._sample(self._decode(), self.samplers)
            self._advance(tokens)
            sampled.update(zip(self.row_ids, tokens))
        if out.prefill:
            sampled.update(self._prefill(out.prefill))
        return sampled

    def reset(self) -> None:
        """Drop every running row."""
        self.batch, self.row_ids, self.samplers = None, [], []
        self.last_tokens, self.next_pos = self.last_tokens[:0], self.next_pos[:0]

    def _keep(self, ids: list[str]) -> None:
        if ids == self.row_ids:
            return
        if not ids:
            self.reset()
            return
        where = {rid: i for i, rid in enumerate(self.row_ids)}
        keep = [where[rid] for rid in ids]
        self.batch = self.batch.filter(keep, self.headroom)
        self.row_ids = list(ids)
        self.samplers = [self.samplers[i] for i in keep]
        idx = torch.tensor(keep, device=self.device)
        self.last_tokens, self.next_pos = self.last_tokens[idx], self.next_pos[idx]

    def _decode(self) -> torch.Tensor:
        b = self.batch
        b.reserve(1, self.headroom)
        b.mask[:, b.length] = 1
        hidden = self.decoder(input_ids=self.last_tokens[:, None], position_ids=self.next_pos[:, None],
                              attention_mask=b.mask[:, :b.length + 1], past_key_values=b,
                              use_cache=True).last_hidden_state
        b.length += 1
        return self.lm_head(hidden[:, -1]).float()

    def _advance(self, tokens: list[int]) -> None:
        self.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.next_pos = self.next_pos + 1

    def _prefill(self, reqs: list[Request]) -> dict[str, int]:
        seqs = [r.prompt_ids for r in reqs]
        batch, hidden = self.forward_new([r.adapter for r in reqs], seqs)
        samplers = [RowSampler.for_request(r) for r in reqs]
        tokens = self._sample(self.lm_head(hidden[:, -1]).float(), samplers)
        self.prefill_tokens_total += sum(len(s) for s in seqs)
        start = torch.tensor([r.adapter.prompt.shape[0] + len(r.prompt_ids) for r in reqs], device=self.device)
        self.batch = batch if self.batch is None else KVBatch.concatenate([self.batch, batch], self.headroom)
        self.row_ids += [r.request_id for r in reqs]
        self.samplers += samplers
        self.last_tokens = torch.cat([self.last_tokens, torch.tensor(tokens, device=self.device)])
        self.next_pos = torch.cat([self.next_pos, start])
        return {r.request_id: t for r, t in zip(reqs, tokens)}

    @staticmethod
    def _sample(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, s in enumerate(samplers):
            if s.generator is not None:
                tokens[i] = s.sample(logits[i])
        return tokens

    # ------------------------------------------------------------------ forwards
    def _prompt_kv(self, prompts: torch.Tensor) -> torch.Tensor:
        """KV of `n` task prompts (same length P), as if they were the first P tokens of a row."""
        n, P, _ = prompts.shape
        b = KVBatch.empty(self.num_layers, n, self.kv_heads, self.head_dim, P, self.dtype, self.device)
        pos = torch.arange(P, device=self.device).expand(n, P)
        self.decoder(inputs_embeds=prompts.to(self.device, self.dtype), position_ids=pos, past_key_values=b,
                     use_cache=True)
        return b.kv

    def forward_new(self, tasks: list[TaskPrompt], seqs: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
        """Run new rows (task prompt KV from the prefix cache + text tokens) through the model.

        Layout per row: `[pad][prompt KV: P_i][pad][text: L_i]`, the prompts right-aligned at column
        max(P), the texts right-aligned at the end, so every row's last token is the last column.

        Returns:
            The rows' `KVBatch` and the hidden states of the text columns `[n, max(L), hidden]`.
        """
        kvs = self.prefix_cache.get_many([(t.name, t.version, t.prompt) for t in tasks])
        n, pmax, lmax = len(seqs), max(kv.shape[3] for kv in kvs), max(len(s) for s in seqs)
        b = KVBatch.empty(self.num_layers, n, self.kv_heads, self.head_dim, pmax + lmax + self.headroom,
                          self.dtype, self.device)
        ids = torch.zeros(n, lmax, dtype=torch.long)
        pos = torch.zeros(n, lmax, dtype=torch.long)
        for i, (kv, s) in enumerate(zip(kvs, seqs)):
            P, L = kv.shape[3], len(s)
            b.kv[:, :, i, :, pmax - P:pmax] = kv
            b.mask[i, pmax - P:pmax] = 1
            b.mask[i, pmax + lmax - L:pmax + lmax] = 1
            ids[i, lmax - L:] = torch.tensor(s)
            pos[i, lmax - L:] = torch.arange(P, P + L)
        b.length = pmax
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                              attention_mask=b.mask[:, :pmax + lmax], past_key_values=b,
                              use_cache=True).last_hidden_state
        b.length = pmax + lmax
        return b, hidden

    @torch.inference_mode()
    def next_token_logits(self, tasks: list[TaskPrompt], seqs: list[list[int]]) -> torch.Tensor:
        """Logits after each row's last token `[n, vocab]` (fp32), through the prefix cache."""
        _, hidden = self.forward_new(tasks, seqs)
        return self.lm_head(hidden[:, -1]).float()

    @torch.inference_mode()
    def score(self, task: TaskPrompt, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Summed log-prob of each continuation's tokens after the task prompt and `prompt_ids`."""
        seqs = [prompt_ids + c for c in continuations]
        _, hidden = self.forward_new([task] * len(seqs), seqs)
        lmax = hidden.shape[1]
        rows, cols, targets = [], [], []
        for i, (s, c) in enumerate(zip(seqs, continuations)):
            first = lmax - len(s) + len(prompt_ids) - 1  # the column that predicts c[0]
            rows += [i] * len(c)
            cols += range(first, first + len(c))
            targets += c
        logp = torch.log_softmax(self.lm_head(hidden[rows, cols]).float(), dim=-1)
        picked = logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)]
        sums = torch.zeros(len(seqs)).index_add(0, torch.tensor(rows), picked.cpu())
        return sums.tolist()
