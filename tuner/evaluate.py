"""Evaluation's model side: scoring labels, greedy decoding and target losses.

`score_labels` scores every label's verbaliser tokens after the input (one forward per example
when every label is a single distinct token, else one segment per (example, label), packed).
`generate_greedy_of_tasks` (`generate_greedy`: one task) decodes with the server's own code
(`serving.offline`: its scheduler, model runner and output path; examples of many tasks in the same
steps), so the answers scored are the answers a served request gets, whatever the batch:
until end-of-sequence or one of the task's stop strings (whitespace before the answer is never a
stop). The metrics that score the results and the `TaskScores` record are `tuner.scores` (no torch).
Which of these a task uses is its kind's choice (`tuner.tasks.kinds`, `evaluate_task`); this module
knows no kind. `prompt=None` evaluates the untuned backbone (zero-shot: no virtual tokens).

Under ZeRO-3 every rank must run the same number of forwards (each forward all-gathers weights),
so ranks split the examples and pad their share to the same number of batches (decoding: step in
lockstep until every rank is done).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from serving.offline import DecodeTask, generate_texts_of_tasks
from tuner.model.prompt_lm import PromptTunedLM
from tuner.model.zero import world
from tuner.tasks.batching import MultiTaskBatch, TokenizedExample, collate
from tuner.tasks.input_budget import cut_input, max_input_tokens
from tuner.tasks.stops import find_stop


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The answer in a generated `text`: cut at the first stop string (`tuner.tasks.stops`), stripped."""
    end = find_stop(text, stop)
    return (text[:end] if end >= 0 else text).strip()


def _shard_lockstep(items: list, batch_size: int) -> list[tuple[list, int]]:
    """This rank's batches, padded so every rank runs the same count; returns (batch, n_real)."""
    rank, size = world()
    mine = items[rank::size]
    n_batches = math.ceil(math.ceil(len(items) / size) / batch_size) if items else 0
    out = []
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        out.append((chunk or items[:1], len(chunk)))  # an empty share runs a throwaway batch
    return out


def _gather(values: list) -> list:
    """Concatenate per-rank result lists back into the original (strided) order."""
    rank, size = world()
    if size == 1:
        return values
    parts: list[list] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(parts, values)
    n = sum(len(p) for p in parts)
    out = [None] * n
    for r, p in enumerate(parts):
        out[r::size] = p
    return out


def _prompt_args(prompt: torch.Tensor | None, device) -> tuple[int, torch.Tensor]:
    if prompt is None:
        return 0, torch.zeros(1, 0, 1, device=device)
    return prompt.shape[0], prompt[None].to(device)


def one_token_labels(tokenizer, verbaliser: dict[str, str]) -> list[int] | None:
    """Each label's token id, in the verbaliser's order, where every label is one distinct token (a label's
    log-probability is then read off the logits at the answer position); else None."""
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in verbaliser.values()]
    if all(len(t) == 1 for t in ids) and len({t[0] for t in ids}) == len(ids):
        return [t[0] for t in ids]
    return None


def score_labels(
    lm: PromptTunedLM,
    tokenizer,
    examples: list[TokenizedExample],
    verbaliser: dict[str, str],
    prompt: torch.Tensor | None,
    max_len: int,
    batch_size: int = 32,
    device="cpu",
) -> list[dict[str, float]]:
    """Log-probability of every label's verbaliser tokens for each example (all read with `prompt`)."""
    tasks = dict.fromkeys(e.task for e in examples)
    prompts = None if prompt is None else dict.fromkeys(tasks, prompt)
    return score_labels_of_tasks(
        lm, tokenizer, examples, dict.fromkeys(tasks, verbaliser), prompts, max_len, batch_size, device
    )


