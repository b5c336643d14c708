"""How a request's raw text becomes the text the model sees for a task: the tuner's own renderer.

`tuner.export.TaskMeta.render` fills the task's template with `tuner.tasks.spec.render_input`, the one
function training used, so served and trained inputs cannot drift apart. This module only adapts it
to the engine's call (`format_prompt(entry.meta, text, raw)`) and turns a request that cannot fill
the template into a 400. To be folded into the engine (`entry.meta.render(...)`).
"""

from __future__ import annotations

from serving.types import InvalidRequest
from tuner.export import TaskMeta


def format_prompt(meta: TaskMeta | dict, text: str, raw: bool = False) -> str:
    """The model input for user `text` under a task's metadata (`raw=True`: `text` unchanged)."""
    meta = meta if isinstance(meta, TaskMeta) else TaskMeta.from_dict(meta)
    try:
        return meta.render(text, raw)
    except ValueError as e:
        raise InvalidRequest(str(e), param="prompt") from None
