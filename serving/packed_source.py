"""The registry's view of a packed prompt store (`tuner.prompt_store`): its tasks as index entries.

A packed store is `root/index.json` plus a few shard files. `PackedSource.scan()` reads the index
only when the file changed (its inode, size and mtime; a publish replaces it whole with a rename),
so rescanning an unchanged store of 100,000 tasks costs one `stat`. Each task's version is (its
shard, its content digest): a publish writes changed tasks, and the tasks it moves, into new shards,
so exactly the entries of changed shards get a new version and are indexed again by the registry;
the others keep their index entry and their loaded prompt. Reading a prompt is
`PackedIndex.read_prompt` (the shard's header checked against the index, then the caller's check,
then that tensor's bytes alone).

It does not check a task against the server (the registry does) nor hold prompts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from tuner.prompt_store import INDEX, SHARDS, PackedEntry, PackedIndex, is_packed_store

__all__ = ["INDEX", "SHARDS", "PackedRef", "PackedSource"]


class PackedRef(NamedTuple):
    """Where one task of a packed store is: the index it was read from, and its entry there (a
    tuple: 100,000 of them are made when an index is read)."""

    index: PackedIndex
    entry: PackedEntry


class PackedSource:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._ident: tuple | None = None  # the index file's identity when it was last read
        self._found: dict[str, tuple[tuple, PackedRef]] = {}

    @property
    def last(self) -> dict[str, tuple[tuple, PackedRef]]:
        """The tasks of the index last read (what keeps serving while the index is unreadable)."""
        return self._found

    def present(self) -> bool:
        return is_packed_store(self.root)

    def scan(self) -> tuple[dict[str, tuple[tuple, PackedRef]], bool]:
        """(name -> (version, PackedRef) of every task, whether it changed since the last scan).
        Raises (the store's own error, one line) if the index cannot be read: keep the last one."""
        try:
            st = os.stat(self.root / INDEX)
        except FileNotFoundError:
            changed, self._ident, self._found = bool(self._found), None, {}
            return self._found, changed
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if ident == self._ident:
            return self._found, False
        index = PackedIndex.open(self.root)
        self._found = {
            name: (("packed", e.shard, e.version), PackedRef(index, e)) for name, e in index.entries.items()
        }
        self._ident = ident
        return self._found, True
