"""Run the tuner recipe on Ray Train: an embedded local Ray, or an existing cluster.

`train_on_ray(cfg)` prepares the job once on the driver (`tuner.job.prepare_job`: tasks checked,
run directory claimed, embedded backbone converted), starts (or joins) Ray, then runs
`tuner.recipe.run` on `num_workers` ranks in a `TorchTrainer` (gloo on CPU, NCCL on GPU). Rank 0
reports each checkpoint to Ray Train, so when a worker dies and `FailureConfig(max_failures)`
replaces the worker group, the new group resumes from the last reported checkpoint. Ray Train
keeps those in the run directory, or on a multi-node cluster on `cluster.storage`, where the node
that replaces a lost one reads them (module `cluster.storage`). Rank 0 also sends each step's and
evaluation's record to the driver through a Ray queue (an actor on the driver's node; a worker that
finds it gone trains on without it): the driver draws the one progress bar and
prints the final table; workers print nothing of their own, and Ray's own INFO lines are turned
off through Ray's logging configuration. A lost worker group is one driver line, and the run's
summary records each restart (`cluster.recovery`); the new group reads its checkpoint in place on
shared storage, so the "resumed from" line names the checkpoint, not a download of it. Joining a
cluster (`--address`) uses the auth token `promptfleet submit` would (`cluster.auth`).

`train_local(cfg)` runs the same recipe in this process (one rank, no Ray), for debugging and
benchmarks. Both export Prometheus metrics (`cluster.metrics`) on `cluster.metrics_port` when it is
set. Under Ray the driver serves them, from rank 0's step, checkpoint and resume records on the same
queue: the driver is one process at one address for the whole run (the head pod, for a submitted job
or a RayJob), where rank 0 lands on whichever worker Ray picks and dies with its group. Only a
`promptfleet tune` trial, which has no driver queue, serves them from its rank 0.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from cluster.storage import cluster_output_dir, ray_train_storage
from tuner.config import ConfigError, JobConfig, from_dict, to_dict
from tuner.job import prepare_job
from tuner.metrics import CheckpointRecord, EvalPoint, EvalProgress, StepMetrics
from tuner.progress import EvalBarFromRecords, describe_eval, step_postfix
from tuner.report import SUMMARY_FILE, RunSummary, read_summary, summary_table

# Environment of every Ray worker, set through each library's own configuration: no INFO chatter,
# no deprecation warnings of upstream internals, no Hub access unless the driver has it.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logging configuration
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's accelerator-visibility setting (and its FutureWarning)
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",  # e.g. DeepSpeed's calls into torch
}


def _quiet_deepspeed() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _worker(config: dict) -> None:
    """The per-rank entry point Ray Train runs."""
    from dataclasses import asdict

    import ray.train

    from tuner.recipe import RecipeHooks, run  # torch and the model: loaded by ranks, never by the driver

    _quiet_deepspeed()
    progress = _ToDriver(config.pop("_progress", None))  # rank 0's records and log lines to the driver
    ledger = config.pop("_ledger", None)  # the driver's `RestartLedger` (None: a tune trial)
    tune = config.pop("_tune", False)  # a `promptfleet tune` trial: evaluations are reported to Ray Tune
    cfg = from_dict(JobConfig, config)
    rank0 = ray.train.get_context().get_world_rank() == 0
    ledger = ledger if rank0 else None
    resumed: _ResumePoint | None = None  # the checkpoint this group resumes from (set below)
    metrics_server = None  # the driver serves the metrics; a tune trial (no queue to it) serves its own
    if cfg.cluster.metrics_port and rank0 and progress.queue is None:
        from cluster.metrics import TrainingMetrics

        metrics_server = TrainingMetrics.start(cfg.cluster.metrics_port)

    def on_step(metrics: StepMetrics) -> None:
        if metrics_server is not None:
            metrics_server.on_step(metrics)
        if rank0:
            progress.put(("step", asdict(metrics)))
        if ledger is not None:
            ledger.at_step.remote(metrics.step)  # fire and forget: how far this group got, if it is lost

    def on_eval(point: EvalPoint) -> None:
        if rank0:
            progress.put(("eval", asdict(point)))
        if tune and not point.zero_shot and point.scores:  # every rank reports (Ray Train's contract)
            ray.train.report({"step": point.step, "score": mean_score(point.scores)})

    def on_checkpoint(record, path: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(asdict(record), checkpoint=checkpoint)
        if metrics_server is not None:
            metrics_server.on_checkpoint(record)
        if rank0:
            progress.put(("checkpoint", asdict(record)))  # for the driver's metrics

    def on_message(line: str) -> None:
        if resumed is not None and resumed.local != resumed.uri:  # name the checkpoint, not its download
            line = line.replace(resumed.local, resumed.uri)
        progress.put(("log", line))

    def on_eval_progress(record: EvalProgress) -> None:  # the recipe calls it on rank 0 only
        progress.put(("eval_progress", asdict(record)))

    hooks = RecipeHooks(
        on_step=on_step,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
        on_message=on_message,
        on_eval_progress=on_eval_progress,
    )
    restored = ray.train.get_checkpoint()  # set when Ray Train replaced a lost worker group
    with restored.as_directory() if restored is not None else contextlib.nullcontext() as local:
        if restored is not None:
            cfg.resume = True  # a replaced worker group resumes its own run dir even when resume=false
            hooks.resume_from = Path(local)  # on shared storage: read in place (a URI: a download)
        resumed = _resume_point(cfg, restored, local)
        if ledger is not None:
            hooks.restarts = _check_in(ledger, resumed)
        if resumed is not None:
            restarts = len(hooks.restarts) if ledger is not None else int(restored is not None)
            if metrics_server is not None:
                metrics_server.on_restart(resumed.step, restarts)
            if rank0:  # the driver's metrics: step and checkpoint step where this group resumes
                progress.put(("resumed", {"step": resumed.step, "restarts": restarts}))
        run(cfg, hooks, progress=False)


@dataclass
class _ResumePoint:
    """The checkpoint a worker group resumes from: its step, where it persists, where it is read."""

    step: int
    uri: str  # where it persists: Ray Train's storage (a shared path, or a URI), or the run directory
    local: str  # the directory read: `uri` itself on a shared filesystem, else a temporary download


def _resume_point(cfg: JobConfig, restored, local: str | None) -> _ResumePoint | None:
    """Ray Train's checkpoint (a replaced group), else with `resume` the run directory's newest, which the
    recipe resumes from by itself (`cluster.recovery.resume_target` says the same on the driver)."""
    from cluster.recovery import checkpoint_uri, run_dir_checkpoint
    from tuner.checkpoint import read_state

    if restored is not None:
        return _ResumePoint(read_state(local).step, checkpoint_uri(restored), str(local))
    found = run_dir_checkpoint(Path(cfg.output_dir).resolve() / cfg.name) if cfg.resume else None
    return _ResumePoint(found[0], found[1], found[1]) if found else None


def _check_in(ledger, resumed: _ResumePoint | None) -> list:
    """Rank 0 of a new worker group checks in with the driver's `RestartLedger`: every restart so far."""
    import ray
    from ray.exceptions import RayError

    step, uri = (resumed.step, resumed.uri) if resumed is not None else (0, "")
    try:
        return ray.get(ledger.group_started.remote(step, uri), timeout=60)
    except RayError as e:  # the driver's node is gone: train on, the summary just lacks the restarts
        print(f"promptfleet: the driver's restart ledger is gone ({e!r:.200})", file=sys.stderr)
        return []


