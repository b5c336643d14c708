"""Issue 34, item 3: the prompt store is bounded before it is read, loaded off the engine thread, and a
task's prefix is tokenised once per version (with the ids training gives the same text)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama
from test_serving_engine import CharTokenizer, make_engine, request, run
from test_serving_engine import save as save_for
from test_serving_registry import HIDDEN, hand_copied, save

import serving.registry
import tuner.export
from serving.engine import Engine, EngineConfig, render_prompt, text_encoder
from serving.registry import PromptRegistry
from serving.task_tokens import TaskTokenCache, splits_exactly, stable_cut
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_META_BYTES, TASK_META, TaskAdapter, save_adapter
from tuner.tasks.data import tokenize
from tuner.tasks.spec import TaskExample


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def claimed(P: int, width: int, dtype: str = "F32") -> dict:
    """A safetensors header for a prompt of this shape."""
    nbytes = P * width * (2 if dtype == "F16" else 4)
    return {"prompt_embeddings": {"dtype": dtype, "shape": [P, width], "data_offsets": [0, nbytes]}}


def forged(root, name, header, P: int, data_bytes: int):
    """A task whose adapter_config.json says `P` virtual tokens and whose weights file is `header`
    followed by `data_bytes` of data, left unwritten (a sparse file: a gigabyte costs nothing)."""
    d = hand_copied(root, name)
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "num_virtual_tokens": P}))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(d / ADAPTER_WEIGHTS, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + data_bytes)
    return d


def refresh_counting_reads(reg, monkeypatch) -> list[int]:
    """`reg.refresh()` with safetensors' loader counting the bytes it is handed."""
    read, load = [], tuner.export.load
    monkeypatch.setattr(tuner.export, "load", lambda data: (read.append(len(data)), load(data))[1])
    reg.refresh()
    return read


def test_a_one_gib_adapter_is_refused_from_its_header_without_reading_it(tmp_path, monkeypatch, caplog):
    """It used to be read whole (on the engine thread) before its shape was checked."""
    save(tmp_path, "good", P=4)
    P, W = (1 << 30) // (HIDDEN * 4) - 64, (1 << 26) - 64  # just under the 1 GiB a file may have
    forged(tmp_path, "long", claimed(P, HIDDEN), P, P * HIDDEN * 4)
    forged(tmp_path, "wide", claimed(4, W), 4, 4 * W * 4)
    for name in ("long", "wide"):
        assert (1 << 30) - 8192 < (tmp_path / name / ADAPTER_WEIGHTS).stat().st_size <= 1 << 30
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN, max_virtual_tokens=7)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        read = refresh_counting_reads(reg, monkeypatch)
    assert time.monotonic() - start < 1.0
    assert reg.names() == ["good"] and len(read) == 1 and read[0] < 4096  # the good one only
    assert "leave no room" in caplog.text and f"does not fit hidden size {HIDDEN}" in caplog.text


@pytest.mark.parametrize(
    "header, P, data_bytes, reason",
    [
        (claimed(4, HIDDEN), 4, 4 * HIDDEN * 4 - 8, "its header describes"),  # truncated
        (claimed(4, HIDDEN), 4, 4 * HIDDEN * 4 + 8, "its header describes"),  # trailing bytes
        (claimed(5, HIDDEN), 4, 5 * HIDDEN * 4, "does not match adapter_config.json"),
        (claimed(4, HIDDEN, "I32"), 4, 4 * HIDDEN * 4, "dtype 'I32'"),
        ({**claimed(4, HIDDEN), "other": claimed(1, 1)["prompt_embeddings"]}, 4, 0, "must hold one tensor"),
        ([1, 2], 4, 0, "must hold one tensor"),
        ({"prompt_embeddings": {"dtype": [], "shape": [4, 8], "data_offsets": [0, 0]}}, 4, 0, "dtype []"),
        *(
            (
                {"prompt_embeddings": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}},
                4,
                0,
                "not [num_",
            )
            for shape in ([4, True], [4, -1], [4, 8.0], [4], "4x8")
        ),
    ],
)
def test_a_header_that_does_not_describe_the_file_is_refused(
    tmp_path, monkeypatch, caplog, header, P, data_bytes, reason
):
    save(tmp_path, "good")
    forged(tmp_path, "bad", header, P, data_bytes)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    with caplog.at_level(logging.WARNING):
        read = refresh_counting_reads(reg, monkeypatch)
    assert reg.names() == ["good"] and len(read) == 1
    assert reason in caplog.text, caplog.text


