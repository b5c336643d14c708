"""Greedy generation in process through the server's own parts: what evaluation decodes with.

Evaluation must score the text a user receives. Decoding with another loop (left-padded batches
through `transformers.generate`) gave greedy text that changed with the batch it ran in, while the
server gave the text of the request alone. So `generate_texts` drives the server's `Scheduler`,
`ModelRunner` (each row decodes on its own KV: the task prompt's cached KV, then its own tokens at
its own positions; no other row's padding enters its attention) and output path
(`serving.output.to_output`: incremental detokenising, the task's stop strings with
`tuner.tasks.stops.find_stop`), step by step as the engine thread does, without HTTP, asyncio,
tenants or a prompt store. A row's text is what the engine would stream for the same token ids.

Lockstep (`any_busy`): under DeepSpeed ZeRO-3 every forward all-gathers each layer's weights, so
every rank must run the same sequence of forwards. Then requests go in waves of `batch_size` (a
wave's prefill is one forward, `LOCKSTEP_GROUP_OVERHEAD`; its decode steps one forward each), the
task prompt's KV is computed on every rank before the first step, and a rank with nothing left
runs a one-token forward per step (`ModelRunner.next_token_logits`, the same modules as a step)
until `any_busy` says every rank is done. Alone, requests are admitted as rows free up, as in the
server.

The model runs under `no_grad`, not inference mode: evaluation's backbone trains the prompts next,
and under ZeRO-3 a weight gathered in inference mode could not be saved for that backward.

It does not tokenise, cut inputs to length or strip answers (`tuner.evaluate.generate_greedy`
does), and never samples: every request is greedy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from serving.output import to_output
from serving.runner import ModelRunner
from serving.scheduler import Request, Scheduler, SchedulerConfig
from serving.types import FinishReason, SamplingParams

# In lockstep a prefill must be one forward whatever its rows' lengths (`length_groups` would split
# rows into forwards by length, a number that differs between ranks): an overhead no padding beats.
LOCKSTEP_GROUP_OVERHEAD = 1 << 40
_DUMMY_TOKEN = 0  # what an idle rank's lockstep forward reads; its logits are thrown away


@dataclass(frozen=True)
class OfflineTask:
    """The task an offline generation runs: a `serving.runner.TaskPrompt`."""

    name: str
    version: Hashable
    prompt: torch.Tensor  # [P, hidden]; P = 0: no virtual tokens (the untuned backbone)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The tokens that end a generation: the model's generation config's and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def decode_text(tokenizer, ids: list[int]) -> str:
    """Token ids as the text a client reads (special tokens, EOS among them, are not shown)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompt: torch.Tensor | None,
    inputs: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    any_busy: Callable[[bool], bool] | None = None,
) -> list[str]:
    """The server's greedy answer to each of `inputs`, as its stream would deliver it (not stripped).

    Args:
        model: a transformers causal LM, frozen, in eval mode.
        prompt: the task's soft prompt `[P, hidden]`; None: no virtual tokens (zero-shot).
        inputs: each request's token ids (the rendered, tokenised input; not empty).
        max_new_tokens: the most tokens a request generates (EOS counts as one, as in the server).
        stop: the task's stop strings (`TaskMeta.stop`): whitespace before the answer never stops it.
        batch_size: rows decoded together (the server's `max_batch_size`).
        any_busy: lockstep across ranks: called once per step with whether this rank has work, it
            returns whether any rank has (e.g. an all-reduce); None: this process alone.
    """
    if any(len(ids) == 0 for ids in inputs):
        raise ValueError("every input needs at least one token")
    # no_grad, not inference mode: the model may train next (`ModelRunner`'s `inference_mode`).
    overhead = LOCKSTEP_GROUP_OVERHEAD if any_busy else 64
    runner = ModelRunner(model, group_overhead_tokens=overhead, inference_mode=False)
    prompt = prompt.detach() if prompt is not None else torch.zeros(0, runner.hidden_size)
    task = OfflineTask("offline", 0, prompt)
    runner.prefix_cache.get_many([(task.name, task.version, task.prompt)])  # on every rank, at once
    eos = eos_token_ids(model, tokenizer)
    params = SamplingParams(max_tokens=max_new_tokens)
    waiting = deque(
        Request(str(i), task.name, list(ids), params, 0.0, eos, task, task_stop=list(stop))
        for i, ids in enumerate(inputs)
    )
    budget = sum(len(ids) for ids in inputs) + batch_size  # never chunked: a step admits whole prompts
    sched = Scheduler(SchedulerConfig(batch_size, len(inputs) + 1, max(budget, 1)))
    texts = {r.request_id: "" for r in waiting}
    order = [r.request_id for r in waiting]
    while True:
        if waiting and (any_busy is None or not sched.has_work):  # lockstep: the next wave
            for _ in range(len(waiting) if any_busy is None else min(batch_size, len(waiting))):
                sched.add(waiting.popleft())
        if any_busy is not None and not any_busy(sched.has_work):
            break
        if not sched.has_work:
            if any_busy is None:
                break
            runner.next_token_logits([task], [[_DUMMY_TOKEN]])  # others still decode: keep step
            continue
        _step(runner, sched, texts, lambda ids: decode_text(tokenizer, ids))
    return [texts[rid] for rid in order]


def _step(runner: ModelRunner, sched: Scheduler, texts: dict[str, str], decode) -> None:
    """One engine step (`serving.engine.Engine._run` / `_finish_step`): schedule, run the model,
    append each sampled token's text, end the requests whose text reached a stop string."""
    out = sched.schedule()
    result = runner.step(out)
    if result.failed:
        raise RuntimeError(f"the model failed on {len(result.failed)} of the step's requests")
    for update in sched.update(out, result.tokens):
        o = to_output(update, decode)
        texts[o.request_id] += o.text
        if o.finished and update.finish_reason is None:  # a stop string: leaves before the next step
            sched.finish(o.request_id, FinishReason.STOP)
