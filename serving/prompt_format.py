"""How a request's raw text becomes the text the model sees for a task.

Training fed each example as `prefix + template.format(field=input)` (see `tuner.tasks`), so a task
is served the same way: `format_prompt(meta, "great movie!")` for sst2 gives
"Review: great movie!\\nSentiment:". Raw mode (or a task without a template) passes text through.
"""

from __future__ import annotations

import string


def format_prompt(meta: dict, text: str, raw: bool = False) -> str:
    """The model input for user `text` under a task's metadata (`promptfleet_task.json`).

    * `raw=True`: `text` unchanged.
    * template with exactly one field: `prefix + template` with that field set to `text.strip()`
      (stripped like the training data).
    * no template, or one with several fields (a single string cannot fill them): `prefix + text`.
    """
    if raw:
        return text
    prefix = meta.get("prefix") or ""
    template = meta.get("template") or ""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        if len(fields) == 1:
            return prefix + template.format(**{fields.pop(): text.strip()})
    except (ValueError, KeyError, IndexError, AttributeError):
        pass  # a template str.format cannot fill from one keyword: fall back to the plain text
    return prefix + text