@torch.no_grad()
def score_labels_of_tasks(
    lm: PromptTunedLM,
    tokenizer,
    examples: list[TokenizedExample],
    verbalisers: Mapping[str, dict[str, str]],
    prompts: Mapping[str, torch.Tensor] | None,
    max_len: int,
    batch_size: int = 32,
    device="cpu",
) -> list[dict[str, float]]:
    """Log-probability of every label's verbaliser tokens for each example, examples of many tasks packed
    into mixed rows as training packs them (each segment reads its own task's prompt; a task's examples
    in one forward share one copy of it).

    `verbalisers` and `prompts` are by task (`prompts=None`: zero-shot, no virtual tokens). A task whose
    labels are single distinct tokens costs one segment per example (its labels read off the logits at
    the answer position); any other one segment per (example, label), scored by its tokens' NLL.
    """
    single: dict[str, list[int] | None] = {}
    cache: dict[tuple, list[int] | None] = {}  # tasks of a family share a verbaliser: tokenise it once
    for t in dict.fromkeys(e.task for e in examples):
        key = tuple(verbalisers[t].items())
        if key not in cache:
            cache[key] = one_token_labels(tokenizer, verbalisers[t])
        single[t] = cache[key]
    # A task's examples side by side, whatever order they came in: they land in the same forwards, where
    # they share one prompt copy (`_MixedForward`). Results go back to each example's place.
    first = {t: k for k, t in enumerate(single)}
    by_task = sorted(range(len(examples)), key=lambda i: first[examples[i].task])
    by_one = [i for i in by_task if single[examples[i].task] is not None]
    by_nll = [i for i in by_task if single[examples[i].task] is None]
    results: list[dict[str, float] | None] = [None] * len(examples)
    forward = _MixedForward(lm, tokenizer, prompts, max_len, device)
    if by_one:
        scored = forward.one_token([examples[i] for i in by_one], verbalisers, single, batch_size)
        for i, r in zip(by_one, scored):
            results[i] = r
    if by_nll:
        scored = forward.label_nll([examples[i] for i in by_nll], verbalisers, batch_size)
        for i, r in zip(by_nll, scored):
            results[i] = r
    return results  # type: ignore[return-value]


@dataclass
class _MixedForward:
    """Forwards over examples of several tasks: each batch's prompts stacked for the tasks in it, one
    packed row per forward where the attention kernel allows (`one_row`)."""

    lm: PromptTunedLM
    tokenizer: Any
    prompts: Mapping[str, torch.Tensor] | None
    max_len: int
    device: Any

    def __post_init__(self) -> None:
        # A kernel that computes attention span by span (every packed kernel but the dense `eager`
        # reference) makes a row's length free: each forward is then one row, so nothing is padding
        # and each task in the forward has one prompt copy, whatever the tasks' lengths.
        self.one_row = self.lm.kernel_for(torch.device(self.device)) != "eager"

    def batch(self, segments: list[TokenizedExample]) -> tuple[MultiTaskBatch, torch.Tensor]:
        """The forward's batch (on the device) and its prompt table (row i: the i-th task in it)."""
        tasks = list(dict.fromkeys(s.task for s in segments))
        if self.prompts is None:
            rows, P, table = dict.fromkeys(tasks, 0), 0, torch.zeros(1, 0, 1, device=self.device)
        else:
            rows = {t: i for i, t in enumerate(tasks)}
            table = torch.stack([self.prompts[t] for t in tasks]).to(self.device)
            P = table.shape[1]
        batch = collate(
            segments,
            rows,
            P,
            max_len=self.max_len,
            pad_id=self.tokenizer.pad_token_id,
            share_prompts=self.lm.supports_shared_prompts,
            row_len=self.max_len * len(segments) if self.one_row else 0,  # every segment fits one row
        )
        return batch.to(self.device), table

    def run(self, segments: list[TokenizedExample], return_logits: bool):
        batch, table = self.batch(segments)
        return batch, self.lm(batch, table, return_logits=return_logits)

    def one_token(self, examples, verbalisers, single, batch_size: int) -> list[dict[str, float]]:
        """One segment per example; its labels' log-probabilities from the logits at the answer."""
        results: list[dict[str, float]] = []
        for chunk, n_real in _shard_lockstep(examples, batch_size):
            cands = [single[e.task] for e in chunk]
            segs = [TokenizedExample(e.task, e.input_ids, [c[0]]) for e, c in zip(chunk, cands)]
            batch, table = self.batch(segs)
            # The logits at the answers alone (no loss: the labels are read off them).
            logits = self.lm.target_logits(self.lm.hidden_states(batch, table, targets_only=True), batch)
            # One target per segment, but targets come in packed-row order: `at[s]` is segment s's. Only the
            # labels' log-probabilities are kept: logit - logsumexp, no [N, V] log-softmax written out.
            at = torch.empty_like(batch.target_seg)
            at[batch.target_seg] = torch.arange(len(at), device=at.device)
            width = max(len(c) for c in cands)
            index = torch.tensor([c + c[:1] * (width - len(c)) for c in cands], device=self.device)
            lse = torch.logsumexp(logits, dim=-1)[at]
            picked = (logits[at[:, None], index] - lse[:, None]).cpu()
            for e, c, row in zip(chunk[:n_real], cands, picked):
                results.append(dict(zip(verbalisers[e.task], row[: len(c)].tolist())))
        return _gather(results)

    def label_nll(self, examples, verbalisers, batch_size: int) -> list[dict[str, float]]:
        """One segment per (example, label): each label's summed token log-probability."""
        ids: dict[tuple, dict[str, list[int]]] = {}
        label_ids = {}
        for t in dict.fromkeys(e.task for e in examples):
            key = tuple(verbalisers[t].items())
            if key not in ids:
                ids[key] = {lab: self.tokenizer(w, add_special_tokens=False).input_ids for lab, w in key}
            label_ids[t] = ids[key]
        segs = [
            TokenizedExample(e.task, e.input_ids, i) for e in examples for i in label_ids[e.task].values()
        ]
        flat: list[float] = []
        width = max(len(v) for v in label_ids.values())
        for chunk, n_real in _shard_lockstep(segs, batch_size * width):
            _, out = self.run(chunk, return_logits=False)
            flat += out.seg_logprob[:n_real].cpu().tolist()
        flat = _gather(flat)
        results, at = [], 0
        for e in examples:
            labels = list(label_ids[e.task])
            results.append(dict(zip(labels, flat[at : at + len(labels)])))
            at += len(labels)
        return results


