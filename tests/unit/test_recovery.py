"""Node loss, explained, and joining a token-auth cluster: the parts that need no cluster.

- `cluster.auth`: where this machine's Ray token is found (the same for `submit` and `train --address`);
- `cluster.recovery`: the restart ledger, the driver's one line, which checkpoint a new group resumes
  from, and the filter that keeps a crashed raylet's log dump off the console;
- `RunSummary.restarts` in summary.json and report.md; `promptfleet_train_step` after a restart.

The real node loss (a SIGKILLed raylet) is `tests/distributed/test_multi_node.py`; the real auth cluster
is `tests/distributed/test_ray_auth.py`.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.auth import enable_token_auth, is_auth_failure, is_local_address, ray_auth_token
from cluster.jobs import auth_headers
from cluster.metrics import TrainingMetrics
from cluster.recovery import (
    RAYLET_DIED,
    RestartLedger,
    keep_raylet_dumps_off_console,
    lost_group_line,
    resume_target,
)
from tuner.metrics import RestartRecord, StepMetrics
from tuner.report import RunSummary, TaskSummary, render_report


@pytest.fixture
def no_ray_auth(monkeypatch, tmp_path) -> Path:
    """No Ray auth setting in the environment; HOME is an empty directory. Returns HOME."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_discovery_order_and_where_the_local_file_goes(no_ray_auth, monkeypatch):
    home = no_ray_auth
    assert (
        ray_auth_token(None, "127.0.0.1:6379") is None and auth_headers(None, "http://127.0.0.1:8265") == {}
    )
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("local-token\n")
    # This machine's file: for a cluster on this machine only (any of its address forms) ...
    for address in ("127.0.0.1:6379", "localhost:6379", "http://127.0.0.1:8265", "auto"):
        assert is_local_address(address) and ray_auth_token(None, address) == "local-token"
    # ... never sent elsewhere, unless RAY_AUTH_MODE=token says so (as Ray's own loader does).
    assert not is_local_address("10.0.0.5:6379") and ray_auth_token(None, "10.0.0.5:6379") is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_auth_token(None, "10.0.0.5:6379") == "local-token"
    monkeypatch.delenv("RAY_AUTH_MODE")
    path = home / "cluster-token"
    path.write_text(" from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert ray_auth_token(None, "10.0.0.5:6379") == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_auth_token(None, "10.0.0.5:6379") == "from-env"
    assert ray_auth_token("given", "10.0.0.5:6379") == "given"
    # `submit`'s header is the same token.
    assert auth_headers(None, "http://10.0.0.5:8265") == {"Authorization": "Bearer from-env"}


def test_enable_token_auth_only_when_a_token_is_found_and_the_mode_is_unset(no_ray_auth, monkeypatch):
    import os

    assert not enable_token_auth("10.0.0.5:6379") and "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit mode is the user's
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert not enable_token_auth("10.0.0.5:6379") and os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert enable_token_auth("10.0.0.5:6379") and os.environ["RAY_AUTH_MODE"] == "token"
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray's cached mode was refreshed
    monkeypatch.delenv("RAY_AUTH_MODE")
    Config.initialize("")  # back to this process's default for the tests after this one


def test_auth_failures_are_recognised_through_ray_wrappers():
    from ray.exceptions import AuthenticationError

    try:
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to Ray cluster") from inner
    except ConnectionError as e:
        assert is_auth_failure(e)
    quoted = RuntimeError(
        "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n  ...\n"
        "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing"
    )
    try:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from quoted
    except ConnectionError as e:
        assert is_auth_failure(e)
    assert not is_auth_failure(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"))


def test_ledger_records_each_replaced_group_with_the_steps_it_lost():
    ledger = RestartLedger(workers=2)
    assert ledger.group_started(0, "") == []  # the first group is no restart
    for step in range(1, 8):
        ledger.at_step(step)
    (first,) = ledger.group_started(5, "/shared/run-1/checkpoint_a")
    assert first == RestartRecord(7, 5, "/shared/run-1/checkpoint_a", 2) and first.lost_steps == 2
    ledger.at_step(6)
    second = ledger.group_started(5, "/shared/run-1/checkpoint_a")[1]  # lost again after one step
    assert (second.lost_at_step, second.lost_steps) == (6, 1)
    third = ledger.group_started(5, "/shared/run-1/checkpoint_a")[2]  # lost before its first step
    assert third.lost_steps == 0


def test_lost_group_line_and_the_checkpoint_it_names(tmp_path):
    from tuner import checkpoint as ckpt

    run_dir = tmp_path / "run"
    assert resume_target(None, str(run_dir), True) is None
    line = lost_group_line(2, None, max_failures=1, failures=1)
    assert line == "worker group lost: waiting for 2 workers; no checkpoint yet, starting over at step 0"
    # Before Ray Train committed a checkpoint, the new group resumes from the run directory's newest.
    sampler = ckpt.SamplerPosition(step=4, cursor={}, epoch={}, sizes={})
    state = ckpt.CheckpointState(step=4, task_names=[], adam_steps={}, sampler=sampler, history={})
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "state.json").write_text(json.dumps(state.to_json()))
    (run_dir / "checkpoints" / "step_00000004" / "tensors.safetensors").write_bytes(b"")
    found = resume_target(None, str(run_dir), True)
    assert found == (4, str(run_dir / "checkpoints" / "step_00000004"))
    assert resume_target(None, str(run_dir), False) is None  # resume=false: it starts over
    assert resume_target((5, "/shared/x/checkpoint_b"), str(run_dir), True) == (5, "/shared/x/checkpoint_b")
    assert lost_group_line(2, (5, "/shared/x/checkpoint_b"), max_failures=-1, failures=9) == (
        "worker group lost: waiting for 2 workers; resuming from checkpoint step 5 (/shared/x/checkpoint_b)"
    )
    assert "no restarts left (cluster.max_failures=1, 2 failures)" in lost_group_line(2, found, 1, 2)


def test_raylet_death_dumps_stay_off_the_console_other_errors_do_not(monkeypatch, capsys):
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    keep_raylet_dumps_off_console()
    keep_raylet_dumps_off_console()  # idempotent: one filter
    dump = f"{RAYLET_DIED} Termination is unexpected. Last 20 lines of the Raylet logs:\n    [state-dump] x"
    ray_worker.print_to_stdstream({"lines": [dump], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream(
        {"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False}, ignore_prefix=False
    )
    out = capsys.readouterr().out
    assert "[state-dump]" not in out and RAYLET_DIED not in out and "A worker died or was killed" in out


def _summary(restarts: list[RestartRecord]) -> RunSummary:
    return RunSummary(
        name="r",
        backbone="b",
        steps=20,
        world_size=2,
        num_virtual_tokens=4,
        tokens_per_s=1.0,
        tasks={"t": TaskSummary("classification", "accuracy", None, None)},
        config={},
        restarts=restarts,
    )


def test_summary_and_report_record_the_restarts():
    restarts = [RestartRecord(7, 4, "/shared/r-1/checkpoint_a", 2), RestartRecord(9, 8, "", 2)]
    data = json.loads(json.dumps(_summary(restarts).to_json()))
    assert (data["restarts"], data["lost_steps"]) == (2, 4)
    assert data["restart_log"][0] == {
        "lost_at_step": 7,
        "resumed_step": 4,
        "checkpoint": "/shared/r-1/checkpoint_a",
        "workers": 2,
        "lost_steps": 3,
    }
    assert RunSummary.from_json(data).restarts == restarts
    report = render_report(_summary(restarts))
    assert "**Restarts**: Ray Train lost and replaced the worker group 2 time(s); 4 step(s)" in report
    assert "| 7 | 4 | 3 | 2 | `/shared/r-1/checkpoint_a` |" in report and "| 9 | 8 | 1 | 2 | none" in report
    # A run that lost nothing: the file and the report are what they were before restarts were recorded.
    plain = _summary([])
    assert "restarts" not in plain.to_json() and "Restarts" not in render_report(plain)


def test_train_step_resumes_at_the_checkpoint_step_not_zero():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = TrainingMetrics.start(port, addr="127.0.0.1")
    try:
        m.on_restart(step=5, restarts=2)  # a replaced group's rank 0, before its first step
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        m.on_step(StepMetrics(6, loss=1.0, lr=0.1, tokens=10, task_loss={"t": 1.0}, step_time_s=0.5))
    finally:
        m.stop()
    value = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert value["promptfleet_train_step"] == 5 and value["promptfleet_train_last_checkpoint_step"] == 5
    assert value["promptfleet_train_restarts_total"] == 2  # the run's restarts, not this process's one
    assert m.step._value.get() == 6
