"""Model runner tests on a tiny random Llama: mixed-task batches equal solo runs, the task prefix KV
cache equals recomputation, seeded sampling is batch-independent, scoring equals a full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from serving.decode_batch import DecodeBatch
from serving.registry import TaskEntry
from serving.runner import ModelRunner, length_groups
from serving.scheduler import Request, RequestKind, Scheduler, SchedulerConfig
from serving.types import SamplingParams

VOCAB, HIDDEN = 128, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def sharp_llama(**config):
    """The tiny Llama re-initialised at unit scale (linears N(0, 1/fan_in), embeddings N(0, 1));
    `config` overrides its config (e.g. `vocab_size`).

    At the default init (std 0.02) the residual stream is just the input embedding, so the model
    repeats its input and logits are near-ties; this model's greedy tokens depend on the prompt and
    position and are well separated from float noise.
    """
    model = tiny_llama(**config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=g)
        embed = model.get_input_embeddings().weight
        embed.normal_(0.0, 1.0, generator=g)
        # An LM head of its own: tied to the input embedding, the last token's own logit dominates
        # and greedy decoding repeats it forever, which would hide position and cache bugs.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(embed.shape, generator=g), requires_grad=False)
    return model


def make_tasks(n: int, seed: int = 0) -> list[TaskEntry]:
    g = torch.Generator().manual_seed(seed)
    return [
        TaskEntry(f"task{i}", torch.randn(3 + i % 5, HIDDEN, generator=g) * 0.5, {}, ((i, 0),))
        for i in range(n)
    ]


def make_request(rid: str, task: TaskEntry, text_seed: int, **params) -> Request:
    g = torch.Generator().manual_seed(text_seed)
    ids = torch.randint(3, VOCAB, (2 + text_seed % 9,), generator=g).tolist()
    return Request(rid, task.name, ids, SamplingParams(**params), 0.0, frozenset(), task)


def classify_request(rid: str, task: TaskEntry, prompt: list[int], continuations: list[list[int]]) -> Request:
    return Request(
        rid,
        task.name,
        prompt,
        SamplingParams(),
        0.0,
        frozenset(),
        task,
        kind=RequestKind.CLASSIFY,
        continuations=continuations,
    )


def serve(
    runner: ModelRunner,
    arrivals: dict[int, list[Request]],
    max_batch_size: int = 32,
    scores: dict[str, list[float]] | None = None,
) -> dict[str, list[int]]:
    """Drive scheduler + runner like the engine does; `arrivals[step]` join at that step (generations
    and classifications; the classifications' scores go into `scores`)."""
    sched = Scheduler(SchedulerConfig(max_batch_size=max_batch_size))
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or sched.has_work:
        for req in arrivals.get(step, []):
            sched.add(req)
        out = sched.schedule()
        result = runner.step(out)
        assert not result.failed
        if scores is not None:
            scores.update(result.scores)
        for u in sched.update(out, result.tokens):
            outputs.setdefault(u.request.request_id, []).append(u.token)
        step += 1
    return outputs


def test_greedy_output_in_mixed_batch_of_many_tasks_equals_solo():
    model, tasks = sharp_llama(), make_tasks(18)
    reqs = {i: make_request(f"r{i}", tasks[i], text_seed=i, max_tokens=4 + i % 5) for i in range(18)}
    # Staggered arrivals and different lengths: rows join (concatenate) and leave (filter) mid-batch.
    arrivals = {
        0: [reqs[i] for i in range(10)],
        2: [reqs[i] for i in range(10, 14)],
        5: [reqs[i] for i in range(14, 18)],
    }
    mixed = serve(ModelRunner(model), arrivals)
    solo_runner = ModelRunner(model)
    for i, req in reqs.items():
        alone = make_request(f"solo{i}", tasks[i], text_seed=i, max_tokens=req.params.max_tokens)
        assert serve(solo_runner, {0: [alone]})[f"solo{i}"] == mixed[f"r{i}"], (
            f"task{i} differs in the mixed batch"
        )
    assert all(len(mixed[f"r{i}"]) == 4 + i % 5 for i in range(18))


def test_prefix_cached_logits_equal_recomputed_ones():
    model, tasks = sharp_llama(), make_tasks(5, seed=1)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, VOCAB, (1 + 3 * i,), generator=g).tolist() for i in range(5)]
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        full = torch.stack(
            [
                model(inputs_embeds=torch.cat([t.prompt, embed(torch.tensor(s))])[None]).logits[0, -1]
                for t, s in zip(tasks, seqs)
            ]
        )
    cached = ModelRunner(model)
    first = cached.next_token_logits(tasks, seqs)  # misses: computes and stores each prompt's KV
    again = cached.next_token_logits(tasks, seqs)  # hits
    uncached = ModelRunner(model, prefix_cache=False).next_token_logits(tasks, seqs)
    for got in (first, again, uncached):
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert (cached.prefix_cache.stats.misses, cached.prefix_cache.stats.hits) == (5, 5)


