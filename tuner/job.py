"""Job preparation: the one place a job's tasks are loaded and checked and its run directory claimed.

`prepare_job(cfg)` loads every task file, checks its data files (each split's header or first
rows must hold every field the task names, see `tuner.tasks.spec.check_columns`) and that task names are unique,
makes `output_dir` absolute (workers run in other directories) and returns a `PreparedJob`.
`prepare_job(cfg, claim=True)` also claims the run directory (`tuner.run_dir`): the entry point
that starts a run (the CLI's launcher, on the driver) does this exactly once; the recipe on each
rank prepares the same job without claiming it. The embedded backbone is resolved (converted into
the model cache) on the claiming process too, so workers never race to convert it.

It reads no more than a few rows per file and loads no model weights (see `tuner.tasks.data`, `tuner.model.backbone`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuner.config import ConfigError, JobConfig
from tuner.run_dir import claim_run_dir
from tuner.tasks.spec import TaskSpec, check_columns


@dataclass
class PreparedJob:
    cfg: JobConfig
    specs: list[TaskSpec]  # in the order of `cfg.tasks`

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir) / self.cfg.name

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]


def load_task_specs(task_files: list[str]) -> list[TaskSpec]:
    """Load and check task files: data files exist and hold the fields the task names, names are unique."""
    specs = [TaskSpec.load(p) for p in task_files]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two task files define the same task name: {', '.join(dup)}")
    for s in specs:
        s.check_files()
        check_columns(s)
    return specs


def prepare_job(cfg: JobConfig, *, claim: bool = False) -> PreparedJob:
    """Load and check `cfg`'s tasks; with `claim`, also claim the run directory and resolve the backbone."""
    specs = load_task_specs(cfg.tasks)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    job = PreparedJob(cfg, specs)
    if (
        cfg.prompt.init_from
    ):  # continual training (tuner/prompts/continual.py): absolute, and checked before claiming
        from tuner.prompts.continual import check_source

        cfg.prompt.init_from = str(Path(cfg.prompt.init_from).expanduser().resolve())
        check_source(cfg.prompt.init_from, cfg.prompt.method, job.task_names)
    if claim:
        from tuner.model.backbone import resolve_backbone

        resolve_backbone(cfg.model.name)  # convert the embedded backbone once, here, before any worker
        claim_run_dir(job.run_dir, cfg)
    return job
