"""The packed prompt store (`tuner.prompt_store`): what is read is what was written, a re-export
rewrites only the shards it must, a reader of the old index still reads the old version, a shard's
header is checked before its data, and nothing outside the store is read."""

from __future__ import annotations

import json
import os
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from tuner.export import AdapterHeader, TaskAdapter, TaskMeta, save_adapter
from tuner.prompt_store import (
    INDEX,
    SHARDS,
    PackedIndex,
    PackedStoreError,
    is_packed_store,
    write_packed_store,
)

CONFIG = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_hidden_layers=2)
P, H = 3, 8
TASK_BYTES = P * H * 4


def adapters(names, seed=0, backbone="tiny"):
    g = torch.Generator().manual_seed(seed)
    return [
        TaskAdapter(
            n,
            torch.randn(P, H, generator=g),
            backbone,
            TaskMeta(kind="classification", verbaliser={"0": " no", "1": " yes"}, score=float(i)),
        )
        for i, n in enumerate(names)
    ]


def shard_files(root):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / SHARDS).iterdir()}


def test_round_trip_equals_the_tensors_written(tmp_path):
    written = adapters([f"t{i}" for i in range(10)])
    # 4 tasks a shard: 3 shards
    result = write_packed_store(tmp_path, iter(written), CONFIG, shard_bytes=4 * TASK_BYTES)
    assert is_packed_store(tmp_path) and len(result.shards_written) == 3 and result.tasks == 10
    index = PackedIndex.open(tmp_path)
    assert list(index.entries) == [a.name for a in written] and set(index.shards) == set(
        result.shards_written
    )
    for a in written:
        entry = index.entries[a.name]
        assert entry.shape == (P, H) and entry.dtype == "F32" and entry.nbytes == TASK_BYTES
        assert entry.meta.verbaliser == {"0": " no", "1": " yes"} and entry.meta.score == a.meta.score
        got = index.read_prompt(a.name)
        assert got.dtype == torch.float32 and torch.equal(got, a.prompt)
        # A second reader of the shard: safetensors itself, at the offset the index gives.
        with safe_open(str(tmp_path / SHARDS / entry.shard), "pt") as f:
            assert torch.equal(f.get_tensor(entry.key), a.prompt)
    raw = json.loads((tmp_path / INDEX).read_text())
    assert len(raw["metas"]) == 1  # the tasks' metadata differ only in score: stored once
    assert index.adapter("t3").backbone == "tiny" and vars(index.backbone_config()) == vars(CONFIG)


def test_a_re_export_rewrites_only_the_shards_of_changed_tasks(tmp_path):
    names = [f"t{i}" for i in range(12)]
    first = adapters(names)
    write_packed_store(tmp_path, first, CONFIG, shard_bytes=4 * TASK_BYTES)
    old = PackedIndex.open(tmp_path)
    before = shard_files(tmp_path)
    same = write_packed_store(tmp_path, first, CONFIG, shard_bytes=4 * TASK_BYTES)
    assert same.shards_written == [] and shard_files(tmp_path) == before
    second = list(first)
    second[5] = TaskAdapter("t5", first[5].prompt + 1, "tiny", first[5].meta)
    result = write_packed_store(tmp_path, second, CONFIG, shard_bytes=4 * TASK_BYTES)
    changed_shard = old.entries["t5"].shard
    assert result.shards_dropped == [changed_shard] and len(result.shards_written) == 1
    after = shard_files(tmp_path)
    for shard, ident in before.items():
        if shard != changed_shard:
            assert after[shard] == ident  # same inode, never rewritten
    new = PackedIndex.open(tmp_path)
    assert new.entries["t5"].version != old.entries["t5"].version
    assert new.entries["t0"].version == old.entries["t0"].version
    for a in second:
        assert torch.equal(new.read_prompt(a.name), a.prompt)
    # Removing a task drops its shard too; the others stay.
    result = write_packed_store(tmp_path, second[:11], CONFIG, shard_bytes=4 * TASK_BYTES)
    assert (
        result.shards_dropped == [new.entries["t11"].shard]
        and "t11" not in PackedIndex.open(tmp_path).entries
    )