class _ToDriver:
    """A worker's end of the driver's queue (`ray.util.queue.Queue`, or None: nothing is sent).

    Best effort: the records it carries are also in the run directory, so if the queue's actor is gone
    (its node lost, the driver exited) the worker says so once on its own stderr and trains on. Before
    this, a restarted worker group failed at its first log line for as long as the queue was gone.
    """

    def __init__(self, queue):
        self.queue = queue

    def put(self, item) -> None:
        if self.queue is None:
            return
        from ray.exceptions import RayActorError

        try:
            self.queue.put(item)
        except RayActorError as e:
            print(
                f"promptfleet: the driver's queue is gone, progress is no longer sent to it ({e!r:.200})",
                file=sys.stderr,
            )
            self.queue = None


class _DriverProgress:
    """The driver's progress bar and training metrics, fed by rank 0's records through a Ray queue."""

    def __init__(self, queue, total: int, show: bool, metrics=None):
        self.queue, self.total, self.show = queue, total, show
        self.metrics = metrics  # the driver's `cluster.metrics.TrainingMetrics` (None: not served)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="promptfleet-progress", daemon=True)
        self.bar = None
        self.evals: EvalBarFromRecords | None = None  # the running evaluation pass's bar
        self._started = False  # a record from rank 0 has arrived

    def __enter__(self) -> _DriverProgress:
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="prompt tuning", unit="step", dynamic_ncols=True)
            self.evals = EvalBarFromRecords(self.bar)  # its passes' time is left out of the bar's rate
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if self.evals is not None:
            self.evals.close()
        if self.bar is not None:
            self.bar.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float = 0.0) -> None:
        from ray.util.queue import Empty

        items = []
        try:
            if timeout:
                items.append(self.queue.get(timeout=timeout))
            items += self.queue.get_nowait_batch(self.queue.qsize())
        except (Empty, Exception):  # noqa: BLE001 - the queue's actor may be gone at shutdown
            pass  # show what did arrive
        for kind, record in items:
            if self.metrics is not None:
                self._record_metrics(kind, record)
            if kind in ("checkpoint", "resumed"):  # for the metrics only
                continue
            if kind == "log":  # rank 0's console lines (e.g. "resumed from ..."): always shown
                (self.bar.write if self.bar is not None else print)(record)
                continue
            if self.bar is None:
                continue
            if not self._started:  # rank 0 is set up: the minutes before (Ray, the model) are not steps
                self._started = True
                if kind == "eval_progress":  # (a first step record keeps them: its own time is in there)
                    self.bar.start_t = self.bar.last_print_t = self.bar._time()
            if kind == "eval_progress":
                self.evals.update(EvalProgress(**record))
            elif kind == "step":
                m = StepMetrics(**record)
                self.bar.n = m.step
                self.bar.set_postfix(step_postfix(m))
            else:
                self.bar.write(describe_eval(EvalPoint(**record)))

    def _record_metrics(self, kind: str, record) -> None:
        """Rank 0's record into the driver's metrics: the values rank 0 itself recorded before."""
        if kind == "step":
            self.metrics.on_step(StepMetrics(**record))
        elif kind == "checkpoint":
            self.metrics.on_checkpoint(CheckpointRecord(**record))
        elif kind == "resumed":
            self.metrics.on_restart(record["step"], record["restarts"])


