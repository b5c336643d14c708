"""Named-entity recognition (NER) as text generation: IOB2 tags in, tagged spans out, entity-level scores.

A sentence's IOB2 tags become a target text listing its entities in order,
`"EU [ORG] | German [MISC] | British [MISC]"` (`"none"` when there is none), so an NER task trains
in the mixed batch like any generation task. `parse_entities` maps a generated text back to one
IOB2 tag per word: each `words [TYPE]` piece is located in the sentence (in order, without
overlap); a piece that is malformed, names an unknown type or is not found gives no entity, and
nothing a model writes can make it raise. `entity_metrics` scores the tags with `seqeval`
(entity-level precision / recall / F1 and the per-type table).

`Ner` is the task kind: a row needs `tokens` and `tags` (CoNLL files are read by
`tuner.tasks.readers.read_conll`); evaluation decodes greedily (the examples of all NER tasks
together, `DecodedKind`) and scores the parsed tags.
It does not tokenise or batch (see `tuner.tasks.data`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuner.config import ConfigError
from tuner.tasks.kinds.base import DecodedKind

if TYPE_CHECKING:
    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskExample, TaskSpec

NO_ENTITIES = "none"  # the target text of a sentence without entities
SEPARATOR = " | "
_PIECE = re.compile(r"^(?P<words>.*\S)\s*\[(?P<type>[^\[\]]+)\]$")


@dataclass(frozen=True)
class Entity:
    """A typed span of words `[start, end)`."""

    type: str
    start: int
    end: int


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


def sentence_entity_f1(gold: list[str], pred: list[str]) -> float:
    """One sentence's entity F1 (type and both boundaries must match; 1.0 when neither has an entity):
    a predictions file's per-example score."""
    g, p = set(iob2_entities(gold)), set(iob2_entities(pred))
    return 2 * len(g & p) / (len(g) + len(p)) if g or p else 1.0


class Ner(DecodedKind):
    name = "ner"
    metrics = ("entity_f1",)

    def required_fields(self, spec: TaskSpec, split: str) -> list[str]:
        return ["tokens", "tags"]

    def target_text(self, spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
        words, tags = row["tokens"], row["tags"]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise ConfigError(f"task {spec.name}: `tokens` and `tags` must be lists of the same length")
        bad = next((t for t in tags if not is_iob2(t)), None)
        if bad is not None:
            raise ConfigError(f"task {spec.name}: tag {bad!r} is not IOB2 (O, B-TYPE or I-TYPE)")
        return spec.target_prefix + render_entities(words, tags, spec.verbaliser), None

    def fill_example(self, example: TaskExample, row: dict[str, Any]) -> None:
        example.words, example.tags = list(row["tokens"]), list(row["tags"])

    def score(self, data: TaskData, hyps: list[str]) -> dict:
        names = data.spec.verbaliser
        pred = [parse_entities(h, e.words, names) for h, e in zip(hyps, data.eval_text)]
        return entity_metrics([e.tags for e in data.eval_text], pred)

    def judge(self, data: TaskData, hyps: list[str]) -> list[tuple[bool, dict]]:
        out = []
        for h, e in zip(hyps, data.eval_text, strict=True):
            pred = parse_entities(h, e.words, data.spec.verbaliser)
            out.append((pred == e.tags, {"entity_f1": sentence_entity_f1(e.tags, pred)}))
        return out
