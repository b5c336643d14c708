"""The packed store's format and its reader: `index.json` parsed and checked, one prompt read from
its shard (see the package's docstring for the layout and the publishing rules).

`PackedIndex.open` reads index.json alone (bounded); `read_prompt` opens one shard (a regular file
inside the store, never through a symlink out of it), reads that shard's safetensors header (cached
per file), checks the entry against it and hands the caller's `check` an `AdapterHeader` before it
reads exactly that tensor's bytes. This module writes nothing (`tuner.prompt_store.writer` does).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from tuner.export import (
    FLOAT_BYTES,
    MAX_WEIGHTS_BYTES,
    AdapterHeader,
    TaskAdapter,
    TaskMeta,
    open_regular,
    read_safetensors_header,
)
from tuner.schema import ConfigError, is_valid_name

INDEX = "index.json"
SHARDS = "shards"
LOCK = ".lock"
FORMAT = "promptfleet-packed-prompts"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 64 << 20  # 1,456 prompts of 20 x 576 fp32; rewriting one is a fraction of a second
MAX_INDEX_BYTES = 512 << 20  # ~2.6 KB a task at 200,000 tasks (a family's metadata is stored once)
MAX_SHARD_HEADER_BYTES = 64 << 20  # a safetensors header of ~100 bytes per tensor
SHARD_NAME = re.compile(r"[0-9]{20}-[0-9a-f]{8}\.safetensors")
TMP_PREFIX = ".tmp-"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CONFIG_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers")  # what PEFT's config needs


class PackedStoreError(ConfigError):
    """A packed store that cannot be read as written (one line naming the file and the field)."""


@dataclass(frozen=True, eq=False)  # hashable by identity (its metadata is a mutable dataclass)
class PackedEntry:
    """Where one task's prompt is in a packed store, and what it is."""

    name: str
    shard: str  # file name under root/shards/
    key: str  # tensor name in the shard's safetensors header
    offset: int  # byte offset of the tensor in the shard's data (after the header)
    shape: tuple[int, int]  # [num_virtual_tokens, width]
    dtype: str  # safetensors dtype (F32 as written; F16, BF16 and F64 are read too)
    version: str  # digest of the prompt, backbone and metadata: changes exactly when the task does
    shared_meta: TaskMeta  # the metadata less the score, one object for every task that has it
    score: float | None

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * FLOAT_BYTES[self.dtype]

    @functools.cached_property
    def meta(self) -> TaskMeta:
        """The task's `TaskMeta` (made on first use: opening an index of 100,000 tasks copies none)."""
        meta = copy.copy(self.shared_meta)  # shallow: a family's tasks share one verbaliser and template
        meta.score = self.score
        return meta


def is_packed_store(root: str | os.PathLike) -> bool:
    return (Path(root) / INDEX).is_file()