def test_an_oversized_header_or_json_file_is_refused_by_its_size(tmp_path, caplog):
    save(tmp_path, "good")
    d = hand_copied(tmp_path, "huge_header")
    with open(d / ADAPTER_WEIGHTS, "wb") as f:
        f.write((64 << 20).to_bytes(8, "little"))
        f.truncate(8 + (64 << 20))
    d = hand_copied(tmp_path, "huge_meta")
    with open(d / TASK_META, "wb") as f:
        f.truncate(MAX_META_BYTES + 1)  # refused by its size: never parsed
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    with caplog.at_level(logging.WARNING):
        reg.refresh()
    assert reg.names() == ["good"]
    assert "no safetensors header of at most 1048576 bytes" in caplog.text
    assert f"{TASK_META} has {MAX_META_BYTES + 1} bytes, more than the {MAX_META_BYTES}" in caplog.text


def test_a_prefix_or_template_longer_than_a_prompt_is_refused_and_the_last_good_one_serves(tmp_path, caplog):
    """A 15 MB prefix used to load, and every request re-tokenised it."""
    save(tmp_path, "a", meta={"kind": "generation", "prefix": "p" * 100})
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN, max_text_chars=100)
    reg.refresh()
    save(tmp_path, "a", meta={"kind": "generation", "prefix": "p" * 101})
    save(tmp_path, "b", meta={"kind": "generation", "template": "{text}" + "t" * 95})
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            reg.refresh()
    assert reg.names() == ["a"] and reg.get("a").meta.prefix == "p" * 100
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "prefix has 101 characters, more than a prompt may have (100)" in warnings[0] + warnings[1]
    assert "template has 101 characters" in warnings[0] + warnings[1]


# ------------------------------------------------------------------ the loader thread


def test_a_slow_load_does_not_stall_requests_to_other_tasks(tmp_path, monkeypatch):
    """Loading used to run on the engine thread: every tenant waited for it. The store's load of
    `slow` is held until the test lets it go, while a request to `fast` runs to its end."""
    entered, release = threading.Event(), threading.Event()
    load = serving.registry.read_adapter_header  # indexing: what the loader thread reads

    def held_load(path, name, **kw):
        if name == "slow":
            entered.set()
            release.wait(30)
        return load(path, name, **kw)

    monkeypatch.setattr(serving.registry, "read_adapter_header", held_load)
    engine = make_engine(tmp_path, reload_interval_s=0.05)
    save_for(tmp_path, "fast", engine.runner.model)
    engine.registry.refresh()

    async def main():
        await engine.start()
        try:
            save_for(tmp_path, "slow", engine.runner.model, seed=1)
            assert await asyncio.to_thread(entered.wait, 10), "the loader never reached `slow`"
            outs = await asyncio.wait_for(run(engine, request("r0", "fast", max_tokens=3)), 10)
            assert outs[-1].finished and engine.task_names() == ["fast"]  # not swapped in half-loaded
            release.set()
            deadline = time.monotonic() + 10
            while "slow" not in engine.task_names() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert (await run(engine, request("r1", "slow", max_tokens=2)))[-1].finished
        finally:
            release.set()
            await engine.stop()
        assert engine._loader is None

    asyncio.run(main())


def test_a_changed_task_frees_its_prompt_kv_on_the_engine_thread(tmp_path):
    engine = make_engine(tmp_path, reload_interval_s=0.05)
    save_for(tmp_path, "t", engine.runner.model)
    engine.registry.refresh()
    cache = engine.runner.prefix_cache

    async def main():
        await engine.start()
        try:
            await run(engine, request("r0", "t", max_tokens=2))
            version = engine.registry.get("t").version
            assert cache.stats.entries == 1
            save_for(tmp_path, "t", engine.runner.model, seed=5)
            deadline = time.monotonic() + 10
            while (cache.stats.entries or engine.registry.get("t").version == version) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.02)
            assert cache.stats.entries == 0 and engine.registry.get("t").version != version
        finally:
            await engine.stop()

    asyncio.run(main())


# ------------------------------------------------------------------ the prefix, tokenised once


PIECES = [
    "Review", " great", " movie", "!", "?", "'s", "'ll", "'", "s", " ", "  ", "\n", "\n\n", "\t", "\r\n",
    "12", "3", " 4", ".", ",", "é", "中文", "😀", "<|im_end|>", "<|endoftext|>", "<|", "im_end", "|>",
    "\u00a0", "\u3000", "\u2028", "\x85", "-", "_", "Sentiment:", " positive",
]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))


def entry_with(meta: dict, name="t", version=1):
    return serving.registry.TaskEntry(name, torch.zeros(1, 1), tuner.export.TaskMeta.from_dict(meta), version)


def test_smollm2_splits_exactly_and_other_tokenizers_are_not_assumed_to(smollm2):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert splits_exactly(smollm2) and not splits_exactly(CharTokenizer())
    llama3_like = Tokenizer(models.BPE())
    llama3_like.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r" ?[^\s\p{L}\p{N}]+[\r\n]*"), "isolated"), pre_tokenizers.ByteLevel()]
    )
    assert not splits_exactly(PreTrainedTokenizerFast(tokenizer_object=llama3_like))
    normalised = Tokenizer(models.BPE())
    normalised.normalizer, normalised.pre_tokenizer = normalizers.NFKC(), pre_tokenizers.ByteLevel()
    assert not splits_exactly(PreTrainedTokenizerFast(tokenizer_object=normalised))


