"""Evaluation's parts: scoring labels, greedy decoding, target losses, the metrics, and `TaskScores`.

`score_labels` scores every label's verbaliser tokens after the input (one forward per example
when every label is a single distinct token, else one segment per (example, label), packed).
`generate_greedy` decodes until end-of-sequence or one of the task's stop strings (whitespace
before the answer is never a stop). `classification_metrics` and `generation_metrics` (chrF,
ROUGE-L with `rouge-score`, exact match against every reference) score the results. Which of these
a task uses is its kind's choice (`tuner.tasks.kinds`, `evaluate_task`); this module knows no kind.
`prompt=None` evaluates the untuned backbone (zero-shot: no virtual tokens).

Under ZeRO-3 every rank must run the same number of forwards (each forward all-gathers weights),
so ranks split the examples and pad their share to the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import StoppingCriteria, StoppingCriteriaList

from tuner.model.prompt_lm import PromptTunedLM
from tuner.model.zero import world
from tuner.tasks.batching import TokenizedExample, collate
from tuner.tasks.stops import find_stop

# Keys of a scores record that are not metric values.
_NOT_VALUES = ("metric", "score", "per_label", "samples")


@dataclass(frozen=True, eq=False)  # eq: Mapping's, so a record compares equal to its dict
class TaskScores(Mapping):
    """One task's evaluation: its headline metric and score, every metric, and what the report shows.

    It also reads as its `summary.json` record (a read-only mapping of the same keys, `to_json`), so a
    record written by an earlier version and a fresh evaluation are read alike (`from_json`).
    """

    metric: str  # the headline metric's name (the task's `metric`)
    score: float  # its value
    values: dict[str, float]  # every metric by name, and `n`: the examples scored
    per_label: dict[str, dict] | None = None  # label or entity type -> precision / recall / F1 / support
    samples: list[dict] | None = None  # decoded kinds: the first answers beside their references

    @classmethod
    def of(cls, metric: str, computed: dict[str, Any]) -> TaskScores:
        """Scores from a metrics function's dict (`classification_metrics`, ...), headlined by `metric`."""
        return cls.from_json({**computed, "metric": metric, "score": computed[metric]})

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TaskScores | None:
        """The scores of a `summary.json` record (`{}`, a task without eval examples: None)."""
        if not record:
            return None
        values = {k: v for k, v in record.items() if k not in _NOT_VALUES}
        return cls(record["metric"], record["score"], values, record.get("per_label"), record.get("samples"))

    def to_json(self) -> dict[str, Any]:
        """The record as evaluation has always written it: metric values, per-label table, n, samples."""
        out = {k: v for k, v in self.values.items() if k != "n"}
        if self.per_label is not None:
            out["per_label"] = self.per_label
        if "n" in self.values:
            out["n"] = self.values["n"]
        if self.samples is not None:
            out["samples"] = self.samples
        return {**out, "metric": self.metric, "score": self.score}

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and a per-label precision / recall / F1 / support report."""
    per_label = {}
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_label[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": sum(g == lab for g in gold)}
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1),
        "macro_f1": sum(v["f1"] for v in per_label.values()) / max(len(labels), 1),
        "per_label": per_label,
        "n": len(gold),
    }


def generation_metrics(refs: Sequence[str | Sequence[str]], hyps: list[str]) -> dict:
    """chrF, ROUGE-L F1 (both 0-100) and exact match of `hyps` against one or several references each.

    With several references an example scores against its best one (sacrebleu's chrF and
    `rouge_score`'s `score_multi` both take the best); exact match needs any one.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    multi = [[r] if isinstance(r, str) else list(r) for r in refs]
    if not multi:
        return {"chrf": 0.0, "rouge_l": 0.0, "exact_match": 0.0, "n": 0}
    # sacrebleu reads references as k parallel streams: pad short lists with their first reference
    # (a duplicate never changes a best-of score).
    k = max(len(r) for r in multi)
    streams = [[r[j] if j < len(r) else r[0] for r in multi] for j in range(k)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(r, h)["rougeL"].fmeasure for r, h in zip(multi, hyps)]
    return {
        "chrf": sacrebleu.corpus_chrf(hyps, streams).score,
        "rouge_l": 100.0 * sum(rouge) / len(rouge),
        "exact_match": sum(any(x.strip() == h.strip() for x in r) for r, h in zip(multi, hyps)) / len(multi),
        "n": len(multi),
    }


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The answer in a generated `text`: cut at the first stop string (`tuner.tasks.stops`), stripped."""
    end = find_stop(text, stop)
    return (text[:end] if end >= 0 else text).strip()


class StopStrings(StoppingCriteria):
    """Ends a row of `generate` once its answer (after leading whitespace) holds a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # `generate(inputs_embeds=...)` hands over only the generated tokens: the text is the answer.
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [find_stop(t, self.stop) >= 0 for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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


@torch.no_grad()
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
    """Log-probability of every label's verbaliser tokens for each example."""
    labels = list(verbaliser)
    label_ids = {lab: tokenizer(w, add_special_tokens=False).input_ids for lab, w in verbaliser.items()}
    P, prompts = _prompt_args(prompt, device)
    single = one_token_labels(tokenizer, verbaliser)
    rows = {examples[0].task: 0} if examples else {}
    results: list[dict[str, float]] = []
    if single is not None:
        cand = torch.tensor(single, device=device)
        for chunk, n_real in _shard_lockstep(examples, batch_size):
            batch = collate(
                [TokenizedExample(e.task, e.input_ids, [int(cand[0])]) for e in chunk],
                rows,
                P,
                max_len=max_len,
                pad_id=tokenizer.pad_token_id,
                share_prompts=lm.supports_shared_prompts,
            ).to(device)
            out = lm(batch, prompts, return_logits=True)
            # One target per segment, but targets come in packed-row order: put them back in segment order.
            logp = torch.empty(batch.num_segments, len(labels), device=device)
            logp[batch.target_seg] = torch.log_softmax(out.target_logits, dim=-1)[:, cand]
            results += [dict(zip(labels, r.tolist())) for r in logp[:n_real].cpu()]
    else:
        segs = [TokenizedExample(e.task, e.input_ids, label_ids[lab]) for e in examples for lab in labels]
        flat: list[float] = []
        for chunk, n_real in _shard_lockstep(segs, batch_size * len(labels)):
            batch = collate(
                chunk,
                rows,
                P,
                max_len=max_len,
                pad_id=tokenizer.pad_token_id,
                share_prompts=lm.supports_shared_prompts,
            ).to(device)
            out = lm(batch, prompts)
            flat += out.seg_logprob[:n_real].cpu().tolist()
        flat = _gather(flat)
        return [
            dict(zip(labels, flat[i * len(labels) : (i + 1) * len(labels)])) for i in range(len(examples))
        ]
    return _gather(results)


@torch.no_grad()
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
    """Greedy answers (left-padded batches through `generate`, synced across ZeRO-3 ranks).

    A row ends at end-of-sequence or at a `stop` string; the answer is cut there (`cut_at_stop`).
    """
    P, prompts = _prompt_args(prompt, device)
    synced = world()[1] > 1
    texts: list[str] = []
    for chunk, n_real in _shard_lockstep(examples, batch_size):
        seqs = [e.input_ids[-(max_len - P - max_new_tokens) :] for e in chunk]
        width = P + max(len(s) for s in seqs)
        # Left-pad each row; its prompt sits right before its text, after the padding.
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        starts = []
        for i, s in enumerate(seqs):
            start = width - len(s) - P
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, start:] = 1
            starts.append(start)
        ids, mask = ids.to(device), mask.to(device)
        emb = lm.embed(ids)
        if P:
            cols = torch.tensor(starts, device=device)[:, None] + torch.arange(P, device=device)[None]
            rows = torch.arange(len(seqs), device=device)[:, None].expand_as(cols)
            emb = emb.index_put(
                (rows.reshape(-1), cols.reshape(-1)), prompts[0].to(emb.dtype).repeat(len(seqs), 1)
            )
        out = lm.backbone.generate(
            inputs_embeds=emb,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([StopStrings(tokenizer, stop)] if stop else []),
            synced_gpus=synced,
        )
        texts += tokenizer.batch_decode(out[:n_real], skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in _gather(texts)]


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
