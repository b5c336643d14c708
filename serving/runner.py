"""The model runner: one frozen backbone, every task's soft prompt, a batched KV cache, sampling.

`ModelRunner.step(SchedulerOutput)` runs one engine step and returns a `StepResult`:
  1. decode: one forward over all rows of the running `DecodeBatch`, all tasks together (input =
     each row's last token, position = its own next position, attention over its own KV columns
     only); rows whose request left since the previous step ride along and are dropped in step 3,
  2. new rows: the newly admitted requests, generations (prefill) and classifications (any tasks),
     go through the model together. Each row starts from its task's prompt KV, gathered from the
     task prefix cache (`serving.prefix_cache`) at positions 0..P-1, and only its text tokens
     (positions P..P+L-1) are computed. Rows are grouped by length (`length_groups`) so that
     padding, which costs as much compute as real tokens, stays small; one forward per group,
  3. the running rows that stay and the new generation rows form the next batch in one KV copy
     (`DecodeBatch.gather`); classification rows are discarded after their logits are read.
A prompt longer than the step's budget arrives in chunks (`SchedulerOutput.chunks`): a chunk runs
like a new row, from the task prompt KV or from the request's partial KV of its earlier chunks, and
the runner keeps the row's KV (`partial`) until the step that completes it starts from there; a
partial KV the scheduler no longer lists (aborted, preempted) is dropped. A preempted generation
leaves the batch like a finished one and later comes back as a prefill of its prompt and the tokens
it produced (its sampler is the request's, so a seeded request draws on from where it was).
This computes what PEFT's prompt tuning computes, `inputs_embeds = cat(prompt, embed(ids))` at
positions 0..P+L-1, split into a cached prefix and the rest. Everything stays on the model's device;
the step reads the sampled tokens back once (and the scores, when it classified).

A request can only fail itself: when a forward raises, the step is retried on each half of the
rows (recursively), so the rows that fail alone are reported in `StepResult.failed` and every other
row goes on with the tokens it would have had alone (a retried row draws no extra random numbers:
sampling happens after its forward succeeded).

Sampling is `serving.sampler`. A classification scores each label's verbaliser tokens: one row per
distinct verbaliser prefix, so single-token verbalisers cost one row per request. Scores are read
from fp32 logits (`fp32_logits`) whatever the backbone's dtype: at logits around 20, bf16 steps by
0.125, which made close labels exactly tied.

It does not decide which requests run (the scheduler does) nor detokenise or stop them.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from serving.decode_batch import DecodeBatch
from serving.kv_batch import KVBatch, prefill_layout, to_device
from serving.prefix_cache import PrefixKVCache
from serving.sampler import RowSampler, sample
from serving.scheduler import Request, RequestKind, SchedulerOutput
from serving.tensor_parallel import RankLost, is_sharded, sharded_fp32_logits

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class TaskPrompt(Protocol):
    """What the runner needs of a task (`serving.registry.TaskEntry` is one)."""

    name: str
    version: Hashable
    prompt: torch.Tensor  # [P, hidden]


@dataclass
class ScoreJob:
    """One classification: the summed log-prob of each continuation after task prompt + `prompt_ids`
    (`past`: the KV of the task prompt and of the tokens before `prompt_ids`, from earlier chunks)."""

    task: TaskPrompt
    prompt_ids: list[int]
    continuations: list[list[int]]
    scores: list[float] = field(default_factory=list)  # filled by `ModelRunner`
    past: torch.Tensor | None = None


@dataclass
class StepResult:
    tokens: dict[str, int] = field(default_factory=dict)  # generation request id -> sampled token
    scores: dict[str, list[float]] = field(default_factory=dict)  # classification id -> per continuation
    failed: list[str] = field(default_factory=list)  # requests whose rows made a forward raise


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


def isolate(
    items: list[T], run: Callable[[list[T]], R], failed: list[T], agree: Callable[[bool], bool] | None = None
) -> list[tuple[list[T], R]]:
    """`[(items, run(items))]`, or, if that raises, the same for each half (recursively): the items
    that fail alone go to `failed`, each logged once (type and message, no traceback).

    `agree(ok)` (tensor-parallel ranks) is True when `run` succeeded on every rank, so every rank
    retries the same halves; `RankLost` (the ranks cannot talk any more) is never retried."""
    error = None
    try:
        result = run(items)
    except RankLost:
        raise
    except Exception as e:
        error = e
    if agree is not None and not agree(error is None) and error is None:
        error = RuntimeError("the step failed on another rank")
    if error is None:
        return [(items, result)]
    if len(items) == 1:
        log.warning("a model step failed on one request (%s): %s", type(error).__name__, str(error)[:300])
        failed.append(items[0])
        return []
    mid = len(items) // 2
    return isolate(items[:mid], run, failed, agree) + isolate(items[mid:], run, failed, agree)


@dataclass
class _NewRows:
    """A prefill's generation rows (as decode batches) and its classifications' scores."""

    parts: list[DecodeBatch] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)  # each part's first sampled tokens
    scores: dict[str, list[float]] = field(default_factory=dict)


def _without_grad(method: Callable[..., R]) -> Callable[..., R]:
    """Run a `ModelRunner` method under inference mode, or under `no_grad` (`inference_mode=False`)."""

    @functools.wraps(method)
    def run(self: ModelRunner, *args, **kwargs) -> R:
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            return method(self, *args, **kwargs)

    return run


class ModelRunner:
    def __init__(
        self,
        model,
        prefix_cache_bytes: int = 256 * 2**20,
        prefix_cache: bool = True,
        kv_headroom: int = 64,
        group_overhead_tokens: int = 64,
        inference_mode: bool = True,
        shards: int = 1,
        agree: Callable[[bool], bool] | None = None,
    ):
        """Args:
        model: a transformers causal LM (frozen, eval mode).
        prefix_cache_bytes: LRU bound of the task prefix KV cache.
        prefix_cache: False recomputes every request's prompt KV (for comparison).
        kv_headroom: free columns reserved when the batch's KV tensor is (re)allocated.
        group_overhead_tokens: the fixed cost of one more forward, in tokens of compute; new rows
            are split by length into separate forwards when that saves more padding than this.
        inference_mode: False runs the model under `no_grad` instead, for a model that also trains
            (evaluation, `serving.offline`): under ZeRO-3 a weight gathered in inference mode (a
            small one stays gathered) is an inference tensor, which a later backward cannot save.
        shards: tensor-parallel ranks the model is split over (`serving.tensor_parallel`): this
            rank's KV caches hold kv_heads / shards heads, its prefix cache 1/shards of the bound.
        agree: with shards > 1, `agree(ok) -> every rank ok`, so retries are the same on every rank.
        """
        self.model = model
        self.inference_mode = inference_mode
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // shards
        self.agree = agree
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.max_positions = getattr(cfg, "max_position_embeddings", 2048)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.headroom = kv_headroom
        self.group_overhead = group_overhead_tokens
        self.prefix_cache = PrefixKVCache(self._prompt_kv, prefix_cache_bytes // shards, prefix_cache)
        self.prefill_tokens_total = 0
        self.batch: DecodeBatch | None = None  # the running rows
        self.partial: dict[
            str, torch.Tensor
        ] = {}  # request id -> KV of its chunks so far [L, 2, h, P + n, d]

    # ------------------------------------------------------------------ one engine step
    @_without_grad
    def step(self, out: SchedulerOutput) -> StepResult:
        """Run the step: each generation's sampled token, each classification's scores, and the
        requests that made a forward fail (their rows are gone; every other row carries on)."""
        result = StepResult()
        keep = out.partial | {r.request_id for r in out.prefill}
        self.partial = {rid: kv for rid, kv in self.partial.items() if rid in keep}
        parts: list[tuple[DecodeBatch, list[int]]] = []  # the next batch's rows
        tokens: list[torch.Tensor] = []  # sampled tokens of `ids`, on the device until the one read
        ids: list[str] = []
        if out.decode:
            old = self.batch
            where = {rid: i for i, rid in enumerate(old.request_ids)}
            keep = sorted(where[r.request_id] for r in out.decode)

            def decode(rows: list[int]) -> tuple[DecodeBatch, list[int]]:
                # First try: the whole batch in place (rows that left ride along: no copy); a retry
                # runs a copy of just its rows.
                b = old if rows is keep else old.filter(rows, self.headroom)
                self._decode(b)
                return b, rows if rows is keep else list(range(len(rows)))

            failed: list[int] = []
            for _, (b, rows) in isolate(keep, decode, failed, self.agree):
                parts.append((b, rows))
                tokens.append(
                    b.last_tokens if len(rows) == len(b) else b.last_tokens[to_device(rows, self.device)]
                )
                ids += [b.requests[i].request_id for i in rows]
            result.failed += [old.requests[i].request_id for i in failed]
        if out.chunks:
            failed_chunks: list[tuple[Request, int]] = []
            isolate(out.chunks, self._run_chunks, failed_chunks, self.agree)
            result.failed += [r.request_id for r, _ in failed_chunks]
        if out.prefill:
            failed_reqs: list[Request] = []
            for _, new in isolate(out.prefill, self._new_rows, failed_reqs, self.agree):
                for b, t in zip(new.parts, new.tokens):
                    parts.append((b, list(range(len(b)))))
                    tokens.append(t)
                    ids += b.request_ids
                result.scores.update(new.scores)
            result.failed += [r.request_id for r in failed_reqs]
        if tokens:
            result.tokens = dict(zip(ids, torch.cat(tokens).tolist()))  # the step's one read-back
        self._regroup(parts)
        for req in out.prefill:  # completed: its KV is in the batch now (or it was scored)
            self.partial.pop(req.request_id, None)
        return result

    def reset(self) -> None:
        """Drop every running row and every partial prefill."""
        self.batch = None
        self.partial = {}

    def _past(self, req: Request) -> torch.Tensor | None:
        """The KV a request's next tokens start from, if it has chunks computed (else its task prompt's)."""
        return self.partial.get(req.request_id) if req.num_computed else None

    def _run_chunks(self, chunks: list[tuple[Request, int]]) -> None:
        """Compute each chunk's tokens after its request's KV so far, and keep the longer KV."""
        pasts = [self._past(r) for r, _ in chunks]
        seqs = [r.prefill_ids[r.num_computed : r.num_computed + n] for r, n in chunks]
        tasks = [r.adapter for r, _ in chunks]
        kept = {}
        for group in length_groups([len(s) for s in seqs], self.group_overhead):
            b, _ = self.forward_new(
                [tasks[i] for i in group], [seqs[i] for i in group], [pasts[i] for i in group]
            )
            pmax, lmax = b.length - max(len(seqs[i]) for i in group), max(len(seqs[i]) for i in group)
            for j, i in enumerate(group):
                P, L = pmax - b.first[j], len(seqs[i])
                kept[chunks[i][0].request_id] = torch.cat(
                    [b.kv[:, :, j, :, pmax - P : pmax], b.kv[:, :, j, :, pmax + lmax - L : pmax + lmax]],
                    dim=3,
                )
        self.partial.update(kept)  # only once every group ran: a retried half starts from the same KV
        self.prefill_tokens_total += sum(
            len(s) for (r, _), s in zip(chunks, seqs) if r.kind is RequestKind.GENERATE
        )

    def _regroup(self, parts: list[tuple[DecodeBatch, list[int]]]) -> None:
        """Make the next batch from the kept rows of each part, in one KV copy (none if nobody left or joined)."""
        if not parts:
            self.batch = None
        elif len(parts) == 1 and parts[0][0] is self.batch and len(parts[0][1]) == len(self.batch):
            pass
        else:
            self.batch = DecodeBatch.gather(parts, self.headroom)

    def _decode(self, b: DecodeBatch) -> None:
        """One token for every row of `b`, in place (KV column, last token, position)."""
        kv = b.kv
        kv.reserve(1, self.headroom)
        kv.mask[:, kv.length] = 1
        hidden = self.decoder(
            input_ids=b.last_tokens[:, None],
            position_ids=b.positions[:, None],
            attention_mask=kv.mask[:, : kv.length + 1],
            past_key_values=kv,
            use_cache=True,
        ).last_hidden_state
        tokens = sample(self.lm_head(hidden[:, -1]).float(), b.samplers)
        # Committed only now: a forward that raised left the batch as it was, ready for a retry.
        kv.length += 1
        b.last_tokens, b.positions = tokens, b.positions + 1

    def _new_rows(self, reqs: list[Request]) -> _NewRows:
        """Prefill the generations and score the classifications among `reqs`."""
        gens = [r for r in reqs if r.kind is RequestKind.GENERATE]
        classify = [r for r in reqs if r.kind is RequestKind.CLASSIFY]
        jobs = [
            ScoreJob(r.adapter, r.prompt_ids[r.num_computed :], r.continuations, past=self._past(r))
            for r in classify
        ]
        new = self._prefill(gens, jobs)
        new.scores = {r.request_id: job.scores for r, job in zip(classify, jobs)}
        return new

    def _prefill(self, reqs: list[Request], jobs: list[ScoreJob]) -> _NewRows:
        """Prefill `reqs` and score `jobs` (scores go into the jobs) in as few forwards as padding allows."""
        tasks: list[TaskPrompt] = [r.adapter for r in reqs]
        seqs = [r.prefill_ids[r.num_computed :] for r in reqs]
        pasts = [self._past(r) for r in reqs]
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
                    pasts.append(job.past)
                first = len(job.prompt_ids) - 1  # the token whose logits predict c[0]
                per_cont.append(
                    [(reads.setdefault((row, first + k), len(reads)), t) for k, t in enumerate(c)]
                )
            picks.append(per_cont)

        hidden = torch.empty(len(reads), self.hidden_size, dtype=self.dtype, device=self.device)
        groups = []  # (rows' KV, their generation rows, those rows' requests)
        for group in length_groups([len(s) for s in seqs], self.group_overhead):
            batch, h = self.forward_new(
                [tasks[i] for i in group],
                [seqs[i] for i in group],
                [pasts[i] for i in group],
                inline_misses=True,  # a never-seen task's prompt goes in with its first request
            )
            lmax, local = h.shape[1], {row: j for j, row in enumerate(group)}
            sel = [
                (read, local[row], lmax - len(seqs[row]) + tok)
                for (row, tok), read in reads.items()
                if row in local
            ]
            read_idx, rows, cols = (to_device(list(x), self.device) for x in zip(*sel))
            hidden[read_idx] = h[rows, cols]
            gen = [j for j, row in enumerate(group) if row < len(reqs)]
            if gen:
                groups.append((batch, gen, [reqs[group[j]] for j in gen]))
        new = _NewRows()
        if jobs:
            flat = [(read - len(reqs), t) for per_cont in picks for cont in per_cont for read, t in cont]
            logp = torch.log_softmax(fp32_logits(self.lm_head, hidden[len(reqs) :]), dim=-1)
            rows, targets = (
                to_device([r for r, _ in flat], self.device),
                to_device([t for _, t in flat], self.device),
            )
            values = iter(logp[rows, targets].tolist() if flat else [])
            for job, per_cont in zip(jobs, picks):
                job.scores = [sum(next(values) for _ in cont) for cont in per_cont]
        kept = [r for _, _, rs in groups for r in rs]
        if kept:
            kvs = [DecodeBatch.prefill_rows(batch, gen) for batch, gen, _ in groups]
            at = {r.request_id: i for i, r in enumerate(reqs)}
            for r in kept:
                r.sampler = r.sampler or RowSampler.for_params(r.params)
            samplers = [r.sampler for r in kept]
            logits = self.lm_head(hidden[to_device([at[r.request_id] for r in kept], self.device)]).float()
            tokens = sample(logits, samplers)  # drawn last: a retried row draws no extra numbers
            n = 0
            for kv, (_, _, rs) in zip(kvs, groups):
                start = [r.adapter.prompt.shape[0] + len(r.prefill_ids) for r in rs]
                part_tokens = tokens[n : n + len(rs)]
                new.parts.append(
                    DecodeBatch.from_prefill(rs, samplers[n : n + len(rs)], kv, part_tokens, start)
                )
                new.tokens.append(part_tokens)
                n += len(rs)
        self.prefill_tokens_total += sum(len(s) for s in seqs[: len(reqs)])
        return new

    # ------------------------------------------------------------------ forwards
    def _prompt_kv(self, prompts: torch.Tensor) -> torch.Tensor:
        """KV of `n` task prompts (same length P), as if they were the first P tokens of a row."""
        n, P, _ = prompts.shape
        b = KVBatch.empty(self.num_layers, n, self.kv_heads, self.head_dim, P, self.dtype, self.device)
        if P == 0:  # no virtual tokens (the untuned backbone): nothing to run
            return b.kv
        pos = torch.arange(P, device=self.device).expand(n, P)
        self.decoder(
            inputs_embeds=prompts.to(self.device, self.dtype),
            position_ids=pos,
            past_key_values=b,
            use_cache=True,
        )
        return b.kv

    def forward_new(
        self,
        tasks: list[TaskPrompt],
        seqs: list[list[int]],
        pasts: list[torch.Tensor | None] | None = None,
        inline_misses: bool = False,
    ) -> tuple[KVBatch, torch.Tensor]:
        """Run new rows (task prompt KV from the prefix cache + text tokens) through the model.
        `pasts[i]`, when given, is row i's KV to start from instead (its task prompt and earlier chunks).

        Layout per row: `[pad][prompt KV: P_i][pad][text: L_i]`, the prompts right-aligned at column
        max(P), the texts right-aligned at the end, so every row's last token is the last column.

        `inline_misses`: a row whose task prompt KV is not cached reads its prompt in this same forward,
        as virtual tokens in front of its text (`[pad][prompt + text]`), and the prompt's KV is cached
        from it. Otherwise a first request to a task costs a forward of its own for the prompt (on a CPU,
        about as long as the request's). The prompt's positions attend only to the prompt, so the KV is
        what `_prompt_kv` computes, up to float rounding (~1e-6 in fp32). Like a row's numbers in
        batches of other shapes, a task's later answers can therefore differ from its first in the last
        bits, which seeded sampling can occasionally show; the cached KV is the one the first used.

        Returns:
            The rows' `KVBatch` and the hidden states of the new columns `[n, max(L), hidden]`; each
            row's text is right-aligned at the end.
        """
        kvs = list(pasts or [None] * len(tasks))
        fresh = [i for i, kv in enumerate(kvs) if kv is None]
        keys = [(tasks[i].name, tasks[i].version) for i in fresh]
        found: list[torch.Tensor | None] = [None] * len(fresh)
        rows_of = Counter(keys)
        # Inline: a missed task with one row here. A task with several rows here is computed once, apart.
        alone = [j for j, k in enumerate(keys) if inline_misses and rows_of[k] == 1]
        apart = [j for j, k in enumerate(keys) if not (inline_misses and rows_of[k] == 1)]
        for j, kv in zip(alone, self.prefix_cache.lookup_many([keys[j] for j in alone])):
            found[j] = kv
        items = [(*keys[j], tasks[fresh[j]].prompt) for j in apart]
        for j, kv in zip(apart, self.prefix_cache.get_many(items)):
            found[j] = kv
        inline = {i for i, kv in zip(fresh, found) if kv is None}
        for i, kv in zip(fresh, found):
            kvs[i] = kv if kv is not None else self._no_prefix()
        new = [[0] * tasks[i].prompt.shape[0] + s if i in inline else s for i, s in enumerate(seqs)]
        pmax, lmax = max(kv.shape[3] for kv in kvs), max(len(s) for s in new)
        # No headroom: generation rows are copied into the running batch (`KVBatch.gather`) before they decode.
        b = KVBatch.from_prefixes(kvs, pmax + lmax)  # every row's prefix in one indexed copy
        # Token ids, positions and mask are built on the host and copied over once each.
        ids, pos, mask = prefill_layout([kv.shape[3] for kv in kvs], new)
        b.mask.copy_(to_device(mask, self.device))
        b.length = pmax
        ids = to_device(ids, self.device)
        inputs = {"input_ids": ids}
        if inline:
            embeds = self.model.get_input_embeddings()(ids)
            for i in inline:
                P, first = tasks[i].prompt.shape[0], lmax - len(new[i])
                embeds[i, first : first + P] = tasks[i].prompt.to(self.device, embeds.dtype)
                b.first[i] = pmax + first
            inputs = {"inputs_embeds": embeds}
        hidden = self.decoder(
            **inputs,
            position_ids=to_device(pos, self.device),
            attention_mask=b.mask[:, : pmax + lmax],
            past_key_values=b,
            use_cache=True,
        ).last_hidden_state
        b.length = pmax + lmax
        for i in sorted(inline):  # cache each missed prompt's KV (one row per task)
            P, first = tasks[i].prompt.shape[0], pmax + lmax - len(new[i])
            if P:
                kv = b.kv[:, :, i, :, first : first + P].contiguous()
                self.prefix_cache.put(tasks[i].name, tasks[i].version, kv)
        return b, hidden

    def _no_prefix(self) -> torch.Tensor:
        """An empty prefix `[L, 2, kv_heads, 0, head_dim]`: a row whose prompt is in its new tokens."""
        return torch.empty(
            self.num_layers, 2, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device
        )

    @_without_grad
    def next_token_logits(self, tasks: list[TaskPrompt], seqs: list[list[int]]) -> torch.Tensor:
        """Logits after each row's last token `[n, vocab]` (fp32), through the prefix cache."""
        _, hidden = self.forward_new(tasks, seqs)
        return self.lm_head(hidden[:, -1]).float()

    @_without_grad
    def score(self, task: TaskPrompt, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Summed log-prob of each continuation's tokens after the task prompt and `prompt_ids`."""
        job = ScoreJob(task, prompt_ids, continuations)
        self._prefill([], [job])
        return job.scores


def fp32_logits(lm_head: torch.nn.Module, hidden: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """`lm_head(hidden)` computed in fp32 `[n, vocab]`, whatever the weights' dtype, a block of the
    vocabulary at a time (no fp32 copy of the whole head is kept)."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if is_sharded(weight):  # tensor-parallel: this rank's slice of the vocabulary, then gathered
        return sharded_fp32_logits(lm_head, hidden, block)
    if weight.dtype == torch.float32:
        return lm_head(hidden.float())
    h = hidden.float()
    out = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, weight.shape[0], block):
        w = weight[start : start + block].float()
        out[:, start : start + block] = h @ w.T + (0 if bias is None else bias[start : start + block].float())
    return out