def test_a_reader_of_the_old_index_reads_the_old_version_whole(tmp_path):
    first = adapters(["a", "b", "c"], seed=1)
    write_packed_store(tmp_path, first, CONFIG, shard_bytes=2 * TASK_BYTES)
    old = PackedIndex.open(tmp_path)  # a reader resolved the index...
    second = adapters(["a", "b", "c"], seed=2)
    write_packed_store(tmp_path, second, CONFIG, shard_bytes=2 * TASK_BYTES)  # ...then it is re-published
    for a in first:
        assert torch.equal(old.read_prompt(a.name), a.prompt)  # the old shards are still there
    now = PackedIndex.open(tmp_path)
    for a in second:
        assert torch.equal(now.read_prompt(a.name), a.prompt)
    write_packed_store(tmp_path, adapters(["a", "b", "c"], seed=3), CONFIG)  # two publishes later
    with pytest.raises(FileNotFoundError, match="open the index again"):
        old.read_prompt("a")
    assert sorted(shard_files(tmp_path)) == sorted(set(now.shards) | set(PackedIndex.open(tmp_path).shards))


class _Recorder:
    """A shard file that records the byte ranges read from it."""

    def __init__(self, f, ranges):
        self.f, self.ranges = f, ranges

    def read(self, n=-1):
        start = self.f.tell()
        data = self.f.read(n)
        self.ranges.append((start, start + len(data)))
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_check_sees_the_header_before_any_tensor_byte_is_read(tmp_path, monkeypatch):
    written = adapters(["a", "b"])
    write_packed_store(tmp_path, written, CONFIG)
    index = PackedIndex.open(tmp_path)
    ranges, seen = [], []
    real_open = PackedIndex._open_shard
    monkeypatch.setattr(
        PackedIndex, "_open_shard", lambda self, shard: _Recorder(real_open(self, shard), ranges)
    )

    def refuse(header: AdapterHeader):
        seen.append(header)
        raise ValueError("too wide")

    with pytest.raises(ValueError, match="too wide"):
        index.read_prompt("b", check=refuse)
    assert seen == [AdapterHeader("tiny", P, H, "F32", index.entries["b"].meta)]
    shard = tmp_path / SHARDS / index.entries["b"].shard
    data_start = shard.stat().st_size - 2 * TASK_BYTES
    assert ranges and all(end <= data_start for _, end in ranges)  # the header alone
    ranges.clear()
    assert torch.equal(index.read_prompt("b", check=seen.append), written[1].prompt)
    # the header is cached for the same file; then exactly b's bytes, not a's
    assert ranges == [(data_start + TASK_BYTES, data_start + 2 * TASK_BYTES)]


def _rewrite_header(path, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    change(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])


def test_a_shard_claiming_a_huge_shape_or_cut_short_is_refused_in_one_line(tmp_path):
    write_packed_store(tmp_path, adapters(["a", "b"]), CONFIG)
    index = PackedIndex.open(tmp_path)
    shard = tmp_path / SHARDS / index.entries["a"].shard

    def huge(header):
        header["a"]["shape"] = [1 << 40, H]
        header["a"]["data_offsets"] = [0, (1 << 40) * H * 4]

    _rewrite_header(shard, huge)
    called = []
    with pytest.raises(PackedStoreError, match="bad dtype, shape or offsets") as e:
        index.read_prompt("a", check=called.append)
    assert called == [] and "\n" not in str(e.value)
    write_packed_store(tmp_path, adapters(["a", "b"], seed=5), CONFIG)
    index = PackedIndex.open(tmp_path)
    shard = tmp_path / SHARDS / index.entries["b"].shard
    os.truncate(shard, shard.stat().st_size - 4)
    with pytest.raises(PackedStoreError, match="truncated"):
        index.read_prompt("b")


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    write_packed_store(store, adapters(["a"]), CONFIG)
    write_packed_store(outside, adapters(["a"], seed=9), CONFIG)
    index = PackedIndex.open(store)
    shard = index.entries["a"].shard
    (store / SHARDS / shard).unlink()
    target = outside / SHARDS / PackedIndex.open(outside).entries["a"].shard
    os.rename(target, outside / SHARDS / shard)
    (store / SHARDS / shard).symlink_to(outside / SHARDS / shard)
    with pytest.raises(PackedStoreError, match="cannot be opened"):
        PackedIndex.open(store).read_prompt("a")
    (store / SHARDS / shard).unlink()
    os.rename(store / SHARDS, tmp_path / "elsewhere")
    (store / SHARDS).symlink_to(outside / SHARDS)  # the shard directory itself points out
    with pytest.raises(PackedStoreError, match="link out of the store"):
        PackedIndex.open(store).read_prompt("a")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(format="x"), "format"),
        (lambda d: d["tasks"]["a"].update(shape=[3, 9]), "tasks['a'].shape"),
        (lambda d: d["tasks"]["a"].update(shard="nope.safetensors"), "tasks['a'].shard"),
        (lambda d: d["tasks"].update({"../x": d["tasks"]["a"]}), "tasks['../x']"),
        (lambda d: d["metas"][0].update(kind="bogus"), "metas[0]"),
        (lambda d: d["shards"].update({"../../etc": {"digest": ""}}), "shards['../../etc']"),
        (lambda d: d["tasks"]["a"].update(score=float("nan")), "tasks['a'].score"),
    ],
)
def test_a_bad_index_names_the_field(tmp_path, change, field):
    write_packed_store(tmp_path, adapters(["a"]), CONFIG)
    data = json.loads((tmp_path / INDEX).read_text())
    change(data)
    (tmp_path / INDEX).write_text(json.dumps(data))
    with pytest.raises(PackedStoreError, match=f"field {__import__('re').escape(field)}"):
        PackedIndex.open(tmp_path)


