"""Issue 37, item 5: a store is served once it is indexed; a task's prompt is read on first use (off
the engine thread) into an LRU bounded by `engine.prompt_cache_bytes`; reindexing is incremental."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from serving_helpers import (
    TASKS,
    assert_error,
    engine_config,
    server_config,
    tiny_backbone_dir,
    write_prompt_store,
)
from test_serving_engine import make_engine, request, run
from test_serving_engine import save as save_for
from test_serving_registry import CFG, HIDDEN, hand_copied, save

import serving.registry
import tuner.export
from serving.api import create_app
from serving.config import EngineConfig
from serving.engine import Engine
from serving.registry import PromptRegistry
from serving.types import PromptUnavailable, UnknownTask
from tuner.export import ADAPTER_WEIGHTS
from tuner.schema import ConfigError


def count_data_reads(monkeypatch) -> list[int]:
    """Each prompt data read (safetensors' `load`, called only once a prompt's bytes are read)."""
    reads, load = [], tuner.export.load
    monkeypatch.setattr(tuner.export, "load", lambda data: (reads.append(len(data)), load(data))[1])
    return reads


def lazy(root, **kw) -> PromptRegistry:
    return PromptRegistry(root, {"tiny"}, HIDDEN, lazy=True, **kw)


def test_an_engine_is_ready_without_reading_a_prompt_and_reads_one_on_first_use(tmp_path, monkeypatch):
    reads = count_data_reads(monkeypatch)
    engine = make_engine(tmp_path / "store", reload_interval_s=3600)
    for i in range(30):
        save_for(tmp_path / "store", f"t{i}", engine.runner.model, seed=i)
    engine.registry.refresh()
    assert len(engine.task_names()) == 30 and reads == []  # indexed: names, metadata, header shapes
    assert engine.task_info("t7").num_virtual_tokens == 4 and reads == []

    async def main():
        await engine.start()
        try:
            for rid in ("a", "b"):
                assert (await run(engine, request(rid, "t7", max_tokens=2)))[-1].finished
        finally:
            await engine.stop()

    asyncio.run(main())
    stats = engine.stats()
    assert len(reads) == 1  # the first request read t7's prompt, the second found it loaded
    assert (stats.prompt_cache_misses_total, stats.prompt_cache_hits_total) == (1, 1)
    assert stats.prompt_cache_bytes == 4 * engine.runner.hidden_size * 4


def test_the_lru_evicts_under_its_bound_and_reads_evicted_prompts_again(tmp_path, monkeypatch):
    written = {}
    for i in range(6):
        d = save(tmp_path, f"t{i}", P=4)
        written[f"t{i}"] = tuner.export.load_adapter(d).prompt
    one = 4 * HIDDEN * 4
    reg = lazy(tmp_path, prompt_cache_bytes=2 * one + one // 2)  # room for two prompts
    reg.refresh()
    reads = count_data_reads(monkeypatch)
    for name in ["t0", "t1", "t2", "t0", "t1", "t2", "t5", "t5"]:
        assert reg.load(reg.get(name)).prompt.equal(written[name])
        assert reg.prompt_stats.bytes <= 2 * one + one // 2
    stats = reg.prompt_stats
    assert len(reads) == stats.misses == 7 and stats.hits == 1 and stats.evictions == 5
    assert stats.entries == 2 and stats.bytes == 2 * one
    assert reg.get("t5").prompt.equal(written["t5"])  # the blocking accessor reads through the same LRU


def test_the_bound_is_a_validated_documented_config_key():
    assert EngineConfig().prompt_cache_bytes == 256 * 2**20
    assert EngineConfig(prompt_cache_bytes=0).prompt_cache_bytes == 0  # none kept: every use reads
    with pytest.raises(ConfigError, match="engine.prompt_cache_bytes"):
        EngineConfig(prompt_cache_bytes=-1)


def test_reindexing_reads_only_the_entries_that_changed(tmp_path, monkeypatch):
    for i in range(20):
        save(tmp_path, f"t{i}")
    reg = lazy(tmp_path)
    indexed, index = [], serving.registry.read_adapter_header
    monkeypatch.setattr(
        serving.registry,
        "read_adapter_header",
        lambda path, name, **kw: (indexed.append(name), index(path, name, **kw))[1],
    )
    assert len(reg.refresh().added) == 20 and len(indexed) == 20
    indexed.clear()
    assert not reg.refresh() and indexed == []  # nothing changed: stat calls only
    save(tmp_path, "t3", P=6)
    save(tmp_path, "new")
    changes = reg.refresh()
    assert (changes.changed, changes.added) == (["t3"], ["new"]) and sorted(indexed) == ["new", "t3"]
    assert reg.get("t3").num_virtual_tokens == 6


def test_a_changed_task_drops_its_prompt_and_one_in_use_is_refused_early_if_bad(tmp_path):
    save(tmp_path, "a", P=4)
    save(tmp_path, "cold", P=4)
    reg = lazy(tmp_path)
    reg.refresh()
    old = reg.load(reg.get("a"))
    new = torch.randn(5, HIDDEN)
    tuner.export.save_adapter(tmp_path, tuner.export.TaskAdapter("a", new, "tiny", {}), CFG)
    assert reg.refresh().changed == ["a"]
    # In use: the new version was read at the refresh (the old one dropped), so it is a hit now.
    assert reg.prompt_stats.entries == 1 and reg.prompts.peek(reg.get("a")).prompt.equal(new)
    bad = torch.randn(6, HIDDEN)
    bad[2, 2] = float("nan")
    tuner.export.save_adapter(tmp_path, tuner.export.TaskAdapter("a", bad, "tiny", {}), CFG)
    assert not reg.refresh() and reg.get("a").prompt.equal(new)  # the last good version keeps serving
    assert old.prompt.shape == (4, HIDDEN)


def test_a_prompt_found_corrupt_on_first_use_fails_alone_and_stops_being_served(tmp_path):
    prompt = torch.randn(4, HIDDEN)
    d = hand_copied(tmp_path, "bad", prompt=prompt)
    save(tmp_path, "good")
    reg = lazy(tmp_path)
    reg.refresh()
    assert reg.names() == ["bad", "good"]
    data = bytearray((d / ADAPTER_WEIGHTS).read_bytes())
    data[-4:] = torch.tensor([float("inf")]).numpy().tobytes()  # same size, same header: data only
    (d / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(PromptUnavailable, match="non-finite"):
        reg.load(reg.get("bad"))
    assert reg.names() == ["good"] and reg.load(reg.get("good")).prompt.shape == (4, HIDDEN)
    assert not reg.refresh() and reg.names() == ["good"]  # not indexed again until its files change
    (tmp_path / "fixed").mkdir()
    hand_copied(tmp_path / "fixed", "bad", prompt=prompt)
    (d / ADAPTER_WEIGHTS).write_bytes((tmp_path / "fixed" / "bad" / ADAPTER_WEIGHTS).read_bytes())
    assert reg.refresh().added == ["bad"] and reg.get("bad").prompt.equal(prompt)


@pytest.fixture
def corrupt_client(tmp_path):
    backbone = tiny_backbone_dir(tmp_path)
    store = write_prompt_store(tmp_path, backbone)
    cfg = server_config(engine_config(store, backbone))
    with TestClient(create_app(Engine(cfg.engine), cfg), raise_server_exceptions=False) as c:
        yield c, store


def test_over_http_a_corrupt_prompt_is_a_json_503_and_the_other_tasks_keep_serving(corrupt_client):
    client, store = corrupt_client
    weights = (store / "trec").resolve() / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    weights.write_bytes(bytes(data))  # after indexing, before first use
    err = assert_error(
        client.post("/v1/classify", json={"model": "trec", "input": "why?"}), 503, "prompt_unavailable"
    )
    assert err["type"] == "server_error"  # its text is logged, not sent: it names server paths
    for model in ("sst2", "samsum"):
        body = {"model": model, "prompt": "a fine film", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/classify", json={"model": "sst2", "input": "great"}).status_code == 200
    assert_error(client.post("/v1/classify", json={"model": "trec", "input": "why?"}), 404, "model_not_found")
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert models == set(TASKS) - {"trec"}
    metrics = client.get("/metrics").text
    assert "promptfleet_prompt_cache_misses_total 3.0" in metrics, metrics[:2000]


def test_a_slow_prompt_read_does_not_block_the_engine_thread(tmp_path):
    """The read of `slow`'s prompt is held on an Event: a request to `fast` (whose prompt is read
    too, on the other read thread) runs to its end meanwhile; then `slow` is let go and finishes."""
    engine = make_engine(tmp_path, reload_interval_s=3600)
    save_for(tmp_path, "fast", engine.runner.model)
    save_for(tmp_path, "slow", engine.runner.model, seed=1)
    engine.registry.refresh()
    entered, release = threading.Event(), threading.Event()
    read = engine.registry.prompts._read

    def held_read(entry):
        if entry.name == "slow":
            entered.set()
            release.wait(30)
        return read(entry)

    engine.registry.prompts._read = held_read

    async def main():
        await engine.start()
        try:
            slow = asyncio.create_task(run(engine, request("s", "slow", max_tokens=2)))
            assert await asyncio.to_thread(entered.wait, 10), "the read of `slow` never started"
            outs = await asyncio.wait_for(run(engine, request("f", "fast", max_tokens=3)), 20)
            assert outs[-1].finished and not slow.done()
            assert engine.stats().queue_depth == 0  # `slow` waits for its prompt outside the scheduler
            release.set()
            assert (await asyncio.wait_for(slow, 20))[-1].finished
        finally:
            release.set()
            await engine.stop()

    asyncio.run(main())


def test_concurrent_first_uses_of_a_task_share_one_read(tmp_path, monkeypatch):
    save(tmp_path, "a")
    reg = lazy(tmp_path)
    reg.refresh()
    reads = count_data_reads(monkeypatch)
    gate, read = threading.Barrier(2), reg.prompts._read
    reg.prompts._read = lambda entry: (gate.wait(10), read(entry))[1]
    out = []
    threads = [threading.Thread(target=lambda: out.append(reg.load(reg.get("a")))) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(30000):  # until the first reader is inside the read (30 s at most)
        if reg.prompts._reading:
            break
        threading.Event().wait(0.001)
    gate.wait(10)
    for t in threads:
        t.join(10)
    assert len(out) == 3 and len(reads) == 1 and all(o is out[0] for o in out)


def test_an_unknown_task_is_still_a_404_and_reads_nothing(tmp_path, monkeypatch):
    save(tmp_path, "a")
    reg = lazy(tmp_path)
    reg.refresh()
    reads = count_data_reads(monkeypatch)
    with pytest.raises(UnknownTask):
        reg.get("../a")
    assert reads == []


# ------------------------------------------------------------------ packed stores


def write_packed(root, prompts: dict, shard_bytes: int = 1 << 20):
    from tuner.prompt_store import write_packed_store

    adapters = (tuner.export.TaskAdapter(n, p, "tiny", {"kind": "generation"}) for n, p in prompts.items())
    return write_packed_store(root, adapters, CFG, shard_bytes=shard_bytes)


def count_packed_reads(monkeypatch) -> list[str]:
    from tuner.prompt_store import PackedIndex

    reads, read_bytes = [], PackedIndex.read_bytes
    monkeypatch.setattr(PackedIndex, "read_bytes", lambda self, name, check=None: (reads.append(name), read_bytes(self, name, check))[1])  # fmt: skip
    return reads


def test_a_packed_store_is_indexed_without_reading_a_prompt_and_reads_one_on_use(tmp_path, monkeypatch):
    prompts = {f"t{i}": torch.randn(4, HIDDEN) for i in range(200)}
    write_packed(tmp_path, prompts, shard_bytes=4 * HIDDEN * 4 * 50)  # 4 shards of 50 tasks
    reads = count_packed_reads(monkeypatch)
    reg = lazy(tmp_path)
    assert len(reg.refresh().added) == 200 and reads == []
    assert reg.get("t7").num_virtual_tokens == 4 and reg.get("t7").meta.kind == "generation"
    for name in ("t7", "t199", "t7"):
        assert reg.load(reg.get(name)).prompt.equal(prompts[name])
    assert reads == ["t7", "t199"]
    assert not reg.refresh()  # the index did not change: not read again


def test_a_republished_packed_store_reindexes_only_the_changed_shards(tmp_path, monkeypatch):
    prompts = {f"t{i:03}": torch.randn(4, HIDDEN) for i in range(200)}
    write_packed(tmp_path, prompts, shard_bytes=4 * HIDDEN * 4 * 50)
    reg = lazy(tmp_path)
    reg.refresh()
    kept = reg.load(reg.get("t150"))  # a task in use, in a shard the publish below keeps
    indexed, index = [], PromptRegistry._index_packed
    monkeypatch.setattr(PromptRegistry, "_index_packed", lambda self, *a: (indexed.append(a[0]), index(self, *a))[1])  # fmt: skip
    prompts["t003"] = torch.randn(4, HIDDEN)  # one changed task: its shard of 50 is rewritten
    stats = write_packed(tmp_path, prompts, shard_bytes=4 * HIDDEN * 4 * 50)
    assert len(stats.shards_kept) == 3
    changes = reg.refresh()
    moved = {n for n in prompts if reg.get(n).packed.entry.shard in stats.shards_written}
    assert (
        sorted(indexed) == sorted(changes.changed) == sorted(moved) and "t003" in moved and len(moved) == 50
    )
    assert reg.get("t003").prompt.equal(prompts["t003"])
    assert reg.prompts.peek(reg.get("t150")) is kept  # an unchanged shard's task keeps its loaded prompt


def test_a_corrupt_shard_fails_its_tasks_alone_and_an_engine_serves_the_others(tmp_path):
    engine = make_engine(tmp_path, reload_interval_s=3600)
    hidden = engine.runner.hidden_size
    prompts = {f"t{i}": torch.randn(4, hidden) * 0.5 for i in range(20)}
    from tuner.prompt_store import write_packed_store

    adapters = (tuner.export.TaskAdapter(n, p, "tiny", {"kind": "generation"}) for n, p in prompts.items())
    write_packed_store(tmp_path, adapters, engine.runner.model.config, shard_bytes=4 * hidden * 4 * 10)
    engine.registry.refresh()
    bad = engine.registry.get("t0").packed
    shard = tmp_path / "shards" / bad.entry.shard
    with open(shard, "r+b") as f:  # t0's first value becomes NaN: same size, same header
        f.seek(bad.index._check_header(f, bad.entry) + bad.entry.offset)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())

    async def main():
        await engine.start()
        try:
            with pytest.raises(PromptUnavailable, match="non-finite"):
                await run(engine, request("a", "t0", max_tokens=2))
            for rid, task in [("b", "t1"), ("c", "t19")]:  # the same shard, another shard
                assert (await run(engine, request(rid, task, max_tokens=2)))[-1].finished
        finally:
            await engine.stop()

    asyncio.run(main())
    assert "t0" not in engine.task_names() and len(engine.task_names()) == 19


def test_task_directories_beside_a_packed_store_are_served_too(tmp_path, caplog):
    prompts = {f"t{i}": torch.randn(4, HIDDEN) for i in range(3)}
    write_packed(tmp_path, prompts)
    save(tmp_path, "extra", P=5)  # a hand-published task directory next to the index
    reg = lazy(tmp_path)
    with caplog.at_level("WARNING"):
        assert sorted(reg.refresh().added) == ["extra", "t0", "t1", "t2"]
    assert not caplog.records  # `shards/` is the store's own, not a task directory missing its files
    assert reg.get("extra").num_virtual_tokens == 5 and reg.get("t1").prompt.equal(prompts["t1"])


def test_a_packed_store_of_another_backbone_is_refused_in_one_line(tmp_path, caplog):
    from tuner.prompt_store import write_packed_store

    adapters = (tuner.export.TaskAdapter(f"t{i}", torch.randn(4, HIDDEN), "llama-70b", {}) for i in range(50))
    write_packed_store(tmp_path, adapters, CFG)
    reg = lazy(tmp_path)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert not reg.refresh()
    assert reg.names() == [] and len(caplog.records) == 1 and "llama-70b" in caplog.text
