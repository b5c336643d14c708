"""Named-entity recognition as text generation: CoNLL files in, tagged spans out, entity-level scores.

A sentence's IOB2 tags become a target text listing its entities in order,
`"EU [ORG] | German [MISC] | British [MISC]"` (`"none"` when there is none), so an NER task trains
in the mixed batch like any generation task. `parse_entities` maps a generated text back to one
IOB2 tag per word: each `words [TYPE]` piece is located in the sentence (in order, without
overlap); a piece that is malformed, names an unknown type or is not found gives no entity, and
nothing a model writes can make it raise. `entity_metrics` scores the tags with `seqeval`
(entity-level precision / recall / F1 and the per-type table).

It does not tokenise, generate or batch (see `tuner.tasks.data`, `tuner.evaluate`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuner.config import ConfigError

NO_ENTITIES = "none"  # the target text of a sentence without entities
SEPARATOR = " | "
_PIECE = re.compile(r"^(?P<words>.*\S)\s*\[(?P<type>[^\[\]]+)\]$")


@dataclass(frozen=True)
class Entity:
    """A typed span of words `[start, end)`."""

    type: str
    start: int
    end: int


def read_conll(
    path: str | Path, token_column: int = 0, tag_column: int = -1, max_sentences: int = 0
) -> list[dict]:
    """Sentences of a CoNLL column file as rows `{"tokens", "tags", "text"}`.

    One token per line, columns separated by whitespace, a blank line between sentences;
    `-DOCSTART-` lines are skipped. `text` is the tokens joined by single spaces. A tag that is
    not IOB2, or a missing column, is a `ConfigError` naming the line. `max_sentences` stops
    early (0 = all).
    """
    rows: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if tokens:
            rows.append({"tokens": list(tokens), "tags": list(tags), "text": " ".join(tokens)})
        tokens.clear()
        tags.clear()

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                flush()
                if max_sentences and len(rows) >= max_sentences:
                    return rows
                continue
            try:
                token, tag = cols[token_column], cols[tag_column]
            except IndexError:
                raise ConfigError(
                    f"{path}:{lineno}: no column {tag_column} (the line has {len(cols)} columns)"
                ) from None
            if not is_iob2(tag):
                raise ConfigError(f"{path}:{lineno}: tag {tag!r} is not IOB2 (O, B-TYPE or I-TYPE)")
            tokens.append(token)
            tags.append(tag)
    flush()
    return rows[:max_sentences] if max_sentences else rows


def is_iob2(tag: object) -> bool:
    """Whether `tag` is an IOB2 tag: `O`, `B-TYPE` or `I-TYPE`."""
    return isinstance(tag, str) and (tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2))


def iob2_entities(tags: list[str]) -> list[Entity]:
    """The entities of an IOB2 tag sequence.

    `B-X` always starts an entity; `I-X` continues the open entity of type X, or starts one
    when none is open (an `I-` without `B-`, as conlleval and seqeval's default mode read it);
    `O` or a change of type closes it; the sentence end closes the last one.
    """
    out: list[Entity] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and t == kind
        if start is not None and not continues:
            out.append(Entity(kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and start is None:
            start, kind = i, t
    return out


def entities_to_iob2(entities: list[Entity], length: int) -> list[str]:
    """IOB2 tags of `length` words holding `entities` (non-overlapping)."""
    tags = ["O"] * length
    for e in entities:
        tags[e.start] = f"B-{e.type}"
        for i in range(e.start + 1, e.end):
            tags[i] = f"I-{e.type}"
    return tags


def render_entities(words: list[str], tags: list[str], names: Mapping[str, str] | None = None) -> str:
    """The target text of a sentence: `"w w [TYPE] | w [TYPE]"`, or `NO_ENTITIES`.

    `names` maps a tag type to the word written for it (default: the type itself).
    """
    names = names or {}
    pieces = [
        f"{' '.join(words[e.start : e.end])} [{names.get(e.type, e.type)}]" for e in iob2_entities(tags)
    ]
    return SEPARATOR.join(pieces) if pieces else NO_ENTITIES


def parse_entities(text: str, words: list[str], names: Mapping[str, str] | None = None) -> list[str]:
    """IOB2 tags for `words` read from a generated `text` (see `render_entities`).

    Pieces are matched to the sentence left to right: each is searched after the previous
    match first, then anywhere; one that overlaps an entity already placed is dropped.
    """
    to_type = {v.strip(): k for k, v in (names or {}).items()}
    known = set(to_type) if to_type else None
    taken = [False] * len(words)
    found: list[Entity] = []
    cursor = 0
    for piece in text.split(SEPARATOR.strip()):
        m = _PIECE.match(piece.strip())
        if not m:
            continue
        label = m["type"].strip()
        if known is not None and label not in known:
            continue
        span = m["words"].split()
        n = len(span)
        starts = [i for i in range(len(words) - n + 1) if words[i : i + n] == span]
        starts = [i for i in starts if not any(taken[i : i + n])]
        if not starts:
            continue
        start = next((i for i in starts if i >= cursor), starts[0])
        found.append(Entity(to_type.get(label, label), start, start + n))
        taken[start : start + n] = [True] * n
        cursor = start + n
    return entities_to_iob2(sorted(found, key=lambda e: e.start), len(words))


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level micro precision / recall / F1 and a per-type table, computed by `seqeval`.

    An entity counts as found only when its type and both boundaries match (conlleval rules).
    """
    from seqeval.metrics import classification_report

    if not gold or not any(iob2_entities(g) for g in gold):
        return {"precision": 0.0, "recall": 0.0, "entity_f1": 0.0, "per_label": {}, "n": len(gold)}
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    per_label = {
        t: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for t, v in sorted(report.items())
        if not t.endswith(" avg")
    }
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "entity_f1": float(micro["f1-score"]),
        "per_label": per_label,
        "n": len(gold),
    }
