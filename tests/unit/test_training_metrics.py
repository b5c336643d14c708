"""The training job's Prometheus endpoint: valid exposition text with per-task series, during a run."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import TrainingMetrics
from tuner.metrics import CheckpointRecord, StepMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    """GET /metrics and parse it strictly; returns {sample name: [samples]}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def test_recorder_exposes_every_series():
    port = _free_port()
    m = TrainingMetrics.start(port, addr="127.0.0.1")
    try:
        m.on_step(
            StepMetrics(
                1, loss=2.5, lr=0.1, tokens=100, task_loss={"sst2": 2.0, "trec": 3.0}, step_time_s=2.0
            )
        )
        m.on_step(StepMetrics(2, loss=2.0, lr=0.05, tokens=60, task_loss={"sst2": 1.5}, step_time_s=1.0))
        m.on_checkpoint(CheckpointRecord(step=2, checkpoint_time_s=0.25))
        m.on_restart()
        s = _scrape(port)
    finally:
        m.stop()
    value = {name: v[0].value for name, v in s.items() if len(v) == 1}
    assert value["promptfleet_train_step"] == 2
    assert value["promptfleet_train_loss"] == 2.0
    assert value["promptfleet_train_learning_rate"] == 0.05
    assert value["promptfleet_train_tokens_total"] == 160
    assert value["promptfleet_train_tokens_per_second"] == 60.0
    assert (
        value["promptfleet_train_step_seconds_count"] == 2
        and value["promptfleet_train_step_seconds_sum"] == 3.0
    )
    assert value["promptfleet_train_checkpoint_seconds_count"] == 1
    assert value["promptfleet_train_last_checkpoint_step"] == 2
    assert value["promptfleet_train_restarts_total"] == 1
    # A task keeps its loss from the last step it appeared in.
    assert {x.labels["task"]: x.value for x in s["promptfleet_train_task_loss"]} == {"sst2": 1.5, "trec": 3.0}


def test_port_in_use_does_not_stop_training():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        m = TrainingMetrics.start(busy.getsockname()[1], addr="127.0.0.1")
    assert m.server is None
    m.on_step(StepMetrics(1, loss=1.0, lr=0.1, tokens=0, task_loss={"a": 1.0}))  # recording still works


def test_endpoint_during_a_run(tmp_path, monkeypatch):
    """A real (tiny) training run with cluster.metrics_port: scrape mid-run, from the checkpoint hook."""
    from tiny_job import write_tiny_backbone, write_tiny_job

    from cluster.launch import train_local
    from tuner.config import load_job_config

    port = _free_port()
    seen: list[dict] = []
    original = TrainingMetrics.on_checkpoint

    def scrape_after_checkpoint(self, record, path=None):
        original(self, record, path)
        seen.append({"step": record.step, "samples": _scrape(port)})

    monkeypatch.setattr(TrainingMetrics, "on_checkpoint", scrape_after_checkpoint)
    job = write_tiny_job(tmp_path / "job", write_tiny_backbone(tmp_path / "backbone"))
    cfg = load_job_config(job, ["optim.max_steps=4", "checkpoint_every=2", f"cluster.metrics_port={port}"])
    train_local(cfg)

    assert [x["step"] for x in seen] == [2, 4]
    mid = seen[0]["samples"]  # scraped while the run still had steps 3-4 to go
    assert mid["promptfleet_train_step"][0].value == 2
    assert {x.labels["task"] for x in mid["promptfleet_train_task_loss"]} == {"tone", "topic"}
    assert all(x.value > 0 for x in mid["promptfleet_train_task_loss"])
    assert mid["promptfleet_train_tokens_total"][0].value > 0
    assert mid["promptfleet_train_last_checkpoint_step"][0].value == 2
    with pytest.raises(OSError):  # the run stopped its endpoint when it finished
        _scrape(port)


class _Fifo:
    """The driver's progress queue as `_DriverProgress` reads it (a `ray.util.queue.Queue` on Ray)."""

    def __init__(self, items):
        self.items = list(items)

    def qsize(self) -> int:
        return len(self.items)

    def get_nowait_batch(self, n: int) -> list:
        out, self.items = self.items[:n], self.items[n:]
        return out


def test_driver_records_rank0s_records_as_rank0_did_and_holds_them_across_a_restart():
    """On Ray the driver serves the metrics (cluster.launch): rank 0 sends its step, checkpoint and
    resume records through the progress queue. A group lost after step 7 and resumed from the
    checkpoint of step 5 (the run's first restart): the series are what a direct computation says."""
    from dataclasses import asdict

    from cluster.launch import _DriverProgress

    steps = [
        StepMetrics(s, loss=10.0 - s, lr=0.1, tokens=100, task_loss={"a": 1.0 / s}, step_time_s=0.5)
        for s in range(1, 8)
    ]
    records = [("step", asdict(m)) for m in steps[:5]]
    records.append(("checkpoint", asdict(CheckpointRecord(step=5, checkpoint_time_s=0.25))))
    records += [("step", asdict(m)) for m in steps[5:7]]  # steps 6-7, then the group is lost
    metrics = TrainingMetrics()
    driver = _DriverProgress(_Fifo(records), total=10, show=False, metrics=metrics)
    driver._drain()
    assert metrics.registry.get_sample_value("promptfleet_train_step") == 7  # held while no group runs

    redo = [StepMetrics(6, loss=3.5, lr=0.1, tokens=100, task_loss={"a": 0.2}, step_time_s=0.5)]
    driver.queue = _Fifo([("resumed", {"step": 5, "restarts": 1})])
    driver._drain()
    value = metrics.registry.get_sample_value
    assert value("promptfleet_train_step") == 5 and value("promptfleet_train_last_checkpoint_step") == 5
    driver.queue = _Fifo([("resumed", {"step": 5, "restarts": 1})] + [("step", asdict(m)) for m in redo])
    driver._drain()  # the same restart told twice counts once
    assert value("promptfleet_train_restarts_total") == 1
    assert value("promptfleet_train_step") == 6 and value("promptfleet_train_loss") == 3.5
    assert value("promptfleet_train_task_loss", {"task": "a"}) == 0.2
    assert value("promptfleet_train_tokens_total") == 100 * 8  # every step run, the redone one included
    assert (
        value("promptfleet_train_step_seconds_count") == 8
        and value("promptfleet_train_checkpoint_seconds_sum") == 0.25
    )
