"""Atomic, rank-independent training checkpoints (never the frozen backbone).

A checkpoint is a directory `step_<N>/` with
  tensors.safetensors  prompt bank, Adam moments per task, sampler and torch RNG states
  state.json           step, task names, per-task Adam step counts, sampler cursors, metric history,
                       and with in-batch search the live variants and rung results (`tuner.search`)
It is written to a hidden temp directory, fsynced and renamed into place, so a save killed half
way leaves only a `.tmp-*` directory that loading ignores: every `step_*` directory is complete.
Everything is keyed by task name, so a checkpoint written by N ranks resumes on any number.
Only safetensors and JSON are read back (no pickle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    bank,
    optimizer,
    sampler,
    history: list[dict],
    keep_last: int = 2,
    search: dict | None = None,
) -> Path:
    """Write `root/step_<step>/` atomically and prune older checkpoints beyond `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tensors = {
        "bank": bank.weight.contiguous(),
        "torch_rng": torch.get_rng_state(),
        "sampler_gen": sampler.gen.get_state(),
    }
    adam_steps = {}
    for name, st in optimizer.state.items():
        tensors[f"adam.{name}.exp_avg"] = st["exp_avg"].contiguous()
        tensors[f"adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        adam_steps[name] = st["step"]
    save_file(tensors, str(tmp / "tensors.safetensors"))
    sd = sampler.state_dict()
    state = {
        "step": step,
        "task_names": bank.task_names,
        "adam_steps": adam_steps,
        "sampler": {"step": sd["step"], "cursor": sd["cursor"], "epoch": sd["epoch"], "sizes": sd["sizes"]},
        "history": history,
    }
    if search is not None:
        state["search"] = search
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / f"step_{step:08d}"
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp dirs of killed saves are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and STEP_DIR.match(p.name)
        and (p / "state.json").is_file()
        and (p / "tensors.safetensors").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, *, bank, optimizer, sampler) -> dict:
    """Restore bank, optimiser, sampler and RNG from `path`; returns the JSON state (step, history, search)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "tensors.safetensors"))
    missing = sorted(set(state["task_names"]) ^ set(bank.task_names))
    if missing:
        raise ValueError(
            f"checkpoint {path} was written for other tasks (differs in: {', '.join(missing[:5])})"
        )
    bank.load_state_dict({"task_names": state["task_names"], "weight": tensors["bank"]})
    optimizer.state = {
        name: {
            "step": n,
            "exp_avg": tensors[f"adam.{name}.exp_avg"],
            "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"],
        }
        for name, n in state["adam_steps"].items()
    }
    sd = dict(state["sampler"])
    sd["gen"] = tensors["sampler_gen"]
    sampler.load_state_dict(sd)
    torch.set_rng_state(tensors["torch_rng"])
    return state
