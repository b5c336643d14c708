"""The `export` part of `bench.fleet` (issue 37): writing a fleet's prompts, packed vs per-task.

For each size N: N prompts of SmolLM2's shape (20 x 576, fp32) with a classification task's
metadata are exported (1) as one packed store (`tuner.prompt_store.write_packed_store`, default
shard size) and (2) up to `--export-dirs-up-to` tasks, as one PEFT directory per task
(`tuner.export.save_adapter`, today's format). Reported: wall and CPU seconds (CPU time is this
process's work, whatever else loads the machine), bytes on disk and files (directories and links
counted too); for the packed store also the index's size, `PackedIndex.open` seconds (what a server
pays at start) and a re-export with one task changed (seconds, shards rewritten). Prompts are made
on the fly (a generator), as the recipe hands them over: memory stays at one shard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

VIRTUAL_TOKENS, HIDDEN = 20, 576  # SmolLM2-135M-Instruct, 20 virtual tokens
CONFIG = SimpleNamespace(hidden_size=HIDDEN, num_attention_heads=9, num_hidden_layers=30)


def _adapters(n: int, changed: int | None = None) -> Iterator:
    from tuner.export import TaskAdapter, TaskMeta

    base = torch.randn(VIRTUAL_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(0))
    meta = {
        "kind": "classification",
        "template": "{sentence}",
        "verbaliser": {"0": " negative", "1": " positive"},
    }
    for i in range(n):
        prompt = base + i * 1e-3 + (1.0 if i == changed else 0.0)
        yield TaskAdapter(
            f"fleet.{i}", prompt, "smollm2-135m", TaskMeta(**meta, metric="accuracy", score=0.5)
        )


def _disk(root: Path) -> tuple[int, int]:
    """(bytes of regular files, entries: files, directories and links) under `root`."""
    size = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                size += os.path.getsize(p)
    return size, count


def _timed(fn, *args) -> tuple[float, float, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _save_each(root: Path, adapters) -> None:
    from tuner.export import save_adapter

    for a in adapters:
        save_adapter(root, a, CONFIG)


def _one_size(n: int, tmp: Path, dirs_up_to: int) -> dict:
    from tuner.prompt_store import INDEX, PackedIndex, write_packed_store

    row: dict = {"tasks": n}
    store = tmp / "packed"
    wall, cpu, res = _timed(write_packed_store, store, _adapters(n), CONFIG)
    row.update(packed_s=wall, packed_cpu_s=cpu, packed_shards=len(res.shards_written))
    row["packed_bytes"], row["packed_files"] = _disk(store)
    row["index_bytes"] = (store / INDEX).stat().st_size
    row["open_s"], _, index = _timed(PackedIndex.open, store)
    row["read_one_ms"] = _timed(index.read_prompt, f"fleet.{n // 2}")[0] * 1e3
    wall, cpu, res = _timed(write_packed_store, store, _adapters(n, changed=n // 2), CONFIG)
    row.update(reexport_one_s=wall, reexport_one_cpu_s=cpu, reexport_shards=len(res.shards_written))
    if n <= dirs_up_to:
        row["dirs_s"], row["dirs_cpu_s"], _ = _timed(_save_each, tmp / "dirs", _adapters(n))
        row["dirs_bytes"], row["dirs_files"] = _disk(tmp / "dirs")
    return row


def bench_export(sizes: list[int], dirs_up_to: int, where: str | None = None) -> list[dict]:
    """One row per size (see the module's docstring); `where`: the directory to write under."""
    out = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="fleet-export-", dir=where))
        try:
            row = _one_size(n, tmp, dirs_up_to)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(row, flush=True)
        out.append(row)
    return out


def table_rows(rows: list[dict]) -> list[list]:
    return [
        [
            r["tasks"], r["packed_s"], r["packed_cpu_s"], r["packed_bytes"], r["packed_files"], r["index_bytes"],
            r["open_s"], r["reexport_one_s"], r["reexport_shards"],
            r.get("dirs_s", ""), r.get("dirs_cpu_s", ""), r.get("dirs_bytes", ""), r.get("dirs_files", ""),
        ]
        for r in rows
    ]  # fmt: skip


HEADER = [
    "tasks", "packed s", "CPU s", "bytes", "files", "index bytes", "open s", "re-export 1 s", "shards",
    "dirs s", "CPU s", "bytes", "files",
]  # fmt: skip
