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