def test_index_size_is_bounded_and_unknown_tasks_are_named(tmp_path):
    write_packed_store(tmp_path, adapters(["a", "b"]), CONFIG)
    with pytest.raises(ValueError, match="more than the 10"):
        PackedIndex.open(tmp_path, max_index_bytes=10)
    with pytest.raises(KeyError, match="no task 'zz' in the store .* \\(2 tasks\\)"):
        PackedIndex.open(tmp_path).read_prompt("zz")


def test_non_finite_prompts_are_refused_on_write_and_read(tmp_path):
    bad = adapters(["a"])
    bad[0].prompt[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        write_packed_store(tmp_path / "w", bad, CONFIG)
    store = tmp_path / "s"
    write_packed_store(store, adapters(["a"]), CONFIG)
    index = PackedIndex.open(store)
    shard = store / SHARDS / index.entries["a"].shard
    data = bytearray(shard.read_bytes())
    data[-4:] = struct.pack("<f", float("inf"))
    shard.write_bytes(bytes(data))
    with pytest.raises(PackedStoreError, match="non-finite"):
        index.read_prompt("a")


def test_keep_others_adds_to_a_store_and_a_per_task_store_is_never_packed_over(tmp_path):
    first, more = adapters(["a", "b"], seed=1), adapters(["c"], seed=2)
    write_packed_store(tmp_path / "s", first, CONFIG)
    before = shard_files(tmp_path / "s")
    result = write_packed_store(tmp_path / "s", more, CONFIG, keep_others=True)
    assert result.shards_dropped == [] and result.tasks == 3
    assert all(shard_files(tmp_path / "s")[s] == ident for s, ident in before.items())
    index = PackedIndex.open(tmp_path / "s")
    for a in first + more:
        assert torch.equal(index.read_prompt(a.name), a.prompt)
    save_adapter(tmp_path / "d", first[0], CONFIG)
    with pytest.raises(ValueError, match="holds per-task adapters"):
        write_packed_store(tmp_path / "d", first, CONFIG)


def test_a_stores_backbone_per_task_is_read_without_its_prompt(tmp_path, monkeypatch):
    """What continual training checks of every source task (`AdapterStore.backbone`): the packed index
    answers it with no shard opened, a task directory from its header, never its tensor data."""
    import tuner.export
    from tuner.run_adapters import AdapterStore

    write_packed_store(tmp_path / "packed", adapters(["a", "b"], backbone="tiny-x"), CONFIG)
    for adapter in adapters(["c"], backbone="tiny-y"):
        save_adapter(tmp_path / "dirs", adapter, CONFIG)
    monkeypatch.setattr(PackedIndex, "_open_shard", lambda *a: pytest.fail("a shard was opened"))
    monkeypatch.setattr(tuner.export, "_read_prompt", lambda *a: pytest.fail("a prompt was read"))
    packed, dirs = AdapterStore(tmp_path / "packed"), AdapterStore(tmp_path / "dirs")
    assert [packed.backbone(n) for n in packed.names] == ["tiny-x", "tiny-x"]
    assert dirs.backbone("c") == "tiny-y"
    with pytest.raises(KeyError, match="no task 'z'"):
        packed.backbone("z")
