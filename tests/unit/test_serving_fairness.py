"""Fair sharing of each engine step (issue 34): batch slots and prefill tokens split between tenants by
weight, preemption of the tenant above its share, chunked prefill, and fp32 classification scores.

The scheduler is driven by hand (no model) where only its decisions matter; where a decision changes
what the model computes (a chunked prompt, a preempted and recomputed generation, bf16 scores), the
tiny Llama of `test_serving_runner` runs it and the result is compared with a direct computation.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_serving_runner import VOCAB, classify_request, make_tasks, sharp_llama

from serving.runner import ModelRunner
from serving.scheduler import Request, RequestKind, RequestStatus, Scheduler, SchedulerConfig, water_fill
from serving.types import SamplingParams, TenantLimits

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(rid: str, tenant: str, prompt_len: int = 4, max_tokens: int = 100, task=None) -> Request:
    return Request(
        rid,
        "t",
        list(range(3, 3 + prompt_len)),
        SamplingParams(max_tokens=max_tokens),
        0.0,
        adapter=task,
        tenant=tenant,
    )


def clf(rid: str, tenant: str, prompt_len: int) -> Request:
    return Request(
        rid,
        "t",
        [5] * prompt_len,
        SamplingParams(max_tokens=1),
        0.0,
        kind=RequestKind.CLASSIFY,
        continuations=[[1], [2]],
        tenant=tenant,
    )


def prefilled(out, tenant: str) -> int:
    """Prefill tokens `out` computes for `tenant` (chunks and completing prompts)."""
    chunks = sum(n for r, n in out.chunks if r.tenant == tenant)
    return chunks + sum(r.completion_cost for r in out.prefill if r.tenant == tenant)


def run(s: Scheduler, token: int = 7):
    """One step with a fake model: every generation row samples `token`. `out.tokens`: what it computed."""
    out = s.schedule()
    out.tokens = sum(n for _, n in out.chunks) + sum(r.completion_cost for r in out.prefill) + len(out.decode)
    out.prefilled = {r.tenant: prefilled(out, r.tenant) for r in (*out.prefill, *(r for r, _ in out.chunks))}
    s.update(out, {r.request_id: token for r in (*out.prefill, *out.decode)})
    return out


def held(s: Scheduler) -> dict[str, int]:
    return {name: t.held for name, t in s._tenants.items()}


def test_water_fill_is_weighted_max_min_fair_and_work_conserving():
    w = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert water_fill(32, {"a": 100, "b": 100, "c": 100}, w) == {"a": 8, "b": 8, "c": 16}
    assert water_fill(32, {"a": 2, "b": 100, "c": 100}, w) == {"a": 2, "b": 10, "c": 20}
    assert water_fill(32, {"a": 100, "b": 0, "c": 0}, w) == {"a": 32, "b": 0, "c": 0}  # alone: everything
    assert water_fill(32, {"a": 3, "b": 4, "c": 5}, w) == {"a": 3, "b": 4, "c": 5}


def test_a_tenant_alone_gets_the_whole_batch():
    s = Scheduler(SchedulerConfig(max_batch_size=8))
    for i in range(12):
        s.add(gen(f"a{i}", "a"))
    out = run(s)
    assert len(out.prefill) == 8 and not out.preempted
    for _ in range(5):
        out = run(s)
        assert len(out.decode) == 8 and not out.preempted


def test_a_tenant_below_its_share_preempts_the_cheapest_row_of_the_tenant_above_it():
    s = Scheduler(SchedulerConfig(max_batch_size=4))
    for i in range(4):  # a fills the batch, admitted one step apart: rows of different lengths
        s.add(gen(f"a{i}", "a"))
        run(s)
    run(s)
    a3 = s.running["a3"]
    s.add(gen("b0", "b", max_tokens=2))
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["a3"]  # the shortest (latest) row of a
    assert [r.request_id for r in out.prefill] == ["b0"] and "a3" not in {r.request_id for r in out.decode}
    assert s.running.keys() == {"a0", "a1", "a2", "b0"}
    assert a3.status is RequestStatus.WAITING and a3.output_ids == [7, 7]  # kept: it resumes from there
    assert a3.prefill_ids == a3.prompt_ids + [7, 7]
    assert a3.wait_steps == 1 and s.tenant_stats()["b"].queue_wait_steps.counts[0] == 1  # b waited 1 step
    assert s.tenant_stats()["a"].preemptions_total == 1
    s.update(out, {r.request_id: 7 for r in (*out.prefill, *out.decode)})
    out = run(s)  # b decodes its last token; a3 waits (a is at its share)
    assert not out.preempted and not out.prefill
    out = run(s)  # b has left: a3 comes back, recomputing its prompt and its 2 tokens in one prefill
    assert [r.request_id for r in out.prefill] == ["a3"] and a3.output_ids == [7, 7, 7]
    assert s.tenant_stats()["a"].admitted_total == 4  # a preempted request is not admitted twice


def test_slot_shares_follow_weights_and_nothing_thrashes():
    s = Scheduler(SchedulerConfig(max_batch_size=12))
    s.set_tenant_limits({"a": TenantLimits(weight=1.0), "b": TenantLimits(weight=2.0)})
    for i in range(12):
        s.add(gen(f"a{i}", "a"))
    run(s)
    for i in range(12):
        s.add(gen(f"b{i}", "b"))
    out = run(s)
    assert len(out.preempted) == 8 and held(s) == {"a": 4, "b": 8}
    for _ in range(10):  # steady: no more preemptions while nothing changes
        assert not run(s).preempted
    assert held(s) == {"a": 4, "b": 8}


def test_a_long_prompt_is_prefilled_in_chunks_within_the_step_budget():
    s = Scheduler(SchedulerConfig(max_step_tokens=64))
    req = gen("long", "a", prompt_len=200)
    s.add(req)
    sizes = []
    while req.status is RequestStatus.WAITING:
        out = run(s)
        assert out.tokens <= 64
        sizes += [n for _, n in out.chunks]
        if out.chunks:
            assert (
                out.partial == {"long"} and s._tenants["a"].held == 1
            )  # a partial generation holds its slot
    assert (
        sizes == [64, 64, 64] and out.tokens == 8 and req.output_ids == [7]
    )  # completed: 8 tokens, a sample
    assert req.num_computed == 0 and not out.partial


def test_a_flood_of_long_prompts_leaves_another_tenant_a_short_step():
    s = Scheduler(SchedulerConfig(max_step_tokens=512, shared_step_tokens=128, shared_hold_s=0.0))
    for i in range(10):
        s.add(clf(f"a{i}", "a", prompt_len=700))
    out = run(s)  # a alone: the whole budget
    assert out.tokens == 512 and out.partial == {"a0"}
    s.add(gen("b0", "b", prompt_len=10, max_tokens=3))
    out = run(s)  # the next step: b's prompt whole, a's flood 128 tokens
    assert "b0" in {r.request_id for r in out.prefill} and out.prefilled == {"a": 128, "b": 10}
    while "b0" in s.running:
        out = run(s)
        assert out.tokens == 128 + 1 and out.prefilled == {"a": 128}  # b decodes beside short steps
    assert run(s).tokens > 500  # a alone again: the whole budget (less a chunk too small to run)


def test_only_a_backlog_of_more_than_flood_steps_steps_is_capped():
    """A burst that takes up to `flood_steps` whole steps goes in whole beside another tenant's
    stream; a deeper backlog is a flood and gets `shared_step_tokens` per step."""
    for n, capped in ((4, False), (5, True)):  # n prompts of one whole step each (flood_steps=4)
        s = Scheduler(SchedulerConfig(max_step_tokens=100, shared_step_tokens=20, shared_hold_s=0.0))
        s.add(gen("a0", "a", max_tokens=50))
        run(s)
        for i in range(n):
            s.add(clf(f"b{i}", "b", prompt_len=100))
        assert run(s).prefilled == {"b": 20 if capped else 99}, n


def test_a_busy_tenant_whose_prompts_fit_in_a_step_is_not_capped():
    """b has many requests but less waiting than one step holds: its prompts go in whole beside a's
    stream (capping it would only slow b down; a's steps are bounded by `max_step_tokens`)."""
    s = Scheduler(SchedulerConfig(max_step_tokens=512, shared_step_tokens=128, shared_hold_s=0.0))
    s.add(gen("a0", "a", max_tokens=50))
    run(s)
    for i in range(6):
        s.add(gen(f"b{i}", "b", prompt_len=60))
    out = run(s)
    assert out.prefilled == {"b": 360} and len(out.prefill) == 6 and out.decode[0].request_id == "a0"


def test_flooding_tenants_share_the_capped_step_by_weight():
    s = Scheduler(SchedulerConfig(max_step_tokens=512, shared_step_tokens=120, shared_hold_s=0.0))
    s.set_tenant_limits({"a": TenantLimits(weight=1.0), "b": TenantLimits(weight=2.0)})
    for i in range(4):
        s.add(clf(f"a{i}", "a", prompt_len=700))
        s.add(clf(f"b{i}", "b", prompt_len=700))
    s.add(gen("c0", "c", prompt_len=8))
    out = run(s)
    assert out.prefilled == {"a": 40, "b": 80, "c": 8}


def test_aborting_a_partial_prefill_frees_its_slot_and_its_kv():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_step_tokens=16))
    s.add(gen("long", "a", prompt_len=100))
    out = run(s)
    assert out.partial == {"long"} and s._tenants["a"].held == 1
    s.abort("long")
    s.add(gen("next", "a"))
    out = run(s)
    assert [r.request_id for r in out.prefill] == ["next"] and out.partial == frozenset()