class PackedIndex:
    """A packed store's index as read once; `read_prompt` reads one task's prompt from its shard."""

    def __init__(self, root: Path, backbone: str, config: dict, entries: dict, shards: dict):
        self.root = root
        self.backbone = backbone  # base_model_name_or_path of every prompt in the store
        self.config = config  # hidden_size, num_attention_heads, num_hidden_layers (PEFT's config)
        self.entries: dict[str, PackedEntry] = entries
        self.shards: dict[str, str] = shards  # shard file -> its digest (a new shard, a new digest)
        self._headers: dict[str, tuple] = {}  # shard -> (identity of the file, data start, tensors)

    @property
    def width(self) -> int:
        return self.config["hidden_size"]

    @classmethod
    def open(cls, root: str | os.PathLike, *, max_index_bytes: int = MAX_INDEX_BYTES) -> PackedIndex:
        """Read and check `root/index.json` (at most `max_index_bytes`); no shard is opened."""
        root = Path(root)
        path = root / INDEX
        try:
            f = open_regular(path, max_index_bytes)
        except ValueError as e:  # not a regular file, or too large
            raise PackedStoreError(f"{root}: {e}") from None
        if f is None:
            raise FileNotFoundError(f"{root}: no {INDEX} (not a packed prompt store)")
        with f:
            raw = f.read(max_index_bytes + 1)
        if len(raw) > max_index_bytes:
            raise PackedStoreError(f"{path} grew past {max_index_bytes} bytes while it was read")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise PackedStoreError(f"{path} is not JSON") from None
        return cls(root, *_parse_index(data, path))

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, name: str) -> PackedEntry:
        entry = self.entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise KeyError(f"no task {name!r:.140} in the store {self.root} ({len(self.entries)} tasks)")
        return entry

    def read_prompt(self, name: str, check: Callable[[AdapterHeader], None] | None = None) -> torch.Tensor:
        """Task `name`'s prompt [P, width] in fp32. The shard's header is read and checked against the
        index first, then `check` (raise to refuse) sees the `AdapterHeader`, then exactly the tensor's
        bytes are read (a seek and one read, never the whole shard). Non-finite values are refused."""
        entry = self.entry(name)
        data = self.read_bytes(name, check)
        prompt = torch.frombuffer(bytearray(data), dtype=_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
        prompt = prompt.float()
        if not torch.isfinite(prompt).all():
            raise PackedStoreError(f"{self.root}: task {name}'s prompt holds non-finite values")
        return prompt

    def read_bytes(self, name: str, check: Callable[[AdapterHeader], None] | None = None) -> bytes:
        """Task `name`'s tensor bytes as stored, after its shard's header and `check` (see `read_prompt`)."""
        entry = self.entry(name)
        with self._open_shard(entry.shard) as f:
            start = self._check_header(f, entry)
            if check is not None:
                check(AdapterHeader(self.backbone, entry.shape[0], entry.shape[1], entry.dtype, entry.meta))
            f.seek(start + entry.offset)
            data = f.read(entry.nbytes)
        if len(data) != entry.nbytes:
            raise PackedStoreError(f"{self.root}: shard {entry.shard} is truncated (task {name})")
        return data

    def adapter(self, name: str, check: Callable[[AdapterHeader], None] | None = None) -> TaskAdapter:
        entry = self.entry(name)
        return TaskAdapter(name, self.read_prompt(name, check), self.backbone, entry.meta)

    def backbone_config(self) -> SimpleNamespace:
        """What `tuner.export.peft_config_dict` needs of the backbone's config, as the store recorded it."""
        return SimpleNamespace(**self.config)

    def _open_shard(self, shard: str):
        """The shard file opened: a regular file directly in the store's own `shards/` (a symlinked
        `shards/` or shard is refused: nothing outside the store is read)."""
        shards = self.root / SHARDS
        if os.path.realpath(shards) != os.path.join(os.path.realpath(self.root), SHARDS):
            raise PackedStoreError(f"{self.root}: {SHARDS}/ is a link out of the store")
        path = shards / shard
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.root}: shard {shard} is gone (the store was published again since this index "
                "was read: open the index again)"
            ) from None
        except OSError as e:  # ELOOP: the shard is a symlink
            raise PackedStoreError(f"{self.root}: shard {shard} cannot be opened ({e.strerror})") from None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise PackedStoreError(f"{self.root}: shard {shard} is not a regular file")
        return f

    def _check_header(self, f, entry: PackedEntry) -> int:
        """The byte where the shard's data starts, once its header says what the index does of `entry`."""
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._headers.get(entry.shard)
        if cached is None or cached[0] != ident:
            start, tensors = _read_shard_header(f, st.st_size, f"{self.root}: shard {entry.shard}")
            cached = self._headers[entry.shard] = (ident, start, tensors)
        _, start, tensors = cached
        info = tensors.get(entry.key)
        where = f"{self.root}: shard {entry.shard}, task {entry.name}"
        if info is None:
            raise PackedStoreError(f"{where}: the shard has no tensor {entry.key!r}")
        want = (entry.dtype, list(entry.shape), [entry.offset, entry.offset + entry.nbytes])
        got = (info.get("dtype"), info.get("shape"), info.get("data_offsets"))
        if got != want:
            raise PackedStoreError(
                f"{where}: the shard's header says dtype/shape/offsets {got!r:.120}, the index {want!r:.120}"
            )
        return start


