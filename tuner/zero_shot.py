"""The zero-shot pass, once per task data and backbone: scores recorded in the run and reused.

A fleet's zero-shot pass scores every eval example of every task with the untuned backbone: as costly
as a final evaluation, and its result depends only on the backbone (its `model` settings) and the
task's eval examples and scoring settings, never on training. So the scores are recorded in the run
directory (`zero_shot.json`: per task a key of what they depend on, and the scores) as soon as the pass
ends, and a run started again before its first checkpoint (killed during its first steps, a worker
group replaced) scores only the tasks whose key it does not find. After a checkpoint the scores come
back with the run's history, as they always did.

The key hashes the job's `model` section, the task's kind and scoring settings (metric, verbaliser,
stop strings, tokens generated) and its eval examples' token ids and labels: a changed data file, a
changed verbaliser or another backbone is scored again.

It evaluates nothing itself (the caller's `evaluate`) and decides nothing about when the pass runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.config import to_dict
from tuner.scores import TaskScores

if TYPE_CHECKING:
    from tuner.tasks.data import TaskData

ZERO_SHOT_FILE = "zero_shot.json"  # in the run directory


def task_key(data: TaskData, model: Any) -> str:
    """What a task's zero-shot scores depend on, hashed: the backbone settings (the job's `model`
    section), scoring, eval examples."""
    spec = data.spec
    h = hashlib.sha256()
    scoring = [spec.kind, spec.metric, spec.verbaliser, spec.stop, spec.max_new_tokens, spec.target_fields]
    h.update(json.dumps([to_dict(model), scoring], sort_keys=True, default=str).encode())
    for e, text in zip(data.eval, data.eval_text or [None] * len(data.eval)):
        refs = text.references if text is not None else []
        h.update(json.dumps([e.input_ids, e.target_ids, e.label, refs]).encode())
    return h.hexdigest()[:24]


def zero_shot_scores(
    run_dir: Path,
    tasks: Mapping[str, TaskData],
    model: Any,
    evaluate: Callable[[dict[str, TaskData]], dict[str, TaskScores | None]],
    *,
    write: bool = True,
) -> dict[str, TaskScores | None]:
    """Every task's zero-shot scores, in the order of `tasks`: those `run_dir` recorded for the same key,
    and `evaluate(the others)` (then recorded, where `write`: rank 0). Recorded scores carry no
    per-example predictions (the pass that computed them wrote those)."""
    path = Path(run_dir) / ZERO_SHOT_FILE
    recorded = _read(path)
    keys = {n: task_key(d, model) for n, d in tasks.items()}
    missing = {n: d for n, d in tasks.items() if recorded.get(n, {}).get("key") != keys[n]}
    fresh = evaluate(missing) if missing else {}
    if fresh and write:
        for n, scores in fresh.items():
            recorded[n] = {"key": keys[n], "scores": scores.to_json() if scores else {}}
        _write_atomic(path, recorded)
    return {n: fresh[n] if n in fresh else TaskScores.from_json(recorded[n]["scores"]) for n in tasks}


def _read(path: Path) -> dict[str, dict]:
    """The recorded scores; a missing or unreadable file is no record (the pass runs again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
