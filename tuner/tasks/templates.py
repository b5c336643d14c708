"""A task's input template: which fields it names, the only form it may take, and the one renderer.

`render_input` is the text the model reads for one input, in training (a data row) and in serving
(the fields of a request): the same function on both sides, so the served token ids equal the
trained ones.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any


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
