"""A request can only fail itself: extreme but valid sampling settings run, and a request whose rows
make a forward raise is ended alone while every other request gets the tokens it gets alone."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from test_serving_engine import CharTokenizer, model, request, run, save
from test_serving_runner import make_request, make_tasks, serve, sharp_llama

from serving.engine import STEP_FAILED, Engine, EngineConfig
from serving.runner import ModelRunner
from serving.sampler import RowSampler, sample
from serving.scheduler import Scheduler, SchedulerConfig
from serving.types import EngineError, GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_ID = 10_000  # outside the tiny model's vocabulary: the embedding lookup raises


def test_extreme_sampling_settings_sample_without_error():
    logits = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 30
    cases = [
        SamplingParams(temperature=1e-300, seed=2**63 - 1),  # denormal-ish: greedy
        SamplingParams(temperature=5e-324, seed=0),
        SamplingParams(temperature=2.0, top_p=1e-9, seed=2**64 + 5),  # any int seed is reduced
        SamplingParams(temperature=0.7, top_p=0.5, seed=-3),
    ]
    samplers = [RowSampler.for_params(p) for p in cases]
    tokens = sample(logits, samplers).tolist()
    greedy = logits.argmax(-1).tolist()
    assert tokens[:3] == greedy[:3]  # tiny temperatures are greedy; top_p ~ 0 keeps only the top token
    assert 0 <= tokens[3] < 128


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 1000)  # uniform: each draw is the generator's

    def draws(seed: int) -> list[int]:
        sampler = RowSampler.for_params(SamplingParams(temperature=1.0, seed=seed))
        return [int(sample(logits, [sampler])) for _ in range(5)]

    assert draws(2**63 - 1) == draws(2**63 - 1) != draws(1)


def drive(runner: ModelRunner, arrivals, corrupt: dict[int, str] | None = None):
    """Like `serve`, but row `corrupt[step]` gets an out-of-vocabulary last token before that step."""
    sched = Scheduler(SchedulerConfig())
    outputs: dict[str, list[int]] = {}
    failed: list[str] = []
    step = 0
    while step <= max(arrivals) or sched.has_work:
        for req in arrivals.get(step, []):
            sched.add(req)
        out = sched.schedule()
        if corrupt and step in corrupt:
            b = runner.batch
            with torch.inference_mode():
                b.last_tokens[b.request_ids.index(corrupt[step])] = BAD_ID
        result = runner.step(out)
        for rid in result.failed:
            sched.abort(rid)
        failed += result.failed
        for u in sched.update(out, result.tokens):
            outputs.setdefault(u.request.request_id, []).append(u.token)
        step += 1
    return outputs, failed


def test_a_failing_row_fails_alone_in_prefill_and_in_decode(caplog):
    model, tasks = sharp_llama(), make_tasks(8, seed=7)
    params = [{"max_tokens": 6}, {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 5}]
    reqs = [make_request(f"r{i}", tasks[i], text_seed=i, **params[i % 2]) for i in range(8)]
    bad = make_request("bad", tasks[0], text_seed=3, max_tokens=6)
    bad.prompt_ids = bad.prompt_ids + [BAD_ID]
    # "bad" is prefilled with r4..r7 while r0..r3 decode; then r2 breaks in a decode step.
    with caplog.at_level(logging.WARNING, logger="serving.runner"):
        mixed, failed = drive(ModelRunner(model), {0: reqs[:4], 1: [bad, *reqs[4:]]}, corrupt={3: "r2"})
    assert failed == ["bad", "r2"]
    assert len(caplog.records) == 2 and all("IndexError" in r.getMessage() for r in caplog.records)
    solo = ModelRunner(model)
    for i, req in enumerate(reqs):
        if req.request_id == "r2":
            continue
        alone = make_request("solo", tasks[i], text_seed=i, **params[i % 2])
        assert serve(solo, {0: [alone]})["solo"] == mixed[req.request_id], req.request_id
    assert len(mixed["r2"]) == 3  # its tokens before the failing step


class BadCharTokenizer(CharTokenizer):
    """CharTokenizer, plus "\\x7f" -> an id outside the model's vocabulary (a broken tokenizer)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return self._Enc([BAD_ID if c == "\x7f" else ord(c) - 29 for c in text if 32 <= ord(c) <= 127])


def test_engine_fails_only_the_request_whose_step_raised(tmp_path, caplog):
    m = model()
    engine = Engine(
        EngineConfig(backbone="tiny", prompt_store=str(tmp_path)), model=m, tokenizer=BadCharTokenizer()
    )
    save(tmp_path, "t", m)
    save(tmp_path, "u", m, seed=1)
    meta = {"kind": "classification", "template": "{sentence}:", "verbaliser": {"pos": " g", "neg": " b"}}
    save(tmp_path, "cls", m, meta=meta, seed=2)
    engine.registry.refresh()
    sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 2**63 - 1}
    hostile = {"temperature": 1e-300, "seed": 2**63 - 1}
    innocents = [
        request(f"i{k}", "tu"[k % 2], prompt="abc" * (k + 1), max_tokens=8, **[{}, sampled, hostile][k % 3])
        for k in range(6)
    ]

    async def together():
        await engine.start()
        try:
            first = [asyncio.ensure_future(run(engine, r)) for r in innocents[:3]]
            await asyncio.sleep(0.05)  # some innocents are decoding when the bad one is prefilled
            bad = asyncio.ensure_future(run(engine, request("bad", "t", prompt="ab\x7fc", max_tokens=8)))
            bad_cls = asyncio.ensure_future(engine.classify("cls", "so \x7f"))
            rest = [asyncio.ensure_future(run(engine, r)) for r in innocents[3:]]
            good_cls = asyncio.ensure_future(engine.classify("cls", "fine"))
            errors = []
            for fut in (bad, bad_cls):
                with pytest.raises(EngineError) as err:
                    await fut
                errors.append(err.value)
            return errors, await good_cls, await asyncio.gather(*first, *rest)
        finally:
            await engine.stop()

    async def alone(req):
        await engine.start()
        try:
            return await (run(engine, req) if isinstance(req, GenerationRequest) else engine.classify(*req))
        finally:
            await engine.stop()

    with caplog.at_level(logging.WARNING):
        errors, label, outs = asyncio.run(together())
    assert [(e.message, e.status) for e in errors] == [(STEP_FAILED, 500)] * 2  # no internal text
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 2  # each logged once, one line
    assert label.labels == pytest.approx(asyncio.run(alone(("cls", "fine"))).labels, abs=1e-6)
    for req, got in zip(innocents, outs):
        assert got[-1].finished
        want = asyncio.run(alone(req))
        assert [t for o in got for t in o.token_ids] == [t for o in want for t in o.token_ids], req.request_id
    stats = engine.stats()
    assert stats["requests_failed_total"] == 2 and stats["running"] == 0
