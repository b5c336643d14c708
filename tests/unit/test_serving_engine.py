"""Engine tests on a tiny random Llama with a character tokenizer: hot reload, validation before the
first output, overload, abort on disconnect, timeouts, classification."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_serving_runner import sharp_llama
from transformers import GenerationConfig

from serving.engine import Engine, EngineConfig
from serving.runner import ModelRunner
from serving.types import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    QuotaExceeded,
    RequestTimeout,
    SamplingParams,
    TenantLimits,
    UnknownTask,
)
from tuner.export import TaskAdapter, save_adapter

EOS = 2


class CharTokenizer:
    """Printable ASCII character c <-> token ord(c) - 29 (3..97); 2 is EOS."""

    eos_token_id = EOS

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = False):
        return self._Enc([ord(c) - 29 for c in text if 32 <= ord(c) < 127])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i + 29) for i in ids if 3 <= i < 98)


pytestmark = pytest.mark.usefixtures("one_thread")


def model():
    m = sharp_llama()
    m.generation_config = GenerationConfig(eos_token_id=EOS)
    return m


def save(root, name, m, meta=None, seed=0):
    prompt = torch.randn(4, m.config.hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.5
    save_adapter(root, TaskAdapter(name, prompt, "tiny", meta or {"kind": "generation"}), m.config)


def make_engine(root, **cfg) -> Engine:
    m = model()
    return Engine(
        EngineConfig(backbone="tiny", prompt_store=str(root), **cfg), model=m, tokenizer=CharTokenizer()
    )


def request(rid, task, prompt="hello", **params) -> GenerationRequest:
    return GenerationRequest(rid, task, prompt, SamplingParams(**params))


async def run(engine: Engine, req: GenerationRequest) -> list:
    return [out async for out in engine.generate(req)]


def test_a_task_directory_written_while_running_is_served_without_restart(tmp_path):
    m = model()
    save(tmp_path, "first", m)
    engine = Engine(
        EngineConfig(backbone="tiny", prompt_store=str(tmp_path), reload_interval_s=0.05),
        model=m,
        tokenizer=CharTokenizer(),
    )

    async def main():
        await engine.start()
        try:
            assert engine.task_names() == ["first"]
            with pytest.raises(UnknownTask):
                await run(engine, request("r0", "second"))
            save(tmp_path, "second", m, seed=1)
            deadline = time.monotonic() + 10
            while "second" not in engine.task_names() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            outs = await run(engine, request("r1", "second", max_tokens=3))
            assert outs[-1].finished and outs[-1].completion_tokens == sum(len(o.token_ids) for o in outs) > 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_engine_stream_equals_runner_output_and_counts_stats(tmp_path):
    engine = make_engine(tmp_path)
    save(tmp_path, "t", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            reqs = [request(f"r{i}", "t", prompt="abc" * (i + 1), max_tokens=5) for i in range(4)]
            return await asyncio.gather(*(run(engine, r) for r in reqs))
        finally:
            await engine.stop()

    results = asyncio.run(main())
    tok = CharTokenizer()
    ref = ModelRunner(engine.runner.model)
    entry = engine.registry.get("t")
    for i, outs in enumerate(results):
        ids = [t for o in outs for t in o.token_ids]
        # The runner alone, greedy, token by token with a full recompute each time.
        seq = tok("abc" * (i + 1)).input_ids
        want = []
        for _ in range(len(ids)):
            want.append(int(ref.next_token_logits([entry], [seq + want])[0].argmax()))
            if want[-1] == EOS:
                break
        assert ids == want
    stats = engine.stats()
    assert stats["requests_finished_total"] == 4 and stats["prefix_cache_misses_total"] == 1
    assert stats["tokens_generated_total"] == sum(len(o) for o in results)


def test_requests_are_validated_before_the_first_output(tmp_path):
    engine = make_engine(tmp_path, max_prompt_tokens=8, max_new_tokens_limit=50)
    save(tmp_path, "t", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            for task in ("../t", "t/x", "nope"):
                with pytest.raises(UnknownTask):
                    await run(engine, request("r", task))
            with pytest.raises(PromptTooLong):
                await run(engine, request("r", "t", prompt="x" * 9))
            with pytest.raises(PromptTooLong):  # 4 virtual + 8 + (context - 10) > the tiny model's context
                limit = engine.runner.max_positions
                engine.config.max_new_tokens_limit = limit + 1000
                await run(engine, request("r", "t", prompt="x" * 8, max_tokens=limit - 10))
            for bad in (
                {"max_tokens": 0},
                {"max_tokens": limit + 1001},
                {"temperature": -1.0},
                {"top_p": 0.0},
            ):
                with pytest.raises(InvalidRequest):
                    await run(engine, request("r", "t", **bad))
            with pytest.raises(InvalidRequest):
                await run(engine, request("r", "t", prompt=""))
            assert engine.stats()["requests_finished_total"] == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_full_queue_is_overloaded_and_a_closed_stream_is_aborted(tmp_path):
    engine = make_engine(tmp_path, max_batch_size=1, max_queue=1)
    save(tmp_path, "t", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            running = engine.generate(request("a", "t", max_tokens=200))
            await anext(running)  # admitted and decoding (the batch of one is full)
            waiting = engine.generate(request("b", "t", max_tokens=5))
            pending = asyncio.ensure_future(anext(waiting))
            while engine.stats()["queue_depth"] < 1:
                await asyncio.sleep(0.005)
            with pytest.raises(Overloaded):
                await run(engine, request("c", "t"))
            await running.aclose()  # the client went away: "a" leaves the batch, "b" gets its turn
            first = await pending
            rest = [o async for o in waiting]
            assert (rest or [first])[-1].finished
            assert engine.stats()["running"] == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_explicit_abort_ends_the_stream_and_old_requests_time_out(tmp_path):
    engine = make_engine(tmp_path, request_timeout_s=5.0)
    save(tmp_path, "t", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            stream = engine.generate(request("a", "t", max_tokens=200))
            await anext(stream)
            engine.abort("a")
            outs = [o async for o in stream]
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
            old = request("old", "t", max_tokens=200)
            old.arrival_time = time.monotonic() - 10.0
            with pytest.raises(RequestTimeout):
                await run(engine, old)
        finally:
            await engine.stop()

    asyncio.run(main())


def test_classify_returns_verbaliser_probabilities(tmp_path):
    engine = make_engine(tmp_path)
    meta = {
        "kind": "classification",
        "template": "Review: {sentence}\nSentiment:",
        "verbaliser": {"pos": " g", "neg": " ba"},
    }
    save(tmp_path, "cls", engine.runner.model, meta=meta)
    save(tmp_path, "gen", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            with pytest.raises(InvalidRequest):
                await engine.classify("gen", "x")
            return await engine.classify("cls", "fine")
        finally:
            await engine.stop()

    result = asyncio.run(main())
    tok = CharTokenizer()
    scores = ModelRunner(engine.runner.model).score(
        engine.registry.get("cls"),
        tok("Review: fine\nSentiment:").input_ids,
        [tok(" g").input_ids, tok(" ba").input_ids],
    )
    want = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
    assert result.labels["pos"] == pytest.approx(want[0], abs=1e-5)
    assert sum(result.labels.values()) == pytest.approx(1.0)
    assert result.label == max(result.labels, key=result.labels.get)
    assert engine.task_info("cls")["labels"] == ["pos", "neg"]


def test_concurrent_classifications_of_many_tasks_equal_each_alone(tmp_path):
    """Pending classifications (any tasks) are scored together with the step's prefills."""
    engine = make_engine(tmp_path)
    metas = [
        {"kind": "classification", "template": "Review: {sentence}\nSentiment:", "verbaliser": v}
        for v in ({"pos": " g", "neg": " b"}, {"yes": " ya", "no": " n", "maybe": " m"})
    ]
    for i, meta in enumerate(metas):
        save(tmp_path, f"cls{i}", engine.runner.model, meta=meta, seed=i)
    save(tmp_path, "gen", engine.runner.model, seed=5)
    engine.registry.refresh()
    inputs = [
        (f"cls{i % 2}", text) for i, text in enumerate(["fine", "awful film", "so-so", "great", "meh", "ok!"])
    ]

    async def together():
        await engine.start()
        try:
            gens = [
                run(engine, request(f"g{i}", "gen", prompt="x" * (3 + i), max_tokens=4)) for i in range(2)
            ]
            results = await asyncio.gather(*(engine.classify(t, x) for t, x in inputs), *gens)
            return results[: len(inputs)]
        finally:
            await engine.stop()

    async def alone(task, text):
        await engine.start()
        try:
            return await engine.classify(task, text)
        finally:
            await engine.stop()

    mixed = asyncio.run(together())
    for (task, text), got in zip(inputs, mixed):
        want = asyncio.run(alone(task, text))
        assert got.label == want.label and got.labels == pytest.approx(want.labels, abs=1e-5)


