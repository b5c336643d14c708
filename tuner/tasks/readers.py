"""Reading a task's rows: local files (tsv, csv, jsonl, txt, line-aligned parallel text, CoNLL) or a Hub dataset.

`read_rows` reads a split through `datasets` (or `read_conll` for CoNLL column files) and renames its
columns (per split when the splits name them differently). `check_columns` reads only each split's
header or first rows and names any field the template, label or target need that the data lacks
(what `promptfleet validate` runs). It does not build examples or tokenise (`tuner.tasks.spec`,
`tuner.tasks.data`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.config import ConfigError, one_line
from tuner.tasks.kinds.ner import is_iob2
from tuner.tasks.templates import template_fields

if TYPE_CHECKING:
    from tuner.tasks.spec import TaskSpec

SPLITS = ("train", "eval")


def split_path(spec: TaskSpec, split: str) -> str:
    """The file (or Hub split name) `split` reads from."""
    return spec.data.train if split == "train" else spec.data.eval


def read_rows(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Read the raw rows of `split` ("train" or "eval") as dicts, renamed per `TaskSpec.columns_of`.

    A column the renames, the template, the label or the target need but the data lacks is a
    `ConfigError` naming the split, its file and the columns it has (`check_row_columns`).
    """
    import datasets

    datasets.disable_progress_bars()
    src = spec.data
    path = split_path(spec, split)
    if not path:
        raise ConfigError(f"task {spec.name}: no {split} file configured")
    if src.format == "hub":
        rows = list(datasets.load_dataset(src.hub_id, src.hub_config or None, split=path))
    else:
        try:
            rows = _read_local(spec, split, path)
        except ConfigError:
            raise
        except Exception as e:  # bad bytes, ragged rows, a line that is not a JSON object...
            raise ConfigError(
                f"task {spec.name}: cannot read its {split} file {path} ({one_line(e)})"
            ) from None
    if rows:
        check_row_columns(spec, split, list(rows[0]))
    for flag in src.drop_if_true:
        rows = [r for r in rows if not r.get(flag)]
    renames = spec.columns_of(split)
    for r in rows:
        for new, old in renames.items():
            r[new] = r[old]
    return rows


def _read_local(spec: TaskSpec, split: str, path: str) -> list[dict[str, Any]]:
    """The rows of a local data file of `spec`'s format (`read_rows`)."""
    import datasets

    src = spec.data
    if src.format in ("tsv", "csv"):
        sep = src.delimiter or ("\t" if src.format == "tsv" else ",")
        # quoting=3 (QUOTE_NONE): the GLUE TSVs contain bare quote characters.
        ds = datasets.load_dataset(
            "csv", data_files=path, sep=sep, quoting=3, split="train", keep_default_na=False
        )
        rows = list(ds)
    elif src.format == "jsonl":
        rows = list(datasets.load_dataset("json", data_files=path, split="train"))
    elif src.format == "txt":
        rows = [{"text": r["text"]} for r in datasets.load_dataset("text", data_files=path, split="train")]
    elif src.format == "conll":
        rows = read_conll(path, src.token_column, src.tag_column)
    else:  # parallel_txt
        tgt = src.train_target if split == "train" else src.eval_target
        source = datasets.load_dataset("text", data_files=path, split="train")["text"]
        target = datasets.load_dataset("text", data_files=tgt, split="train")["text"]
        pairs = [(s, t) for s, t in zip(source, target) if s.strip() or t.strip()]
        if len(source) - len(target) not in (-1, 0, 1) or not pairs:
            raise ConfigError(f"task {spec.name}: {path} and {tgt} are not line-aligned")
        rows = [{"source": s, "target": t} for s, t in pairs]
    return rows


def check_row_columns(spec: TaskSpec, split: str, columns: list[str]) -> None:
    """Raise one-line `ConfigError` if a split whose rows have `columns` lacks a needed field.

    Checks the renames' source columns and, after renaming, every field of
    `TaskSpec.required_fields`. Shared by `read_rows` (all rows read) and `check_columns`
    (header or first rows only).
    """
    renames = spec.columns_of(split)
    where = f"task {spec.name}: {split} split ({split_path(spec, split)})"
    have = ", ".join(columns) or "none"
    for new, old in renames.items():
        if old not in columns:
            raise ConfigError(
                f"{where}: column {old!r} (renamed to {new!r}) not in the data (columns: {have})"
            )
    available = set(columns) | set(renames)
    for name in spec.required_fields(split):
        if name not in available:
            role = "template field" if name in template_fields(spec.template) else "field"
            raise ConfigError(f"{where}: {role} {name!r} not in the data (columns: {have})")


def peek_columns(spec: TaskSpec, split: str, max_rows: int = 20) -> list[str] | None:
    """The columns of `split` from its header or first rows (None for Hub datasets: not read)."""
    src = spec.data
    path = split_path(spec, split)
    if src.format == "hub":
        return None
    if src.format == "txt":
        return ["text"]
    if src.format == "parallel_txt":
        return ["source", "target"]
    if src.format == "conll":
        first = read_conll(path, src.token_column, src.tag_column, max_sentences=1)
        return list(first[0]) if first else []
    with open(path, encoding="utf-8") as f:
        if src.format in ("tsv", "csv"):
            sep = src.delimiter or ("\t" if src.format == "tsv" else ",")
            return [c.strip() for c in f.readline().rstrip("\r\n").split(sep)]
        columns: dict[str, None] = {}
        for line, _ in zip(f, range(max_rows)):
            if line.strip():
                try:
                    columns.update(dict.fromkeys(json.loads(line)))
                except ValueError:
                    raise ConfigError(f"task {spec.name}: {path}: not JSON lines: {line[:60]!r}") from None
        return list(columns)


def check_columns(spec: TaskSpec) -> None:
    """Check every configured split's header or first rows against the task (`promptfleet validate`)."""
    for split in SPLITS:
        if not split_path(spec, split):
            continue
        columns = peek_columns(spec, split)
        if columns is not None:
            check_row_columns(spec, split, columns)


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
