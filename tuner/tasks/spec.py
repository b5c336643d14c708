"""Task definitions: where a task's data lives, how an example becomes text, what it is scored on.

A task is one YAML file (see `configs/tasks/`); adding a task needs no code. `TaskSpec.load`
validates it; `read_rows` reads a split's rows through `datasets` (local tsv/csv/jsonl/txt files
or a Hub dataset id) or `tuner.tasks.ner.read_conll` (CoNLL column files), renames its columns (per
split when the splits name them differently) and `build_examples` turns them into `TaskExample`s
(prompt text + target text, plus every reference and the gold tags for evaluation).
`check_columns` reads only each split's header or first rows and names any field the template,
label or target need that the data lacks (what `promptfleet validate` runs). Tokenisation and
batching live in `tuner.tasks.data`.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.config import ConfigError, from_dict, one_line, read_yaml, validate_name
from tuner.tasks.ner import is_iob2, read_conll, render_entities

LOCAL_FORMATS = ("tsv", "csv", "jsonl", "txt", "parallel_txt", "conll")
SPLITS = ("train", "eval")
# The headline metric of each task kind, and the ones it may choose instead.
KIND_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("chrf", "rouge_l", "exact_match"),
    "ner": ("entity_f1",),
}


@dataclass
class DataSource:
    format: str = field(
        default="jsonl",
        metadata={
            "doc": "tsv, csv, jsonl, txt (one example per line), parallel_txt (line-aligned source/target "
            "files), conll (CoNLL column files: rows `tokens`, `tags`, `text`) or hub."
        },
    )
    train: str = field(
        default="",
        metadata={"doc": "Train file (relative to the task file), or the Hub split name when format=hub."},
    )
    eval: str = field(default="", metadata={"doc": "Eval file or Hub split name."})
    train_target: str = field(default="", metadata={"doc": "parallel_txt only: the target-side train file."})
    eval_target: str = field(default="", metadata={"doc": "parallel_txt only: the target-side eval file."})
    hub_id: str = field(default="", metadata={"doc": "format=hub: dataset id, e.g. `glue` or `SetFit/sst2`."})
    hub_config: str = field(default="", metadata={"doc": "format=hub: dataset config name, e.g. `sst2`."})
    delimiter: str = field(
        default="", metadata={"doc": "csv/tsv: field separator (default `,` for csv, tab for tsv)."}
    )
    drop_if_true: list[str] = field(
        default_factory=list, metadata={"doc": "Drop rows where any of these boolean fields is true."}
    )
    token_column: int = field(default=0, metadata={"doc": "conll: the column holding the word."})
    tag_column: int = field(
        default=-1, metadata={"doc": "conll: the column holding the IOB2 tag (default: the last)."}
    )

    def __post_init__(self) -> None:
        if self.format not in (*LOCAL_FORMATS, "hub"):
            raise ConfigError(
                f"data.format={self.format!r}: expected one of {', '.join((*LOCAL_FORMATS, 'hub'))}"
            )
        if self.format == "hub" and not self.hub_id:
            raise ConfigError("data.format=hub needs data.hub_id")


@dataclass
class TaskSpec:
    name: str = field(
        default="", metadata={"doc": "Task name: the prompt's id in training, export and serving."}
    )
    kind: str = field(
        default="classification",
        metadata={
            "doc": "classification (verbaliser), generation (target field) or ner (IOB2 tags, "
            "generated as tagged spans; see tuner.tasks.ner)."
        },
    )
    data: DataSource = field(default_factory=DataSource, metadata={"doc": "Where the rows come from."})
    fields: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "Rename raw columns: {template_name: raw_column}."}
    )
    split_fields: dict[str, dict[str, str]] = field(
        default_factory=dict,
        metadata={
            "doc": "Per-split renames over `fields`, for splits that name columns differently: "
            "{train: {name: column}, eval: {name: column}}."
        },
    )
    description: str = field(
        default="", metadata={"doc": "Instruction placed before the demonstrations and the input."}
    )
    template: str = field(
        default="{text}", metadata={"doc": "Input template; `{name}` refers to (renamed) columns."}
    )
    label_field: str = field(
        default="label", metadata={"doc": "classification: the column holding the label."}
    )
    verbaliser: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "doc": "classification: label value -> words the model should produce. ner (optional): "
            "entity type -> the word written for it (default: the type itself)."
        },
    )
    target_field: str | list[str] = field(
        default="target",
        metadata={
            "doc": "generation: the column holding the target text, or a list of columns holding "
            "several references (training uses the first; evaluation scores against all)."
        },
    )
    target_prefix: str = field(
        default=" ", metadata={"doc": "generation: text put before the target (e.g. a space)."}
    )
    few_shot: int = field(
        default=0,
        metadata={
            "doc": "Demonstrations drawn from the train split (fixed seed) and placed before the input."
        },
    )
    metric: str = field(
        default="",
        metadata={
            "doc": "Headline metric: accuracy or macro_f1 (classification); chrf, rouge_l or "
            "exact_match (generation); entity_f1 (ner). Default: the kind's first."
        },
    )
    max_new_tokens: int = field(
        default=48, metadata={"doc": "generation, ner: tokens generated at evaluation."}
    )
    stop: list[str] = field(
        default_factory=list,
        metadata={
            "doc": "generation, ner: strings that end an answer at evaluation (e.g. a newline). "
            "The end-of-sequence token always does; whitespace before the answer never does."
        },
    )

    def __post_init__(self) -> None:
        validate_name("task name", self.name)
        if self.kind not in KIND_METRICS:
            raise ConfigError(f"task {self.name}: kind={self.kind!r}: expected {', '.join(KIND_METRICS)}")
        self.metric = self.metric or KIND_METRICS[self.kind][0]
        if self.metric not in KIND_METRICS[self.kind]:
            raise ConfigError(f"task {self.name}: metric {self.metric!r} does not fit a {self.kind} task")
        if self.kind == "classification" and len(self.verbaliser) < 2:
            raise ConfigError(f"task {self.name}: a classification task needs a verbaliser with >= 2 labels")
        self.verbaliser = {str(k): str(v) for k, v in self.verbaliser.items()}
        if self.kind == "classification":
            words = list(self.verbaliser.values())
            if not all(w.strip() for w in words):
                raise ConfigError(f"task {self.name}: every verbaliser word must be non-empty")
            if len(set(words)) < len(words):
                same = next(w for w in words if words.count(w) > 1)
                raise ConfigError(
                    f"task {self.name}: two labels have the verbaliser word {same!r} (one could never be predicted)"
                )
        if isinstance(self.target_field, str):
            self.target_field = [self.target_field]
        if not self.target_field or not all(isinstance(t, str) and t for t in self.target_field):
            raise ConfigError(f"task {self.name}: target_field must name one column or a list of columns")
        bad = sorted(set(self.split_fields) - set(SPLITS))
        if bad:
            raise ConfigError(
                f"task {self.name}: split_fields.{bad[0]}: expected a split ({', '.join(SPLITS)})"
            )
        for split, renames in self.split_fields.items():
            if not isinstance(renames, dict):
                raise ConfigError(
                    f"task {self.name}: split_fields.{split}: expected a mapping {{name: column}}"
                )
        if "" in self.stop:
            raise ConfigError(f"task {self.name}: stop: an empty string would stop every answer at once")
        try:
            names = check_template(self.template)
        except ValueError as e:
            raise ConfigError(f"task {self.name}: {e}") from None
        if not names:
            raise ConfigError(f"task {self.name}: template uses no field")

    @property
    def labels(self) -> list[str]:
        return list(self.verbaliser)

    @property
    def target_fields(self) -> list[str]:
        """The reference columns (generation): the first is also the training target."""
        return list(self.target_field)

    def columns_of(self, split: str) -> dict[str, str]:
        """The renames of `split`: {name: raw column}, `fields` overridden by `split_fields`."""
        return {**self.fields, **self.split_fields.get(split, {})}

    def required_fields(self, split: str) -> list[str]:
        """Every field (after renaming) a row of `split` must have."""
        need = template_fields(self.template)
        if self.kind == "classification":
            need.append(self.label_field)
        elif self.kind == "ner":
            need += ["tokens", "tags"]
        else:
            need += self.target_fields if split == "eval" else self.target_fields[:1]
        return list(dict.fromkeys(need))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskSpec:
        """Read a task YAML; relative data paths resolve against the task file's directory."""
        spec = from_dict(cls, read_yaml(path), where="")
        if spec.data.format != "hub":
            base = Path(path).resolve().parent
            for attr in ("train", "eval", "train_target", "eval_target"):
                v = getattr(spec.data, attr)
                if v:
                    setattr(spec.data, attr, str((base / v).resolve()))
        return spec

    def check_files(self) -> None:
        """Raise `ConfigError` naming the first missing data file."""
        if self.data.format == "hub":
            return
        for attr in ("train", "eval", "train_target", "eval_target"):
            v = getattr(self.data, attr)
            if v and not Path(v).is_file():
                raise ConfigError(f"task {self.name}: data file not found: {v}")
        if not self.data.train:
            raise ConfigError(f"task {self.name}: data.train is empty")


