"""Scheduler tests: no torch, no model (tokens are fed by hand, like vLLM's tests/v1/core)."""

from __future__ import annotations

import pytest

from serving.detokenizer import IncrementalText
from serving.output import to_output
from serving.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig
from serving.types import FinishReason, Overloaded, SamplingParams

EOS = 0


def decode(ids: list[int]) -> str:
    """Token i is the letter chr(ord('a') + i - 1); EOS (0) is special and never shown."""
    return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


def make(rid: str, task: str = "t", prompt_len: int = 3, **params) -> Request:
    return Request(
        rid,
        task,
        [1] * prompt_len,
        SamplingParams(**params),
        arrival_time=0.0,
        eos_token_ids=frozenset({EOS}),
    )


def sched(**cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg))


def step(s: Scheduler, token: int = 1):
    """One step as the engine runs it: the scheduler's update, then the output path (text, stop strings)."""
    out = s.schedule()
    outputs = []
    for u in s.update(out, {r.request_id: token for r in (*out.prefill, *out.decode)}):
        outputs.append(to_output(u, decode))
        if outputs[-1].finished and u.finish_reason is None:
            s.finish(u.request.request_id, FinishReason.STOP)
    return out, outputs


def test_requests_of_different_tasks_share_a_step():
    s = sched(max_batch_size=8)
    for i in range(4):
        s.add(make(f"r{i}", task=f"task{i}"))
    out = s.schedule()
    assert [r.task for r in out.prefill] == ["task0", "task1", "task2", "task3"]
    assert out.decode == []
    s.update(out, {r.request_id: 1 for r in out.prefill})
    out = s.schedule()
    assert {r.task for r in out.decode} == {"task0", "task1", "task2", "task3"} and not out.prefill


def test_continuous_batching_admits_new_requests_while_others_decode():
    s = sched(max_batch_size=4)
    s.add(make("a", max_tokens=10))
    step(s)
    s.add(make("b", max_tokens=10))
    out, _ = step(s)
    assert [r.request_id for r in out.decode] == ["a"] and [r.request_id for r in out.prefill] == ["b"]
    out = s.schedule()
    assert [r.request_id for r in out.decode] == ["a", "b"]


def test_batch_size_and_step_token_budget_bound_admission():
    s = sched(max_batch_size=2, max_step_tokens=10)
    for i in range(3):
        s.add(make(f"r{i}", prompt_len=4))
    out = s.schedule()
    assert len(out.prefill) == 2  # batch full
    s2 = sched(max_batch_size=8, max_step_tokens=10)
    for i in range(3):
        s2.add(make(f"r{i}", prompt_len=4))
    assert len(s2.schedule().prefill) == 2  # 4 + 4 <= 10 < 12
    s3 = sched(max_step_tokens=5)
    s3.add(make("long", prompt_len=50))
    assert len(s3.schedule().prefill) == 1  # an idle engine always admits one request


def test_full_queue_raises_overloaded_with_retry_after():
    s = sched(max_queue=2)
    s.add(make("a"))
    s.add(make("b"))
    with pytest.raises(Overloaded) as err:
        s.add(make("c"))
    assert err.value.retry_after > 0 and err.value.status == 429
    s.abort("a")  # room again
    s.add(make("c"))


def test_abort_waiting_and_running():
    s = sched(max_batch_size=1)
    s.add(make("run"))
    s.add(make("wait"))
    step(s)
    assert s.abort("wait").finish_reason is FinishReason.ABORT
    assert s.abort("run").status is RequestStatus.FINISHED
    assert s.abort("run") is None  # already gone
    out = s.schedule()
    assert out.empty and not s.has_work


def test_abort_during_model_step_drops_its_token():
    s = sched()
    s.add(make("a"))
    out = s.schedule()
    s.abort("a")
    assert s.update(out, {"a": 1}) == []


def test_max_tokens_finishes_with_length():
    s = sched()
    s.add(make("a", max_tokens=3))
    outs = [step(s, token=2)[1][0] for _ in range(3)]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].completion_tokens == 3
    assert "".join(o.text for o in outs) == "bbb"
    assert s.schedule().empty


def test_eos_finishes_with_stop_and_is_not_shown():
    s = sched()
    s.add(make("a", max_tokens=10))
    step(s, token=3)
    _, [last] = step(s, token=EOS)
    assert last.finished and last.finish_reason is FinishReason.STOP and last.text == ""
    assert last.completion_tokens == 2


def test_stop_string_cuts_output_and_is_never_streamed():
    s = sched()
    s.add(make("a", max_tokens=20, stop=["cd"]))
    texts = []
    for token in [1, 2, 3, 4, 5]:  # a b c d e
        _, outs = step(s, token)
        if not outs:
            break
        texts.append(outs[0].text)
        if outs[0].finished:
            assert outs[0].finish_reason is FinishReason.STOP
            break
    assert "".join(texts) == "ab"
    assert len(texts) == 4  # finished at the token that completed "cd"


def test_incremental_text_waits_for_complete_characters():
    table = {1: b"\xe2", 2: b"\x82", 3: b"\xac", 4: b"x"}  # the euro sign split over 3 tokens

    def dec(ids):
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    t = IncrementalText(dec)
    deltas = []
    for tok in [4, 1, 2, 3, 4]:
        t.append(tok)
        deltas.append(t.take_delta(final=False))
    assert deltas == ["x", "", "", "\u20ac", "x"]
