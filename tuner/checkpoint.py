"""Atomic, rank-independent training checkpoints (never the frozen backbone).

A checkpoint is a directory `step_<N>/` with
  tensors.safetensors  prompt bank, Adam moments per task, sampler and torch RNG states
  state.json           a `CheckpointState`: step, task names, per-task Adam step counts, sampler
                       position, metric history, the prompt method, and with in-batch search the live
                       variants and rung results (`tuner.search.state`)
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tuner.config import one_line

STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class SamplerPosition:
    """Where the task sampler stands: `MultiTaskSampler.state_dict()` less its generator (a tensor)."""

    step: int  # batches drawn
    cursor: dict[str, int]  # task -> next position in its current epoch order
    epoch: dict[str, int]  # task -> epochs completed
    sizes: dict[str, int]  # task -> train examples (a resumed job must have the same)
    held_out: dict[str, int] = field(default_factory=dict)  # task -> examples the search holds out

    @classmethod
    def of(cls, sampler_state: dict) -> SamplerPosition:
        return cls(**{f.name: sampler_state[f.name] for f in fields(cls) if f.name in sampler_state})


@dataclass
class CheckpointState:
    """What a checkpoint's `state.json` holds: everything but its tensors.

    `from_json` reads the files of every release so far: a field added later has a default that means
    what the older code did. `to_json` writes the keys the file has always had (`search` only with one).
    """

    step: int  # optimiser steps applied
    task_names: list[str]  # the prompt bank's rows, in its order
    adam_steps: dict[str, int]  # row -> its Adam step count (rows never in a batch are absent)
    sampler: SamplerPosition
    history: Any  # `RunHistory.to_json()`, read back with `RunHistory.from_json`
    prompt_method: str = "independent"  # absent in checkpoints written before prompt methods
    shared_adam_steps: dict[str, int] = field(default_factory=dict)  # the method's shared part's Adam
    search: dict | None = None  # `SearchState.to_json()` with in-batch search; absent from the file without

    def to_json(self) -> dict:
        out = asdict(self)
        if self.search is None:
            del out["search"]
        return out

    @classmethod
    def from_json(cls, data: dict) -> CheckpointState:
        """Raises ValueError (or KeyError, TypeError) where `data` is not a checkpoint state."""
        if not isinstance(data, dict) or "task_names" not in data:
            raise ValueError("state.json is not a checkpoint state")
        known = {f.name for f in fields(cls)} - {"sampler"}
        rest = {k: v for k, v in data.items() if k in known}
        return cls(sampler=SamplerPosition.of(data["sampler"]), **rest)

    def __getitem__(self, key: str) -> Any:
        """The JSON value under `key` (`state["step"]`), for code that reads the file's dict."""
        return self.to_json()[key]


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
    history: Any,
    keep_last: int = 2,
    method: str = "independent",
    shared=None,
    search: dict | None = None,
) -> Path:
    """Write `root/step_<step>/` atomically and prune older checkpoints beyond `keep_last`.

    `history` is `RunHistory.to_json()`; `method` names the prompt parameterisation; `shared` is its
    `SharedParams` (None: no shared part); `search` is `SearchState.to_json()` (None: no search).
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
    state = CheckpointState(
        step=step,
        task_names=bank.task_names,
        adam_steps=adam_steps,
        sampler=SamplerPosition.of(sampler.state_dict()),
        history=history,
        prompt_method=method,
        shared_adam_steps={k: v["step"] for k, v in shared.optimizer.state.items()} if shared else {},
        search=search,
    )
    with open(tmp / "state.json", "w") as f:
        json.dump(state.to_json(), f)
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


def _read(path: Path, *, with_tensors: bool = True) -> tuple[CheckpointState, dict[str, torch.Tensor]]:
    """The checkpoint's state and tensors; a damaged one is a ValueError that says what to do
    (checkpoints are written atomically, so this is a disk fault or a hand edit, not a killed save)."""
    try:
        state = CheckpointState.from_json(json.loads((path / "state.json").read_text()))
        tensors = load_file(str(path / "tensors.safetensors")) if with_tensors else {}
    except Exception as e:  # JSON, a missing key, safetensors' own error type, a missing file
        raise ValueError(
            f"checkpoint {path} is damaged ({one_line(e)}); delete that directory to resume from the "
            "checkpoint before it"
        ) from None
    return state, tensors


def load_checkpoint(
    path: str | os.PathLike, *, bank, optimizer, sampler, method: str = "independent", shared=None
) -> CheckpointState:
    """Restore bank, optimiser, sampler, RNG (and a method's shared part) from `path`; returns its
    state (step, history, and the in-batch search's state when there is one)."""
    path = Path(path)
    state, tensors = _read(path)
    if state.prompt_method != method:
        raise ValueError(
            f"checkpoint {path} was written with prompt.method={state.prompt_method}, not {method}"
        )
    missing = sorted(set(state.task_names) ^ set(bank.task_names))
    if missing:
        raise ValueError(
            f"checkpoint {path} was written for other tasks (differs in: {', '.join(missing[:5])})"
        )
    bank.load_state_dict({"task_names": state.task_names, "weight": tensors["bank"]})
    optimizer.state = {
        name: {
            "step": n,
            "exp_avg": tensors[f"adam.{name}.exp_avg"],
            "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"],
        }
        for name, n in state.adam_steps.items()
    }
    if shared is not None:
        load_shared(shared, tensors, state.shared_adam_steps)
    sampler.load_state_dict({**asdict(state.sampler), "gen": tensors["sampler_gen"]})
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


def load_shared(shared, tensors: dict[str, torch.Tensor], adam_steps: dict[str, int]) -> None:
    """Set `shared` (a `SharedParams`) to the checkpoint's shared vector and its Adam state
    (`adam_steps`: `CheckpointState.shared_adam_steps`)."""
    if "shared" not in tensors or tensors["shared"].shape != shared.values.shape:
        raise ValueError("the checkpoint's shared prompt parameters do not match this job's prompt method")
    shared.values = tensors["shared"].to(shared.values.device)
    shared.optimizer.state = {
        name: {
            "step": n,
            "exp_avg": tensors[f"shared_adam.{name}.exp_avg"],
            "exp_avg_sq": tensors[f"shared_adam.{name}.exp_avg_sq"],
        }
        for name, n in adam_steps.items()
    }


def read_prompt_state(path: str | os.PathLike) -> tuple[CheckpointState, dict[str, torch.Tensor]]:
    """The state and the tensors of checkpoint `path`, without restoring anything (continual training)."""
    return _read(Path(path))


def read_state(path: str | os.PathLike) -> CheckpointState:
    """The state of checkpoint `path` alone (its tensors are not read)."""
    return _read(Path(path), with_tensors=False)[0]
