"""Task definitions: where a task's data lives, how an example becomes text, what it is scored on.

A task is one YAML file (see `configs/tasks/`); adding a task needs no code. A family's YAML
(`family.id_column`) is many tasks, one per value of a column of its table (`tuner.tasks.family`). `TaskSpec.load`
validates it; `build_examples` turns a split's rows (`tuner.tasks.readers.read_rows`) into
`TaskExample`s (prompt text + target text, plus every reference and the gold tags for evaluation).
What depends on the task's kind (the fields a row needs, the target text, the references, how it is
scored) the kind answers (`tuner.tasks.kinds`). Tokenisation and batching live in `tuner.tasks.data`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tuner.config import ConfigError, from_dict, read_yaml, validate_name
from tuner.schema import check_non_negative
from tuner.tasks.kinds import KINDS, TaskKind
from tuner.tasks.readers import SPLITS, check_encoding, read_rows
from tuner.tasks.templates import check_template, render_input, template_fields

LOCAL_FORMATS = ("tsv", "csv", "jsonl", "txt", "parallel_txt", "conll")


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
    encoding: str = field(
        default="utf-8",
        metadata={
            "doc": "Text encoding of the local files (a Python codec: utf-8, latin-1, cp1252, utf-16...); "
            "a leading byte-order mark is dropped whatever the encoding."
        },
    )

    def __post_init__(self) -> None:
        check_encoding(self.encoding)
        if self.format not in (*LOCAL_FORMATS, "hub"):
            raise ConfigError(
                f"data.format={self.format!r}: expected one of {', '.join((*LOCAL_FORMATS, 'hub'))}"
            )
        if self.format == "hub" and not self.hub_id:
            raise ConfigError("data.format=hub needs data.hub_id")


FAMILY_FORMATS = ("tsv", "csv", "jsonl", "hub")  # formats whose rows have columns (one can name the task)


@dataclass
class FamilySource:
    """Many tasks from one table (`tuner.tasks.family`): one task per distinct value of a column."""

    id_column: str = field(
        default="",
        metadata={
            "doc": "The column naming each row's task: one task per distinct value, named "
            "`<name>.<value>` (a valid task name). Empty: the file is one task."
        },
    )
    verbaliser_column: str = field(
        default="",
        metadata={
            "doc": "classification: a column holding each task's verbaliser as a JSON object "
            '(`{"0": " bad", "1": " good"}`), the same on every row of a task. Empty: `verbaliser` '
            "is shared by every task of the family."
        },
    )

    @property
    def enabled(self) -> bool:
        return bool(self.id_column)


@dataclass
class TaskSpec:
    name: str = field(
        default="", metadata={"doc": "Task name: the prompt's id in training, export and serving."}
    )
    kind: str = field(
        default="classification",
        metadata={
            "doc": "classification (verbaliser), generation (target field) or ner (IOB2 tags, "
            "generated as tagged spans; see tuner.tasks.kinds.ner)."
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
    max_eval_examples: int | None = field(
        default=None,
        metadata={
            "doc": "Eval examples of this task (a seeded random subset; 0 = the whole eval split), over "
            "the job's data.max_eval_examples. Default: the job's."
        },
    )
    family: FamilySource = field(
        default_factory=FamilySource,
        metadata={"doc": "A family: this file describes one task per value of `family.id_column`."},
    )

    # A task of a family (`tuner.tasks.family.FamilyMember`): its rows, read with the family's table.
    family_member: ClassVar[Any] = None

    def __post_init__(self) -> None:
        validate_name("task name", self.name)
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind={self.kind!r}: expected {', '.join(KINDS)}")
        metrics = self.task_kind.metrics
        self.metric = self.metric or metrics[0]
        if self.metric not in metrics:
            raise ConfigError(f"task {self.name}: metric {self.metric!r} does not fit a {self.kind} task")
        self.verbaliser = {str(k): str(v) for k, v in self.verbaliser.items()}
        self._check_family()
        if not self.family.verbaliser_column:  # else each task's verbaliser is checked when it is read
            self.task_kind.check_spec(self)
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
        if self.max_eval_examples is not None:
            check_non_negative(f"task {self.name}: max_eval_examples", self.max_eval_examples)
        try:
            names = check_template(self.template)
        except ValueError as e:
            raise ConfigError(f"task {self.name}: {e}") from None
        if not names:
            raise ConfigError(f"task {self.name}: template uses no field")

    def _check_family(self) -> None:
        fam = self.family
        if fam.verbaliser_column and not fam.enabled:
            raise ConfigError(f"task {self.name}: family.verbaliser_column needs family.id_column")
        if fam.verbaliser_column and not self.task_kind.label_scored:
            raise ConfigError(
                f"task {self.name}: family.verbaliser_column: a {self.kind} task has no verbaliser"
            )
        if fam.enabled and self.data.format not in FAMILY_FORMATS:
            raise ConfigError(
                f"task {self.name}: a family needs rows with columns (data.format "
                f"{', '.join(FAMILY_FORMATS)}), not {self.data.format}"
            )

    @property
    def task_kind(self) -> TaskKind:
        """What this task's kind does (`tuner.tasks.kinds`)."""
        return KINDS[self.kind]

    @property
    def labels(self) -> list[str]:
        return list(self.verbaliser)

    @property
    def target_fields(self) -> list[str]:
        """The reference columns (generation): the first is also the training target."""
        return list(self.target_field)

    def eval_limit(self, job_limit: int) -> int:
        """How many eval examples to keep (0: all): this task's `max_eval_examples`, else the job's."""
        return job_limit if self.max_eval_examples is None else self.max_eval_examples

    def columns_of(self, split: str) -> dict[str, str]:
        """The renames of `split`: {name: raw column}, `fields` overridden by `split_fields`."""
        return {**self.fields, **self.split_fields.get(split, {})}

    def required_fields(self, split: str) -> list[str]:
        """Every field (after renaming) a row of `split` must have."""
        need = template_fields(self.template) + self.task_kind.required_fields(self, split)
        need += [c for c in (self.family.id_column, self.family.verbaliser_column) if c]
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


# ------------------------------------------------------------------------------------ examples


def format_input(spec: TaskSpec, row: dict[str, Any], prefix: str = "") -> str:
    """`render_input` for a data row of `spec`; a template field missing from the data is a ConfigError."""
    try:
        return render_input(spec.template, prefix, row)
    except KeyError as e:
        raise ConfigError(
            f"task {spec.name}: template field {e} not in the data (has {', '.join(row)})"
        ) from None


def target_text(spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
    """The text the model should write for `row` (and its label key, where the kind has labels)."""
    return spec.task_kind.target_text(spec, row)


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

    `limit` keeps a seeded random subset (0 = all); for the eval split the task's own
    `max_eval_examples`, where it sets one, replaces it (`TaskSpec.eval_limit`).
    """
    if split == "eval":
        limit = spec.eval_limit(limit)
    rows = read_rows(spec, split)
    if limit and len(rows) > limit:
        rows = random.Random(f"{seed}-{spec.name}-{split}").sample(rows, limit)
    out = []
    for r in rows:
        tgt, label = target_text(spec, r)
        ex = TaskExample(
            spec.name, format_input(spec, r, prefix), tgt, label, spec.task_kind.references(spec, r)
        )
        spec.task_kind.fill_example(ex, r)
        out.append(ex)
    return out
