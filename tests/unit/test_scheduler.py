"""Scheduler tests: no torch, no model (tokens are fed by hand, like vLLM's tests/v1/core)."""

from __future__ import annotations

import pytest

from serving.detokenizer import IncrementalText
from serving.output import to_output
from serving.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig
from serving.types import (
    FinishReason,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    SamplingParams,
    TenantLimits,
)

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


# ------------------------------------------------------------------ tenants


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_t(rid: str, tenant: str, prompt_len: int = 3, max_tokens: int = 10) -> Request:
    req = make(rid, prompt_len=prompt_len, max_tokens=max_tokens)
    req.tenant = tenant
    return req


def test_a_flooding_tenant_gets_its_own_429s_and_never_delays_or_rejects_another():
    s = sched(max_batch_size=4, max_queue=64)
    s.set_tenant_limits({"a": TenantLimits(max_concurrent=20), "b": TenantLimits(max_concurrent=20)})
    rejected = 0
    for i in range(200):  # tenant a floods far past its quota
        try:
            s.add(make_t(f"a{i}", "a"))
        except QuotaExceeded as e:
            assert e.status == 429 and e.retry_after >= 1.0
            rejected += 1
    assert rejected == 180
    for i in range(3):  # b arrives behind a's backlog: never rejected ...
        s.add(make_t(f"b{i}", "b"))
    admitted = [r.request_id for r in s.schedule().prefill]
    assert admitted == ["a0", "b0", "a1", "b1"]  # ... and admitted alternately with a, not after it
    stats = s.tenant_stats()
    assert (stats["a"].rejected_total, stats["b"].rejected_total) == (180, 0)
    assert (stats["a"].queued, stats["a"].running, stats["b"].queued, stats["b"].running) == (18, 2, 1, 2)


def test_no_tenant_fills_the_queue_for_the_others():
    s = sched(max_batch_size=1, max_queue=30)
    s.set_tenant_limits({"a": TenantLimits(), "b": TenantLimits()})  # no concurrency limits at all
    with pytest.raises(QuotaExceeded):
        for i in range(100):
            s.add(make_t(f"a{i}", "a"))
    assert s.num_waiting == 10  # a third of the queue: a, b and unnamed tenants
    for i in range(10):
        s.add(make_t(f"b{i}", "b"))  # b's share is still free


def test_weighted_round_robin_admits_in_proportion_to_weight():
    s = sched(max_batch_size=1000, max_step_tokens=10**6)
    s.set_tenant_limits({"a": TenantLimits(weight=1.0), "b": TenantLimits(weight=3.0)})
    for i in range(40):
        s.add(make_t(f"a{i}", "a"))
        s.add(make_t(f"b{i}", "b"))
    s.config.max_batch_size = 20
    first = [r.tenant for r in s.schedule().prefill]
    assert (first.count("a"), first.count("b")) == (5, 15)


def test_token_rate_limit_has_a_retry_after_for_that_tenant():
    clock = Clock()
    s = Scheduler(SchedulerConfig(), clock)
    s.set_tenant_limits({"a": TenantLimits(tokens_per_minute=100)})
    for i in range(7):  # 3 prompt + 10 max tokens = 13 each: 91 of 100
        s.add(make_t(f"a{i}", "a"))
        clock.now += 5
    with pytest.raises(QuotaExceeded) as err:
        s.add(make_t("a7", "a"))
    assert err.value.retry_after == pytest.approx(60 - 35)  # when a0's charge leaves the window
    s.add(make_t("b0", "b"))  # another tenant is unaffected
    with pytest.raises(InvalidRequest):  # can never fit: retrying would not help
        s.add(make_t("huge", "a", max_tokens=200))
    clock.now += 25
    s.add(make_t("a7", "a"))


def test_a_finished_request_is_charged_the_tokens_it_used():
    clock = Clock()
    s = Scheduler(SchedulerConfig(), clock)
    s.set_tenant_limits({"a": TenantLimits(tokens_per_minute=1000)})
    s.add(make_t("a0", "a", max_tokens=100))
    s.add(make_t("a1", "a", max_tokens=100))
    assert s.tenant_stats()["a"].tokens_last_minute == 206
    step(s, token=EOS)  # both stop after one token: 3 prompt + 1 each
    assert s.tenant_stats()["a"].tokens_last_minute == 8
    s.add(make_t("a2", "a", max_tokens=100))
    s.abort("a2")  # never ran: free
    assert s.tenant_stats()["a"].tokens_last_minute == 8
