"""On a CUDA GPU: the serving runner keeps the running batch, its KV and the task prefix KV on the
device, and a mixed batch (greedy and seeded sampling, many tasks) equals each request alone; the
engine serves in bf16 there. Skips without a GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_serving_engine import CharTokenizer, model, request, run, save
from test_serving_runner import make_request, make_tasks, serve, sharp_llama

from serving.engine import Engine, EngineConfig
from serving.runner import ModelRunner
from serving.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.gpu


def test_runner_state_stays_on_the_gpu_and_mixed_batches_equal_solo():
    m, tasks = sharp_llama().to("cuda"), make_tasks(6, seed=8)
    params = [{"max_tokens": 6}, {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 7}]
    reqs = [make_request(f"r{i}", tasks[i], text_seed=i, **params[i % 2]) for i in range(6)]
    runner = ModelRunner(m)
    sched = Scheduler(SchedulerConfig())
    for r in reqs[:3]:
        sched.add(r)
    runner.step(sched.schedule())
    b = runner.batch
    on_gpu = [b.kv.kv, b.kv.mask, b.last_tokens, b.positions, *runner.prefix_cache._entries.values()]
    assert all(t.device.type == "cuda" for t in on_gpu)
    mixed = serve(ModelRunner(m), {0: reqs[:3], 2: reqs[3:]})
    for i in range(6):
        alone = make_request("solo", tasks[i], text_seed=i, **params[i % 2])
        assert serve(ModelRunner(m), {0: [alone]})["solo"] == mixed[f"r{i}"]


def test_engine_serves_in_bf16_on_the_gpu(tmp_path):
    m = model().to("cuda", torch.bfloat16)
    engine = Engine(
        EngineConfig(backbone="tiny", prompt_store=str(tmp_path), dtype="bf16", device="cuda"),
        model=m,
        tokenizer=CharTokenizer(),
    )
    save(tmp_path, "t", m)
    meta = {"kind": "classification", "template": "{sentence}:", "verbaliser": {"pos": " g", "neg": " b"}}
    save(tmp_path, "cls", m, meta=meta, seed=1)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            gens = [
                run(engine, request(f"r{i}", "t", prompt="abc" * (i + 1), max_tokens=5)) for i in range(4)
            ]
            return await asyncio.gather(engine.classify("cls", "fine"), *gens)
        finally:
            await engine.stop()

    label, *outs = asyncio.run(main())
    assert sum(label.labels.values()) == pytest.approx(1.0)
    assert all(o[-1].finished and o[-1].completion_tokens == 5 for o in outs)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["requests_finished_total"] == 5
