"""Reading a task's rows: local files (tsv, csv, jsonl, txt, line-aligned parallel text, CoNLL) or a Hub dataset.

Every local file is opened by `open_text`, the one place text is decoded: in the task's `data.encoding`
(utf-8 by default) with a leading byte-order mark dropped, whatever the encoding. `promptfleet
validate` (`check_columns`, which reads only each split's header or first rows) and training
(`read_rows`, which reads all rows and renames columns, per split when the splits name them
differently) parse a file with the same function, so they see the same column names: a header
`validate` accepts is the header training reads. A field the template, label or target need that a
split lacks is a one-line `ConfigError` naming the split, its file and the columns it has (a name
with an invisible character shown escaped, `'\\ufeffQuality'`).

It does not build examples or tokenise (`tuner.tasks.spec`, `tuner.tasks.data`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tuner.config import ConfigError, one_line, shown
from tuner.tasks.kinds.ner import is_iob2
from tuner.tasks.templates import template_fields

if TYPE_CHECKING:
    from tuner.tasks.spec import DataSource, TaskSpec

SPLITS = ("train", "eval")
BOM = "\ufeff"  # U+FEFF at the start of a file: a byte-order mark, never data (Excel and Notepad write one)


def check_encoding(encoding: str) -> str:
    """`encoding` if Python decodes text with it (`utf-8`, `latin-1`, `cp1252`, `utf-16`...); else a
    one-line `ConfigError`. Codecs that are not text encodings (`base64`, `rot13`) are refused too."""
    try:
        io.TextIOWrapper(io.BytesIO(), encoding=encoding)  # the check `open` makes (b"".decode skips it)
    except LookupError:
        raise ConfigError(
            f"data.encoding={encoding!r}: not a text encoding Python knows (e.g. utf-8, latin-1, "
            "cp1252, utf-16)"
        ) from None
    return encoding


@contextmanager
def open_text(path: str | Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """`path` opened as text in `encoding` (universal newlines), past a leading byte-order mark.

    The one place a task's local data files are decoded: the header `validate` reads and the
    rows training reads come through here, so a BOM can never be part of one and not the other.
    """
    with open(path, encoding=encoding) as f:
        if f.read(1) != BOM:
            f.seek(0)
        yield f


def split_path(spec: TaskSpec, split: str) -> str:
    """The file (or Hub split name) `split` reads from."""
    return spec.data.train if split == "train" else spec.data.eval


def _unreadable(spec: TaskSpec, split: str, path: str, e: Exception) -> ConfigError:
    """The one-line error for a data file that cannot be parsed (bad bytes, ragged rows, not JSON)."""
    hint = ""
    if isinstance(e, UnicodeDecodeError):
        hint = f"; it is not {spec.data.encoding} text: set the task's data.encoding (e.g. latin-1, cp1252)"
    return ConfigError(f"task {spec.name}: cannot read its {split} file {path} ({one_line(e)}{hint})")


def read_rows(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Read the raw rows of `split` ("train" or "eval") as dicts, renamed per `TaskSpec.columns_of`.

    A column the renames, the template, the label or the target need but the data lacks is a
    `ConfigError` naming the split, its file and the columns it has (`check_row_columns`).
    """
    if spec.family_member is not None:  # a task of a family: its rows of the family's table, read once
        return spec.family_member.rows(split)
    rows = raw_rows(spec, split)
    if rows:
        check_row_columns(spec, split, list(rows[0]))
    rows = [r for r in rows if not is_dropped(spec, r)]
    renames = spec.columns_of(split)
    for r in rows:
        for new, old in renames.items():
            r[new] = r[old]
    return rows


def is_dropped(spec: TaskSpec, row: dict[str, Any]) -> bool:
    """Whether `data.drop_if_true` drops `row` (any of its flags is true)."""
    return any(row.get(flag) for flag in spec.data.drop_if_true)


