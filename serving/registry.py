"""The prompt registry: which tasks are servable, indexed from a prompt store, hot-reloaded; their
prompts read on first use into an LRU (`serving.prompt_cache`).

The store holds one sub-directory per task in PEFT prompt-tuning format (`tuner.export`;
safetensors only). `refresh()` rescans it cheaply (a few `stat` calls per task, compared with the
last scan) and indexes only new or changed directories, so the engine's prompt-store loader thread
calls it every second or two: a task directory that appears becomes servable without a restart, a
removed one stops being served. Readers (`get`, `names`) never wait for a refresh: the task dict is
swapped whole once every changed task is indexed and checked, so they see the old one or the new one.
`tuner.export.save_adapter` publishes a task as a symlink `<name> -> .versions/<name>/<version>`
flipped atomically; a hand-copied directory works too. An entry that cannot be served (half-written,
unreadable, a symlink loop, a FIFO or other non-regular file, another backbone, a prompt width that
is not the backbone's hidden size, a prompt too long for the backbone's context, a bad field in its
`promptfleet_task.json`, a prefix or template longer than a prompt may be, non-finite values)
is logged once per change and skipped, without stopping the rest of the store; if that task was
being served, its last good version keeps serving. Symlinks leading out of the store are refused
unless `allow_symlinks`. What is read is bounded before it is read: each file by its size, and the
prompt by its safetensors header (`tuner.export.AdapterHeader`), so a misshapen or oversized prompt
is refused without reading its data.

Indexing reads a task's config, metadata and prompt header, never the prompt's data: every check
above but the last is made then. With `lazy=False` (tools, small stores) each indexed prompt is also
read at once (and checked for non-finite values), and all stay in memory. With `lazy=True` (the
server) a prompt is read on first use (`load`, off the engine thread) and kept in an LRU of
`prompt_cache_bytes`; it is checked against the header it was indexed with, and a prompt whose data
turns out unreadable or non-finite then fails that request (`PromptUnavailable`, 503) and stops
being served until its files change. A changed task whose prompt is in use is read at the refresh
that sees it, so a bad new version of a task in use is refused there and the last good one keeps
serving. A changed or removed task drops its loaded prompt.

A packed store (`root/index.json` + shards, `tuner.prompt_store`) is served too, with task directories
beside it if any (a directory wins over a packed entry of the same name): its index is read again only
when the file changed (`serving.packed_source`), and only the tasks of changed shards get a new version,
so a republish re-indexes, drops and re-reads just those. A packed task is checked from the index (one
check per distinct metadata and shape), and its shard's header against the index before its bytes are
read.

Task names from requests are looked up in a dict, never joined into a path: "../x" or "a/b" is
simply an unknown task. It does not compute anything with the prompts (the runner does).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.packed_source import INDEX, SHARDS, PackedRef, PackedSource
from serving.prompt_cache import PromptCache, PromptCacheStats
from serving.types import PromptUnavailable, UnknownTask
from tuner.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TASK_META,
    AdapterHeader,
    TaskMeta,
    load_adapter,
    read_adapter_header,
)
from tuner.schema import ConfigError, validate_name

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int, int], ...]  # (inode, mtime_ns, size) of each adapter file
_LOAD_ATTEMPTS = 5  # a scanned version pruned before it is indexed: scan the entry again


@dataclass(frozen=True)
class TaskEntry:
    """A task with its prompt in memory (what the runner reads): prompt and serving metadata."""

    name: str
    prompt: torch.Tensor = field(repr=False)  # [P, hidden] fp32
    meta: TaskMeta = field(repr=False)
    version: Hashable = field(repr=False)  # changes whenever the adapter files change
    path: str = ""

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]


class IndexedTask:
    """A servable task as indexed: its metadata and checked header, its prompt not necessarily read.

    Requests are validated from it (kind, template, prompt length); `PromptRegistry.load` gives the
    `TaskEntry` with the prompt in memory. A task of a packed store makes its `TaskMeta` on first
    use (indexing 100,000 tasks copies none)."""

    __slots__ = ("name", "version", "path", "header", "registry", "packed", "_meta")

    def __init__(self, name: str, version: Hashable, path: str, header: AdapterHeader, registry, packed=None):
        self.name, self.version, self.path, self.header = name, version, path, header
        self.registry = registry  # the `PromptRegistry` that reads its prompt
        self.packed = packed  # a `serving.packed_source.PackedRef`, or None for a task directory
        self._meta = header.meta if packed is None else None

    def __repr__(self) -> str:
        return f"IndexedTask({self.name!r})"

    @property
    def meta(self) -> TaskMeta:
        if self._meta is None:
            self._meta = self.packed.entry.meta
        return self._meta

    @property
    def num_virtual_tokens(self) -> int:
        return self.header.num_virtual_tokens

    @property
    def prompt(self) -> torch.Tensor:
        """The prompt, read through the registry's cache if it is not held (blocking: for tools and
        tests; the engine reads with `serving.prompt_cache.PromptReads`, never on its own thread)."""
        return self.registry.load(self).prompt


@dataclass
class RegistryChanges:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class PromptRegistry:
    def __init__(
        self,
        root: str | os.PathLike,
        backbone_names: set[str],
        hidden_size: int,
        allow_symlinks: bool = False,
        max_virtual_tokens: int | None = None,
        max_text_chars: int | None = None,
        lazy: bool = False,
        prompt_cache_bytes: int | None = None,
    ):
        """Args:
        root: the prompt-store directory (may not exist yet: then no task is served).
        backbone_names: names an adapter's `base_model_name_or_path` may carry for the served
            backbone (e.g. {"smollm2-135m", "/path/it/resolves/to"}).
        hidden_size: the backbone's hidden size (the prompt width).
        allow_symlinks: serve task entries and adapter files that are symlinks leading anywhere.
            Off: a task entry may only link inside the store (what `tuner.export` publishes), and
            an adapter file may not be a link at all.
        max_virtual_tokens: the longest prompt a task may have (the backbone's context leaves no
            room for a request beyond it); None: no bound.
        max_text_chars: the longest prefix or template a task may have, in characters (the
            longest prompt the server takes: each is part of every prompt); None: no bound.
        lazy: index only, read each prompt on first use (see the module docstring); False: read
            every prompt when it is indexed and keep them all.
        prompt_cache_bytes: with `lazy`, the bound of the loaded prompts' LRU (None: unbounded).
        """
        self.root = Path(root)
        self.backbone_names = set(backbone_names)
        self.hidden_size = hidden_size
        self.allow_symlinks = allow_symlinks
        self.max_virtual_tokens = max_virtual_tokens
        self.max_text_chars = max_text_chars
        self.lazy = lazy
        self.prompts = PromptCache(self._read, prompt_cache_bytes if lazy else None)
        self._refreshing = threading.Lock()  # one refresh at a time (the loader thread, a test, a CLI)
        self._swap = threading.Lock()  # the swap of `_tasks` (a refresh, a prompt that failed on use)
        self._tasks: dict[str, IndexedTask] = {}
        self._rejected: dict[str, Hashable] = {}  # name -> version that failed to index or load
        self._broken: dict[str, set] = {}  # name -> versions (indexed, on disk) whose prompt failed on use
        self._failed_on_use = False  # a prompt failed on use since the last swap: the next refresh looks
        self._problems: dict[str, str] = {}  # name -> reason last logged ("" = the store itself)
        self._packed = PackedSource(self.root)  # the store's packed index, if it has one
        self._dirs: dict | None = None  # the task directories found by the last refresh
        self._fitting: dict[tuple, AdapterHeader] = {}  # packed headers checked in this refresh
        self._shard_paths: dict[str, str] = {}  # shard -> its path, in this refresh
        self._packed_refusals: set[str] = set()  # why packed tasks were refused, in this refresh

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, name: str) -> IndexedTask:
        entry = self._tasks.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownTask(f"The model `{name}` does not exist", param="model")
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    @property
    def prompt_stats(self) -> PromptCacheStats:
        return self.prompts.stats

    def load(self, entry: IndexedTask) -> TaskEntry:
        """`entry`'s prompt in memory: from the LRU, or read now (blocking; shapes checked from the
        header first). PromptUnavailable if it cannot be read or fails its checks: then the task is
        not served until its files change (logged once)."""
        try:
            return self.prompts.get(entry)
        except FileNotFoundError as e:  # replaced since indexed (a shard pruned): the next scan indexes it
            raise PromptUnavailable(f"the prompt of task `{entry.name}` moved: {e}") from None
        except Exception as e:
            reason = str(e) or type(e).__name__
            now = self._entry(str(self.root / entry.name), os.path.realpath(self.root))
            with self._swap:  # its version now too: files rewritten since indexing are not indexed again
                if self._tasks.get(entry.name) is entry:
                    self._broken[entry.name] = {entry.version, now[0] if isinstance(now, tuple) else None}
                    self._failed_on_use = True
                    self._tasks = {n: t for n, t in self._tasks.items() if n != entry.name}
                    log.warning(
                        "prompt registry: task %s not served: its prompt failed on use: %s",
                        entry.name,
                        reason,
                    )
            raise PromptUnavailable(f"the prompt of task `{entry.name}` cannot be read: {reason}") from None

    def refresh(self) -> RegistryChanges:
        """Rescan the store; index new/changed complete task directories, drop vanished ones.

        A broken entry (a symlink loop, an unreadable or half-written file, a bad adapter) is
        reported once per change and never stops the others; while a served task's entry is
        broken, its last good version keeps serving. Only an entry that is gone stops being served.
        Safe to call from any thread; concurrent calls run one after the other.
        """
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> RegistryChanges:
        changes = RegistryChanges()
        found = self._scan()
        if found is None:  # the store itself is unreadable: keep serving what is indexed
            return changes
        packed, packed_changed = self._scan_packed()
        if not packed_changed and found == self._dirs and not self._failed_on_use:
            return changes  # nothing changed since the last refresh: no task to look at
        self._dirs, self._fitting, self._shard_paths, self._packed_refusals = found, {}, {}, set()
        found = {**packed, **found}  # a task directory beside a packed store wins over its entry
        tasks = dict(self._tasks)  # copy-on-write: readers on other threads see old or new, never half
        for name, item in found.items():
            if isinstance(item, str):  # broken: keep its last good version, if any
                self._problem(name, item)
                continue
            fp, path = item
            old = tasks.get(name)
            if self._rejected.get(name) == fp or fp in self._broken.get(name, ()):
                continue
            if old is not None and old.version == fp:
                continue
            entry = self._index(name, path, fp)
            if entry is None or not self._read_now(entry, old):
                continue
            self._rejected.pop(name, None)
            self._problems.pop(name, None)
            tasks[name] = entry
            (changes.changed if old is not None else changes.added).append(name)
        for name in [n for n in tasks if n not in found]:
            del tasks[name]
            changes.removed.append(name)
        for name in [n for n in self._problems if n not in found and n not in ("", INDEX)]:
            del self._problems[name]
        self._swap_in(tasks, found, changes)
        if changes:
            log.info(
                "prompt registry: +%s ~%s -%s", *map(_few, (changes.added, changes.changed, changes.removed))
            )
        return changes

    def _read_now(self, entry: IndexedTask, old: IndexedTask | None) -> bool:
        """Read `entry`'s prompt now when it must be (not lazy, or a new version of a task in use);
        False if it cannot be served (logged; the last good version keeps serving)."""
        if self.lazy and (old is None or not self.prompts.holds(entry.name)):
            return True
        try:
            self.prompts.put(self._read(entry))
        except Exception as e:
            self._rejected[entry.name] = entry.version
            self._problem(entry.name, str(e) or type(e).__name__)
            return False
        return True

    def _swap_in(self, tasks: dict[str, IndexedTask], found: dict, changes: RegistryChanges) -> None:
        """Publish `tasks`; drop the loaded prompts of changed and removed tasks, and the tasks whose
        prompt failed on use meanwhile."""
        with self._swap:
            for name, versions in list(self._broken.items()):
                item = found.get(name)
                if not isinstance(item, tuple) or item[0] not in versions:
                    del self._broken[name]  # changed or gone: indexed afresh
                elif name in tasks and tasks[name].version in versions:
                    del tasks[name]
            self._tasks, self._failed_on_use = tasks, False
        for name in (*changes.changed, *changes.removed):
            self.prompts.discard(name, keep=tasks[name].version if name in tasks else None)

    def _problem(self, name: str, reason: str) -> None:
        """Log a broken entry once per distinct reason (the store is rescanned every few seconds)."""
        if self._problems.get(name) != reason:
            self._problems[name] = reason
            kept = " (its last good version keeps serving)" if name in self._tasks else ""
            log.warning("prompt registry: task %s not loaded: %s%s", name, reason, kept)

    def _scan(self) -> dict[str, tuple[Fingerprint, Path] | str] | None:
        """Each task entry of the store: (fingerprint, real directory), or why it cannot be read."""
        try:
            children = list(os.scandir(self.root))
        except FileNotFoundError:
            return {}
        except OSError as e:
            if self._problems.get("") != str(e):
                self._problems[""] = str(e)
                log.warning("prompt registry: store %s unreadable, serving what is loaded: %s", self.root, e)
            return None
        self._problems.pop("", None)
        root = os.path.realpath(self.root)
        found: dict[str, tuple[Fingerprint, Path] | str] = {}
        for child in children:
            if child.name.startswith(".") or (child.name == SHARDS and self._packed.present()):
                continue  # hidden: the versions of atomic publishing, temp dirs, pointer flips
            try:
                validate_name("task name", child.name)
            except ConfigError:
                continue
            item = self._entry(child.path, root)
            if item is not None:  # None: a plain file, not a task
                found[child.name] = item
        return found

    def _scan_packed(self) -> tuple[dict, bool]:
        """The packed index's tasks (name -> (version, PackedRef)) and whether they changed; an
        unreadable index is logged once and the tasks last read from it keep serving."""
        try:
            packed, changed = self._packed.scan()
        except Exception as e:
            reason = str(e) or type(e).__name__
            if self._problems.get(INDEX) != reason:
                self._problems[INDEX] = reason
                log.warning("prompt registry: packed index unreadable, serving what it held: %s", reason)
            return self._packed.last, False
        self._problems.pop(INDEX, None)
        return packed, changed

    def _entry(self, path: str, root: str) -> tuple[Fingerprint, Path] | str | None:
        """A store entry's (fingerprint, real directory), why it cannot be read, or None if it is
        not a directory."""
        try:
            task_dir = self._task_dir(path, root)
            if task_dir is None:
                return None
            fp = _fingerprint(task_dir, self.allow_symlinks)
        except (OSError, ValueError) as e:
            return str(e) or type(e).__name__
        # A required file is missing: a copy in progress. Not an error, but not loadable yet.
        return (fp, task_dir) if fp is not None else "incomplete (a file is missing)"

    def _task_dir(self, path: str, root: str) -> Path | None:
        """The real directory of a store entry; a symlink must stay inside the store unless allowed."""
        if os.path.islink(path):
            target = os.path.realpath(path, strict=True)  # raises on a loop or a dangling link
            if not self.allow_symlinks and os.path.commonpath([root, target]) != root:
                raise ValueError("a symlink leading out of the prompt store (not allowed by the config)")
            return Path(target) if os.path.isdir(target) else None
        return Path(path) if os.path.isdir(path) else None

    def _index(self, name: str, path: Path, fp: Fingerprint) -> IndexedTask | None:
        """The index entry of the version scanned as (`fp`, `path`); None if it cannot be served.

        Two publishes between the scan and the read prune the scanned version: then the entry is
        scanned again (every check of the scan included) and the version now published is indexed.
        """
        for _ in range(_LOAD_ATTEMPTS):
            try:
                if isinstance(path, PackedRef):
                    return self._index_packed(name, path, fp)
                header = read_adapter_header(path, name, check=self._fits)
                return IndexedTask(name, fp, str(path), header, self)
            except Exception as e:  # any unreadable adapter (bad JSON, truncated safetensors...) is skipped
                error, failed = e, fp
            again = self._entry(str(self.root / name), os.path.realpath(self.root))
            if not isinstance(again, tuple) or again[1] == path:
                break  # not replaced meanwhile: this version itself cannot be served
            fp, path = again
        self._rejected[name] = failed
        reason = str(error) or type(error).__name__
        packed = isinstance(path, PackedRef)
        if packed and reason in self._packed_refusals:
            self._problems[name] = reason  # a family shares its header: logged for its first task only
        else:
            if packed:
                self._packed_refusals.add(reason)
            self._problem(name, reason)
        return None

    def _read(self, entry: IndexedTask) -> TaskEntry:
        """`entry`'s prompt, read and checked (non-finite values refused); ValueError if the adapter
        no longer has the header it was indexed with (it changed: the next refresh indexes it)."""

        def same_header(header: AdapterHeader) -> None:
            if header != entry.header:
                raise ValueError(
                    "its adapter changed since it was indexed (indexed again at the next rescan)"
                )

        if entry.packed is not None:  # the shard's header is checked against the index first
            prompt = entry.packed.index.read_prompt(entry.name, check=self._fits)
        else:
            prompt = load_adapter(entry.path, entry.name, check=same_header).prompt.float()
        return TaskEntry(entry.name, prompt, entry.meta, entry.version, entry.path)

    def _index_packed(self, name: str, ref: PackedRef, fp: Hashable) -> IndexedTask:
        """The index entry of a packed store's task, checked from what the index says of it. The
        tasks of a family share one metadata: its header is made and checked once per refresh."""
        e = ref.entry
        key = (id(ref.index), id(e.shared_meta), e.shape, e.dtype)
        header = self._fitting.get(key)
        if header is None:
            header = AdapterHeader(ref.index.backbone, e.shape[0], e.shape[1], e.dtype, e.shared_meta)
            self._fits(header)  # raises: refused (this task; the next with the same key raises too)
            self._fitting[key] = header
        path = self._shard_paths.get(e.shard)
        if path is None:
            path = self._shard_paths[e.shard] = str(ref.index.root / SHARDS / e.shard)
        return IndexedTask(name, fp, path, header, self, ref)

    def _fits(self, header: AdapterHeader) -> None:
        """ValueError unless an adapter with this header can be served here."""
        if header.backbone not in self.backbone_names:
            raise ValueError(
                f"adapter is for backbone {header.backbone!r}, this server runs "
                f"{sorted(self.backbone_names)[0]!r}"
            )
        shape = (header.num_virtual_tokens, header.width)
        if header.width != self.hidden_size or header.num_virtual_tokens < 1:
            raise ValueError(f"prompt shape {shape} does not fit hidden size {self.hidden_size}")
        if self.max_virtual_tokens is not None and header.num_virtual_tokens > self.max_virtual_tokens:
            raise ValueError(
                f"{header.num_virtual_tokens} virtual tokens leave no room for a request in the "
                f"backbone's context (at most {self.max_virtual_tokens})"
            )
        for field_name in ("prefix", "template"):
            n = len(getattr(header.meta, field_name))
            if self.max_text_chars is not None and n > self.max_text_chars:
                raise ValueError(
                    f"its {field_name} has {n} characters, more than a prompt may have ({self.max_text_chars})"
                )


def _few(names: list[str], shown: int = 8) -> str:
    """Names for a log line: a store of 100,000 tasks is indexed in one refresh."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def _fingerprint(task_dir: Path, allow_symlinks: bool) -> Fingerprint | None:
    """(inode, mtime, size) of the adapter files; None while a required file is missing.

    The inode makes a flip to a new version directory a change even if times and sizes match.
    """
    fp = []
    for fname, required in ((ADAPTER_CONFIG, True), (ADAPTER_WEIGHTS, True), (TASK_META, False)):
        try:
            st = os.lstat(task_dir / fname)
        except FileNotFoundError:
            if required:
                return None
            fp.append((0, 0, 0))
            continue
        if stat.S_ISLNK(st.st_mode):
            if not allow_symlinks:
                raise ValueError(f"{fname} is a symlink (not allowed by the config)")
            st = os.stat(task_dir / fname)  # raises on a loop or a dangling link
        fp.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(fp)