def _read_shard_header(f, size: int, where: str) -> tuple[int, dict]:
    """(data start, tensors) of a safetensors shard, checked: bounded JSON, float tensors whose data
    lie end to end and end where the file does (a truncated or padded shard is refused)."""
    start, header = read_safetensors_header(f, size, MAX_SHARD_HEADER_BYTES, where, PackedStoreError)
    if not isinstance(header, dict):
        raise PackedStoreError(f"{where} has a safetensors header that is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, info in sorted(tensors.items(), key=lambda kv: _first_offset(kv[1])):
        ok = isinstance(info, dict) and info.get("dtype") in FLOAT_BYTES
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = (
            ok
            and isinstance(shape, list)
            and len(shape) == 2
            and all(type(x) is int and x >= 0 for x in shape)
        )
        nbytes = shape[0] * shape[1] * FLOAT_BYTES[info["dtype"]] if ok else -1
        if not (ok and nbytes <= MAX_WEIGHTS_BYTES and offsets == [end, end + nbytes]):
            raise PackedStoreError(f"{where}: tensor {key!r:.80} has a bad dtype, shape or offsets")
        end += nbytes
    if start + end != size:
        raise PackedStoreError(
            f"{where}: has {size} bytes, its header describes {start + end}: truncated or not a shard"
        )
    return start, tensors


def _first_offset(info) -> int:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and type(offsets[0]) is int else -1


def _parse_index(data, path: Path) -> tuple[str, dict, dict, dict]:
    """(backbone, config, entries, shards) of an index.json, each field checked (PackedStoreError)."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise PackedStoreError(f"{path}: field {field} {what}")

    need(isinstance(data, dict), "(top level)", "must be a JSON object")
    need(data.get("format") == FORMAT, "format", f"must be {FORMAT!r}")
    need(data.get("format_version") == FORMAT_VERSION, "format_version", f"must be {FORMAT_VERSION}")
    backbone, config = data.get("backbone"), data.get("config")
    need(isinstance(backbone, str), "backbone", "must be a string")
    need(
        isinstance(config, dict) and all(_count(config.get(k), 1) for k in CONFIG_KEYS),
        "config",
        f"must give positive integers {', '.join(CONFIG_KEYS)}",
    )
    config = {k: config[k] for k in CONFIG_KEYS}
    shards, metas, tasks = data.get("shards"), data.get("metas"), data.get("tasks")
    need(isinstance(shards, dict), "shards", "must be an object")
    for name, info in shards.items():
        need(SHARD_NAME.fullmatch(name) is not None, f"shards[{name!r:.60}]", "is not a shard name")
        need(
            isinstance(info, dict) and isinstance(info.get("digest"), str),
            f"shards[{name}]",
            "needs a digest",
        )
    need(isinstance(metas, list), "metas", "must be a list")
    parsed = []
    for i, meta in enumerate(metas):
        try:
            parsed.append(TaskMeta.from_dict(meta))
        except (ValueError, TypeError) as e:
            raise PackedStoreError(f"{path}: field metas[{i}]: {e}") from None
    need(isinstance(tasks, dict), "tasks", "must be an object")
    entries, context = {}, {"shards": shards, "metas": parsed, "width": config["hidden_size"]}
    for name, t in tasks.items():
        if not (is_valid_name(name) and isinstance(t, dict)):
            need(is_valid_name(name), f"tasks[{name!r:.140}]", "is not a valid task name")
            need(False, f"tasks[{name!r:.140}]", "must be an object")
        entries[name] = _parse_entry(name, t, context, path)
    return backbone, config, entries, {k: v["digest"] for k, v in shards.items()}


# The checks of one task's index entry, in order: (field, what it must be, test of (entry, context)).
_ENTRY_CHECKS = (
    ("shard", "must name a shard listed in shards", lambda t, c: t.get("shard") in c["shards"]),
    ("key", "must be a string", lambda t, c: isinstance(t.get("key"), str)),
    ("offset", "must be a non-negative integer", lambda t, c: _count(t.get("offset"), 0)),
    ("dtype", f"must be one of {', '.join(FLOAT_BYTES)}", lambda t, c: t.get("dtype") in FLOAT_BYTES),
    (
        "shape",
        "must be [num_virtual_tokens, the store's width]",
        lambda t, c: _shape_ok(t.get("shape"), c["width"]),
    ),
    (
        "shape",
        f"must hold at most {MAX_WEIGHTS_BYTES} bytes",
        lambda t, c: t["shape"][0] * t["shape"][1] * FLOAT_BYTES[t["dtype"]] <= MAX_WEIGHTS_BYTES,
    ),
    ("version", "must be a string", lambda t, c: isinstance(t.get("version"), str)),
    ("meta", "must index metas", lambda t, c: _count(t.get("meta"), 0) and t["meta"] < len(c["metas"])),
    ("score", "must be a finite number or null", lambda t, c: _score_ok(t.get("score"))),
)


def _parse_entry(name: str, t: dict, context: dict, path: Path) -> PackedEntry:
    for field, what, ok in _ENTRY_CHECKS:
        if not ok(t, context):
            raise PackedStoreError(f"{path}: field tasks[{name!r:.140}].{field} {what}")
    shape = t["shape"]
    meta = context["metas"][t["meta"]]
    return PackedEntry(
        name,
        t["shard"],
        t["key"],
        t["offset"],
        (shape[0], shape[1]),
        t["dtype"],
        t["version"],
        meta,
        t.get("score"),
    )


def _shape_ok(shape, width: int) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and _count(shape[0], 1) and shape[1] == width


def _score_ok(score) -> bool:
    return score is None or (type(score) in (int, float) and math.isfinite(score))


def _count(x, least: int) -> bool:
    return type(x) is int and x >= least
