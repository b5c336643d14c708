"""The model runner: one frozen backbone, every task's soft prompt, a batched KV cache, sampling.

`ModelRunner.step(SchedulerOutput, score_jobs)` runs one engine step:
  1. decode: one forward over all rows of the running batch, all tasks together (input = each
     row's last token, position = its own next position, attention over its own KV columns only);
     rows whose request left since the previous step ride along and are dropped in step 3,
  2. new rows: the newly admitted requests (prefill) and this step's classifications (`ScoreJob`s,
     any tasks) go through the model together. Each row starts from its task's prompt KV, gathered
     from the task prefix cache (`serving.prefix_cache`) at positions 0..P-1, and only its text
     tokens (positions P..P+L-1) are computed. Rows are grouped by length (`length_groups`) so
     that padding, which costs as much compute as real tokens, stays small; one forward per group,
  3. the running rows that stay and the new generation rows form the next batch in one KV copy
     (`KVBatch.gather`); classification rows are discarded after their logits are read.
This computes what PEFT's prompt tuning computes, `inputs_embeds = cat(prompt, embed(ids))` at
positions 0..P+L-1, split into a cached prefix and the rest.

Sampling is greedy at temperature 0, else temperature + top-p with a per-request `torch.Generator`
seeded by the request's seed, so a sampled request gives the same tokens alone or in any batch.
A classification scores each label's verbaliser tokens: one row per distinct verbaliser prefix, so
single-token verbalisers cost one row per request whatever the number of labels.

It does not decide which requests run (the scheduler does) nor detokenise or stop them.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable
from dataclasses import dataclass, field
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
class ScoreJob:
    """One classification: the summed log-prob of each continuation after task prompt + `prompt_ids`."""

    task: TaskPrompt
    prompt_ids: list[int]
    continuations: list[list[int]]
    scores: list[float] = field(default_factory=list)  # filled by `ModelRunner.step`


def length_groups(lengths: list[int], overhead: int) -> list[list[int]]:
    """Split rows into forwards of similar length, minimising sum(overhead + rows * longest row).

    A padded forward computes every row at the longest row's length, while each extra forward costs
    about `overhead` tokens (reading the weights once more, Python). Optimal over contiguous runs of
    the rows sorted by length (dynamic programming, O(n^2) for n rows: microseconds for a step).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + overhead + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class _NewRows:
    """A step's prefilled requests, in the row order of their KV `parts` (length groups reorder them)."""

    parts: list[tuple[KVBatch, list[int]]] = field(default_factory=list)  # (group batch, its generation rows)
    requests: list[Request] = field(default_factory=list)
    samplers: list[RowSampler] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # each request's first sampled token


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
    def __init__(
        self,
        model,
        prefix_cache_bytes: int = 256 * 2**20,
        prefix_cache: bool = True,
        kv_headroom: int = 64,
        group_overhead_tokens: int = 64,
    ):
        """Args:
        model: a transformers causal LM (frozen, eval mode).
        prefix_cache_bytes: LRU bound of the task prefix KV cache.
        prefix_cache: False recomputes every request's prompt KV (for comparison).
        kv_headroom: free columns reserved when the batch's KV tensor is (re)allocated.
        group_overhead_tokens: the fixed cost of one more forward, in tokens of compute; new rows
            are split by length into separate forwards when that saves more padding than this.
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
        self.group_overhead = group_overhead_tokens
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
    def step(self, out: SchedulerOutput, score_jobs: list[ScoreJob] = ()) -> dict[str, int]:
        """Run the step; return each scheduled request's sampled token id (scores go into the jobs)."""
        where = {rid: i for i, rid in enumerate(self.row_ids)}
        keep = sorted(where[r.request_id] for r in out.decode)  # rows stay in place: no copy unless one left
        sampled: dict[str, int] = {}
        if keep:
            tokens = self._sample(self._decode(), self.samplers)
            sampled.update((self.row_ids[i], tokens[i]) for i in keep)
            self.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
            self.next_pos = self.next_pos + 1
        new = self._new_rows(out.prefill, list(score_jobs)) if out.prefill or score_jobs else _NewRows()
        sampled.update((r.request_id, t) for r, t in zip(new.requests, new.tokens))
        self._regroup(keep, new)
        return sampled

    def reset(self) -> None:
        """Drop every running row."""
        self.batch, self.row_ids, self.samplers = None, [], []
        self.last_tokens, self.next_pos = self.last_tokens[:0], self.next_pos[:0]

    def _regroup(self, keep: list[int], new: _NewRows) -> None:
        """Make the next batch: rows `keep` of the running batch, then the newly prefilled rows."""
        if not keep and not new.requests:
            self.reset()
            return
        if not new.requests and keep == list(range(len(self.row_ids))):
            return  # nobody left or joined: no copy
        self.batch = KVBatch.gather(([(self.batch, keep)] if keep else []) + new.parts, self.headroom)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        start = [r.adapter.prompt.shape[0] + len(r.prompt_ids) for r in new.requests]
        self.row_ids = [self.row_ids[i] for i in keep] + [r.request_id for r in new.requests]
        self.samplers = [self.samplers[i] for i in keep] + new.samplers
        self.last_tokens = torch.cat(
            [self.last_tokens[idx], torch.tensor(new.tokens, dtype=torch.long, device=self.device)]
        )
        self.next_pos = torch.cat(
            [self.next_pos[idx], torch.tensor(start, dtype=torch.long, device=self.device)]
        )

    def _decode(self) -> torch.Tensor:
        b = self.batch
        b.reserve(1, self.headroom)
        b.mask[:, b.length] = 1
        hidden = self.decoder(
            input_ids=self.last_tokens[:, None],
            position_ids=self.next_pos[:, None],
            attention_mask=b.mask[:, : b.length + 1],
            past_key_values=b,
            use_cache=True,
        ).last_hidden_state
        b.length += 1
        return self.lm_head(hidden[:, -1]).float()

    def _new_rows(self, reqs: list[Request], jobs: list[ScoreJob]) -> _NewRows:
        """Prefill `reqs` and score `jobs` (scores go into the jobs) in as few forwards as padding allows."""
        tasks: list[TaskPrompt] = [r.adapter for r in reqs]
        seqs = [r.prompt_ids for r in reqs]
        reads: dict[tuple[int, int], int] = {
            (i, len(s) - 1): i for i, s in enumerate(seqs)
        }  # (row, token) -> read
        picks = []  # per job, per continuation: [(read, target token), ...]
        for job in jobs:
            rows: dict[tuple[int, ...], int] = {}  # one row per distinct continuation prefix c[:-1]
            per_cont = []
            for c in job.continuations:
                if not c:
                    per_cont.append([])  # log-prob of nothing: 0
                    continue
                row = rows.setdefault(tuple(c[:-1]), len(seqs))
                if row == len(seqs):
                    tasks.append(job.task)
                    seqs.append(job.prompt_ids + list(c[:-1]))
                first = len(job.prompt_ids) - 1  # the token whose logits predict c[0]
                per_cont.append(
                    [(reads.setdefault((row, first + k), len(reads)), t) for k, t in enumerate(c)]
                )
            picks.append(per_cont)

        hidden = torch.empty(len(reads), self.hidden_size, dtype=self.dtype, device=self.device)
        new = _NewRows()
        kept: list[int] = []  # generation rows in the order of `new.parts`
        for group in length_groups([len(s) for s in seqs], self.group_overhead):
            batch, h = self.forward_new([tasks[i] for i in group], [seqs[i] for i in group])
            lmax, local = h.shape[1], {row: j for j, row in enumerate(group)}
            sel = [
                (read, local[row], lmax - len(seqs[row]) + tok)
                for (row, tok), read in reads.items()
                if row in local
            ]
            read_idx, rows, cols = (list(x) for x in zip(*sel))
            hidden[read_idx] = h[rows, cols]
            gen = [j for j, row in enumerate(group) if row < len(reqs)]
            if gen:
                new.parts.append((batch, gen))
                kept += [group[j] for j in gen]
        logits = self.lm_head(hidden).float()
        new.requests = [reqs[i] for i in kept]
        new.samplers = [RowSampler.for_request(r) for r in new.requests]
        new.tokens = self._sample(logits[kept], new.samplers) if kept else []
        if jobs:
            logp = torch.log_softmax(logits[len(reqs) :], dim=-1).cpu()
            for job, per_cont in zip(jobs, picks):
                job.scores = [sum(float(logp[read - len(reqs), t]) for read, t in cont) for cont in per_cont]
        self.prefill_tokens_total += sum(len(r.prompt_ids) for r in reqs)
        return new

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
        self.decoder(
            inputs_embeds=prompts.to(self.device, self.dtype),
            position_ids=pos,
            past_key_values=b,
            use_cache=True,
        )
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
        # No headroom: generation rows are copied into the running batch (`KVBatch.gather`) before they decode.
        b = KVBatch.empty(
            self.num_layers, n, self.kv_heads, self.head_dim, pmax + lmax, self.dtype, self.device
        )
        ids = torch.zeros(n, lmax, dtype=torch.long)
        pos = torch.zeros(n, lmax, dtype=torch.long)
        for i, (kv, s) in enumerate(zip(kvs, seqs)):
            P, L = kv.shape[3], len(s)
            b.kv[:, :, i, :, pmax - P : pmax] = kv
            b.mask[i, pmax - P : pmax] = 1
            b.mask[i, pmax + lmax - L : pmax + lmax] = 1
            ids[i, lmax - L :] = torch.tensor(s)
            pos[i, lmax - L :] = torch.arange(P, P + L)
        b.length = pmax
        hidden = self.decoder(
            input_ids=ids.to(self.device),
            position_ids=pos.to(self.device),
            attention_mask=b.mask[:, : pmax + lmax],
            past_key_values=b,
            use_cache=True,
        ).last_hidden_state
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
        job = ScoreJob(task, prompt_ids, continuations)
        self._new_rows([], [job])
        return job.scores