def test_text_encoder_gives_the_tokenizers_own_ids():
    """The GIL-free encoder (a fast tokenizer's `encode_batch`) and the fallback (any callable tokenizer)
    give exactly what `tokenizer(text, add_special_tokens=False)` gives."""
    from conftest import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from serving.engine import text_encoder

    fast = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    texts = [
        "Review: fine\nSentiment:",
        "  spaces  ",
        "émoji 🤖",
        "<|im_start|>user\nhi<|im_end|>",
        "word " * 300,
    ]
    for tok in (fast, CharTokenizer()):
        encode = text_encoder(tok)
        for text in texts:
            assert encode(text) == tok(text, add_special_tokens=False).input_ids


def test_tenant_limits_apply_to_generation_and_classification_alike(tmp_path):
    engine = make_engine(tmp_path)
    meta = {"kind": "classification", "template": "{sentence}:", "verbaliser": {"pos": " g", "neg": " b"}}
    save(tmp_path, "cls", engine.runner.model, meta=meta)
    save(tmp_path, "gen", engine.runner.model, seed=1)
    engine.registry.refresh()
    engine.set_tenant_limits({"a": TenantLimits(max_concurrent=1)})

    def tenant_request(rid, tenant, **params):
        req = request(rid, "gen", **params)
        req.tenant = tenant
        return req

    async def main():
        await engine.start()
        try:
            running = engine.generate(tenant_request("a0", "a", max_tokens=200))
            await anext(running)  # a's one allowed request is running
            with pytest.raises(QuotaExceeded) as err:
                await run(engine, tenant_request("a1", "a"))
            assert err.value.status == 429 and err.value.retry_after >= 1
            with pytest.raises(QuotaExceeded):
                await engine.classify("cls", "fine", tenant="a")
            b_outs = await run(engine, tenant_request("b0", "b", max_tokens=3))
            b_label = await engine.classify("cls", "fine", tenant="b")
            await running.aclose()
            return b_outs, b_label
        finally:
            await engine.stop()

    b_outs, b_label = asyncio.run(main())
    assert b_outs[-1].finished and b_label.label in ("pos", "neg")
    tenants = engine.stats()["tenants"]
    assert (tenants["a"].rejected_total, tenants["b"].rejected_total) == (2, 0)
    assert tenants["b"].admitted_total == 2 and tenants["a"].running == 0