def mean_score(scores: dict[str, float]) -> float:
    """The headline number of a run: the mean over tasks of their scores."""
    return sum(scores.values()) / len(scores) if scores else 0.0


def init_ray(cfg: JobConfig, address: str | None = None) -> None:
    """Start (or join) Ray for `cfg` once per process, with the workers' environment."""
    import ray

    env = {**WORKER_ENV, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's accelerator setting: no GPU probing and its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver too (it converts the backbone)
    c = cfg.cluster
    address = address or c.address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return
    if address:  # joining a cluster: with the token `promptfleet submit` would send (cluster.auth)
        from cluster.auth import enable_token_auth

        enable_token_auth(address)
    try:
        # Ray's logging configuration: its own INFO/WARNING lines (token auth, accelerator set-up) and the
        # workers' console output stay in Ray's log files (`cluster.worker_logs=true` forwards the latter).
        # Progress reaches the driver through the queue below; a worker's error still ends `fit()` with it.
        # No address: a new local Ray ("local"), never Ray's own default of joining whatever cluster
        # `ray start` last started on this machine (`--address auto` asks for that).
        ray.init(
            address=address or "local",
            log_to_driver=c.worker_logs,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
            runtime_env={"env_vars": env},
        )
    except (ConnectionError, RuntimeError) as e:
        from cluster.auth import auth_failure_message, is_auth_failure

        if not is_auth_failure(e):
            raise
        raise ConfigError(auth_failure_message(address)) from None
    if not c.worker_logs:  # a crashed raylet's log dump: in its node's raylet.out, not on the console
        from cluster.recovery import keep_raylet_dumps_off_console

        keep_raylet_dumps_off_console()


def make_trainer(cfg: JobConfig, loop_config: dict, callbacks: list | None = None):
    """The Ray Train `TorchTrainer` that runs the prepared job `cfg` on `cluster.num_workers` ranks."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    storage_path, run_name = ray_train_storage(Path(cfg.output_dir) / cfg.name, cfg.name, c.storage)
    return TorchTrainer(
        _worker,
        train_loop_config={**to_dict(cfg), **loop_config},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,  # where a replaced worker group finds the last checkpoint
            failure_config=FailureConfig(max_failures=c.max_failures),
            # Ray Train's logging configuration: no per-report and worker-group INFO lines.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def train_on_ray(cfg: JobConfig, address: str | None = None, progress: bool = True) -> RunSummary | None:
    """Run `cfg` on Ray Train; returns the run summary written by rank 0 (None if it wrote none)."""
    import ray
    from ray.util.queue import Queue

    from cluster.recovery import RestartLedger, WorkerGroupWatch

    # A relative output_dir lies on the cluster's shared storage when there is one (see cluster.storage).
    cfg.output_dir = cluster_output_dir(cfg.output_dir, cfg.cluster.storage)
    job = prepare_job(cfg, claim=True)
    cfg = job.cfg
    init_ray(cfg, address)
    queue = Queue(actor_options=driver_node_actor())
    # Where a lost worker group is explained: the ledger (restarts, for the summary) and one console line.
    c = cfg.cluster
    ledger = ray.remote(RestartLedger).options(**driver_node_actor()).remote(c.num_workers)
    watch = WorkerGroupWatch(queue, c.num_workers, c.max_failures, str(job.run_dir), cfg.resume)
    trainer = make_trainer(cfg, {"_progress": queue, "_ledger": ledger}, callbacks=[watch])
    metrics = None
    if c.metrics_port:  # served here, on the driver (see the module docstring)
        from cluster.metrics import TrainingMetrics

        metrics = TrainingMetrics.start(c.metrics_port)
    try:
        with _DriverProgress(queue, cfg.optim.max_steps, show=progress, metrics=metrics):
            trainer.fit()
    finally:
        if metrics is not None:
            metrics.stop()
    summary = read_summary(job.run_dir) if (job.run_dir / SUMMARY_FILE).is_file() else None
    if progress and summary:
        print_outcome(summary, job.run_dir)
    return summary


def driver_node_actor() -> dict:
    """Actor options that place a driver-side helper actor (the progress queue) on the driver's own node.

    It needs no CPU, so Ray could put it on any node; on a worker node that is lost, the driver's progress
    would go with it, and every replacement worker group would find its queue dead. The driver's node
    (the head, for a submitted job) lives as long as the driver does. The affinity is hard: a soft one
    was seen to spill the actor to a worker node while the head was still starting its first worker.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def print_outcome(summary: RunSummary, run_dir: Path) -> None:
    """The tuned-vs-zero-shot table and where the outputs went."""
    out = sys.stdout
    out.write("\n" + summary_table(summary) + "\n\n")
    out.write(f"run directory: {run_dir}\n")
    for what, path in (
        ("adapters (PEFT format)", "adapters/"),
        ("report", "report.md"),
        ("curves", "curves.png"),
        ("summary", "summary.json"),
    ):
        out.write(f"  {what:<24}{run_dir / path}\n")
    out.flush()


def train_local(cfg: JobConfig, progress: bool = True) -> RunSummary:
    """Run `cfg` in this process as a single rank (no Ray, no DeepSpeed); metrics as on Ray."""
    from tuner.recipe import RecipeHooks, run

    job = prepare_job(cfg, claim=True)
    hooks = RecipeHooks()
    metrics = None
    if job.cfg.cluster.metrics_port:
        from cluster.metrics import TrainingMetrics

        metrics = TrainingMetrics.start(job.cfg.cluster.metrics_port)
        hooks = RecipeHooks(on_step=metrics.on_step, on_checkpoint=metrics.on_checkpoint)
    try:
        summary = run(job.cfg, hooks, progress=progress)
    finally:
        if metrics is not None:
            metrics.stop()
    if progress:
        print_outcome(summary, job.run_dir)
    return summary
