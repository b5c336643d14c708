"""The run directory's identity card (`run.json`): which job owns it and whether it finished; and its
per-example predictions files.

A run directory is resumed only by the job that created it: same name, tasks, backbone and
prompt shape. A finished run or one written by a different job is refused with a clear message
instead of being silently mixed into.

A claim is kept only by a run that started: `released_on_failure()` wraps a start (the CLI's train
command), and when the block fails before the run wrote its first checkpoint, the claims made
inside it are rolled back and the run directory they created goes with them. So a start that
fails (a bad model path, a missing data file on the cluster) never leaves `run.json` saying
"running" and the corrected command is not refused as another job's. A run with a checkpoint
keeps its claim: it is resumable.

`predictions/<pass>/<task>.jsonl` holds one JSON object per eval example of one evaluation pass
(`zero_shot` and `tuned` from training; `eval_tuned`, `eval_zero_shot` from `promptfleet eval`):
input, references, output, correct, scores (`tuner.tasks.kinds.base.prediction`). Each file is
written atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.config import DEFAULT_RANK
from tuner.schema import ConfigError

if TYPE_CHECKING:
    from tuner.scores import TaskScores

RUN_FILE = "run.json"
PREDICTIONS_DIR = "predictions"  # predictions/<pass>/<task>.jsonl
# Claims this process made of new run directories, with whether it created the directory: the claim
# happens deep inside a launcher, the failure surfaces at the entry point (`released_on_failure`).
_NEW_CLAIMS: list[tuple[Path, bool]] = []


# Prompt fields added after runs were first fingerprinted, with their defaults: at the default they are
# left out of the key, so a run directory written before they existed still resumes.
_LATER_PROMPT_FIELDS = {"superpos_tokens": 128, "transfer_check_steps": 10, "transfer_heldout": 32}


def fingerprint(job: dict[str, Any]) -> str:
    """What must match to resume a job (its config as a dict, `tuner.config.to_dict`): tasks, backbone,
    prompt shape and data seed (not step counts). `prompt.rank=0` counts as the method's own rank
    (the default before 0 meant that was 1)."""
    prompt = dict(job["prompt"])
    for name, default in _LATER_PROMPT_FIELDS.items():
        if prompt.get(name) == default:
            del prompt[name]
    if prompt.get("rank") == 0:
        prompt["rank"] = DEFAULT_RANK.get(prompt.get("method"), 1)
    key = {
        "tasks": [Path(t).name for t in job["tasks"]],
        "model": job["model"]["name"],
        "prompt": prompt,
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
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"name": name, "fingerprint": fp, "status": "running"}, indent=2))
    _NEW_CLAIMS.append((run_dir, created))


def has_started(run_dir: Path) -> bool:
    """Whether the run in `run_dir` wrote a checkpoint (`tuner.checkpoint`'s `step_*`): it can resume."""
    return any((run_dir / "checkpoints").glob("step_*"))


@contextmanager
def released_on_failure() -> Iterator[None]:
    """Roll back the run directories claimed inside the block if it fails before their run started:
    the directory goes if the claim created it, else (it was empty) what the failed start put in it."""
    first = len(_NEW_CLAIMS)
    try:
        yield
    except BaseException:
        for run_dir, created in _NEW_CLAIMS[first:]:
            if (run_dir / RUN_FILE).is_file() and not has_started(run_dir):
                if created:
                    shutil.rmtree(run_dir, ignore_errors=True)
                else:
                    for child in run_dir.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
        raise
    finally:
        del _NEW_CLAIMS[first:]


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
