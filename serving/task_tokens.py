"""Token ids of a task's own text, kept per task version: its prefix, tokenised once instead of on
every request, and its verbaliser words.

A served prompt must be the ids training gave the same text, and training tokenises `prefix + input`
as one string (`tuner.tasks.data.tokenize`): the prefix's ids cannot simply be put in front, since a
tokenizer may merge across the boundary. The prefix is cut instead where no tokenisation crosses
(`stable_cut`): the last place a non-whitespace character is followed by a space, tab or newline.
With byte-level BPE on GPT-2's pre-tokenisation regex (SmolLM2's tokenizer; `splits_exactly` checks
a tokenizer for it) no pre-token spans such a place, and none before it depends on the text after
it, so for every `rest`

    encode(prefix + rest) == encode(prefix[:cut]) + encode(prefix[cut:] + rest)

and a request encodes only the prefix's short tail and its own text. A tokenizer not known to split
exactly (a Llama-3-style regex merges punctuation with the newlines after it) gets the whole rendered
prompt encoded per request, as before; the registry bounds the prefix's length either way.

The cache holds one version per task, in an LRU bounded by the ids it holds; it is thread-safe (the
engine tokenises in worker threads, its prompt-store loader warms and forgets). It does not render
prompts (`tuner.export.TaskMeta.render` does).
"""

from __future__ import annotations

import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from serving.registry import IndexedTask, TaskEntry

Task = IndexedTask | TaskEntry  # what is read of it: name, version, meta (never the prompt)

CACHE_IDS = 1 << 22  # token ids held for all tasks together (16 MiB: int32 each)
_BREAKS = " \t\n\r"  # whitespace every tokenizer's `\s` matches


def stable_cut(prefix: str) -> int:
    """The last index `c` where `prefix[c - 1]` is not whitespace and `prefix[c]` is a space, tab,
    carriage return or newline; 0 if there is none."""
    for c in range(len(prefix) - 1, 0, -1):
        if prefix[c] in _BREAKS and not prefix[c - 1].isspace():
            return c
    return 0


def splits_exactly(tokenizer) -> bool:
    """Whether a prefix may be tokenised apart at `stable_cut` with `tokenizer`: a fast tokenizer
    without a normaliser, pre-tokenised by ByteLevel on GPT-2's regex without an added prefix space
    (and optionally Digits), a BPE model without dropout, and added tokens that hold no whitespace and
    strip none around them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    try:
        pre = json.loads(backend.pre_tokenizer.__getstate__())
        added = list(backend.get_added_tokens_decoder().values())
    except Exception:  # another binding's objects: not one we know
        return False
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds.count("ByteLevel") != 1 or set(kinds) - {"ByteLevel", "Digits"}:
        return False
    byte_level = parts[kinds.index("ByteLevel")]
    if not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        return False
    if type(backend.model).__name__ != "BPE" or getattr(backend.model, "dropout", None):
        return False
    return not any(t.lstrip or t.rstrip or any(ch.isspace() for ch in t.content) for t in added)


@dataclass(frozen=True)
class _TaskTokens:
    version: Hashable
    head: array  # the ids of prefix[:cut]
    tail: str  # prefix[cut:], encoded with each request's text
    labels: dict[str, list[int]]  # label -> the ids of its verbaliser words

    @property
    def size(self) -> int:
        return 1 + len(self.head) + sum(len(ids) for ids in self.labels.values())


class TaskTokenCache:
    def __init__(self, encode: Callable[[str], list[int]], split: bool, capacity_ids: int = CACHE_IDS):
        """Args:
        encode: text -> token ids (no special tokens), as the engine encodes prompts.
        split: whether the prefix may be encoded apart at `stable_cut` (`splits_exactly`).
        capacity_ids: the LRU's bound, in ids held (one task larger than it is still kept, alone).
        """
        self._encode = encode
        self.split = split
        self.capacity_ids = capacity_ids
        self._entries: OrderedDict[str, _TaskTokens] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def prompt_ids(self, entry: Task, rendered: str, raw: bool = False) -> list[int]:
        """`encode(rendered)` for a prompt rendered with `entry`'s metadata (its prefix, then the
        request's input; `raw`: the request's text alone), without encoding the prefix again."""
        prefix = entry.meta.prefix
        if raw or not self.split or not prefix or not rendered.startswith(prefix):
            return self._encode(rendered)
        tokens = self._get(entry)
        return [*tokens.head, *self._encode(tokens.tail + rendered[len(prefix) :])]

    def label_ids(self, entry: Task) -> dict[str, list[int]]:
        """Each label's verbaliser words as ids (shared: do not modify)."""
        return self._get(entry).labels

    def warm(self, entry: Task) -> None:
        """Tokenise `entry`'s version now (the prompt-store loader does, off the request path)."""
        self._get(entry)

    def forget(self, names: Iterable[str]) -> None:
        """Drop what is held for these tasks (changed or removed)."""
        with self._lock:
            for name in names:
                self._drop(name)

    @property
    def held_ids(self) -> int:
        return self._held

    def _get(self, entry: Task) -> _TaskTokens:
        with self._lock:
            tokens = self._entries.get(entry.name)
            if tokens is not None and tokens.version == entry.version:
                self._entries.move_to_end(entry.name)
                return tokens
        tokens = self._tokenize(entry)  # outside the lock: a long prefix takes milliseconds
        with self._lock:
            self._drop(entry.name)
            self._entries[entry.name] = tokens
            self._held += tokens.size
            while self._held > self.capacity_ids and len(self._entries) > 1:
                self._drop(next(iter(self._entries)))
        return tokens

    def _tokenize(self, entry: Task) -> _TaskTokens:
        meta = entry.meta
        labels = {label: self._encode(words) for label, words in meta.verbaliser.items()}
        cut = stable_cut(meta.prefix) if self.split else 0
        head = self._encode(meta.prefix[:cut]) if cut else []
        if cut and head + self._encode(meta.prefix[cut:]) != self._encode(meta.prefix):
            cut, head = 0, []  # a second check, on the prefix itself: never serve other ids than training
        return _TaskTokens(entry.version, array("i", head), meta.prefix[cut:], labels)

    def _drop(self, name: str) -> None:
        tokens = self._entries.pop(name, None)
        if tokens is not None:
            self._held -= tokens.size
