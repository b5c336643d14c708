"""Job preparation: the one place a job's tasks are loaded and checked and its run directory claimed.

`prepare_job(cfg)` loads every task file, checks its data files (each split's header or first
rows must hold every field the task names, see `tuner.tasks.readers.check_columns`; a task family's
table is read whole and every row checked, `tuner.tasks.family`) and that task names are unique,
makes `output_dir` absolute (workers run in other directories) and returns a `PreparedJob`.
`prepare_job(cfg, claim=True)` also claims the run directory (`tuner.run_dir`): the entry point
that starts a run (the CLI's launcher, on the driver) does this exactly once; the recipe on each
rank prepares the same job without claiming it. The embedded backbone is resolved (converted into
the model cache) on the claiming process too, so workers never race to convert it.

It reads no more than a few rows per file (a family's table: all of it, once) and loads no model
weights (see `tuner.tasks.data`, `tuner.model.backbone`); the builders the recipe calls next read the rest of the config: `PreparedJob.load_data` (every task's
examples, tokenised), `PreparedJob.sampler` and `zero_setup` (how the backbone is laid out over the ranks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuner.config import ConfigError, JobConfig, to_dict
from tuner.run_dir import claim_run_dir, fingerprint
from tuner.tasks.family import expand_family
from tuner.tasks.readers import check_columns
from tuner.tasks.spec import TaskSpec

if TYPE_CHECKING:
    import torch

    from tuner.model.memory import Workload
    from tuner.model.zero import ZeroSettings, ZeroSetup
    from tuner.tasks.data import MultiTaskSampler, TaskData


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

    def load_data(self, tokenizer, log: Callable[[str], None] = lambda msg: None) -> dict[str, TaskData]:
        """Every task's examples by name, tokenised, within the job's `data.*` limits; train examples whose
        target alone overfills `model.max_seq_len` are left out, each task's count told to `log`."""
        from tuner.tasks.data import TaskData

        d, P, L = self.cfg.data, self.cfg.prompt.num_virtual_tokens, self.cfg.model.max_seq_len
        out = {}
        for s in self.specs:
            data = TaskData.load(
                s, tokenizer, max_train=d.max_train_examples, max_eval=d.max_eval_examples, seed=d.seed
            )
            out[s.name], dropped = data.fitting(P, L)
            if dropped:
                log(
                    f"task {s.name}: {dropped} of {len(data.train):,} train examples left out: their targets "
                    f"leave no room for an input in model.max_seq_len={L} after {P} virtual tokens"
                )
        return out

    def sampler(self, sizes: dict[str, int]) -> MultiTaskSampler:
        """What draws each step's global batch from tasks of `sizes` train examples (`optim.batch_size`,
        mixed as `data.*` says)."""
        from tuner.tasks.data import MultiTaskSampler

        c = self.cfg
        return MultiTaskSampler(sizes, c.optim.batch_size, c.data.mixing, c.data.temperature, c.data.seed)


def load_task_specs(task_files: list[str]) -> list[TaskSpec]:
    """Load and check task files: data files exist and hold the fields the task names, names are unique.

    A family file (`family.id_column`, `tuner.tasks.family`) is every task of its table, each row checked.
    """
    files = [TaskSpec.load(p) for p in task_files]
    names = [s.name for s in files]
    if len(set(names)) != len(names):
        dup = sorted(n for n, k in Counter(names).items() if k > 1)
        raise ConfigError(f"two task files define the same task name: {', '.join(dup)}")
    specs: list[TaskSpec] = []
    for s in files:
        if s.family.enabled:
            specs += expand_family(s)  # reads the table once; checks files, header and every row
            continue
        s.check_files()
        check_columns(s)
        specs.append(s)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted(n for n, k in Counter(names).items() if k > 1)
        raise ConfigError(f"two tasks of the job have the same name: {', '.join(dup[:5])}")
    return specs


def prepare_job(cfg: JobConfig, *, claim: bool = False) -> PreparedJob:
    """Load and check `cfg`'s tasks; with `claim`, also claim the run directory and resolve the backbone."""
    specs = load_task_specs(cfg.tasks)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    job = PreparedJob(cfg, specs)
    if cfg.prompt.init_from:  # continual training (tuner/prompts/continual.py): absolute, checked first
        from tuner.prompts.continual import check_source

        cfg.prompt.init_from = str(Path(cfg.prompt.init_from).expanduser().resolve())
        check_source(cfg.prompt.init_from, cfg.prompt.method, job.task_names)
    if claim:
        from tuner.model.model_cache import resolve_backbone

        cfg.model.check_local_path()  # a missing local backbone: one line, before anything loads
        resolve_backbone(cfg.model.name)  # convert the embedded backbone once, here, before any worker
        claim_run_dir(job.run_dir, cfg.name, fingerprint(to_dict(cfg)), resume=cfg.resume)
    return job


def job_workload(job: PreparedJob, world_size: int, dtype: torch.dtype) -> Workload:
    """What one training step of `job` asks of each of `world_size` ranks: its share of the micro-batch,
    the sequence length and the prompt bank, one row per registered task (`PreparedJob.task_names`: a
    task family counts every task of its table, not the one entry of `cfg.tasks` that names it)."""
    import torch

    from tuner.model.memory import Workload

    cfg = job.cfg
    micro = cfg.optim.batch_size // cfg.optim.grad_accum
    return Workload(
        seq_len=cfg.model.max_seq_len,
        micro_batch=-(-micro // world_size),
        num_tasks=len(job.task_names),
        num_virtual_tokens=cfg.prompt.num_virtual_tokens,
        dtype={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
    )


def zero_setup(
    job: PreparedJob,
    backbone_path: str,
    dtype: torch.dtype,
    world_size: int,
    log: Callable[[str], None] = lambda msg: None,
    settings: ZeroSettings | None = None,
) -> ZeroSetup:
    """The backbone's layout over ranks for `job` (`tuner.model.zero.prepare_zero` on its cluster
    section and what one training step asks of each rank, `job_workload`). `settings` replaces the
    ZeRO-3 knobs of `cluster.*` (benchmarks)."""
    from tuner.model.zero import prepare_zero

    workload = job_workload(job, world_size, dtype)
    return prepare_zero(
        job.cfg.cluster, workload, world_size, backbone=backbone_path, dtype=dtype, settings=settings, log=log
    )