def test_served_ids_equal_whole_prompt_and_training_ids_for_any_prefix_and_input(smollm2):
    encode = text_encoder(smollm2)
    cache = TaskTokenCache(encode, splits_exactly(smollm2))
    rng, cut_somewhere, rows = random.Random(0), 0, []
    for i in range(1500):
        template = rng.choice(["", "{text}", "Review: {text}\nSentiment:", " {text}", "\n{text}"])
        meta = {"kind": "generation", "prefix": random_text(rng, 12), "template": template}
        entry, text = entry_with(meta, version=i), random_text(rng, 6)
        rendered = render_prompt(entry.meta, text)
        assert cache.prompt_ids(entry, rendered) == encode(rendered), (meta, text)
        split = stable_cut(meta["prefix"]) > 0
        assert split == bool(meta["prefix"] and cache._entries["t"].head)  # the check never fell back
        cut_somewhere += split
        rows.append(rendered)
    assert cut_somewhere > 750  # most prefixes were split, so the identity above was tested
    examples = [TaskExample("t", r, "x") for r in rows[:300]]
    assert [e.input_ids for e in tokenize(examples, smollm2)] == [encode(r) for r in rows[:300]]


def test_a_32k_prefix_is_tokenised_once_per_version(smollm2):
    encode, encoded = text_encoder(smollm2), []
    cache = TaskTokenCache(lambda s: (encoded.append(len(s)), encode(s))[1], True)
    demos = "".join(
        f"Review: film number {i} was {'good' if i % 3 else 'bad'}\nSentiment: x\n\n" for i in range(700)
    )
    meta = {
        "kind": "generation",
        "prefix": demos[: 32 * 1024 - 2] + "\n\n",
        "template": "Review: {text}\nSentiment:",
    }
    entry = entry_with(meta)
    for text in ["a fine film", " dull ", "so-so"] * 10:
        rendered = render_prompt(entry.meta, text)
        assert cache.prompt_ids(entry, rendered) == encode(rendered)
    assert sum(encoded) < 3 * 32 * 1024 + 30 * 64  # the prefix's few encodings, then short tails
    assert sum(n > 1024 for n in encoded) <= 3
    encoded.clear()
    newer = entry_with({**meta, "prefix": "Changed.\n\n" + meta["prefix"][11:]}, version=2)
    cache.prompt_ids(newer, render_prompt(newer.meta, "x"))
    assert sum(n > 1024 for n in encoded) <= 3 and cache.held_ids < 2 * 32 * 1024  # one version held


def test_the_cache_is_bounded_and_forgets_changed_tasks():
    cache = TaskTokenCache(lambda s: [ord(c) for c in s], True, capacity_ids=1000)
    for i in range(50):
        entry = entry_with({"kind": "generation", "prefix": "x" * 99 + " "}, name=f"t{i}")
        cache.prompt_ids(entry, entry.meta.prefix + "hi")
        assert cache.held_ids <= 1000
    labels = entry_with({"kind": "classification", "verbaliser": {"0": " no", "1": " yes"}}, name="c")
    assert cache.label_ids(labels) == {"0": [32, 110, 111], "1": [32, 121, 101, 115]}
    held = cache.held_ids
    cache.forget(["c", "t49"])
    assert cache.held_ids < held - 100


def test_the_engine_serves_a_long_prefix_without_tokenising_it_per_request(tmp_path, smollm2):
    m = tiny_llama(vocab_size=49152)
    prefix = "".join(f"Text: item {i} here\nLabel: ok\n\n" for i in range(60))
    meta = {"kind": "classification", "prefix": prefix, "template": "Text: {text}\nLabel:", "verbaliser": {"0": " ok", "1": " no"}}  # fmt: skip
    save_adapter(tmp_path, TaskAdapter("t", torch.randn(4, 32), "tiny", meta), m.config)
    engine = Engine(EngineConfig(backbone="tiny", prompt_store=str(tmp_path)), model=m, tokenizer=smollm2)
    encode, encoded = engine._encode, []
    engine._tokens._encode = lambda s: (encoded.append(len(s)), encode(s))[1]
    entry = engine.registry.get("t")
    for text in ["first", "second one", "third"]:
        assert engine._prompt_ids(entry, text, False, 1) == encode(render_prompt(entry.meta, text))
    assert [n for n in encoded if n > 64] == [len(prefix) - 2, len(prefix)]  # its head, and the check
    assert engine._labels(entry) == {"0": encode(" ok"), "1": encode(" no")}