class SlowCountingTokenizer(CharTokenizer):
    """CharTokenizer that takes `delay` seconds per call (like a long prompt) and counts its calls."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        self.calls += 1
        time.sleep(self.delay)
        return super().__call__(text, add_special_tokens)


def test_prompts_are_checked_before_and_tokenised_off_the_event_loop(tmp_path):
    m = model()
    tok = SlowCountingTokenizer()
    engine = Engine(
        EngineConfig(backbone="tiny", prompt_store=str(tmp_path), max_prompt_tokens=64),
        model=m,
        tokenizer=tok,
    )
    save(tmp_path, "t", m)
    meta = {"kind": "classification", "template": "{sentence}:", "verbaliser": {"pos": " g", "neg": " b"}}
    save(tmp_path, "cls", m, meta=meta)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            with pytest.raises(PromptTooLong):  # 1 MB: refused by its length in characters, untokenised
                await run(engine, request("huge", "t", prompt="x" * 2**20))
            assert tok.calls == 0
            for bad in ("\ud800", "ok \udfff ok"):  # lone surrogates: a 400, not a tokenizer TypeError
                with pytest.raises(InvalidRequest, match="Unicode"):
                    await run(engine, request("s", "t", prompt=bad))
                with pytest.raises(InvalidRequest, match="Unicode"):
                    await engine.classify("cls", bad)
            tok.delay = 0.4  # a slow tokenisation must not stall the loop
            gaps, stop = [], asyncio.Event()

            async def tick():
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

            ticker = asyncio.ensure_future(tick())
            outs = await run(engine, request("slow", "t", prompt="abc", max_tokens=2))
            stop.set()
            await ticker
            return outs, max(gaps)
        finally:
            await engine.stop()

    outs, worst_gap = asyncio.run(main())
    assert outs[-1].finished and worst_gap < 0.2
