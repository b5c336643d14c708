"""The run directory's identity card (`run.json`): which job owns it and whether it finished; and its
per-example predictions files.

A run directory is resumed only by the job that created it: same name, tasks, backbone and
prompt shape. A finished run or one written by a different job is refused with a clear message
instead of being silently mixed into.

`predictions/<pass>/<task>.jsonl` holds one JSON object per eval example of one evaluation pass
(`zero_shot` and `tuned` from training; `eval_tuned`, `eval_zero_shot` from `promptfleet eval`):
input, references, output, correct, scores (`tuner.tasks.kinds.base.prediction`). Each file is
written atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.schema import ConfigError

if TYPE_CHECKING:
    from tuner.evaluate import TaskScores

RUN_FILE = "run.json"
PREDICTIONS_DIR = "predictions"  # predictions/<pass>/<task>.jsonl


def fingerprint(job: dict[str, Any]) -> str:
    """What must match to resume a job (its config as a dict, `tuner.config.to_dict`): tasks, backbone,
    prompt shape and data seed (not step counts)."""
    key = {
        "tasks": [Path(t).name for t in job["tasks"]],
        "model": job["model"]["name"],
        "prompt": job["prompt"],
        "seed": job["data"]["seed"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def claim_run_dir(run_dir: Path, name: str, fp: str, *, resume: bool) -> None:
    """Create `run_dir` for job `name` (`fingerprint` `fp`) or check that the job may resume it
    (`resume`: it may continue a run of its own)."""
    info_path = run_dir / RUN_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(
                f"{info_path} is unreadable ({type(e).__name__}); repair or delete it"
            ) from None
        if not isinstance(info, dict):
            raise ConfigError(f"{info_path} is not a run record (a JSON object); repair or delete it")
        if info.get("fingerprint") != fp:
            raise ConfigError(
                f"{run_dir} belongs to another job (different tasks, backbone or prompt settings); "
                "pick another name= or output_dir="
            )
        if info.get("status") == "finished":
            raise ConfigError(
                f"{run_dir} holds a finished run; pick another name= (or delete the directory) to train again"
            )
        if not resume:
            raise ConfigError(f"{run_dir} already exists and resume=false; pick another name=")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):  # someone's files, not a run: never write over them
        raise ConfigError(
            f"{run_dir} exists, is not empty and holds no run; pick another name= or output_dir="
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"name": name, "fingerprint": fp, "status": "running"}, indent=2))


def mark_finished(run_dir: Path) -> None:
    info_path = run_dir / RUN_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["status"] = "finished"
    info_path.write_text(json.dumps(info, indent=2))


def write_jsonl_atomic(path: Path, records: Iterable[Mapping]) -> None:
    """`records` as JSON lines at `path`, atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=float) + "\n")
        os.chmod(tmp, 0o644)  # as the run's other files (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_predictions(directory: Path, results: Mapping[str, TaskScores | None]) -> list[Path]:
    """Each task's prediction records (`TaskScores.predictions`) as `directory/<task>.jsonl`; tasks
    without any (no eval split) get no file. Returns the files written."""
    written = []
    for task, scores in results.items():
        records = scores.predictions if scores is not None else None
        if records is None:
            continue
        path = Path(directory) / f"{task}.jsonl"
        write_jsonl_atomic(path, records)
        written.append(path)
    return written
