"""Run the tuner recipe on Ray Train: an embedded local Ray, or an existing cluster.

`train_on_ray(cfg)` starts (or joins) Ray, then runs `tuner.recipe.run` on `num_workers` ranks
in a `TorchTrainer` (gloo on CPU, NCCL on GPU). Rank 0 reports each checkpoint to Ray Train, so
when a worker dies and `FailureConfig(max_failures)` replaces the worker group, the new group
resumes from the last reported checkpoint. `train_local(cfg)` runs the same recipe in this
process (one rank, no Ray), for debugging and benchmarks. Both export Prometheus metrics
(`cluster.metrics`) on `cluster.metrics_port` when it is set (on rank 0 under Ray).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tuner.config import ConfigError, JobConfig, from_dict, to_dict
from tuner.recipe import RecipeHooks, run
from tuner.run_dir import claim_run_dir
from tuner.tasks import TaskSpec


def validate_job(cfg: JobConfig) -> JobConfig:
    """Check on the driver what would otherwise fail inside a worker: tasks, files, run dir."""
    names = []
    for path in cfg.tasks:
        spec = TaskSpec.load(path)
        spec.check_files()
        names.append(spec.name)
    if len(set(names)) != len(names):
        raise ConfigError(f"two task files define the same task name: {sorted(names)}")
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # workers run in other directories
    claim_run_dir(Path(cfg.output_dir) / cfg.name, cfg)
    return cfg


def _worker(config: dict) -> None:
    """The per-rank entry point Ray Train runs."""
    import ray.train

    cfg = from_dict(JobConfig, config)
    metrics_server = None
    if cfg.cluster.metrics_port and ray.train.get_context().get_world_rank() == 0:
        from cluster.metrics import TrainingMetrics

        metrics_server = TrainingMetrics.start(cfg.cluster.metrics_port)

    def on_checkpoint(step: int, path: Path | None, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if metrics_server is not None:
            metrics_server.on_checkpoint(metrics)

    hooks = RecipeHooks(
        on_checkpoint=on_checkpoint, on_step=metrics_server.on_step if metrics_server is not None else None
    )
    restored = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        if restored is not None:
            cfg.resume = True  # a replaced worker group resumes its own run dir even when resume=false
            hooks.resume_from = Path(restored.to_directory(tmp))
            if metrics_server is not None:
                metrics_server.on_restart()
        run(cfg, hooks)


def train_on_ray(cfg: JobConfig, address: str | None = None) -> dict:
    """Run `cfg` on Ray Train; returns the run summary written by rank 0."""
    import json

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = validate_job(cfg)
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env={
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                }
            },
        )
    c = cfg.cluster
    trainer = TorchTrainer(
        _worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(Path(cfg.output_dir) / cfg.name / "ray"),
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
    )
    trainer.fit()
    summary = Path(cfg.output_dir) / cfg.name / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def train_local(cfg: JobConfig) -> dict:
    """Run `cfg` in this process as a single rank (no Ray, no DeepSpeed); metrics as on Ray."""
    cfg = validate_job(cfg)
    if not cfg.cluster.metrics_port:
        return run(cfg)
    from cluster.metrics import TrainingMetrics

    metrics = TrainingMetrics.start(cfg.cluster.metrics_port)
    try:
        return run(
            cfg,
            RecipeHooks(
                on_step=metrics.on_step, on_checkpoint=lambda step, path, m: metrics.on_checkpoint(m)
            ),
        )
    finally:
        metrics.stop()