@dataclass
class TaskExample:
    """One example as text: `prompt` is what the model reads, `target` what it should write."""

    task: str
    prompt: str
    target: str
    label: str | None = None  # classification: the gold label key of the verbaliser
    references: list[str] = field(default_factory=list)  # generation, eval: every reference (stripped)
    words: list[str] = field(default_factory=list)  # ner: the sentence's words
    tags: list[str] = field(default_factory=list)  # ner: their gold IOB2 tags


# ------------------------------------------------------------------------------------ reading rows


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


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a template, in order of first use."""
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


def check_template(template: str) -> list[str]:
    """`template`'s field names, if it uses only plain `{name}` fields; ValueError otherwise.

    `str.format` would also take `{name:>99999999}` (a width that allocates gigabytes per row),
    `{name!r}`, `{name.attr}`, `{name[0]}` and positional `{}`; a task's template names columns, so
    none of these is needed and each is refused (in the task YAML and in a served adapter alike).
    """
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # an unmatched brace
        raise ValueError(f"template {template[:80]!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name or spec or conversion:
            raw = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"template field {raw[:80]!r}: only plain {{name}} fields are allowed")
    return list(dict.fromkeys(name for _, name, _, _ in parsed if name))


def render_input(template: str, prefix: str, values: Mapping[str, Any]) -> str:
    """The text the model reads for one input of a task, in training AND in serving.

    `prefix` (description and demonstrations, see `task_prefix`), then `template` with each
    `{field}` set to its value, stripped (None -> ""). Training calls it with a data row;
    serving (`tuner.export.TaskMeta.render`) with the fields of a request.
    """
    return prefix + template.format(**{k: ("" if v is None else str(v).strip()) for k, v in values.items()})


def format_input(spec: TaskSpec, row: dict[str, Any], prefix: str = "") -> str:
    """`render_input` for a data row of `spec`; a template field missing from the data is a ConfigError."""
    try:
        return render_input(spec.template, prefix, row)
    except KeyError as e:
        raise ConfigError(
            f"task {spec.name}: template field {e} not in the data (has {', '.join(row)})"
        ) from None


def target_text(spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
    """The text the model should write for `row` (and its label key, for classification)."""
    if spec.kind == "classification":
        if spec.label_field not in row:
            raise ConfigError(f"task {spec.name}: label field {spec.label_field!r} not in the data")
        label = str(row[spec.label_field]).strip()
        if label not in spec.verbaliser:
            raise ConfigError(f"task {spec.name}: label {label!r} has no verbaliser entry")
        return spec.verbaliser[label], label
    if spec.kind == "ner":
        words, tags = row["tokens"], row["tags"]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise ConfigError(f"task {spec.name}: `tokens` and `tags` must be lists of the same length")
        bad = next((t for t in tags if not is_iob2(t)), None)
        if bad is not None:
            raise ConfigError(f"task {spec.name}: tag {bad!r} is not IOB2 (O, B-TYPE or I-TYPE)")
        return spec.target_prefix + render_entities(words, tags, spec.verbaliser), None
    first = spec.target_fields[0]
    if first not in row:
        raise ConfigError(f"task {spec.name}: target field {first!r} not in the data")
    return spec.target_prefix + _text(row[first]), None


def references(spec: TaskSpec, row: dict[str, Any]) -> list[str]:
    """Every reference of an eval row (generation: one per target field, empty ones left out)."""
    if spec.kind != "generation":
        return []
    refs = [_text(row.get(f)) for f in spec.target_fields]
    return [r for r in refs if r] or refs[:1]


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def task_prefix(spec: TaskSpec, train_rows: list[dict[str, Any]], seed: int = 0) -> str:
    """The fixed text before every input: the description, then `few_shot` demonstrations
    drawn (seeded) from the train split. The same for every example, so serving reuses it."""
    prefix = spec.description.strip() + "\n\n" if spec.description.strip() else ""
    if spec.few_shot:
        demo_rng = random.Random(f"demos-{seed}-{spec.name}")
        for r in demo_rng.sample(train_rows, min(spec.few_shot, len(train_rows))):
            tgt, _ = target_text(spec, r)
            prefix += format_input(spec, r) + tgt + "\n\n"
    return prefix


def build_examples(
    spec: TaskSpec, split: str, limit: int = 0, seed: int = 0, prefix: str = ""
) -> list[TaskExample]:
    """Turn a split into examples: `prefix` (see `task_prefix`) + templated input -> target.

    `limit` keeps a seeded random subset (0 = all).
    """
    rows = read_rows(spec, split)
    if limit and len(rows) > limit:
        rows = random.Random(f"{seed}-{spec.name}-{split}").sample(rows, limit)
    out = []
    for r in rows:
        tgt, label = target_text(spec, r)
        ex = TaskExample(spec.name, format_input(spec, r, prefix), tgt, label, references(spec, r))
        if spec.kind == "ner":
            ex.words, ex.tags = list(r["tokens"]), list(r["tags"])
        out.append(ex)
    return out
