"""Prometheus metrics of a training job, served over HTTP by the process that runs the job.

`TrainingMetrics.start(port)` opens a scrape endpoint (`/metrics`) in a background thread and
returns the recorder that `cluster.launch` feeds: `on_step` (loss, per-task loss, learning rate,
tokens, step time), `on_checkpoint` (checkpoint time and step) and `on_restart` (a worker group
resumed from a checkpoint: `step` is set to the checkpoint's step, not 0).
The series live in a registry of their own, so several recorders in one process never clash.

Who serves them: on Ray, the driver (`cluster.launch.train_on_ray`), fed with rank 0's step,
checkpoint and resume records through its progress queue. The driver is one process that outlives
every worker group (for a submitted job or a KubeRay RayJob it runs on the head pod), so the endpoint
has one fixed address that `k8s/monitoring.yaml` scrapes, and a lost worker group does not take the
series with it: `step` holds its value until the new group resumes. With `--no-ray` the single
training process serves them itself.

Series (all prefixed `promptfleet_train_`): `step`, `loss`, `task_loss{task}`, `learning_rate`,
`tokens_total`, `tokens_per_second`, `step_seconds` (histogram), `checkpoint_seconds`
(histogram), `last_checkpoint_step`, `restarts_total`. `task_loss` has one series per task seen
in a batch, so very large task counts mean as many series; the dashboard aggregates them.

A port that cannot be opened only logs a warning: metrics must never stop a training run.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tuner.metrics import CheckpointRecord, StepMetrics

log = logging.getLogger(__name__)

PREFIX = "promptfleet_train_"
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class TrainingMetrics:
    """Records one training process's series; `start(port)` also serves them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.server = None  # (WSGIServer, Thread) once `serve` succeeded
        r = self.registry
        self.step = Gauge(PREFIX + "step", "Optimiser steps completed.", registry=r)
        self.loss = Gauge(PREFIX + "loss", "Mean loss over the examples of the last step.", registry=r)
        self.task_loss = Gauge(
            PREFIX + "task_loss",
            "Mean loss of a task's examples in the last step it appeared in.",
            ["task"],
            registry=r,
        )
        self.lr = Gauge(PREFIX + "learning_rate", "Learning rate of the last step.", registry=r)
        self.tokens = Counter(PREFIX + "tokens", "Text tokens processed (all ranks).", registry=r)
        self.tokens_per_s = Gauge(
            PREFIX + "tokens_per_second", "Text tokens per second in the last step.", registry=r
        )
        self.step_seconds = Histogram(
            PREFIX + "step_seconds", "Wall time of one optimiser step.", buckets=STEP_BUCKETS, registry=r
        )
        self.checkpoint_seconds = Histogram(
            PREFIX + "checkpoint_seconds",
            "Wall time of one checkpoint save.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.last_checkpoint_step = Gauge(
            PREFIX + "last_checkpoint_step", "Step of the newest checkpoint.", registry=r
        )
        self.restarts = Counter(PREFIX + "restarts", "Worker groups the run lost and replaced.", registry=r)
        self._restarts = 0  # what `restarts` counts (a Counter's value is not public)

    @classmethod
    def start(cls, port: int, addr: str = "0.0.0.0") -> TrainingMetrics:
        """Create a recorder and serve it on `addr:port` (a failure to bind is logged, not raised)."""
        metrics = cls()
        metrics.serve(port, addr)
        return metrics

    def serve(self, port: int, addr: str = "0.0.0.0") -> bool:
        try:
            self.server = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            # e.g. another job's driver on this node holds the port: keep training without metrics.
            log.warning(
                "training metrics: cannot listen on %s:%d (%s); continuing without them", addr, port, e
            )
            return False
        return True

    def stop(self) -> None:
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self.server = None

    def on_step(self, metrics: StepMetrics) -> None:
        """Record one step of the recipe (`MultiTaskPromptTuningRecipe.train_step`'s record)."""
        self.step.set(metrics.step)
        self.loss.set(metrics.loss)
        self.lr.set(metrics.lr)
        self.tokens.inc(metrics.tokens)
        self.tokens_per_s.set(metrics.tokens_per_s)
        if metrics.step_time_s > 0:
            self.step_seconds.observe(metrics.step_time_s)
        for task, loss in metrics.task_loss.items():
            self.task_loss.labels(task).set(loss)

    def on_checkpoint(self, record: CheckpointRecord, path=None) -> None:
        """Record a finished checkpoint save (usable directly as the recipe's `on_checkpoint` hook)."""
        self.checkpoint_seconds.observe(record.checkpoint_time_s)
        self.last_checkpoint_step.set(record.step)

    def on_restart(self, step: int | None = None, restarts: int = 1) -> None:
        """A worker group resumes from the checkpoint of `step`; the run has been restarted `restarts`
        times in all. `step` and the checkpoint step are set to where training resumes (not 0, nor the
        lost group's last step, until its first step); the counter is raised to the run's total, so the
        same total told twice (or by a fresh process) counts each restart once."""
        if step is not None:
            self.step.set(step)
            self.last_checkpoint_step.set(step)
        if restarts > self._restarts:
            self.restarts.inc(restarts - self._restarts)
            self._restarts = restarts
