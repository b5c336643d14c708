"""Tensor-parallel serving on a tiny random Llama (4 heads, 2 KV heads): N=2 real ranks over gloo.

Rank 0 runs in this process (the engine under test), rank 1 is a child process
(`python -m serving.tp_worker`), exactly as `promptfleet serve` starts them. The oracle is the
single-process engine on the same checkpoint and prompt store: greedy tokens and streamed chunks
identical, label probabilities within `tp_helpers.PROB_TOL`. Also here: the step plan on its own
(each task version shipped once, forgotten tasks dropped), the one-line errors at start, a rank
killed or stalled mid-stream (every request ends with 503, nothing hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch
from serving_helpers import engine_config, tiny_backbone_dir, write_prompt_store
from tp_helpers import assert_same_outputs, engine_loop, mixed_outputs, stop_engine

from cluster.plan_serving import serving_plan
from serving.engine import Engine
from serving.scheduler import Request, RequestKind, SchedulerOutput
from serving.step_plan import PlanReader, PlanWriter
from serving.tensor_parallel import RankLost
from serving.types import GenerationRequest, SamplingParams
from tuner.model.memory import GB, load_shape

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    backbone = tiny_backbone_dir(root)
    return backbone, write_prompt_store(root, backbone)


def _engine(tiny, n: int, **kw) -> Engine:
    backbone, store = tiny
    return Engine(engine_config(store, backbone, tensor_parallel=n, threads=1, **kw))


def test_two_ranks_serve_a_mixed_batch_as_one_process(tiny):
    single = _engine(tiny, 1)
    try:
        want = mixed_outputs(single)
    finally:
        stop_engine(single)
    sharded = _engine(tiny, 2)
    try:
        got = mixed_outputs(sharded)
        again = mixed_outputs(sharded)  # the ranks' caches warm (prefix hits) and a second batch
        memory = sharded.runner.memory
    finally:
        stop_engine(sharded)
    assert_same_outputs(want, got, "N=2, first batch")
    assert_same_outputs(want, again, "N=2, second batch")
    # Every layer's projections and the embedding are halved; only the norms are whole on each rank,
    # exactly what `promptfleet plan --serve-ranks 2` says a rank holds.
    planned = serving_plan(load_shape(str(tiny[0])), 2, 1, 1, 1, 1, "fp32", 0, GB).weights
    for m in memory:
        assert m.ratio <= 1 / 2 + 0.10, f"rank {m.rank} holds {m.ratio:.3f} of the weights"
        assert m.weight_bytes == planned


def _req(rid: str, task, kind=RequestKind.GENERATE) -> Request:
    return Request(rid, task.name, [5, 6, 7], SamplingParams(max_tokens=2), 0.0, adapter=task, kind=kind)


class _Task:
    def __init__(self, name, version, prompt):
        self.name, self.version, self.prompt = name, version, prompt


def test_the_plan_ships_each_task_version_once_and_forgets_changed_tasks():
    writer, reader = PlanWriter(), PlanReader()
    a1, b1 = _Task("a", 1, torch.ones(2, 4)), _Task("b", 1, torch.zeros(3, 4))
    plan = writer.plan(SchedulerOutput(prefill=[_req("r1", a1), _req("r2", a1), _req("r3", b1)]), {})
    assert [(n, v) for n, v, _ in plan.prompts] == [("a", 1), ("b", 1)]
    reader.apply(plan)
    out = reader.scheduler_output(plan)
    assert [r.adapter.name for r in out.prefill] == ["a", "a", "b"]
    assert torch.equal(out.prefill[0].adapter.prompt, a1.prompt)
    assert writer.plan(SchedulerOutput(prefill=[_req("r4", a1)]), {}).prompts == []  # held already

    # Task a changes: the next plan says forget, and ships the new version with its first row.
    writer.forget("a")
    a2 = _Task("a", 2, torch.full((2, 4), 2.0))
    plan = writer.plan(SchedulerOutput(prefill=[_req("r5", a2)], chunks=[(_req("r6", b1), 2)]), {"r1": 9})
    assert plan.forget == ["a"] and [(n, v) for n, v, _ in plan.prompts] == [("a", 2)]
    assert reader.apply(plan) == ["a"]
    assert set(reader.prompts) == {("a", 2), ("b", 1)}  # no rank keeps a version rank 0 dropped
    out = reader.scheduler_output(plan)
    assert torch.equal(out.prefill[0].adapter.prompt, a2.prompt) and out.chunks[0][1] == 2
    assert plan.tokens == {"r1": 9}


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["engine.tensor_parallel=3"],
            "engine.tensor_parallel=3 does not divide the backbone's 4 attention heads",
        ),
        (["engine.tensor_parallel=2", "engine.device=cuda"], "engine.tensor_parallel=2 needs 2 GPUs"),
    ],
)
def test_a_bad_number_of_ranks_is_a_one_line_error_at_start(tiny, overrides, message):
    backbone, store = tiny
    if "cuda" in overrides[-1] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    done = _serve("--prompt-store", str(store), f"engine.backbone={backbone}", "api.auth=none", *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("promptfleet: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


async def _stream_until_lost(engine: Engine, lose) -> tuple[list, BaseException | None]:
    """Start two long streams and a classification, then `lose()` a rank after the first chunk."""
    params = SamplingParams(max_tokens=250, temperature=0.0)
    streams = [engine.generate(GenerationRequest(f"s{i}", "samsum", "Anna: hi", params)) for i in range(2)]
    firsts = [await anext(s) for s in streams]
    # Held scheduler lock: the engine cannot finish the streams while the rank goes (250 tokens each).
    with engine._lock:
        lose()
        classify = asyncio.ensure_future(engine.classify("sst2", "fine"))
    errors = []
    for s in streams:
        try:
            async for _ in s:
                pass
        except BaseException as e:  # noqa: BLE001 - what ended the stream is the result
            errors.append(e)
    try:
        await classify
    except BaseException as e:  # noqa: BLE001
        errors.append(e)
    return firsts, errors


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_lost_rank_ends_every_request_with_503_and_nothing_hangs(tiny, how):
    # A 3 s collective timeout: a stalled (SIGSTOPped) rank is declared lost after it.
    engine = _engine(tiny, 2, collective_timeout_s=3.0, max_new_tokens_limit=256)
    pid = engine.runner.pids[0]
    loop = engine_loop(engine)
    try:
        sig = signal.SIGKILL if how == "kill" else signal.SIGSTOP
        firsts, errors = loop.run_until_complete(
            asyncio.wait_for(_stream_until_lost(engine, lambda: os.kill(pid, sig)), timeout=60)
        )
        assert all(not f.finished for f in firsts)
        assert len(errors) == 3 and all(isinstance(e, RankLost) and e.status == 503 for e in errors), errors
        assert engine.failed.wait(30) and engine.failure is not None  # the other ranks ended first
        with pytest.raises(RankLost):  # and every later request, at once
            loop.run_until_complete(engine.classify("sst2", "fine"))
    finally:
        if how == "stall":  # only if the test failed before the replica killed it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop_engine(engine)
    # The lost replica ended (and reaped) its other ranks: none is left behind.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