def test_a_never_seen_tasks_prompt_is_read_in_its_first_requests_own_forward(monkeypatch):
    """A first request to a task computes the task's prompt KV in its own prefill, not in a forward of
    its own (on a CPU that forward costs about as much as the request's): same tokens as with the KV
    cached beforehand, and the KV it caches is the prompt's alone. Two rows of one task in the same
    step still compute the prompt once, apart."""
    model, tasks = sharp_llama(), make_tasks(4, seed=5)
    apart = []
    compute = ModelRunner._prompt_kv
    monkeypatch.setattr(ModelRunner, "_prompt_kv", lambda r, p: apart.append(p.shape[0]) or compute(r, p))
    reqs = [make_request(f"r{i}", tasks[i], text_seed=i, max_tokens=5) for i in range(4)]
    twin = make_request("twin", tasks[3], text_seed=9, max_tokens=5)
    inline = ModelRunner(model)
    got = serve(inline, {0: [*reqs, twin]})
    assert apart == [1]  # only task3, which has two rows in the step
    warm = ModelRunner(model)
    warm.next_token_logits(tasks, [[5]] * 4)  # every prompt's KV computed apart first
    again = [make_request(f"r{i}", tasks[i], text_seed=i, max_tokens=5) for i in range(4)]
    want = serve(warm, {0: [*again, make_request("twin", tasks[3], text_seed=9, max_tokens=5)]})
    assert got == want
    for t in tasks:
        cached = inline.prefix_cache.lookup_many([(t.name, t.version)])[0]
        torch.testing.assert_close(cached, compute(inline, t.prompt[None])[:, :, 0], rtol=1e-5, atol=1e-5)
    assert (inline.prefix_cache.stats.misses, inline.prefix_cache.stats.entries) == (4, 4)


def test_prefix_cache_is_lru_bounded_by_bytes_and_invalidated():
    model, tasks = sharp_llama(), make_tasks(3, seed=3)
    tasks = [TaskEntry(t.name, t.prompt[:3], {}, t.version) for t in tasks]  # same size each
    runner = ModelRunner(model)
    runner.next_token_logits(tasks[:1], [[5]])
    one = runner.prefix_cache.stats.bytes
    runner.prefix_cache.capacity_bytes = 2 * one
    runner.next_token_logits(tasks, [[5], [6], [7]])
    stats = runner.prefix_cache.stats
    assert stats.bytes == 2 * one and stats.evictions == 1 and stats.entries == 2
    runner.prefix_cache.invalidate("task2")
    assert runner.prefix_cache.stats.bytes == one
    changed = TaskEntry("task1", tasks[1].prompt + 1.0, {}, ((9, 9),))  # a reloaded adapter: new version
    runner.next_token_logits([changed], [[5]])
    assert runner.prefix_cache.stats.misses == 4


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    model, tasks = sharp_llama(), make_tasks(6, seed=4)
    params = {"max_tokens": 6, "temperature": 0.9, "top_p": 0.8, "seed": 1234}
    batch = [make_request(f"r{i}", tasks[i], text_seed=i, **params) for i in range(6)]
    mixed = serve(ModelRunner(model), {0: batch})
    alone = serve(ModelRunner(model), {0: [make_request("x", tasks[3], text_seed=3, **params)]})
    assert alone["x"] == mixed["r3"]


def test_score_equals_full_forward_log_probs():
    model, [task] = sharp_llama(), make_tasks(1, seed=5)
    prompt, conts = [7, 8, 9], [[10], [11, 12], [13, 14, 15]]
    got = ModelRunner(model).score(task, prompt, conts)
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        for c, score in zip(conts, got):
            ids = torch.tensor(prompt + c)
            logp = torch.log_softmax(
                model(inputs_embeds=torch.cat([task.prompt, embed(ids)])[None]).logits[0], -1
            )
            P = task.prompt.shape[0]
            want = sum(logp[P + len(prompt) - 1 + j, t] for j, t in enumerate(c))
            assert abs(float(want) - score) < 1e-4


