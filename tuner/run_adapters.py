"""A run's adapters in either store format: the per-task directories of `tuner.export` or the packed
store of `tuner.prompt_store`, chosen by the job's `export_format`.

`export_run` is the recipe's one call at the end of a run; `task_names` and `load_task_adapter` read
a store of either format (`promptfleet eval`, continual training, `promptfleet export`). The serving
registry reads both formats itself (lazily). This module writes no format of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from tuner.export import AdapterHeader, TaskAdapter, TaskMeta, load_adapter, read_adapter_header, save_adapter
from tuner.prompt_store import PackedIndex, is_packed_store, write_packed_store
from tuner.schema import ConfigError, validate_name

AUTO_PACKED_TASKS = 64  # export_format=auto: more tasks than this (or a family) are exported packed


def use_packed(export_format: str, specs: Iterable) -> bool:
    """Whether a run with tasks `specs` (`TaskSpec`s) exports packed under `export_format`."""
    if export_format != "auto":
        return export_format == "packed"
    specs = list(specs)
    return len(specs) > AUTO_PACKED_TASKS or any(s.family_member is not None for s in specs)


def export_adapters(
    root: str | os.PathLike, adapters: Iterable[TaskAdapter], backbone_config, packed: bool
) -> None:
    """Publish `adapters` under `root`: one packed store, or one versioned directory per task."""
    root = Path(root)
    if packed:
        write_packed_store(root, adapters, backbone_config)
        return
    if is_packed_store(root):
        raise ConfigError(f"{root} is a packed prompt store: write per-task adapters to another directory")
    root.mkdir(parents=True, exist_ok=True)
    for adapter in adapters:
        save_adapter(root, adapter, backbone_config)


class AdapterStore:
    """A store of either format opened once: its task names, and each task's adapter on demand (a
    packed store's index is read once here, not once per task)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index = PackedIndex.open(self.root) if is_packed_store(self.root) else None
        if self.index is not None:
            self.names = list(self.index.entries)  # the order they were exported in
        else:
            self.names = sorted(
                p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir()
            )

    def backbone(self, name: str) -> str:
        """The backbone task `name` was trained on, without reading its prompt (the packed index
        records one for the store; a directory's is in its adapter config)."""
        if self.index is not None:
            self.index.entry(name)  # KeyError if absent
            return self.index.backbone
        validate_name("task name", name)
        return read_adapter_header(self.root / name, name).backbone

    def adapter(self, name: str, check: Callable[[AdapterHeader], None] | None = None) -> TaskAdapter:
        """Task `name`'s adapter (KeyError naming it and how many tasks the store has if absent)."""
        if self.index is not None:
            return self.index.adapter(name, check)
        validate_name("task name", name)
        if not (self.root / name).is_dir():
            raise KeyError(f"no task {name!r} in the store {self.root} ({len(self.names)} tasks)")
        return load_adapter(self.root / name, name, check)


def task_names(root: str | os.PathLike) -> list[str]:
    """The tasks of store `root` (either format)."""
    return AdapterStore(root).names


def load_task_adapter(
    root: str | os.PathLike, name: str, check: Callable[[AdapterHeader], None] | None = None
) -> TaskAdapter:
    """Task `name` of store `root`, packed or per-task (to read many, open an `AdapterStore` once)."""
    return AdapterStore(root).adapter(name, check)


def export_run(
    root: Path,
    tasks: dict,
    final: dict,
    prompt_of: Callable[[str], torch.Tensor],
    backbone_config,
    *,
    backbone: str,
    max_len: int,
    export_format: str,
    source=None,
) -> None:
    """A finished run's adapters under `root`: each task of `tasks` (name -> `TaskData`) with its
    final scores (`final`, None where it has no eval split) and prompt (`prompt_of`), then every
    adapter a continual run's `source` carries unchanged. Prompts are made one at a time."""

    def adapters() -> Iterator[TaskAdapter]:
        for name, data in tasks.items():
            score = final[name].score if final[name] is not None else None
            prompt = prompt_of(name)
            meta = TaskMeta.from_spec(
                data.spec, data.prefix, score, max_len=max_len, virtual_tokens=len(prompt)
            )
            yield TaskAdapter(name, prompt, backbone, meta)
        if source is not None:
            carried = AdapterStore(source.path / "adapters")
            for name in source.adapters:
                yield carried.adapter(name)

    packed = use_packed(export_format, [d.spec for d in tasks.values()])
    export_adapters(root, adapters(), backbone_config, packed)