def raw_rows(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """The rows of `split` as the file (or Hub split) holds them: not renamed, nothing dropped."""
    src = spec.data
    path = split_path(spec, split)
    if not path:
        raise ConfigError(f"task {spec.name}: no {split} file configured")
    if src.format == "hub":
        import datasets

        datasets.disable_progress_bars()
        rows = list(datasets.load_dataset(src.hub_id, src.hub_config or None, split=path))
    else:
        try:
            rows = _read_local(spec, split, path)
        except ConfigError:
            raise
        except Exception as e:  # bad bytes, ragged rows, a line that is not a JSON object...
            raise _unreadable(spec, split, path, e) from None
    return rows


def _read_local(spec: TaskSpec, split: str, path: str) -> list[dict[str, Any]]:
    """The rows of a local data file of `spec`'s format (`read_rows`)."""
    src = spec.data
    enc = src.encoding
    if src.format in ("tsv", "csv"):
        return read_delimited(path, _separator(src), enc)
    if src.format == "jsonl":
        return _with_all_columns(list(_jsonl_rows(path, enc)))
    if src.format == "txt":
        return [{"text": line} for line in read_lines(path, enc)]
    if src.format == "conll":
        return read_conll(path, src.token_column, src.tag_column, encoding=enc)
    # parallel_txt
    tgt = src.train_target if split == "train" else src.eval_target
    source, target = read_lines(path, enc), read_lines(tgt, enc)
    pairs = [(s, t) for s, t in zip(source, target) if s.strip() or t.strip()]
    if len(source) - len(target) not in (-1, 0, 1) or not pairs:
        raise ConfigError(f"task {spec.name}: {path} and {tgt} are not line-aligned")
    return [{"source": s, "target": t} for s, t in pairs]


def _separator(src: DataSource) -> str:
    return src.delimiter or ("\t" if src.format == "tsv" else ",")


def read_delimited(
    path: str | Path, sep: str, encoding: str = "utf-8", header_only: bool = False
) -> list[dict[str, Any]] | list[str]:
    """The rows of a csv/tsv file (pandas' parser: numbers and booleans typed as pandas infers them,
    empty cells ""), or with `header_only` its column names exactly as those rows have them."""
    import datasets
    import pandas as pd

    with open_text(path, encoding) as f:
        # quoting=3 (QUOTE_NONE): the GLUE TSVs contain bare quote characters.
        df = pd.read_csv(f, sep=sep, quoting=3, keep_default_na=False, nrows=0 if header_only else None)
    if header_only:
        return [str(c) for c in df.columns]
    # through Arrow, as `datasets` always read them: plain Python values (int, not numpy.int64)
    return list(datasets.Dataset.from_pandas(df, preserve_index=False))


def read_lines(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file without their line breaks (blank lines kept)."""
    with open_text(path, encoding) as f:
        return [line.rstrip("\n") for line in f]


def _jsonl_rows(path: str | Path, encoding: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-blank line; anything else is a ConfigError."""
    with open_text(path, encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: not a JSON object: {line.strip()[:60]!r}")
            yield row


def _with_all_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that all have every column some row has (None where a row lacks it), as a table has."""
    columns = dict.fromkeys(k for r in rows for k in r)
    return [r if len(r) == len(columns) else {c: r.get(c) for c in columns} for r in rows]


def check_row_columns(spec: TaskSpec, split: str, columns: list[str]) -> None:
    """Raise one-line `ConfigError` if a split whose rows have `columns` lacks a needed field.

    Checks the renames' source columns and, after renaming, every field of
    `TaskSpec.required_fields`. Shared by `read_rows` (all rows read) and `check_columns`
    (header or first rows only). Column names with an invisible character are shown escaped.
    """
    renames = spec.columns_of(split)
    where = f"task {spec.name}: {split} split ({split_path(spec, split)})"
    have = ", ".join(shown(c) for c in columns) or "none"
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
    """The columns of `split` from its header or first rows (None for Hub datasets: not read),
    parsed as `read_rows` parses the whole file."""
    src = spec.data
    path = split_path(spec, split)
    if src.format == "hub":
        return None
    if src.format == "txt":
        return ["text"]
    if src.format == "parallel_txt":
        return ["source", "target"]
    try:
        if src.format == "conll":
            first = read_conll(path, src.token_column, src.tag_column, max_sentences=1, encoding=src.encoding)
            return list(first[0]) if first else []
        if src.format in ("tsv", "csv"):
            return read_delimited(path, _separator(src), src.encoding, header_only=True)
        rows = list(islice(_jsonl_rows(path, src.encoding), max_rows))
        return list(dict.fromkeys(k for r in rows for k in r))
    except ConfigError:
        raise
    except Exception as e:  # bad bytes in the header, a header pandas cannot parse
        raise _unreadable(spec, split, path, e) from None


def check_columns(spec: TaskSpec) -> None:
    """Check every configured split's header or first rows against the task (`promptfleet validate`)."""
    for split in SPLITS:
        if not split_path(spec, split):
            continue
        columns = peek_columns(spec, split)
        if columns is not None:
            check_row_columns(spec, split, columns)


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    max_sentences: int = 0,
    encoding: str = "utf-8",
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

    with open_text(path, encoding) as f:
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
