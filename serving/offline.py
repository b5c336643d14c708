"""Greedy generation in process through the server's own parts: what evaluation decodes with.

Evaluation must score the text a user receives. Decoding with another loop (left-padded batches
through `transformers.generate`) gave greedy text that changed with the batch it ran in, while the
server gave the text of the request alone. So `generate_texts_of_tasks` drives the server's
`Scheduler`, `ModelRunner` (each row decodes on its own KV: its task prompt's cached KV, then its own
tokens at its own positions; no other row's padding enters its attention) and output path
(`serving.output.to_output`: incremental detokenising, the task's stop strings with
`tuner.tasks.stops.find_stop`), step by step as the engine thread does, without HTTP, asyncio,
tenants or a prompt store. A row's text is what the engine would stream for the same token ids.

Requests of many tasks decode in the same steps, as the server's do: each request carries its own
task (`DecodeTask`: prompt, answer length, stop strings), and tasks holding the same prompt object
share one prefix KV entry. So evaluating a fleet of tasks with a few examples each costs the steps of
its examples, not one small decode per task. `generate_texts` is the one-task case.

Lockstep (`any_busy`): under DeepSpeed ZeRO-3 every forward all-gathers each layer's weights, so
every rank must run the same sequence of forwards. Then requests go in waves of `batch_size` (a
wave's prefill is one forward, `LOCKSTEP_GROUP_OVERHEAD`; its decode steps one forward each), every
task's prompt KV is computed on every rank before the first step (the ranks pass the same tasks: one
forward per prompt length) and kept for the call, so no step misses, and a rank with nothing left
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
_CACHE_BYTES = 256 * 2**20  # alone: the prefix KV LRU's bound (the server's default)
# Lockstep: no bound; what a call holds is the KV of the tasks it is given (callers pass a piece's).
_LOCKSTEP_CACHE_BYTES = 1 << 62


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


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds a tensor
class DecodeTask:
    """What the inputs of one task decode with: its soft prompt, answer length and stop strings."""

    prompt: torch.Tensor | None  # [P, hidden]; None: no virtual tokens (the untuned backbone)
    max_new_tokens: int  # the most tokens a request generates (EOS counts as one, as in the server)
    stop: tuple[str, ...] = ()  # the task's stop strings (`TaskMeta.stop`)


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
    """The server's greedy answer to each of `inputs` under one task's `prompt` (None: zero-shot):
    `generate_texts_of_tasks` with a single task (see there for the arguments)."""
    task = DecodeTask(prompt, max_new_tokens, tuple(stop))
    return generate_texts_of_tasks(
        model, tokenizer, [task], [(0, ids) for ids in inputs], batch_size=batch_size, any_busy=any_busy
    )


@torch.no_grad()
def generate_texts_of_tasks(
    model,
    tokenizer,
    tasks: Sequence[DecodeTask],
    inputs: Sequence[tuple[int, Sequence[int]]],
    *,
    batch_size: int = 16,
    any_busy: Callable[[bool], bool] | None = None,
) -> list[str]:
    """The server's greedy answer to each of `inputs`, as its stream would deliver it (not stripped),
    requests of many tasks decoded in the same steps (the engine's mixed batches).

    Args:
        model: a transformers causal LM, frozen, in eval mode.
        tasks: the tasks the inputs name. Tasks holding the same prompt object share its prefix KV
            (one entry, computed once); in lockstep every rank must pass the same list.
        inputs: each request's (index of its task in `tasks`, token ids: rendered, tokenised, not empty).
        batch_size: rows decoded together (the server's `max_batch_size`).
        any_busy: lockstep across ranks: called once per step with whether this rank has work, it
            returns whether any rank has (e.g. an all-reduce); None: this process alone.
    """
    if any(len(ids) == 0 for _, ids in inputs):
        raise ValueError("every input needs at least one token")
    if any(not 0 <= t < len(tasks) for t, _ in inputs):
        raise ValueError(f"an input names a task outside the {len(tasks)} given")
    lockstep = any_busy is not None
    # Alone, the prefix cache is the server's LRU (a miss is computed at its rows' prefill). In lockstep a
    # miss would be a forward the other ranks do not run: every rank computes every task's prompt KV
    # before the first step (the same list: the same forwards) and keeps it for the call.
    runner = ModelRunner(
        model,
        prefix_cache_bytes=_LOCKSTEP_CACHE_BYTES if lockstep else _CACHE_BYTES,
        group_overhead_tokens=LOCKSTEP_GROUP_OVERHEAD if lockstep else 64,
        inference_mode=False,  # no_grad, not inference mode: the model may train next
    )
    entries = _offline_tasks(tasks, runner.hidden_size)
    if lockstep:
        distinct = {e.name: e for e in entries}.values()
        runner.prefix_cache.get_many([(e.name, e.version, e.prompt) for e in distinct])
    idle = entries[0] if entries else OfflineTask("idle", 0, torch.zeros(0, runner.hidden_size))
    eos = eos_token_ids(model, tokenizer)
    waiting = deque(
        Request(
            str(i),
            entries[t].name,
            list(ids),
            SamplingParams(max_tokens=tasks[t].max_new_tokens),
            0.0,
            eos,
            entries[t],
            task_stop=list(tasks[t].stop),
        )
        for i, (t, ids) in enumerate(inputs)
    )
    budget = sum(len(ids) for _, ids in inputs) + batch_size  # never chunked: a step admits whole prompts
    sched = Scheduler(SchedulerConfig(batch_size, len(inputs) + 1, max(budget, 1)))
    texts = {r.request_id: "" for r in waiting}
    order = [r.request_id for r in waiting]
    while True:
        if waiting and (not lockstep or not sched.has_work):  # lockstep: the next wave
            for _ in range(len(waiting) if not lockstep else min(batch_size, len(waiting))):
                sched.add(waiting.popleft())
        if lockstep and not any_busy(sched.has_work):
            break
        if not sched.has_work:
            if not lockstep:
                break
            runner.next_token_logits([idle], [[_DUMMY_TOKEN]])  # others still decode: keep step
            continue
        _step(runner, sched, texts, lambda ids: decode_text(tokenizer, ids))
    return [texts[rid] for rid in order]


def _offline_tasks(tasks: Sequence[DecodeTask], hidden_size: int) -> list[OfflineTask]:
    """The runner's task of each of `tasks`: one per distinct prompt object (its prefix KV entry)."""
    by_prompt: dict[int, OfflineTask] = {}
    out = []
    for task in tasks:
        key = id(task.prompt)  # every prompt stays referenced by `tasks` for the call: ids stay unique
        if key not in by_prompt:
            prompt = task.prompt.detach() if task.prompt is not None else torch.zeros(0, hidden_size)
            by_prompt[key] = OfflineTask(f"prompt{len(by_prompt)}", 0, prompt)
        out.append(by_prompt[key])
    return out


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
