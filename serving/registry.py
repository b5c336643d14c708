"""The prompt registry: which tasks are servable, read from a prompt-store directory, hot-reloaded.

The store holds one sub-directory per task in PEFT prompt-tuning format (`tuner.export`;
safetensors only). `refresh()` rescans it cheaply (a few `stat` calls per task, compared with the
last scan) and loads only new or changed directories, so the engine's prompt-store loader thread
calls it every second or two: a task directory that appears becomes servable without a restart, a
removed one stops being served. Readers (`get`, `names`) never wait for a refresh: the task dict is
swapped whole once every changed task is loaded and checked, so they see the old one or the new one.
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

Task names from requests are looked up in a dict, never joined into a path: "../x" or "a/b" is
simply an unknown task. It does not compute anything with the prompts (the runner does).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.types import UnknownTask
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META, AdapterHeader, TaskMeta, load_adapter
from tuner.schema import ConfigError, validate_name

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int, int], ...]  # (inode, mtime_ns, size) of each adapter file
_LOAD_ATTEMPTS = 5  # a scanned version pruned before it is loaded: scan the entry again


@dataclass(frozen=True)
class TaskEntry:
    """A servable task: its prompt and serving metadata (kind, prefix, template, verbaliser...)."""

    name: str
    prompt: torch.Tensor = field(repr=False)  # [P, hidden] fp32
    meta: TaskMeta = field(repr=False)
    version: Fingerprint = field(repr=False)  # changes whenever the adapter files change
    path: str = ""

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]


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
        """
        self.root = Path(root)
        self.backbone_names = set(backbone_names)
        self.hidden_size = hidden_size
        self.allow_symlinks = allow_symlinks
        self.max_virtual_tokens = max_virtual_tokens
        self.max_text_chars = max_text_chars
        self._refreshing = threading.Lock()  # one refresh at a time (the loader thread, a test, a CLI)
        self._tasks: dict[str, TaskEntry] = {}
        self._rejected: dict[str, Fingerprint] = {}  # name -> fingerprint that failed to load
        self._problems: dict[str, str] = {}  # name -> reason last logged ("" = the store itself)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def get(self, name: str) -> TaskEntry:
        entry = self._tasks.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownTask(f"The model `{name}` does not exist", param="model")
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def refresh(self) -> RegistryChanges:
        """Rescan the store; load new/changed complete task directories, drop vanished ones.

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
        if found is None:  # the store itself is unreadable: keep serving what is loaded
            return changes
        tasks = dict(self._tasks)  # copy-on-write: readers on other threads see old or new, never half
        for name, item in found.items():
            if isinstance(item, str):  # broken: keep its last good version, if any
                self._problem(name, item)
                continue
            fp, path = item
            old = tasks.get(name)
            if (old is not None and old.version == fp) or self._rejected.get(name) == fp:
                continue
            entry = self._load(name, path, fp)
            if entry is None:
                continue
            self._rejected.pop(name, None)
            self._problems.pop(name, None)
            tasks[name] = entry
            (changes.changed if old is not None else changes.added).append(name)
        for name in [n for n in tasks if n not in found]:
            del tasks[name]
            changes.removed.append(name)
        for name in [n for n in self._problems if n not in found]:
            del self._problems[name]
        self._tasks = tasks
        if changes:
            log.info("prompt registry: +%s ~%s -%s", changes.added, changes.changed, changes.removed)
        return changes

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
            if child.name.startswith("."):
                continue  # hidden: the versions of atomic publishing, temp dirs, pointer flips
            try:
                validate_name("task name", child.name)
            except ConfigError:
                continue
            item = self._entry(child.path, root)
            if item is not None:  # None: a plain file, not a task
                found[child.name] = item
        return found

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

    def _load(self, name: str, path: Path, fp: Fingerprint) -> TaskEntry | None:
        """The task entry of the version scanned as (`fp`, `path`); None if it cannot be served.

        Two publishes between the scan and the load prune the scanned version: then the entry is
        scanned again (every check of the scan included) and the version now published is loaded.
        """
        for _ in range(_LOAD_ATTEMPTS):
            try:
                return self._checked(name, path, fp)
            except Exception as e:  # any unreadable adapter (bad JSON, truncated safetensors...) is skipped
                error, failed = e, fp
            again = self._entry(str(self.root / name), os.path.realpath(self.root))
            if not isinstance(again, tuple) or again[1] == path:
                break  # not replaced meanwhile: this version itself cannot be served
            fp, path = again
        self._rejected[name] = failed
        self._problem(name, str(error) or type(error).__name__)
        return None

    def _checked(self, name: str, path: Path, fp: Fingerprint) -> TaskEntry:
        """Load the adapter at `path`; ValueError (or the reader's error) unless it fits this server,
        found from its header before its prompt is read."""
        adapter = load_adapter(path, name, check=self._fits)
        return TaskEntry(name, adapter.prompt.float(), adapter.meta, fp, str(path))

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
