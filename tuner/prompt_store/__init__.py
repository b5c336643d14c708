"""The packed prompt store: a fleet's prompts in a few sharded safetensors files and one index.

A per-task store (`tuner.export`) is one directory and one version link per task: at 100,000 tasks
that is 100,000 directories to write, scan and open. A packed store is

  root/index.json                  every task: shard, tensor key, byte offset, shape, dtype, version
                                   (a digest of its content), score and `TaskMeta` (each distinct one
                                   stored once: a family's tasks share it); every shard's digest;
                                   the backbone's name and the shape of its config PEFT needs
  root/shards/<time>-<rand>.safetensors
                                   up to `shard_bytes` of prompts each, tensors named by task

Publishing is atomic per shard: a changed shard is written under a NEW name (a temp file renamed in,
so no reader ever sees half a shard) and then the index is replaced with one `os.replace`. A reader
sees the old index or the new one, and every shard either names. Files of the index before the
current one are kept (a reader that opened it can still read them); older ones are deleted when the
next index is published, as `tuner.export` prunes versions. Writers take a lock file in turn.

Re-exporting rewrites only shards that hold a changed, new or removed task: an unchanged task (same
content digest) stays where it is and its shard file is not touched. A changed task moves to a new
shard, and so does every other live task of a shard it leaves (which is dropped whole), so shards
do not fill with dead bytes and the writer holds at most one shard in memory.

Reading (`PackedIndex`) parses index.json alone (bounded); `read_prompt` opens one shard (a regular
file inside the store, never through a symlink out of it), reads that shard's safetensors header,
checks the entry against it and hands the reader's `check` an `AdapterHeader` before it reads exactly
that tensor's bytes. Task names are validated (`tuner.schema.validate_name`); the only names joined
into paths are the shard names this module generates (and the index's are checked against their
pattern).

Rooms: `reader` (the format, `PackedIndex`), `writer` (`write_packed_store`). This package does not
serve, evaluate or decide which format a run is exported in (that is `tuner.run_adapters`, which
also reads a store of either format).
"""

from tuner.prompt_store.reader import (
    DEFAULT_SHARD_BYTES,
    INDEX,
    MAX_INDEX_BYTES,
    SHARDS,
    PackedEntry,
    PackedIndex,
    PackedStoreError,
    is_packed_store,
)
from tuner.prompt_store.writer import StoreWrite, write_packed_store

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "INDEX",
    "MAX_INDEX_BYTES",
    "SHARDS",
    "PackedEntry",
    "PackedIndex",
    "PackedStoreError",
    "StoreWrite",
    "is_packed_store",
    "write_packed_store",
]