def generate_greedy(
    lm: PromptTunedLM,
    tokenizer,
    examples: list[TokenizedExample],
    prompt: torch.Tensor | None,
    max_new_tokens: int,
    max_len: int,
    batch_size: int = 16,
    device="cpu",
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy answers of one task's examples under `prompt`: `generate_greedy_of_tasks` with one task."""
    task = DecodeTask(prompt, max_new_tokens, tuple(stop))
    tasks = dict.fromkeys((e.task for e in examples), task)  # in order: the same on every rank
    return generate_greedy_of_tasks(lm, tokenizer, examples, tasks, max_len, batch_size, device)


def generate_greedy_of_tasks(
    lm: PromptTunedLM,
    tokenizer,
    examples: list[TokenizedExample],
    tasks: Mapping[str, DecodeTask],
    max_len: int,
    batch_size: int = 16,
    device="cpu",
) -> list[str]:
    """Greedy answers, examples of many tasks decoded together by the server's own code
    (`serving.offline.generate_texts_of_tasks`, its mixed-task steps): each is the text a served
    request for the same input streams, stripped.

    `tasks` gives each example's task (`example.task`): its prompt, answer length and stop strings
    (the same mapping on every rank). Each input keeps its last `max_len - P - max_new_tokens` tokens
    (`tuner.tasks.input_budget`, the rule the task's adapter records for the server). A row ends at
    end-of-sequence or at a stop string (whitespace before the answer never stops it). Ranks decode
    every world-size-th example, up to `batch_size` rows at a time, stepping in lockstep (ZeRO-3:
    `_any_rank_busy`).
    """
    used = {e.task for e in examples}
    names = [n for n in tasks if n in used]  # the mapping's order: the same list on every rank
    if len(names) < len(used):
        raise KeyError(f"no decoding settings for task {next(iter(used - set(names)))!r}")
    index = {n: i for i, n in enumerate(names)}
    limit = {
        n: max_input_tokens(max_len, _prompt_length(tasks[n].prompt), tasks[n].max_new_tokens) for n in names
    }
    rank, size = world()
    mine = [(index[e.task], cut_input(e.input_ids, limit[e.task])) for e in examples[rank::size]]
    texts = generate_texts_of_tasks(
        lm.backbone,
        tokenizer,
        [tasks[n] for n in names],
        mine,
        batch_size=batch_size,
        any_busy=_any_rank_busy(device) if size > 1 else None,
    )
    return [t.strip() for t in _gather(texts)]


def _prompt_length(prompt: torch.Tensor | None) -> int:
    return 0 if prompt is None else prompt.shape[0]


def _any_rank_busy(device) -> Callable[[bool], bool]:
    """`busy -> any rank busy`: one all-reduce per decoding step (what `synced_gpus` does in
    `transformers.generate`), so ranks run the same forwards until every rank is done."""

    def any_busy(busy: bool) -> bool:
        flag = torch.tensor([1.0 if busy else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return any_busy


def label_nlls(
    lm: PromptTunedLM,
    tokenizer,
    examples: list[TokenizedExample],
    verbaliser: dict[str, str],
    prompt: torch.Tensor | None,
    max_len: int,
    batch_size: int = 32,
    device="cpu",
) -> list[float]:
    """Each example's minus log-probability of its gold label among the task's labels.

    The labels' verbaliser log-probabilities (`score_labels`, the same forward as the accuracy / F1)
    are renormalised over the labels: the smooth counterpart of the classification metric. It uses
    every example's whole label distribution, so on a few dozen examples it ranks prompts far more
    steadily than accuracy or macro-F1 (a 6-class macro-F1 on 22 examples is mostly chance).
    """
    scores = score_labels(lm, tokenizer, examples, verbaliser, prompt, max_len, batch_size, device)
    out = []
    for s, e in zip(scores, examples, strict=True):
        logp = torch.tensor(list(s.values()), dtype=torch.float64)
        out.append(float(torch.logsumexp(logp, 0)) - s[e.label])
    return out


def mean_label_nll(*args, **kwargs) -> float:
    """The mean over the examples of `label_nlls` (same arguments)."""
    nll = label_nlls(*args, **kwargs)
    return sum(nll) / len(nll)


@torch.no_grad()
def target_losses(
    lm: PromptTunedLM,
    examples: Sequence[TokenizedExample],
    prompts: dict[str, torch.Tensor],
    *,
    max_len: int,
    pad_id: int,
    device="cpu",
    batch_size: int = 32,
) -> dict[str, list[float]]:
    """Each prompt's target NLL on each of `examples` (an example's token-mean NLL:
    `optim.loss_weighting: example`), teacher-forced, so one forward per example whatever the task kind.

    Several prompts share a forward (`prompts`: name -> [P, H]); ranks split the (prompt, example)
    pairs and each fills in its own, so every rank returns the same numbers.
    """
    names = list(prompts)
    index = {n: j for j, n in enumerate(names)}
    P = next(iter(prompts.values())).shape[0]
    pairs = [(n, i) for n in names for i in range(len(examples))]
    nll = torch.zeros(len(names), len(examples), dtype=torch.float64)
    for chunk, n_real in _shard_lockstep(pairs, batch_size):
        group = sorted({n for n, _ in chunk}, key=index.__getitem__)
        local = {n: j for j, n in enumerate(group)}
        batch = collate(
            [dataclasses.replace(examples[i], task=n) for n, i in chunk],
            local,
            P,
            max_len=max_len,
            pad_id=pad_id,
        )
        stacked = torch.stack([prompts[n] for n in group]).to(device)
        seg = lm(batch.to(device), stacked).seg_loss.double().cpu()  # segment j is chunk[j]
        if n_real:  # a rank's throwaway batch (it had no pairs left) keeps the ranks in lockstep only
            for (n, i), loss in zip(chunk, seg.tolist()):
                nll[index[n], i] = loss
    # every (prompt, example) was filled in by exactly one rank: the sum over ranks puts them together
    filled = [sum(col) for col in zip(*_gather([nll.flatten().tolist()]))]
    return {n: filled[j * len(examples) : (j + 1) * len(examples)] for j, n in enumerate(names)}


def mean_target_loss(*args, **kwargs) -> dict[str, float]:
    """Each prompt's mean over the examples of `target_losses` (same arguments)."""
    return {n: sum(v) / len(v) for n, v in target_losses(*args, **kwargs).items()}
