"""Task families: N tasks that share a template and kind, described by one YAML and one table.

A family's YAML is a task YAML with `family.id_column` set: each distinct value of that column in the
train file is a task of its own, named `<family name>.<value>` (a dot, because task names are
validated and become directory names: letters, digits, `_`, `-`, `.`, never a `/`). Every task shares
the family's template, kind, description, metric and limits; classification tasks share its
`verbaliser`, or each takes its own from `family.verbaliser_column` (a JSON object, the same on every
row of the task). The eval file is split by the same column; a task may have no eval rows, but eval
rows of a task with no train rows are an error.

`expand_family(spec)` reads each split's file once (`tuner.tasks.readers.raw_rows`, the reader every
task uses), splits its rows by the id column and checks every row in that one pass: a bad task id, a
label without a verbaliser entry, a verbaliser that changes within a task... The first bad row is a
one-line `ConfigError` naming `file:line` and the value (escaped where it holds an invisible
character). Each task's `TaskSpec` carries its rows (`FamilyMember`), so `read_rows` never reads the
file again: a job's set-up costs one read of the table, not one parse per task. `promptfleet
validate` and training check a family with this same function.

It does not tokenise or batch (`tuner.tasks.data`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tuner.config import ConfigError, shown
from tuner.schema import is_valid_name
from tuner.tasks.readers import SPLITS, check_columns, is_dropped, open_text, raw_rows, split_path
from tuner.tasks.spec import FamilySource, TaskSpec, format_input


@dataclass
class FamilyMember:
    """A task of a family: its id and its rows of each split (renamed, dropped rows left out)."""

    family: str
    task_id: str
    rows_of: dict[str, list[dict[str, Any]]]

    def rows(self, split: str) -> list[dict[str, Any]]:
        return self.rows_of.get(split, [])


class _Places:
    """Where row i of a split is, for an error: `file:line` (local files) or `<hub id> <split> row i`.

    Line numbers are the file's non-blank lines (after the header of a tsv/csv), as the readers skip
    blank lines; they are counted only when an error needs one.
    """

    def __init__(self, spec: TaskSpec, split: str, n_rows: int):
        self.spec, self.split, self.n_rows = spec, split, n_rows
        self._lines: list[int] | None = None

    def __call__(self, i: int) -> str:
        src, path = self.spec.data, split_path(self.spec, self.split)
        if src.format == "hub":
            return f"{src.hub_id} {path} row {i + 1}"
        if self._lines is None:
            with open_text(path, src.encoding) as f:
                lines = [n for n, line in enumerate(f, 1) if line.strip()]
            self._lines = lines[1:] if src.format in ("tsv", "csv") else lines
        if len(self._lines) != self.n_rows:  # a layout the count cannot follow: say which row
            return f"{path}: row {i + 1}"
        return f"{path}:{self._lines[i]}"


def expand_family(spec: TaskSpec) -> list[TaskSpec]:
    """Every task of family `spec` (in order of first appearance in the train file), each with its rows.

    Checks the files and their headers as for any task, then every row of every split; raises a
    one-line `ConfigError` at the first bad row.
    """
    spec.check_files()
    check_columns(spec)
    members: dict[str, TaskSpec] = {}
    verbalisers: dict[str, Any] = {}  # task id -> the raw verbaliser value of its first row
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split in SPLITS:
        if not split_path(spec, split):
            continue
        rows = raw_rows(spec, split)
        place = _Places(spec, split, len(rows))
        renames = spec.columns_of(split)
        groups: dict[str, list[dict[str, Any]]] = {}
        for i, row in enumerate(rows):
            if is_dropped(spec, row):
                continue
            for new, old in renames.items():
                row[new] = row[old]
            task_id = _task_id(row[spec.family.id_column])
            member = members.get(task_id)
            if member is None:
                if split != "train":
                    raise ConfigError(
                        f"{place(i)}: task id {shown(task_id)} has {split} rows but no train rows"
                    )
                member = members[task_id] = _member(spec, task_id, row, i, place)
                verbalisers[task_id] = _verbaliser_value(spec, row)
            elif spec.family.verbaliser_column and _verbaliser_value(spec, row) != verbalisers[task_id]:
                raise ConfigError(
                    f"{place(i)}: task {member.name}: verbaliser "
                    f"{shown(_verbaliser_value(spec, row))} differs from the one of its first row"
                )
            _check_row(member, row, place, i)
            groups.setdefault(task_id, []).append(row)
        tables[split] = groups
    if not members:
        raise ConfigError(f"task {spec.name}: the family's train file ({spec.data.train}) has no rows")
    for task_id, member in members.items():
        rows_of = {split: groups.get(task_id, []) for split, groups in tables.items()}
        member.family_member = FamilyMember(spec.name, task_id, rows_of)
    return list(members.values())


def _task_id(value: Any) -> str:
    return "" if value is None else str(value)


def _verbaliser_value(spec: TaskSpec, row: dict[str, Any]) -> Any:
    column = spec.family.verbaliser_column
    return row[column] if column else None


def _member(spec: TaskSpec, task_id: str, row: dict[str, Any], i: int, place: _Places) -> TaskSpec:
    """The spec of the task `task_id` of family `spec`, from the first row of it (row `i`)."""
    name = f"{spec.name}.{task_id}"
    if not task_id or not is_valid_name(name):
        raise ConfigError(
            f"{place(i)}: task id {shown(task_id)} does not make a valid task name "
            f"({spec.name}.<id>: letters, digits, '_', '-', '.'; no paths)"
        )
    verbaliser = spec.verbaliser
    if spec.family.verbaliser_column:
        verbaliser = _parse_verbaliser(_verbaliser_value(spec, row), place(i))
    try:  # the member is an ordinary task: no family section, its own name and verbaliser
        return dataclasses.replace(spec, name=name, verbaliser=verbaliser, family=FamilySource())
    except ConfigError as e:
        raise ConfigError(f"{place(i)}: {e}") from None


def _parse_verbaliser(value: Any, where: str) -> dict[str, str]:
    """A verbaliser cell: a JSON object {label: words} (a jsonl file may hold the object itself)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise ConfigError(
            f"{where}: verbaliser {shown(value)} is not a JSON object of label -> words "
            '(e.g. {"0": " bad", "1": " good"})'
        )
    return {str(k): v for k, v in parsed.items()}


def _check_row(member: TaskSpec, row: dict[str, Any], place: _Places, i: int) -> None:
    """What training will ask of the row: its target (a label with a verbaliser entry...) and its input."""
    try:
        member.task_kind.target_text(member, row)
        format_input(member, row)
    except ConfigError as e:
        raise ConfigError(f"{place(i)}: {e}") from None
