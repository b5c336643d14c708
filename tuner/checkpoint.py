"""Atomic, rank-independent training checkpoints (never the frozen backbone).

A checkpoint is a directory `step_<N>/` with
  tensors.safetensors  prompt bank, Adam moments per task, sampler and torch RNG states
  state.json           a `CheckpointState`: step, task names, per-task Adam step counts, sampler
                       position, metric history, the prompt method, and with in-batch search the live
                       variants and rung results (`tuner.search.state`)
  chain.json           whether it is a full snapshot or a delta of an earlier checkpoint (`tuner.checkpoint_chain`:
                       a delta holds only the rows, Adam moments and sampler positions changed since; every
                       `full_every`-th checkpoint and the final one are full; reading a delta applies it to
                       its full snapshot, so what loads is the same either way)
A method with shared parts (tuner/prompts/methods.py) adds its shared vector and that vector's Adam.
It is written to a hidden temp directory, fsynced and renamed into place, so a save killed half
way leaves only a `.tmp-*` directory that loading ignores: every `step_*` directory is complete.
Everything is keyed by task name, so a checkpoint written by N ranks resumes on any number.
Only safetensors and JSON are read back (no pickle).
"""

from __future__ import annotations

import dataclasses
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

from tuner import checkpoint_chain as chain_mod
from tuner.config import one_line
from tuner.durable import fsync_path

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
    full_every: int = 1,
    final: bool = False,
) -> Path:
    """Write `root/step_<step>/` atomically and prune older checkpoints beyond `keep_last` (keeping
    every checkpoint a kept delta depends on).

    `history` is `RunHistory.to_json()`; `method` names the prompt parameterisation; `shared` is its
    `SharedParams` (None: no shared part); `search` is `SearchState.to_json()` (None: no search).
    With `full_every` > 1 the checkpoint is a delta of the one this optimiser's state was last saved
    to or loaded from (`tuner.checkpoint_chain`), and every `full_every`-th one of a chain, and a
    `final` one, a full snapshot.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    lineage = chain_mod.lineage_of(optimizer)
    chain = None if final else chain_mod.delta_parent(lineage, root, step, full_every)
    chain, rows, tensors, saved_history, position = _contents(
        chain, lineage, bank, optimizer, sampler, history
    )
    adam_steps = {}
    for name in rows if not chain.full else optimizer.state:
        st = optimizer.state[name]
        tensors[f"adam.{name}.exp_avg"] = st["exp_avg"].contiguous()
        tensors[f"adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        adam_steps[name] = st["step"]
    tensors.update(_shared_tensors(shared))
    save_file(tensors, str(tmp / "tensors.safetensors"))
    state = CheckpointState(
        step=step,
        task_names=list(rows),
        adam_steps=adam_steps,
        sampler=position,
        history=saved_history,
        prompt_method=method,
        shared_adam_steps={k: v["step"] for k, v in shared.optimizer.state.items()} if shared else {},
        search=search,
    )
    _write_json(tmp / chain_mod.CHAIN, chain.to_json())
    _write_json(tmp / "state.json", state.to_json())
    fsync_path(tmp)
    final_dir = root / chain_mod.step_name(step)
    if final_dir.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final_dir)
    os.rename(tmp, final_dir)
    fsync_path(root)
    chain_mod.set_lineage(optimizer, chain_mod.Lineage(step, chain.id, chain.since_full, history))
    chain_mod.mark_saved(optimizer, sampler)
    _prune(root, keep_last)
    return final_dir


def _contents(chain, lineage, bank, optimizer, sampler, history):
    """What a checkpoint holds besides the Adam moments: (its chain record, the bank rows it holds, its
    tensors so far, the history it writes, the sampler position it writes). `chain` None: a full
    snapshot; else a delta of `lineage`'s checkpoint: the rows and positions changed since, the
    history's parts that differ."""
    position = SamplerPosition.of(sampler.state_dict())
    rng = {"torch_rng": torch.get_rng_state(), "sampler_gen": sampler.gen.get_state()}
    if chain is None:
        return (
            chain_mod.Chain(),
            bank.task_names,
            {"bank": bank.weight.contiguous(), **rng},
            history,
            position,
        )
    rows = chain_mod.changed_rows(optimizer)
    tensors = {"bank": bank.weight.index_select(0, bank.rows_of(rows).to(bank.device))} if rows else {}
    saved_history, chain.history_from_parent = chain_mod.history_delta(history, lineage.history)
    position = dataclasses.replace(
        position,
        cursor=chain_mod.changed_positions(position.cursor, sampler),
        epoch=chain_mod.changed_positions(position.epoch, sampler),
        sizes={},
    )
    return chain, rows, {**tensors, **rng}, saved_history, position


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    """Drop checkpoints beyond the newest `keep_last`, but none a kept one is a delta of; and what
    killed saves left (one writer: rank 0)."""
    found = list_checkpoints(root)
    if keep_last > 0 and len(found) > keep_last:
        keep = chain_mod.needed(found, found[-keep_last:])
        for old in found:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
    for killed in root.glob(".tmp-*"):
        shutil.rmtree(killed, ignore_errors=True)


def is_full(path: str | os.PathLike) -> bool:
    """Whether checkpoint `path` is a full snapshot (else a delta of an earlier one)."""
    return chain_mod.Chain.read(Path(path)).full


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
    """The checkpoint's state and tensors (a delta applied to its full snapshot and the deltas
    between); a damaged one is a ValueError that says what to do (checkpoints are written
    atomically, so this is a disk fault or a hand edit, not a killed save)."""
    try:
        state, tensors, _ = _read_chain(path, with_tensors)
    except Exception as e:  # JSON, a missing key, safetensors' own error type, a missing file or parent
        raise ValueError(
            f"checkpoint {path} is damaged ({one_line(e)}); delete that directory to resume from the "
            "checkpoint before it"
        ) from None
    return state, tensors


def _read_chain(path: Path, with_tensors: bool) -> tuple[CheckpointState, dict[str, torch.Tensor], list]:
    """`_read` without the error wording, and the chain of (directory, chain record) it read."""
    links = chain_mod.lineage_chain(path)
    data: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    for i, (p, chain) in enumerate(links):
        step_data = json.loads((p / "state.json").read_text())
        step_tensors = load_file(str(p / "tensors.safetensors")) if with_tensors else {}
        if i == 0:
            data, tensors = step_data, step_tensors
            continue
        if with_tensors:
            tensors = chain_mod.merge_tensors(
                tensors, data["task_names"], step_tensors, step_data["task_names"]
            )
        data = chain_mod.merge_state(data, step_data, chain)
    return CheckpointState.from_json(data), tensors, links


def load_checkpoint(
    path: str | os.PathLike, *, bank, optimizer, sampler, method: str = "independent", shared=None
) -> CheckpointState:
    """Restore bank, optimiser, sampler, RNG (and a method's shared part) from `path`; returns its
    state (step, history, and the in-batch search's state when there is one)."""
    path = Path(path)
    state, tensors = _read(path)
    links = chain_mod.lineage_chain(path)
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
    chain = links[-1][1]  # the next save is a delta of this checkpoint
    chain_mod.set_lineage(optimizer, chain_mod.Lineage(state.step, chain.id, chain.since_full, state.history))
    chain_mod.mark_saved(optimizer, sampler)
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
