"""Atomic, rank-independent training checkpoints (never the frozen backbone).

A checkpoint is a directory `step_<N>/` with
  tensors.safetensors  prompt bank, Adam moments per task, sampler and torch RNG states
  state.json           step, task names, per-task Adam step counts, sampler cursors, metric history,
                       the prompt method (absent in checkpoints written before methods: independent),
                       and with in-batch search the live variants and rung results (`tuner.search.state`)
A method with shared parts (tuner/prompts/methods.py) adds its shared vector and that vector's Adam.
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

from tuner.config import one_line

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
    method: str = "independent",
    shared=None,
    search: dict | None = None,
) -> Path:
    """Write `root/step_<step>/` atomically and prune older checkpoints beyond `keep_last`.

    `method` names the prompt parameterisation; `shared` is its `SharedParams` (None: no shared part).
    """
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
    tensors.update(_shared_tensors(shared))
    save_file(tensors, str(tmp / "tensors.safetensors"))
    sd = sampler.state_dict()
    state = {
        "step": step,
        "task_names": bank.task_names,
        "adam_steps": adam_steps,
        "sampler": {k: sd[k] for k in ("step", "cursor", "epoch", "sizes", "held_out")},
        "history": history,
        "prompt_method": method,
        "shared_adam_steps": {k: v["step"] for k, v in shared.optimizer.state.items()} if shared else {},
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
    for killed in root.glob(".tmp-*"):  # what saves killed mid-way left (one writer: rank 0)
        shutil.rmtree(killed, ignore_errors=True)
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


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checkpoint's JSON state and tensors; a damaged one is a ValueError that says what to do
    (checkpoints are written atomically, so this is a disk fault or a hand edit, not a killed save)."""
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
        if not isinstance(state, dict) or "task_names" not in state:
            raise ValueError("state.json is not a checkpoint state")
    except Exception as e:  # JSON, safetensors' own error type, a missing file
        raise ValueError(
            f"checkpoint {path} is damaged ({one_line(e)}); delete that directory to resume from the "
            "checkpoint before it"
        ) from None
    return state, tensors


def load_checkpoint(
    path: str | os.PathLike, *, bank, optimizer, sampler, method: str = "independent", shared=None
) -> dict:
    """Restore bank, optimiser, sampler, RNG (and a method's shared part) from `path`; returns the
    JSON state (step, history, and the in-batch search's state when there is one)."""
    path = Path(path)
    state, tensors = _read(path)
    written = state.get("prompt_method", "independent")
    if written != method:
        raise ValueError(f"checkpoint {path} was written with prompt.method={written}, not {method}")
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
    if shared is not None:
        load_shared(shared, tensors, state)
    sd = dict(state["sampler"])
    sd["gen"] = tensors["sampler_gen"]
    sampler.load_state_dict(sd)
    torch.set_rng_state(tensors["torch_rng"])
    return state


# ------------------------------------------------------------------------------------ shared parts


def _shared_tensors(shared) -> dict[str, torch.Tensor]:
    if shared is None:
        return {}
    out = {"shared": shared.values.contiguous()}
    for name, st in shared.optimizer.state.items():
        out[f"shared_adam.{name}.exp_avg"] = st["exp_avg"].contiguous()
        out[f"shared_adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
    return out


def load_shared(shared, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Set `shared` (a `SharedParams`) to the checkpoint's shared vector and its Adam state."""
    if "shared" not in tensors or tensors["shared"].shape != shared.values.shape:
        raise ValueError("the checkpoint's shared prompt parameters do not match this job's prompt method")
    shared.values = tensors["shared"].to(shared.values.device)
    shared.optimizer.state = {
        name: {
            "step": n,
            "exp_avg": tensors[f"shared_adam.{name}.exp_avg"],
            "exp_avg_sq": tensors[f"shared_adam.{name}.exp_avg_sq"],
        }
        for name, n in state.get("shared_adam_steps", {}).items()
    }


def read_prompt_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON state and the tensors of checkpoint `path`, without restoring anything (continual training)."""
    return _read(Path(path))