# ---------------------------------------------------------------------------- with the model


def drive(
    runner: ModelRunner, s: Scheduler, arrivals: dict[int, list[Request]], hook=None
) -> dict[str, list]:
    """Scheduler + runner as the engine runs them; returns each generation's tokens and each
    classification's scores. `hook(step, scheduler)` runs before each schedule."""
    got: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or s.has_work:
        for req in arrivals.get(step, []):
            s.add(req)
        if hook is not None:
            hook(step, s)
        out = s.schedule()
        result = runner.step(out)
        assert not result.failed
        got.update(result.scores)
        for u in s.update(out, result.tokens):
            got.setdefault(u.request.request_id, []).append(u.token)
        step += 1
    return got


def direct_greedy(model, task, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of a full forward of [task prompt; embed(ids)] each step (the reference)."""
    embed, out = model.get_input_embeddings(), []
    with torch.inference_mode():
        for _ in range(n):
            x = torch.cat([task.prompt, embed(torch.tensor(ids + out))])[None]
            out.append(int(model(inputs_embeds=x).logits[0, -1].argmax()))
    return out


def test_chunked_prefill_and_recompute_after_preemption_give_the_direct_tokens():
    model, tasks = sharp_llama(), make_tasks(2, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (41, 5, 6, 3)]

    def req(i: int, tenant: str, task: int) -> Request:
        return Request(
            f"{tenant}{i}",
            "t",
            prompts[i],
            SamplingParams(max_tokens=6),
            0.0,
            adapter=tasks[task],
            tenant=tenant,
        )

    s = Scheduler(SchedulerConfig(max_batch_size=2, max_step_tokens=20, min_chunk_tokens=4))
    a0, a1, b0 = req(0, "a", 0), req(1, "a", 1), req(2, "b", 1)
    got = drive(ModelRunner(model), s, {0: [a0, a1], 4: [b0]})
    assert a0.preemptions + a1.preemptions == 1  # b's arrival preempted one of a's rows
    for r in (a0, a1, b0):
        assert got[r.request_id] == direct_greedy(model, r.adapter, r.prompt_ids, 6), r.request_id


def test_a_chunked_classification_scores_like_a_direct_forward():
    model, [task] = sharp_llama(), make_tasks(1, seed=4)
    prompt = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    conts = [[10], [11, 12], [11, 13]]
    req = classify_request("c", task, prompt, conts)
    req.tenant = "a"
    s = Scheduler(SchedulerConfig(max_step_tokens=10, min_chunk_tokens=4))
    got = drive(ModelRunner(model), s, {0: [req]})["c"]
    embed = model.get_input_embeddings()
    P = task.prompt.shape[0]
    with torch.inference_mode():
        for c, score in zip(conts, got):
            logp = torch.log_softmax(
                model(inputs_embeds=torch.cat([task.prompt, embed(torch.tensor(prompt + c))])[None]).logits[
                    0
                ],
                -1,
            )
            want = sum(float(logp[P + len(prompt) - 1 + j, t]) for j, t in enumerate(c))
            assert score == pytest.approx(want, abs=1e-4)


def test_bf16_label_probabilities_equal_fp32_arithmetic_on_the_same_hidden_states():
    """Logits around 40 step by 0.25 in bf16: labels a few hundredths apart came out tied (0.5/0.5)."""
    model = sharp_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits of tens, as a trained LM's
    model = model.to(torch.bfloat16)
    [task] = make_tasks(1, seed=7)
    prompt = [7, 8, 9, 10]
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        x = torch.cat([task.prompt.to(torch.bfloat16), embed(torch.tensor(prompt))])[None]
        hidden = model.model(inputs_embeds=x).last_hidden_state[0, -1]
        logits = hidden.float() @ model.lm_head.weight.float().T  # fp32 arithmetic, bf16 weights and states
        coarse = model.lm_head(hidden).float()
    top = logits.topk(50).indices.tolist()  # two close competitors: what a classifier's labels are
    labels = min(zip(top, top[1:]), key=lambda pair: float(logits[pair[0]] - logits[pair[1]]))
    labels = list(labels)
    assert logits[labels[1]] > 20
    got = ModelRunner(model).score(task, prompt, [[t] for t in labels])
    got = torch.softmax(torch.tensor(got, dtype=torch.float64), 0)
    want = torch.softmax(logits.double().log_softmax(-1)[labels], 0)
    old = torch.softmax(coarse.double().log_softmax(-1)[labels], 0)
    assert (got - want).abs().max() < 1e-3
    assert (old - want).abs().max() > 1e-3  # what bf16 logits gave: the test sees the difference


def test_a_saturating_tenant_leaves_another_a_slot_within_two_steps_and_loses_no_token(tmp_path):
    """Tenant a fills the batch with long streams; b's request is scheduled within 2 engine steps
    (the engine's own count), so it finishes long before a's 40-token streams, and a's streams (one preempted and
    recomputed) are exactly what they are without b."""
    from test_serving_engine import make_engine, request, save

    from serving.types import TenantLimits

    def engine_with_store(root):
        engine = make_engine(root, max_batch_size=4)
        engine.set_tenant_limits({"a": TenantLimits(max_concurrent=4), "b": TenantLimits()})
        return engine

    save(tmp_path, "gen", make_engine(tmp_path).runner.model, seed=1)

    def tenant_request(rid, tenant, prompt, max_tokens):
        req = request(rid, "gen", prompt, max_tokens=max_tokens)
        req.tenant = tenant
        return req

    async def serve(with_b: bool):
        engine = engine_with_store(tmp_path)
        await engine.start()
        try:
            streams = [engine.generate(tenant_request(f"a{i}", "a", f"stream {i}", 40)) for i in range(4)]
            firsts = [await anext(s) for s in streams]  # all four rows of the batch are a's
            b = None
            if with_b:
                b = [o async for o in engine.generate(tenant_request("b0", "b", "quick", 3))]
            rest = []
            for stream in streams:
                rest.append([o async for o in stream])
            return [[f, *r] for f, r in zip(firsts, rest)], b, engine.stats()
        finally:
            await engine.stop()

    alone, _, _ = asyncio.run(serve(False))
    shared, b, stats = asyncio.run(serve(True))

    def text(outs):
        return ["".join(o.text for o in s) for s in outs]

    assert text(shared) == text(alone) and [s[-1].completion_tokens for s in shared] == [40] * 4
    assert b[-1].finished and b[-1].completion_tokens == 3
    waited = stats.tenants["b"].queue_wait_steps
    assert waited.count == 1 and waited.counts[0] + waited.counts[1] == 1  # 1 or 2 steps
    assert stats.tenants["a"].preemptions_total == 1


def test_a_prefill_mixing_classification_and_generation_rows_runs_once():
    """A length group whose first row is a classification's kept only its generation rows through a
    lookup by the wrong index: the step raised after sampling and was retried half by half (each retry
    a forward more, and a seeded row drew twice). Now: one forward, and the tokens of the direct model."""
    model, tasks = sharp_llama(), make_tasks(2, seed=8)
    runner = ModelRunner(model)
    forwards = []
    runner.decoder.register_forward_hook(lambda *_: forwards.append(1))
    c = classify_request("c", tasks[0], [5, 6, 7], [[10], [11]])  # shorter: first in its length group
    g = Request("g", "t", [12, 13, 14, 15, 16], SamplingParams(max_tokens=1), 0.0, adapter=tasks[1])
    s = Scheduler(SchedulerConfig())
    s.add(c)
    s.add(g)
    out = s.schedule()
    runner.prefix_cache.get_many([(t.name, t.version, t.prompt) for t in tasks])  # prompt KV: not counted
    forwards.clear()
    result = runner.step(out)
    assert not result.failed and len(forwards) == 1
    assert [result.tokens["g"]] == direct_greedy(model, tasks[1], g.prompt_ids, 1)


def test_a_tenant_between_two_requests_still_gets_short_steps():
    """b's next request is on its way (b has no work for a moment): a keeps the shared budget for
    `shared_hold_s`, so b's next request does not arrive in the middle of one huge step."""

    clock = Clock()
    s = Scheduler(SchedulerConfig(max_step_tokens=512, shared_step_tokens=128, shared_hold_s=2.0), clock)
    for i in range(10):
        s.add(clf(f"a{i}", "a", prompt_len=700))
    s.add(gen("b0", "b", prompt_len=10, max_tokens=1))
    assert run(s).tokens == 128 + 10  # b's request finishes in this step
    clock.now = 1.0
    assert run(s).tokens == 128  # b has no work, but had some a second ago
    clock.now = 3.5
    assert run(s).tokens == 512  # b is gone: a gets the whole step again


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_a_tenant_alone_with_nothing_decoding_gets_alone_step_tokens():
    """a's flood of classifications alone: steps of `alone_step_tokens` (a larger matrix multiply costs
    less per token on a CPU). Another tenant's work brings back `max_step_tokens` until a has been
    alone for `alone_after_s` again, and a stream of a's own too: a running stream's next token never
    waits for a long step."""
    config = SchedulerConfig(
        max_step_tokens=512,
        alone_step_tokens=2048,
        shared_step_tokens=128,
        shared_hold_s=2.0,
        alone_after_s=30.0,
    )
    clock = Clock()
    s = Scheduler(config, clock)
    for i in range(10):
        s.add(clf(f"a{i}", "a", prompt_len=700))
    out = run(s)
    assert out.tokens == 2048 and {r.request_id for r in out.prefill} == {"a0", "a1"}  # 2 whole, a chunk
    s.add(gen("b0", "b", prompt_len=10, max_tokens=2))
    out = run(s)  # b's first step: shared, a's flood capped
    assert "b0" in {r.request_id for r in out.prefill} and out.prefilled == {"a": 128, "b": 10}
    while "b0" in s.running:
        run(s)
    clock.now = 10.0
    assert run(s).tokens == 512  # b had work 10 s ago: the whole step, but a short one
    clock.now = 31.0
    assert run(s).tokens == 2048  # a alone for 30 s: long steps again
    s = Scheduler(config)
    s.add(gen("a-stream", "a", prompt_len=10, max_tokens=50))
    run(s)
    for i in range(10):
        s.add(clf(f"a{i}", "a", prompt_len=700))
    assert "a-stream" in s.running and run(s).tokens == 512  # a's own stream decodes: short steps
    # 0 or less than max_step_tokens: max_step_tokens
    for alone in (0, 100):
        t = Scheduler(SchedulerConfig(max_step_tokens=512, alone_step_tokens=alone))
        t.add(clf("x", "a", prompt_len=700))
        assert run(t).tokens == 512


def test_the_engine_gives_its_step_budgets_to_the_scheduler(tmp_path):
    from serving_helpers import engine_config, tiny_backbone_dir, write_prompt_store

    from serving.engine import Engine

    backbone = tiny_backbone_dir(tmp_path)
    cfg = engine_config(
        write_prompt_store(tmp_path, backbone),
        backbone,
        max_step_tokens=300,
        alone_step_tokens=777,
        shared_step_tokens=55,
    )
    got = Engine(cfg).scheduler.config
    assert (got.max_step_tokens, got.alone_step_tokens, got.shared_step_tokens) == (300, 777, 55)
