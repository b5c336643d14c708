"""Shared by the tensor-parallel serving tests: a mixed batch of tasks through one engine, its outputs.

`mixed_outputs(engine)` sends, at once, greedy completions of two tasks, one streamed completion and
classifications of two tasks, and returns what a client reads: each completion's token ids, the
streamed chunks' texts, and each classification's label probabilities. Two engines (one process,
N ranks) given the same store must return the same greedy tokens and chunks, and probabilities
within `PROB_TOL`.
"""

from __future__ import annotations

import asyncio

from serving.types import GenerationRequest, SamplingParams

PROB_TOL = 1e-4  # fp32 logits: the ranks' partial sums add in another order (measured ~1e-5 on SmolLM2)
GENERATE = [  # (request id, task, prompt, max tokens)
    ("g-samsum", "samsum", "Anna: lunch at noon?\nBen: sure, see you there", 6),
    ("g-sst2", "sst2", "a warm, funny film", 4),
    ("g-trec", "trec", "Who wrote Hamlet?", 5),
]
STREAM = ("s-samsum", "samsum", "Carl: the train is late again\nDina: I will wait", 7)
CLASSIFY = [("sst2", "a dull and lifeless plot"), ("trec", "Where is Lima?"), ("sst2", "superb acting")]


async def _mixed(engine) -> dict:
    async def tokens(rid, task, prompt, n):
        req = GenerationRequest(rid, task, prompt, SamplingParams(max_tokens=n, temperature=0.0))
        return [t async for out in engine.generate(req) for t in out.token_ids]

    async def chunks(rid, task, prompt, n):
        req = GenerationRequest(rid, task, prompt, SamplingParams(max_tokens=n, temperature=0.0))
        return [(out.text, list(out.token_ids)) async for out in engine.generate(req)]

    async def probs(task, text):
        return (await engine.classify(task, text)).labels

    gens = [tokens(*g) for g in GENERATE]
    results = await asyncio.gather(*gens, chunks(*STREAM), *(probs(t, x) for t, x in CLASSIFY))
    return {
        "tokens": dict(zip([g[0] for g in GENERATE], results[: len(GENERATE)])),
        "stream": results[len(GENERATE)],
        "probs": results[len(GENERATE) + 1 :],
    }


def mixed_outputs(engine) -> dict:
    """The mixed batch's outputs (the engine is started and stopped by the caller's loop)."""
    return engine_loop(engine).run_until_complete(_mixed(engine))


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}


def engine_loop(engine) -> asyncio.AbstractEventLoop:
    """One event loop per engine, started once: the engine delivers to the loop it started on."""
    loop = _LOOPS.get(id(engine))
    if loop is None:
        loop = _LOOPS[id(engine)] = asyncio.new_event_loop()
        loop.run_until_complete(engine.start())
    return loop


def stop_engine(engine) -> None:
    loop = _LOOPS.pop(id(engine), None)
    if loop is not None:
        loop.run_until_complete(engine.stop())
        loop.close()


def assert_same_outputs(single: dict, sharded: dict, what: str) -> None:
    assert sharded["tokens"] == single["tokens"], f"{what}: greedy tokens differ"
    assert sharded["stream"] == single["stream"], f"{what}: streamed chunks differ"
    for a, b in zip(single["probs"], sharded["probs"]):
        assert a.keys() == b.keys()
        worst = max(abs(a[k] - b[k]) for k in a)
        assert worst <= PROB_TOL, f"{what}: label probabilities differ by {worst:.2e} > {PROB_TOL}"
