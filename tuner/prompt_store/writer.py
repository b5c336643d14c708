"""The packed store's writer: `write_packed_store` publishes prompts as shards and one index.

Each shard is written under a new name (a temp file renamed in), then the index is replaced with one
`os.replace`; the shards of the index before stay for readers that opened it, older ones are pruned.
An unchanged task (same content digest) stays in its shard, which is not touched; a changed, new or
removed task makes its old shard be dropped and that shard's other live tasks move to new shards,
so at most one shard is held in memory. One writer at a time per store (a lock file).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.export import TaskAdapter
from tuner.model.model_cache import exclusive_lock  # the flock the backbone cache takes too
from tuner.prompt_store.reader import (
    CONFIG_KEYS,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    LOCK,
    SHARD_NAME,
    SHARDS,
    TMP_PREFIX,
    PackedEntry,
    PackedIndex,
    is_packed_store,
)
from tuner.schema import ConfigError, validate_name


@dataclass
class StoreWrite:
    """What one `write_packed_store` did (for tests, logs and the benchmark)."""

    tasks: int
    shards_written: list[str]
    shards_kept: list[str]
    shards_dropped: list[str]
    bytes_written: int


class _ShardWriter:
    """Prompts gathered into shards of about `shard_bytes`; each full shard is written out at once."""

    def __init__(self, shards_dir: Path, shard_bytes: int):
        self.dir, self.limit = shards_dir, shard_bytes
        self.pending: list[tuple[str, str, list[int], bytes, str]] = []  # (name, dtype, shape, data, version)
        self.size = 0
        self.written: dict[str, str] = {}  # shard -> its digest
        self.bytes_written = 0
        self.placed: dict[str, tuple[str, int]] = {}  # task -> (shard, offset)

    def add(self, name: str, dtype: str, shape: list[int], data: bytes, version: str) -> None:
        self.pending.append((name, dtype, shape, data, version))
        self.size += len(data)
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        header, offset = {"__metadata__": {"format": FORMAT}}, 0
        for name, dtype, shape, data, _ in self.pending:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes
        shard = f"{time.time_ns():020d}-{secrets.token_hex(4)}.safetensors"
        # The shard's digest: of its header and its tasks' digests (which cover their bytes), so no
        # byte is hashed twice.
        digest = hashlib.sha256(head)
        for p in self.pending:
            digest.update(p[4].encode())
        tmp = self.dir / f"{TMP_PREFIX}{shard}"
        with open(tmp, "wb") as f:
            for chunk in (len(head).to_bytes(8, "little"), head, *(p[3] for p in self.pending)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.dir / shard)  # a new name: no reader of the old index ever sees it change
        offset = 0
        for name, _, _, data, _ in self.pending:
            self.placed[name] = (shard, offset)
            offset += len(data)
        self.written[shard] = digest.hexdigest()
        self.bytes_written += 8 + len(head) + offset
        self.pending, self.size = [], 0


def _version(backbone: str, meta: dict, data: bytes, dtype: str, shape: list[int]) -> str:
    """A task's content digest: its backbone, prompt and metadata (`TaskMeta.to_dict()`, score included)."""
    h = hashlib.sha256(json.dumps([backbone, dtype, shape, meta], sort_keys=True).encode())
    h.update(data)  # sha256 (CPU instructions on x86 and ARM) hashes several times faster than blake2b here
    return h.hexdigest()[:32]


def _check_packable_root(root: Path) -> None:
    stray = [
        p.name
        for p in root.iterdir()
        if p.name not in (INDEX, SHARDS) and not p.name.startswith(".") and (p.is_dir() or p.is_symlink())
    ]
    if stray:
        raise ConfigError(
            f"{root} holds per-task adapters ({stray[0]}, ...): write the packed store to another directory"
        )


