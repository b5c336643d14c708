"""What an operator sees, and what the run records, when Ray Train loses its worker group.

A lost node (or a killed worker) fails the worker group; Ray Train (`cluster.max_failures`) waits until
the cluster has room for a new one and the new group resumes from the last checkpoint reported to it
(`cluster.launch`). Three parts make that legible:

- `WorkerGroupWatch`, a Ray Train callback that runs in Ray Train's controller: it remembers the last
  committed checkpoint (its step and persistent path on Ray Train's storage) and, when the worker group
  fails, puts ONE line on the driver's console through the driver's progress queue:
  "worker group lost: waiting for 2 workers; resuming from checkpoint step 5 (/mnt/shared/...)".
  Ray Train takes a checkpoint in when it next polls the workers, so a group lost right after a save
  may have none committed yet: the new group then resumes from the run directory's newest
  (`resume_target`, the recipe's own rule), and the line names that one.
- `RestartLedger`, a small Ray actor on the driver's node: rank 0 tells it each step it finishes
  (fire and forget), and every worker group's rank 0 checks in when it starts. A check-in after the
  first is a restart: the ledger records how far the lost group got and where the new one resumed
  (`tuner.metrics.RestartRecord`) and hands rank 0 every restart so far, which the recipe writes into
  summary.json and report.md (`tuner.report.RunSummary.restarts`).
- `keep_raylet_dumps_off_console`: when a raylet dies unexpectedly (SIGKILL, OOM killer), the agents on
  its node publish its last log lines (`[state-dump] ...`, ~20 lines each, two agents) to every driver,
  and Ray's driver prints every published error whatever `log_to_driver` says. The driver filters
  those dumps out unless `cluster.worker_logs=true`; they stay in the node's `raylet.out`, and the
  watch's line says what happened.

Nothing here restarts anything (Ray Train does) or loads checkpoints (the recipe does; here only their
step is read). Other errors Ray publishes (a worker's death, one line) still reach the console.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray.train import UserCallback

from tuner.metrics import RestartRecord

RAYLET_DIED = "Raylet is terminated."  # how Ray's agents begin the error they publish when their raylet dies


def checkpoint_uri(checkpoint) -> str:
    """Where a `ray.train.Checkpoint` persists: a path on a filesystem every node mounts, or a URI."""
    import pyarrow.fs

    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{checkpoint.path}"


class RestartLedger:
    """Ray actor (on the driver's node) counting a run's worker groups and the steps they reached."""

    def __init__(self, workers: int):
        self.workers = workers
        self.step = 0  # the last step rank 0 reported
        self.groups = 0  # worker groups whose rank 0 checked in
        self.restarts: list[RestartRecord] = []

    def at_step(self, step: int) -> None:
        self.step = step

    def group_started(self, resumed_step: int, checkpoint: str) -> list[RestartRecord]:
        """Rank 0 of a new worker group, before it trains; returns every restart of the run so far."""
        if self.groups:
            self.restarts.append(RestartRecord(self.step, resumed_step, checkpoint, self.workers))
        self.groups += 1
        self.step = resumed_step
        return list(self.restarts)


class WorkerGroupWatch(UserCallback):
    """Ray Train callback (it runs in Ray Train's controller): one driver line per lost worker group.

    `after_report` keeps the last checkpoint Ray Train committed, the one a new group resumes from;
    `after_exception` (Ray Train polled the group and found a worker failed or gone) sends the line
    through the driver's progress queue, fire and forget. A callback that raised would fail the run, so
    neither ever raises.
    """

    def __init__(self, queue, workers: int, max_failures: int, run_dir: str, resume: bool):
        self.queue = queue  # the driver's `ray.util.queue.Queue` (None: nowhere to say it)
        self.workers, self.max_failures = workers, max_failures
        self.run_dir, self.resume = run_dir, resume
        self.committed: tuple[int, str] | None = None  # (step, path) of Ray Train's newest checkpoint
        self.failures = 0

    def after_report(self, run_context, metrics, checkpoint) -> None:
        try:
            if checkpoint is not None and metrics and "step" in metrics[0]:
                self.committed = (int(metrics[0]["step"]), checkpoint_uri(checkpoint))
        except Exception:  # noqa: BLE001 - never fail the run over a console line
            pass

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.failures += 1
        try:
            target = resume_target(self.committed, self.run_dir, self.resume)
            line = lost_group_line(self.workers, target, self.max_failures, self.failures)
            if self.queue is not None:
                self.queue.actor.put_nowait.remote(("log", line))  # no ray.get: the controller is async
        except Exception:  # noqa: BLE001 - the driver (and its queue) may be gone
            pass


def run_dir_checkpoint(run_dir: str | os.PathLike) -> tuple[int, str] | None:
    """(step, path) of the run directory's newest complete checkpoint, None if it has none (or is not
    on this node's filesystem)."""
    from tuner.checkpoint import latest_checkpoint, read_state

    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    return (read_state(latest).step, str(latest)) if latest is not None else None


def resume_target(committed: tuple[int, str] | None, run_dir: str, resume: bool) -> tuple[int, str] | None:
    """Where a new worker group resumes: Ray Train's newest committed checkpoint; before Ray Train has
    committed one, with `resume` the run directory's newest (the recipe's own rule); else nowhere."""
    if committed is not None:
        return committed
    return run_dir_checkpoint(run_dir) if resume else None


def lost_group_line(workers: int, target: tuple[int, str] | None, max_failures: int, failures: int) -> str:
    """The driver's one line for a lost worker group (`failures`: groups lost so far, this one included;
    `target`: the (step, path) of the checkpoint the next group resumes from)."""
    if max_failures != -1 and failures > max_failures:
        return (
            f"worker group lost: no restarts left (cluster.max_failures={max_failures}, "
            f"{failures} failures); the run fails"
        )
    if target is None:
        return f"worker group lost: waiting for {workers} workers; no checkpoint yet, starting over at step 0"
    step, path = target
    return f"worker group lost: waiting for {workers} workers; resuming from checkpoint step {step} ({path})"


def keep_raylet_dumps_off_console() -> None:
    """Drop the raylet-death dumps from what Ray's driver prints (see the module docstring).

    Ray has no setting for it: its driver thread that listens for published errors prints each through
    `ray._private.worker.print_to_stdstream`, looked up at every call, so a filter in its place sees them
    all. Every other published error (a worker's crash, an actor's death) is still printed.
    """
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "drops_raylet_dumps", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        lines = data.get("lines") or [""]
        if data.get("pid") == "raylet" and str(lines[0]).startswith(RAYLET_DIED):
            return
        original(data, ignore_prefix)

    print_to_stdstream.drops_raylet_dumps = True
    ray_worker.print_to_stdstream = print_to_stdstream
