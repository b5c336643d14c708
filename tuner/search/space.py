"""A search space and its variants: which settings can vary per prompt-bank row, and every combination.

A job's `search.space` (e.g. `{optim.lr: [0.003, 0.01, 0.03], prompt.init: [class_labels, vocab]}`)
expands into the cartesian product of its values (`expand_space`), each combination applied to the
job's own `optim` and `prompt` sections and validated as YAML values are; every task gets one
`Variant` per combination, its own prompt-bank row named `<task>~<k>` (task names cannot contain `~`,
see `tuner.schema.validate_name`). Only settings each row can have its own value of in one batch
(`PER_ROW`) can vary; the others are one value for the whole job and are searched over whole jobs by
`cluster.tune`. Variants that would train alike on a task are one (`effective`).

It computes nothing on the model and keeps no state (`tuner.search.state`).
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tuner.schema import ConfigError, coerce

if TYPE_CHECKING:
    from tuner.config import OptimConfig, PromptConfig
    from tuner.search.config import SearchConfig

SEP = "~"  # variant rows are `<task>~<k>`; `validate_name` keeps `~` out of task names

# Prompt methods whose variants are rows alone (no trainable shared part: ULPT's projection and
# SuperPos's vocabulary sample are fixed), so each variant trains as the task would alone.
ROW_ONLY_METHODS = ("independent", "ulpt", "superpos")

# Settings each prompt-bank row can have its own value of, in one batch.
PER_ROW = (
    "optim.lr",
    "optim.weight_decay",
    "optim.grad_clip",
    "optim.warmup_steps",
    "optim.schedule",
    "prompt.init",
    "prompt.init_std",
    "prompt.init_text",
)


class SearchedJob(Protocol):
    """What the search reads of a job (`tuner.config.JobConfig` is one): its `search` section, and the
    `optim` and `prompt` sections every variant starts from (the job's own values: the base variant).
    A space key naming a field of any other section of the job is a setting that cannot vary inside it."""

    search: SearchConfig
    optim: OptimConfig
    prompt: PromptConfig


@dataclass(frozen=True)
class VariantSettings:
    """One combination of the search space, applied to the job's optim and prompt sections."""

    values: dict[str, Any]  # setting -> value, in the order of `search.space`
    optim: OptimConfig
    prompt: PromptConfig

    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.values.items())


@dataclass(frozen=True)
class Variant:
    task: str
    index: int
    settings: VariantSettings

    @property
    def row(self) -> str:
        return f"{self.task}{SEP}{self.index}"


def flatten_space(space: dict[str, Any]) -> dict[str, list]:
    """`{optim: {lr: [..]}}` and `{optim.lr: [..]}` (and a mix) -> `{"optim.lr": [..]}`."""
    out: dict[str, list] = {}
    for key, value in space.items():
        if isinstance(value, dict):
            for sub, v in flatten_space(value).items():
                out[f"{key}.{sub}"] = v
        else:
            out[str(key)] = value if isinstance(value, list) else [value]
    return out


def expand_space(job: SearchedJob) -> list[VariantSettings]:
    """Every combination of `job.search.space`; unknown, job-level or invalid settings are a `ConfigError`."""
    space = flatten_space(job.search.space)
    for key, values in space.items():
        _check_setting(job, key, values)
    out = []
    keys = list(space)
    for combo in itertools.product(*(space[k] for k in keys)):
        values = dict(zip(keys, combo))
        per = {"optim": {}, "prompt": {}}
        for key, v in values.items():
            section, _, name = key.partition(".")
            per[section][name] = v
        try:
            optim = _replace(job.optim, per["optim"], "optim")
            prompt = _replace(job.prompt, per["prompt"], "prompt")
        except ConfigError as e:
            raise ConfigError(f"search.space: {e}") from None
        out.append(VariantSettings(values, optim, prompt))
    return out


def _check_setting(job: SearchedJob, key: str, values: list) -> None:
    """Refuse a space entry that is not a per-row setting (naming job-level ones as such), or whose values
    are not distinct."""
    section, _, name = key.partition(".")
    if key not in PER_ROW:
        parent = getattr(job, section, None)
        if dataclasses.is_dataclass(parent) and name in {f.name for f in dataclasses.fields(parent)}:
            raise ConfigError(
                f"search.space: {key} cannot vary inside one job (one value for the whole bank or batch); "
                f"search it over whole jobs with `promptfleet tune <job> --param {key}=a,b`"
            )
        raise ConfigError(f"search.space: unknown setting {key!r} (per-task settings: {', '.join(PER_ROW)})")
    if not values or len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"search.space.{key}: needs distinct values, got {values!r}")


def effective(settings: VariantSettings, labelled: bool) -> tuple:
    """What a variant trains with on a task, less settings that make no difference there: without label
    words (`labelled` False: a generation task) `class_labels` initialises as `vocab`; `init_std` only
    matters to `random`, `init_text` only to `text`. Variants with equal keys train alike (same stream)."""
    p = settings.prompt
    init = "vocab" if p.init == "class_labels" and not labelled else p.init
    return (
        repr(settings.optim),  # a dataclass with lists in it: compared by value, not hashable
        init,
        p.init_std if init == "random" else None,
        p.init_text if init == "text" else None,
    )


def _replace(section: Any, changes: dict[str, Any], prefix: str) -> Any:
    """`section` with `changes` applied, coerced and validated as YAML values are (`__post_init__`)."""
    hints = typing.get_type_hints(type(section))
    return dataclasses.replace(
        section, **{k: coerce(hints[k], v, f"{prefix}.{k}") for k, v in changes.items()}
    )