def write_packed_store(
    root: str | os.PathLike,
    adapters: Iterable[TaskAdapter],
    backbone_config,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    keep_others: bool = False,
) -> StoreWrite:
    """Publish `adapters` as the packed store `root` (created if missing).

    Args:
        adapters: the tasks, read one at a time (a generator keeps a fleet's prompts out of memory);
            every one has the same backbone name.
        backbone_config: has `hidden_size`, `num_attention_heads`, `num_hidden_layers` (for PEFT export).
        shard_bytes: a shard is closed once it holds this many bytes of prompts.
        keep_others: keep the store's tasks that `adapters` does not name (else they are removed).
    """
    root = Path(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    _check_packable_root(root)
    config = {k: int(getattr(backbone_config, k)) for k in CONFIG_KEYS}
    with exclusive_lock(root / LOCK):  # one writer at a time per store; readers take no lock
        old = PackedIndex.open(root) if is_packed_store(root) else None
        if old is not None and (old.config["hidden_size"] != config["hidden_size"]) and keep_others:
            raise ConfigError(f"{root} holds prompts {old.width} wide, these are {config['hidden_size']}")
        writer = _ShardWriter(root / SHARDS, shard_bytes)
        entries, dirty, backbone = _write_new(adapters, old, writer, config["hidden_size"])
        if old is not None and backbone is not None and old.backbone != backbone and keep_others:
            raise ConfigError(f"{root} holds prompts of {old.backbone}, not {backbone}")
        backbone = backbone if backbone is not None else (old.backbone if old is not None else "")
        dirty |= _dropped_shards(old, entries, keep_others)
        _move_live(old, entries, dirty, writer)
        writer.flush()
        index = _index_json(entries, writer, backbone, config, old)
        _replace_index(root, index)
        kept = sorted(set(index["shards"]) - set(writer.written))
        _prune(root, keep=set(index["shards"]) | (set(old.shards) if old else set()))
    return StoreWrite(len(index["tasks"]), sorted(writer.written), kept, sorted(dirty), writer.bytes_written)


@dataclass
class _New:
    """A task written in this publish: where the shard writer placed it is known once it flushes."""

    dtype: str
    shape: list[int]
    version: str
    meta: dict  # `TaskMeta.to_dict()` less the score
    score: float | None


def _write_new(
    adapters: Iterable[TaskAdapter], old: PackedIndex | None, writer: _ShardWriter, width: int
) -> tuple[dict, set[str], str | None]:
    """Every given task: kept where it is (unchanged) or handed to `writer`. Returns (entries, the old
    shards a changed task leaves, the backbone name)."""
    entries: dict[str, PackedEntry | _New] = {}
    dirty: set[str] = set()
    backbone = None
    for a in adapters:
        validate_name("task name", a.name)
        if a.name in entries:
            raise ConfigError(f"task {a.name} is given twice")
        backbone = a.backbone if backbone is None else backbone
        if a.backbone != backbone:
            raise ConfigError(f"task {a.name} was trained on {a.backbone}, the others on {backbone}")
        prompt = a.prompt.detach().float().contiguous().cpu()
        if prompt.ndim != 2 or prompt.shape[1] != width:
            raise ConfigError(f"task {a.name}: prompt shape {tuple(prompt.shape)}, expected [P, {width}]")
        if not torch.isfinite(prompt).all():
            raise ValueError(f"task {a.name}: the prompt holds non-finite values")
        data, shape, meta = prompt.numpy().tobytes(), list(prompt.shape), a.meta.to_dict()
        version = _version(a.backbone, meta, data, "F32", shape)
        prev = old.entries.get(a.name) if old is not None else None
        if prev is not None and prev.version == version:
            entries[a.name] = prev  # stays in its shard unless that shard is rewritten
            continue
        if prev is not None:
            dirty.add(prev.shard)
        writer.add(a.name, "F32", shape, data, version)
        entries[a.name] = _New("F32", shape, version, meta, meta.pop("score"))
    return entries, dirty, backbone


def _dropped_shards(old: PackedIndex | None, entries: dict, keep_others: bool) -> set[str]:
    """The old shards that hold a task the new store no longer has (none with `keep_others`, which
    keeps those tasks in `entries` instead)."""
    dirty = set()
    for name, e in (old.entries if old is not None else {}).items():
        if name in entries:
            continue
        if keep_others:
            entries[name] = e
        else:
            dirty.add(e.shard)
    return dirty


def _move_live(old: PackedIndex | None, entries: dict, dirty: set[str], writer: _ShardWriter) -> None:
    """Every unchanged task of a shard that is dropped moves into the new shards, read as bytes."""
    moving = sorted(
        (e for e in entries.values() if isinstance(e, PackedEntry) and e.shard in dirty),
        key=lambda e: (e.shard, e.offset),
    )
    metas: dict[int, dict] = {}  # id(shared_meta) -> its dict: a family's tasks share one
    for e in moving:
        writer.add(e.name, e.dtype, list(e.shape), old.read_bytes(e.name), e.version)
        meta = metas.get(id(e.shared_meta)) or metas.setdefault(id(e.shared_meta), _shared_dict(e))
        entries[e.name] = _New(e.dtype, list(e.shape), e.version, meta, e.score)


def _index_json(
    entries: dict, writer: _ShardWriter, backbone: str, config: dict, old: PackedIndex | None
) -> dict:
    """index.json's content; each distinct metadata (less the score) is stored once."""
    metas: list[dict] = []
    meta_ids: dict[str, int] = {}  # a metadata's JSON -> its place in `metas`
    kept_ids: dict[int, int] = {}  # id(a kept entry's shared_meta) -> its place in `metas`
    tasks, shards = {}, dict(writer.written)
    for name, e in entries.items():
        if isinstance(e, PackedEntry):
            shard, offset, score = e.shard, e.offset, e.score
            shards[shard] = old.shards[shard]
            i = kept_ids.get(id(e.shared_meta))
            if i is None:
                i = kept_ids[id(e.shared_meta)] = _intern(_shared_dict(e), metas, meta_ids)
        else:
            (shard, offset), score = writer.placed[name], e.score
            i = _intern(e.meta, metas, meta_ids)
        tasks[name] = {
            "shard": shard,
            "key": name,
            "offset": offset,
            "shape": list(e.shape),
            "dtype": e.dtype,
            "version": e.version,
            "meta": i,
            "score": score,
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "config": config,
        "shards": {s: {"digest": h} for s, h in sorted(shards.items())},
        "metas": metas,
        "tasks": tasks,
    }


def _replace_index(root: Path, index: dict) -> None:
    tmp = root / f".{INDEX}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(index, separators=(",", ":")))  # dumps: the C encoder (dump is pure Python)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / INDEX)  # the one atomic step: readers see the old store or the new one


def _prune(root: Path, keep: set[str]) -> None:
    """Delete shards neither the current index nor the one before names, and a crashed writer's
    temp files (the writer lock is held: no other writer's are in flight)."""
    for p in (root / SHARDS).iterdir():
        if p.name not in keep and (SHARD_NAME.fullmatch(p.name) or p.name.startswith(TMP_PREFIX)):
            p.unlink(missing_ok=True)
    for p in root.glob(f".{INDEX}.*.tmp"):
        p.unlink(missing_ok=True)


def _shared_dict(e: PackedEntry) -> dict:
    meta = e.shared_meta.to_dict()
    meta.pop("score")
    return meta


def _intern(meta: dict, metas: list[dict], ids: dict[str, int]) -> int:
    """The place of `meta` in `metas`, appended the first time it is seen."""
    i = ids.setdefault(json.dumps(meta, sort_keys=True), len(metas))
    if i == len(metas):
        metas.append(meta)
    return i
