"""Typed configuration machinery: dataclasses built from YAML dicts, checked, reported in one line.

Every configuration of the project (the job's sections in `tuner.config`, the search's in
`tuner.search.config`, serving's in `serving.config`) is a dataclass whose fields carry a default
and a one-line doc (`_f`); `from_dict` builds one from a dict, refusing unknown keys and values of
the wrong type, and its `__post_init__` checks values with the small validators here. Also the
project-wide bounds every part shares: `MAX_SEED` and the name pattern of runs and tasks.

It knows no section of any configuration and imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

# Seeds are in [0, MAX_SEED): `torch.Generator.manual_seed` takes a signed 64-bit value.
MAX_SEED = 2**63
# Names (runs, tasks) become directory names: letters, digits, `_`, `-`, `.`; no `..` (see `is_valid_name`).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


def one_line(e: BaseException) -> str:
    """`e` as one line a user can act on: the innermost cause (Ray and `datasets` wrap the error that
    says what is wrong), its last line, with its type unless it is our own ConfigError."""
    inner = e
    while getattr(inner, "cause", None) is not None or inner.__cause__ is not None:
        inner = getattr(inner, "cause", None) or inner.__cause__
    msg = str(inner).strip().splitlines()
    text = msg[-1] if msg else type(inner).__name__
    return text if isinstance(inner, ConfigError) else f"{type(inner).__name__}: {text}"


def shown(value: object) -> str:
    """`value` as an error message lists it: as is when every character is visible, else Python's
    escaped form in quotes (`'\\ufeffQuality'`, `'label '`), so a byte-order mark, a zero-width
    space or a trailing blank in a name a user must type is seen, not guessed at."""
    text = str(value)
    return text if text and text.isprintable() and text == text.strip() else repr(text)


class ReadByKey:
    """`record["field"]` reads a dataclass's field: records that were dicts before they were typed
    (a task's metadata, the engine's stats and task info) stay readable as scripts written then read
    them. Code in this repository reads the attributes."""

    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def documented(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with `default` (a list or dict is copied per instance) and its one-line `doc`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def is_valid_name(value: object) -> bool:
    """Whether `value` may name a run or a task (a directory name): `NAME_PATTERN`, and no `..`."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None and ".." not in value


def validate_name(what: str, value: str) -> str:
    """Names (runs, tasks) become directory names: letters, digits, `_`, `-`, `.`; no paths."""
    if not is_valid_name(value):
        raise ConfigError(f"{what}={value!r} is not a valid name (letters, digits, '_', '-', '.'; no paths)")
    return value


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def check_positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r}: must be > 0 (and finite)")


def check_non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r}: must be >= 0 (and finite)")


# ---------------------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict; unknown keys and wrong types are `ConfigError`s."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ConfigError(f"unknown key {key!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` (from YAML) as type `tp`, a dataclass built with `from_dict`; `ConfigError` naming `key`
    where it does not fit."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:  # `str | list[str]`: the first type the value fits
            try:
                return coerce(a, value, key)
            except ConfigError:
                pass
        return coerce(args[-1], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _number(tp, value, key)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)  # YAML `key:` / `~` is empty, never "None"
    return value


def _number(tp: type, value: Any, key: str) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        out = tp(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is int and isinstance(value, float) and value != out:
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """Set `a.b.c` = `value` in nested dict `data`, making missing sections; `what` names the setting
    in the error for a part of the path that is not a section."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML (quote a string: {key}='\"...\"')"
            ) from None
        set_dotted(data, key.strip(), value, f"override {key!r}")
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}  # YAML is UTF-8; a BOM is skipped
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text (YAML files are UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data
