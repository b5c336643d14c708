"""Task definitions: where a task's data lives, how an example becomes text, what it is scored on.

A task is one YAML file (see `configs/tasks/`); adding a task needs no code. `TaskSpec.load`
validates it; `load_split` reads rows through `datasets` (local tsv/csv/jsonl/txt files or a
Hub dataset id) and turns them into `TaskExample`s (prompt text + target text). Tokenisation
and batching live in `tuner.data`.
"""

from __future__ import annotations

import os
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.config import ConfigError, from_dict, read_yaml, validate_name

LOCAL_FORMATS = ("tsv", "csv", "jsonl", "txt", "parallel_txt")


@dataclass
class DataSource:
    format: str = field(
        default="jsonl",
        metadata={
            "doc": "tsv, csv, jsonl, txt (one example per line), parallel_txt (line-aligned source/target files) or hub."
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
        metadata={"doc": "classification (verbaliser) or generation (target field)."},
    )
    data: DataSource = field(default_factory=DataSource, metadata={"doc": "Where the rows come from."})
    fields: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "Rename raw columns: {template_name: raw_column}."}
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
        metadata={"doc": "classification: label value -> words the model should produce."},
    )
    target_field: str = field(
        default="target", metadata={"doc": "generation: the column holding the target text."}
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
        default="accuracy", metadata={"doc": "Headline metric: accuracy, macro_f1, chrf or exact_match."}
    )
    max_new_tokens: int = field(default=48, metadata={"doc": "generation: tokens generated at evaluation."})

    def __post_init__(self) -> None:
        validate_name("task name", self.name)
        if self.kind not in ("classification", "generation"):
            raise ConfigError(f"task {self.name}: kind={self.kind!r}: expected classification or generation")
        if self.kind == "classification":
            if len(self.verbaliser) < 2:
                raise ConfigError(
                    f"task {self.name}: a classification task needs a verbaliser with >= 2 labels"
                )
            self.verbaliser = {str(k): str(v) for k, v in self.verbaliser.items()}
            if self.metric not in ("accuracy", "macro_f1"):
                raise ConfigError(
                    f"task {self.name}: metric {self.metric!r} does not fit a classification task"
                )
        elif self.metric not in ("chrf", "exact_match"):
            raise ConfigError(f"task {self.name}: metric {self.metric!r} does not fit a generation task")
        names = [n for _, n, _, _ in string.Formatter().parse(self.template) if n]
        if not names:
            raise ConfigError(f"task {self.name}: template uses no field")

    @property
    def labels(self) -> list[str]:
        return list(self.verbaliser)

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


# ------------------------------------------------------------------------------------ reading rows


def read_rows(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Read the raw rows of `split` ("train" or "eval") as dicts, via `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    src = spec.data
    if src.format == "hub":
        ds = datasets.load_dataset(
            src.hub_id, src.hub_config or None, split=src.train if split == "train" else src.eval
        )
        rows = list(ds)
    else:
        path = src.train if split == "train" else src.eval
        if not path:
            raise ConfigError(f"task {spec.name}: no {split} file configured")
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
            rows = [
                {"text": r["text"]} for r in datasets.load_dataset("text", data_files=path, split="train")
            ]
        else:  # parallel_txt
            tgt = src.train_target if split == "train" else src.eval_target
            source = datasets.load_dataset("text", data_files=path, split="train")["text"]
            target = datasets.load_dataset("text", data_files=tgt, split="train")["text"]
            pairs = [(s, t) for s, t in zip(source, target) if s.strip() or t.strip()]
            if len(source) - len(target) not in (-1, 0, 1) or not pairs:
                raise ConfigError(f"task {spec.name}: {path} and {tgt} are not line-aligned")
            rows = [{"source": s, "target": t} for s, t in pairs]
    for flag in src.drop_if_true:
        rows = [r for r in rows if not r.get(flag)]
    if spec.fields:
        for r in rows:
            for new, old in spec.fields.items():
                if old not in r:
                    raise ConfigError(
                        f"task {spec.name}: column {old!r} not in the data (has {', '.join(r)})"
                    )
                r[new] = r[old]
    return rows


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a template, in order of first use."""
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


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
    if spec.kind == "classification":
        if spec.label_field not in row:
            raise ConfigError(f"task {spec.name}: label field {spec.label_field!r} not in the data")
        label = str(row[spec.label_field]).strip()
        if label not in spec.verbaliser:
            raise ConfigError(f"task {spec.name}: label {label!r} has no verbaliser entry")
        return spec.verbaliser[label], label
    if spec.target_field not in row:
        raise ConfigError(f"task {spec.name}: target field {spec.target_field!r} not in the data")
    return spec.target_prefix + str(row[spec.target_field]).strip(), None


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
        out.append(TaskExample(spec.name, format_input(spec, r, prefix), tgt, label))
    return out
