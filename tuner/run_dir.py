"""The run directory's identity card (`run.json`): which job owns it and whether it finished.

A run directory is resumed only by the job that created it: same name, tasks, backbone and
prompt shape. A finished run or one written by a different job is refused with a clear message
instead of being silently mixed into.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tuner.schema import ConfigError

RUN_FILE = "run.json"


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
