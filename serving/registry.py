"""The prompt registry: which tasks are servable, read from a prompt-store directory, hot-reloaded.

The store holds one sub-directory per task in PEFT prompt-tuning format (`tuner.export`;
safetensors only). `refresh()` rescans it cheaply (a few `stat` calls per task, compared with the
last scan) and loads only new or changed directories, so the engine can call it every second or two:
a task directory that appears becomes servable without a restart, a removed one stops being served.
A directory is skipped until it is complete (`save_adapter` writes a hidden temp dir and renames it,
but a hand-copied one may be half-written), and rejected, with the reason logged once, when its
adapter names another backbone or its prompt width is not the backbone's hidden size.

Task names from requests are looked up in a dict, never joined into a path: "../x" or "a/b" is
simply an unknown task. It does not compute anything with the prompts (the runner does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.types import UnknownTask
from tuner.config import ConfigError, validate_name
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META, load_adapter

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int], ...]  # (mtime_ns, size) of each adapter file


@dataclass(frozen=True)
class TaskEntry:
    """A servable task: its prompt and serving metadata (kind, prefix, template, verbaliser...)."""

    name: str
    prompt: torch.Tensor = field(repr=False)  # [P, hidden] fp32
    meta: dict = field(repr=False)
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
    def __init__(self, root: str | os.PathLike, backbone_names: set[str], hidden_size: int):
        """Args:
        root: the prompt-store directory (may not exist yet: then no task is served).
        backbone_names: names an adapter's `base_model_name_or_path` may carry for the served
            backbone (e.g. {"smollm2-135m", "/path/it/resolves/to"}).
        hidden_size: the backbone's hidden size (the prompt width).
        """
        self.root = Path(root)
        self.backbone_names = set(backbone_names)
        self.hidden_size = hidden_size
        self._tasks: dict[str, TaskEntry] = {}
        self._rejected: dict[str, Fingerprint] = {}  # name -> fingerprint already logged as bad

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
        """Rescan the store; load new/changed complete task directories, drop vanished ones."""
        changes = RegistryChanges()
        tasks = dict(self._tasks)  # copy-on-write: readers on other threads see old or new, never half
        seen = set()
        for name, fp, path in self._scan():
            seen.add(name)
            old = tasks.get(name)
            if (old is not None and old.version == fp) or self._rejected.get(name) == fp:
                continue
            entry = self._load(name, path, fp)
            if entry is None:
                if tasks.pop(name, None) is not None:
                    changes.removed.append(name)
                continue
            self._rejected.pop(name, None)
            tasks[name] = entry
            (changes.changed if old is not None else changes.added).append(name)
        for name in [n for n in tasks if n not in seen]:
            del tasks[name]
            changes.removed.append(name)
        self._tasks = tasks
        if changes:
            log.info("prompt registry: +%s ~%s -%s", changes.added, changes.changed, changes.removed)
        return changes

    def _scan(self):
        try:
            children = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue  # hidden = a temp dir of an atomic save in progress
            try:
                validate_name("task name", child.name)
            except ConfigError:
                continue
            fp = _fingerprint(Path(child.path))
            if fp is not None:
                yield child.name, fp, Path(child.path)

    def _load(self, name: str, path: Path, fp: Fingerprint) -> TaskEntry | None:
        try:
            adapter = load_adapter(path)
            if adapter.backbone not in self.backbone_names:
                raise ValueError(
                    f"adapter is for backbone {adapter.backbone!r}, this server runs "
                    f"{sorted(self.backbone_names)[0]!r}"
                )
            if adapter.prompt.shape[1] != self.hidden_size or adapter.prompt.shape[0] < 1:
                raise ValueError(
                    f"prompt shape {tuple(adapter.prompt.shape)} does not fit hidden size {self.hidden_size}"
                )
        except (
            Exception
        ) as e:  # any unreadable adapter (bad JSON, truncated safetensors...) is skipped, not fatal
            log.warning("prompt registry: task %s not served: %s", name, e)
            self._rejected[name] = fp
            return None
        return TaskEntry(name, adapter.prompt.float(), adapter.meta, fp, str(path))


def _fingerprint(task_dir: Path) -> Fingerprint | None:
    """(mtime, size) of the adapter files; None while a required file is missing (half-written dir)."""
    fp = []
    for fname, required in ((ADAPTER_CONFIG, True), (ADAPTER_WEIGHTS, True), (TASK_META, False)):
        try:
            st = os.stat(task_dir / fname)
            fp.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            if required:
                return None
            fp.append((0, 0))
    return tuple(fp)
