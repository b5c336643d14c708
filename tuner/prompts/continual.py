"""Add tasks to a trained fleet (`prompt.init_from=<finished run dir>`), and transfer initialisation.

A finished run directory holds `adapters/<task>/` (plain PEFT prompts, what was exported) and
`checkpoints/step_*/` (the per-task rows and the shared vector of its prompt method).
`load_source` reads both. The recipe then
  * registers the source's rows next to the new tasks' rows, and never trains them (they are not in
    the sampler), so the new run's checkpoint can itself be an `init_from` later;
  * loads the source's shared vector and freezes it, so every old task's composed prompt stays
    exactly what was exported (old tasks need no re-evaluation);
  * re-publishes every source adapter unchanged (`tuner.run_adapters.export_run`): the same tensor
    and metadata through the same writer, so the files are byte-identical.
The job lists only new tasks: a task that is already in the source is a configuration error.
`check_source` runs before the job claims its run directory, `load_source` in the recipe's setup.

Transfer initialisation (`prompt.init=transfer`, SPoT-style): each new task starts from the
source row whose composed prompt has the lowest zero-shot loss (mean target NLL, the training
loss) on the new task's first `prompt.transfer_examples` training examples (`choose_sources`).
Loss on the task itself, rather than a similarity between prompt embeddings, measures what the
initialisation is for; it costs one forward of sources x examples segments per new task.

This module does not train, evaluate or decide the job's tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner import checkpoint as ckpt
from tuner.config import ConfigError
from tuner.evaluate import mean_target_loss
from tuner.run_adapters import AdapterStore
from tuner.run_dir import RUN_FILE


@dataclass
class SourceRun:
    """What a finished run lends to a continual one."""

    path: Path
    method: str  # its prompt.method
    rows: dict[str, torch.Tensor]  # row name -> its per-task row, as in the source bank
    shared: torch.Tensor | None  # the source's shared vector (None: independent)
    adapters: dict[str, Path]  # task -> root/<task>: its directory, or its name in a packed store `root`


def check_source(run_dir: str | Path, method: str, new_tasks: list[str]) -> tuple[Path, ckpt.CheckpointState]:
    """Cheap checks of `run_dir` as an init_from for a job of `method` training `new_tasks`, before the
    job claims its own run directory (a mistake here leaves nothing behind). Returns the newest
    checkpoint and its state; raises ConfigError with a one-line message."""
    path = Path(run_dir).expanduser().resolve()
    info = path / RUN_FILE
    if not info.is_file() or json.loads(info.read_text()).get("status") != "finished":
        raise ConfigError(f"prompt.init_from={run_dir}: not a finished run directory")
    last = ckpt.latest_checkpoint(path / "checkpoints")
    if last is None:
        raise ConfigError(f"prompt.init_from={run_dir}: the run has no checkpoint")
    state = ckpt.read_state(last)
    if state.prompt_method != method:
        raise ConfigError(
            f"prompt.init_from={run_dir} was trained with prompt.method={state.prompt_method}, not {method}"
        )
    again = sorted(set(new_tasks) & set(state.task_names))
    if again:
        raise ConfigError(
            f"task {again[0]} is already trained in prompt.init_from: list only new tasks in the job"
        )
    return last, state


def load_source(
    run_dir: str | Path, method: str, row_shape: tuple[int, ...], backbone: str, new_tasks: list[str]
) -> SourceRun:
    """Read finished run `run_dir` for continual training with `method` (ConfigError if it does not fit)."""
    path = Path(run_dir).expanduser().resolve()
    last, _ = check_source(path, method, new_tasks)
    state, tensors = ckpt.read_prompt_state(last)
    bank = tensors["bank"]
    if tuple(bank.shape[1:]) != tuple(row_shape):
        raise ConfigError(
            f"prompt.init_from={run_dir}: its prompts have shape {tuple(bank.shape[1:])}, this job's {tuple(row_shape)} "
            "(num_virtual_tokens, rank or backbone differ)"
        )
    adapters, store = {}, AdapterStore(path / "adapters")  # per-task directories or a packed store
    for name in store.names:  # headers only: the prompts are read when they are carried to the new run
        trained_on = store.backbone(name)
        if trained_on != backbone:
            raise ConfigError(
                f"prompt.init_from={run_dir}: task {name} was trained on {trained_on}, not {backbone}"
            )
        adapters[name] = path / "adapters" / name
    rows = {name: bank[i] for i, name in enumerate(state.task_names)}
    missing = sorted(set(adapters) ^ set(rows))
    if missing:
        raise ConfigError(
            f"prompt.init_from={run_dir}: adapters and checkpoint differ in {', '.join(missing[:5])}"
        )
    return SourceRun(path, state.prompt_method, rows, tensors.get("shared"), adapters)


def choose_sources(
    lm,
    examples: dict[str, list],
    candidates: dict[str, torch.Tensor],
    *,
    max_len: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, tuple[str, float]]:
    """For each new task, the candidate prompt with the lowest mean target loss on its examples.

    Args:
        examples: new task -> its `TokenizedExample`s to score on.
        candidates: source name -> its composed [P, H] prompt.
    Returns:
        new task -> (chosen source, its mean loss); ties go to the first name in sorted order.
    """
    names = sorted(candidates)
    out = {}
    for task, exs in examples.items():
        loss = mean_target_loss(
            lm, exs, {n: candidates[n] for n in names}, max_len=max_len, pad_id=pad_id, device=device
        )
        best = min(range(len(names)), key=lambda j: (loss[names[j]], j))
        out[task] = (names[best], loss[names[best]])
    return out