def test_classification_in_a_mixed_batch_equals_classification_alone():
    """Classifications of many tasks share the step's forwards with prefills (and run while other rows
    decode): each one's scores equal those of the same classification run alone, and the generated
    tokens equal those of a run without classifications."""
    model, tasks = sharp_llama(), make_tasks(8, seed=6)

    def job(i: int) -> Request:
        prompt = torch.randint(
            3, VOCAB, (1 + (5 * i) % 11,), generator=torch.Generator().manual_seed(i)
        ).tolist()
        # Single-token verbalisers (one row per request) and multi-token ones sharing a first token.
        conts = [[10], [11], [12]] if i % 2 else [[10, 20], [10, 21, 22], [13]]
        return classify_request(f"c{i}", tasks[i % 8], prompt, conts)

    jobs = {0: [job(i) for i in range(5)], 2: [job(i) for i in range(5, 9)], 3: [job(9)]}
    reqs = [make_request(f"r{i}", tasks[i], text_seed=10 + i, max_tokens=5) for i in range(6)]
    arrivals = {s: reqs[:3] if s == 0 else reqs[3:] if s == 2 else [] for s in range(4)}
    mixed = {s: arrivals[s] + jobs.get(s, []) for s in arrivals}
    scores: dict[str, list[float]] = {}
    with_scores = serve(ModelRunner(model), mixed, scores=scores)
    without = serve(ModelRunner(model), arrivals)
    assert with_scores == without
    solo = ModelRunner(model)
    for step_jobs in jobs.values():
        for j in step_jobs:
            assert len(scores[j.request_id]) == len(j.continuations)
            alone = solo.score(j.adapter, j.prompt_ids, j.continuations)
            torch.testing.assert_close(
                torch.tensor(scores[j.request_id]), torch.tensor(alone), rtol=1e-5, atol=1e-4
            )


def test_length_groups_split_rows_where_padding_costs_more_than_a_forward():
    lengths = [30, 4, 5, 29, 6, 31]
    assert length_groups(lengths, overhead=1000) == [[1, 2, 4, 3, 0, 5]]  # one forward, sorted by length
    assert length_groups(lengths, overhead=10) == [[1, 2, 4], [3, 0, 5]]
    groups = length_groups(lengths, overhead=0)
    assert sorted(i for g in groups for i in g) == list(range(6)) and len(groups) == 6


def test_decode_batch_filter_and_concatenate_keep_each_rows_state():
    """Rows keep their request, sampler, last token, position and KV (real columns, in order) through
    `concatenate` and `filter`, and the trimmed batch has no column that is padding in every row."""
    model, tasks = sharp_llama(), make_tasks(5, seed=9)
    runner = ModelRunner(model)
    batches = []
    for group in ([0, 1], [2, 3, 4]):
        sched = Scheduler(SchedulerConfig())
        for i in group:
            sched.add(make_request(f"r{i}", tasks[i], text_seed=3 * i, max_tokens=5))
        runner.reset()
        runner.step(sched.schedule())
        batches.append(runner.batch)

    def rows_state(b: DecodeBatch) -> dict:
        kv, mask = b.kv.kv, b.kv.mask.bool()
        return {
            rid: (b.samplers[i], int(b.last_tokens[i]), int(b.positions[i]), kv[:, :, i][..., mask[i], :])
            for i, rid in enumerate(b.request_ids)
        }

    before = rows_state(batches[0]) | rows_state(batches[1])
    joined = DecodeBatch.concatenate(batches, headroom=4)
    assert joined.request_ids == batches[0].request_ids + batches[1].request_ids
    kept = joined.filter([joined.request_ids.index(r) for r in ("r4", "r1")], headroom=0)
    assert kept.request_ids == ["r4", "r1"]
    assert kept.kv.mask[:, : kept.kv.length].any(0).all()  # trimmed to the rows' own columns
    for b in (joined, kept):
        for rid, (sampler, last, pos, kv) in rows_state(b).items():
            want = before[rid]
            assert (sampler, last, pos) == want[:3]
            torch.testing.assert_close(kv, want[3], rtol=0, atol=0)
