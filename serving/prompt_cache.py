"""Task prompts read on first use and kept in an LRU bounded by bytes, beside the prefix KV LRU.

A store of 100,000 tasks is indexed at start (`serving.registry`: names, versions, metadata and the
shapes its headers declare), not read: a task's prompt tensor is read the first time a request
names it and kept here, keyed by (task, version), so a reloaded task never hits a stale prompt. The
LRU is bounded by `engine.prompt_cache_bytes` (the loaded fp32 bytes); an evicted prompt is read
again on its next use. Concurrent requests for a task not yet loaded share one read.

`PromptReads` runs those reads for the request path on a small pool of its own threads: the event
loop never waits on disk, the engine thread never does either (a request enters the scheduler only
with its prompt in memory, `TaskEntry.prompt`), and a slow read holds up only the requests of its
task (not the tokenising threads of `asyncio.to_thread`). Reading and checking a prompt is the
registry's `read` callable; this module only keeps tensors and counts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from serving.prefix_cache import BytesLRU

READ_THREADS = 2  # prompt reads in flight at once (each is one small file or one slice of a shard)


class Loaded(Protocol):
    """What the cache holds (`serving.registry.TaskEntry` is one)."""

    name: str
    version: Hashable
    prompt: torch.Tensor


class Indexed(Protocol):
    """What names a prompt to read (`serving.registry.IndexedTask` is one)."""

    name: str
    version: Hashable


@dataclass
class PromptCacheStats:
    hits: int = 0  # found loaded (or joined a read already in flight)
    misses: int = 0  # read from the store
    evictions: int = 0  # dropped to stay within the bound (read again on next use)
    bytes: int = 0  # held now
    entries: int = 0


class PromptCache(BytesLRU):
    def __init__(self, read: Callable[[Indexed], Loaded], capacity_bytes: int | None):
        """Args:
        read: reads and checks one task's prompt (blocking); raises if it cannot be served.
        capacity_bytes: the LRU's bound in prompt bytes (None: unbounded, every prompt stays; 0:
            none stays, every use reads). A prompt larger than the bound is served, not kept.
        """
        super().__init__(capacity_bytes, PromptCacheStats(), _nbytes)
        self._read = read
        self._reading: dict[tuple[str, Hashable], Future] = {}
        self._lock = threading.Lock()

    def peek(self, task: Indexed) -> Loaded | None:
        """The loaded prompt of `task`'s version if it is held (a hit), else None; never reads."""
        with self._lock:
            return self._hit((task.name, task.version))

    def _hit(self, key: tuple[str, Hashable]) -> Loaded | None:
        """The held prompt of `key`, counted as a hit and made most recent; None if not held (lock held)."""
        loaded = self._entries.get(key)
        if loaded is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
        return loaded

    def holds(self, name: str) -> bool:
        """Whether any version of `name` is held (a task in use: its new version is read at reload)."""
        with self._lock:
            return any(k[0] == name for k in self._entries)

    def get(self, task: Indexed) -> Loaded:
        """The loaded prompt of `task`'s version, read now if it is not held (blocking)."""
        key = (task.name, task.version)
        with self._lock:
            loaded = self._hit(key)
            if loaded is not None:
                return loaded
            reading = self._reading.get(key)
            if reading is None:
                reading = self._reading[key] = Future()
                self.stats.misses += 1
                mine = True
            else:
                self.stats.hits += 1  # another request of this task is reading it: share that read
                mine = False
        if not mine:
            return reading.result()
        try:
            loaded = self._read(task)
        except BaseException as e:
            with self._lock:
                del self._reading[key]
            reading.set_exception(e)
            raise
        with self._lock:
            del self._reading[key]
            self._put(key, loaded)
        reading.set_result(loaded)
        return loaded

    def put(self, loaded: Loaded) -> None:
        """Hold an already loaded prompt (the registry reads a changed task in use at reload)."""
        with self._lock:
            self._put((loaded.name, loaded.version), loaded)

    def discard(self, name: str, keep: Hashable | None = None) -> None:
        """Drop every version of `name` except `keep` (the task changed or was removed)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == name and k[1] != keep]:
                self._drop(key)


def _nbytes(loaded: Loaded) -> int:
    return loaded.prompt.numel() * loaded.prompt.element_size()


class PromptReads:
    """The request path's prompt reads, on threads of their own (see the module docstring)."""

    def __init__(self, cache: PromptCache, load: Callable[[Indexed], Loaded], threads: int = READ_THREADS):
        """Args:
        cache: where loaded prompts are held (a hit is answered at once, on the caller's thread).
        load: reads through `cache` (blocking), as `serving.registry.PromptRegistry.load` does.
        """
        self.cache = cache
        self._load = load
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def loaded(self, task: Indexed) -> Loaded:
        """`task`'s prompt in memory: at once if it is held, else after a read off this thread."""
        held = self.cache.peek(task)
        if held is not None:
            return held
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="prompt-read")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load, task)

    def close(self) -> None:
        """Stop taking reads (one in progress ends on its own; a later `loaded` starts a new pool)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
