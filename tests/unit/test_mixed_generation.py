"""Generation and NER evaluation across tasks in one decode (issue 37, item 2).

Examples of many decoded tasks go through the server's mixed-task steps together
(`serving.offline.generate_texts_of_tasks`, `TaskKind.evaluate_many`): each request carries its own
task's prompt, answer length and stop strings. The oracles:
  1. each answer equals the task decoded alone (one task per call, today's per-task path) and a direct
     greedy loop written here (`direct_answer`: [prompt embeddings][token embeddings], full forward,
     argmax; no cache, no batch), on a tiny random Llama in fp32, for generation and for NER;
  2. a task's scores, samples and prediction records from the mixed pass equal those it gets alone;
  3. tasks holding the same prompt object share one prefix KV entry (computed once);
  4. `promptfleet eval` scores a run's tasks in one pass with the numbers each task gets alone.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_job_yaml, write_generation_task, write_tiny_tasks
from test_one_generation_path import direct_answer, tiny_examples
from test_serving_runner import sharp_llama

from serving.offline import DecodeTask, generate_texts, generate_texts_of_tasks
from serving.prefix_cache import PrefixKVCache
from serving.runner import ModelRunner
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_task, evaluate_tasks
from tuner.tasks.spec import TaskSpec

HIDDEN = 32
MAX_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


def sharp_wide_llama():
    """`sharp_llama` with the real tokenizer's vocabulary (task data ids reach 49151)."""
    return sharp_llama(vocab_size=49152)


def prompt_of(seed: int, length: int = 4) -> torch.Tensor:
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.5


class PromptKVCount:
    """How many task prompts the runner computed prefix KV for (apart, or inline in a request's forward), and
    in how many forwards of their own (P > 0)."""

    def __init__(self, monkeypatch):
        self.prompts, self.forwards = 0, 0
        compute = ModelRunner._prompt_kv

        def counted(runner, prompts):
            if prompts.shape[1]:  # no virtual tokens: nothing runs
                self.prompts += prompts.shape[0]
                self.forwards += 1
            return compute(runner, prompts)

        monkeypatch.setattr(ModelRunner, "_prompt_kv", counted)
        put = PrefixKVCache.put

        def inline(cache, task, version, kv):  # a prompt computed in its first request's own forward
            self.prompts += 1
            return put(cache, task, version, kv)

        monkeypatch.setattr(PrefixKVCache, "put", inline)


# ------------------------------------------------------------------------------------ serving.offline


def test_requests_of_three_tasks_decode_together_as_each_task_alone_and_as_a_direct_loop(
    tokenizer, monkeypatch, one_thread
):
    """Three tasks, each its own prompt (one of them none: zero-shot), answer length and stop string,
    their requests interleaved: every answer is its task's alone and the direct loop's."""
    model = sharp_llama()
    shared = prompt_of(1)
    tasks = [
        DecodeTask(shared, 8),
        DecodeTask(prompt_of(2, length=6), 5),
        DecodeTask(None, 7),
        DecodeTask(shared, 8),  # the first task's prompt object with a stop string of its own
    ]
    examples = tiny_examples(24, seed=5)
    which = [i % len(tasks) for i in range(len(examples))]
    # A stop string each task's answers really contain (found by decoding without one first).
    full = generate_texts_of_tasks(
        model, tokenizer, tasks, [(t, e.input_ids) for t, e in zip(which, examples)]
    )
    for t in (1, 3):
        text = next(h.strip() for h, w in zip(full, which) if w == t and len(h.strip()) > 2)
        tasks[t] = DecodeTask(tasks[t].prompt, tasks[t].max_new_tokens, (text[1],))
    inputs = [(t, e.input_ids) for t, e in zip(which, examples)]
    want = [
        direct_answer(model, tokenizer, tasks[t].prompt, ids, tasks[t].max_new_tokens, tasks[t].stop)
        for t, ids in inputs
    ]
    assert sum(bool(w) for w in want) > len(want) // 2  # answers with text: the comparison is not vacuous
    assert [w for w, h in zip(want, full) if w != h.strip()]  # the stop strings cut some answers

    counted = PromptKVCount(monkeypatch)
    for batch in (1, 5, 16):
        got = generate_texts_of_tasks(model, tokenizer, tasks, inputs, batch_size=batch)
        assert [t.strip() for t in got] == want, f"batch {batch}"
    assert counted.prompts == 3 * 2  # per call: the shared prompt once, the other once, none for P = 0
    alone = [None] * len(inputs)
    for t, task in enumerate(tasks):
        mine = [i for i, w in enumerate(which) if w == t]
        texts = generate_texts(
            model, tokenizer, task.prompt, [inputs[i][1] for i in mine], task.max_new_tokens, stop=task.stop
        )
        for i, text in zip(mine, texts):
            alone[i] = text.strip()
    assert alone == want


def test_lockstep_waves_of_mixed_tasks_compute_each_prompt_once_before_the_first_step(
    tokenizer, monkeypatch, one_thread
):
    """ZeRO-3 ranks decode in lockstep waves: every task's prompt KV is computed up front, one forward
    per prompt length, and no step misses the cache afterwards (a miss would be a forward that the
    other ranks do not run). The answers are the same as alone."""
    model = sharp_llama()
    a, b = prompt_of(3), prompt_of(4)
    tasks = [DecodeTask(a, 6), DecodeTask(b, 4), DecodeTask(a, 3), DecodeTask(None, 5)]
    examples = tiny_examples(11, seed=6)
    inputs = [(i % 4, e.input_ids) for i, e in enumerate(examples)]
    alone = generate_texts_of_tasks(model, tokenizer, tasks, inputs, batch_size=4)
    counted = PromptKVCount(monkeypatch)
    waves = generate_texts_of_tasks(model, tokenizer, tasks, inputs, batch_size=3, any_busy=bool)
    assert waves == alone
    assert (counted.prompts, counted.forwards) == (2, 1)  # a and b in one forward, before any step
    with pytest.raises(ValueError, match="outside the 4"):
        generate_texts_of_tasks(model, tokenizer, tasks, [(4, [5])])


def test_lockstep_ranks_with_different_tasks_run_the_same_forwards(tokenizer, one_thread):
    """Two lockstep "ranks" (threads, `any_busy` an OR over both at a barrier): rank 0 decodes requests
    of two prompted tasks in two waves, rank 1 one zero-shot request and then idles. Under ZeRO-3 every
    forward all-gathers weights, so both must run the same number of forwards (their prompt KV up
    front, whatever their own requests need); the answers are those of the same requests alone."""
    model = sharp_llama()
    tasks = [DecodeTask(prompt_of(7), 6), DecodeTask(prompt_of(8, length=3), 4, ("a",)), DecodeTask(None, 5)]
    examples = tiny_examples(5, seed=8)
    shares = [
        [(0, e.input_ids) for e in examples[:2]] + [(1, e.input_ids) for e in examples[2:4]],
        [(2, examples[4].input_ids)],
    ]
    barrier, flags = threading.Barrier(2, timeout=120), [False, False]
    forwards, answers, rank_of = [0, 0], [None, None], {}

    def any_busy_of(rank: int):
        def any_busy(busy: bool) -> bool:
            flags[rank] = busy
            barrier.wait()
            out = any(flags)
            barrier.wait()  # both read the flags before either writes the next step's
            return out

        return any_busy

    def count(*_):
        forwards[rank_of[threading.get_ident()]] += 1

    def rank_main(rank: int):
        rank_of[threading.get_ident()] = rank
        answers[rank] = generate_texts_of_tasks(
            model, tokenizer, tasks, shares[rank], batch_size=2, any_busy=any_busy_of(rank)
        )

    hook = model.model.register_forward_hook(count)
    try:
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    assert forwards[0] == forwards[1] > 2
    for rank in (0, 1):
        assert answers[rank] == generate_texts_of_tasks(model, tokenizer, tasks, shares[rank])


# ------------------------------------------------------------------------------------ task kinds


def write_generation_tasks(root) -> list[TaskSpec]:
    """Three generation tasks over the same words: different templates, answer lengths and stops."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    rows = [{"source": " ".join(words[i : i + 1 + i % 3]), "target": words[i]} for i in range(len(words))]
    (root / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = []
    for name, template, new, stop in (
        ("echo_a", "Word: {source}\\nList:", 8, '[" "]'),
        ("echo_b", "Say {source} again:", 5, '["a", "."]'),
        ("echo_c", "{source} =>", 6, "[]"),
    ):
        (root / f"{name}.yaml").write_text(
            f"name: {name}\nkind: generation\ndata: {{format: jsonl, train: words.jsonl, eval: words.jsonl}}\n"
            f'template: "{template}"\ntarget_field: target\nmax_new_tokens: {new}\nstop: {stop}\n'
        )
        specs.append(TaskSpec.load(root / f"{name}.yaml"))
    return specs


def write_ner_tasks(root) -> list[TaskSpec]:
    sentences = [
        ["EU", "B-ORG"], ["rejects", "O"], ["German", "B-MISC"], [], ["Peter", "B-PER"],
        ["Blackburn", "I-PER"], [], ["Rome", "B-LOC"], ["is", "O"], ["old", "O"], [],
        ["BRUSSELS", "B-LOC"], ["1996-08-22", "O"],
    ]  # fmt: skip
    (root / "ner.txt").write_text("".join((" ".join(s) + "\n") for s in sentences))
    specs = []
    for name, template, new, stop in (
        ("ner_a", "Sentence: {text}\\nEntities:", 8, "[]"),
        ("ner_b", "Find entities in: {text}\\n", 6, '["|"]'),
    ):
        (root / f"{name}.yaml").write_text(
            f"name: {name}\nkind: ner\ndata: {{format: conll, train: ner.txt, eval: ner.txt}}\n"
            f'template: "{template}"\nmax_new_tokens: {new}\nstop: {stop}\n'
        )
        specs.append(TaskSpec.load(root / f"{name}.yaml"))
    return specs


@pytest.mark.parametrize("kind", ["generation", "ner"])
@pytest.mark.parametrize("zero_shot", [False, True], ids=["prompts", "zero-shot"])
def test_decoded_tasks_evaluated_together_score_as_each_alone_and_answer_as_a_direct_loop(
    tmp_path, tokenizer, kind, zero_shot, one_thread
):
    specs = write_generation_tasks(tmp_path) if kind == "generation" else write_ner_tasks(tmp_path)
    model = sharp_wide_llama()
    lm = PromptTunedLM(model)
    tasks = {s.name: TaskData.load(s, tokenizer, need_train=False) for s in specs}
    prompts = None if zero_shot else {n: prompt_of(10 + i) for i, n in enumerate(tasks)}
    seen = []
    together = evaluate_tasks(lm, tokenizer, tasks, prompts, MAX_LEN, batch_size=2, progress=seen.append)
    assert sum(seen) == sum(len(d.eval) for d in tasks.values()) and len(seen) > 1  # in pieces
    texts = 0
    for name, data in tasks.items():
        prompt = None if prompts is None else prompts[name]
        alone = evaluate_task(lm, tokenizer, data, prompt, MAX_LEN, batch_size=2)
        assert together[name].to_json() == alone.to_json()  # metrics, samples
        assert together[name].predictions == alone.predictions
        spec = data.spec
        want = [
            direct_answer(model, tokenizer, prompt, e.input_ids, spec.max_new_tokens, spec.stop)
            for e in data.eval
        ]
        assert [p["output"] for p in together[name].predictions] == want
        texts += sum(bool(w) for w in want)
    assert texts > sum(len(d.eval) for d in tasks.values()) // 2  # not vacuous: most answers have text


def test_examples_of_generation_tasks_share_the_decoding_steps(tmp_path, tokenizer, monkeypatch, one_thread):
    """One decode for every task's examples (not one per task): the runner is built once per piece."""
    specs = write_generation_tasks(tmp_path)
    lm = PromptTunedLM(sharp_wide_llama())
    tasks = {s.name: TaskData.load(s, tokenizer, need_train=False) for s in specs}
    built = []
    init = ModelRunner.__init__

    def counted(runner, *args, **kwargs):
        built.append(1)
        init(runner, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "__init__", counted)
    evaluate_tasks(lm, tokenizer, tasks, None, MAX_LEN, batch_size=64)
    assert len(built) == 1  # 3 tasks x 7 examples, one piece
    for data in tasks.values():
        evaluate_task(lm, tokenizer, data, None, MAX_LEN, batch_size=64)
    assert len(built) == 1 + len(tasks)


# ------------------------------------------------------------------------------------ promptfleet eval


def test_eval_cli_scores_a_runs_tasks_in_one_pass_as_each_task_alone(
    tmp_path, tiny_backbone_dir, monkeypatch
):
    """Two classification tasks, a generation task and an NER task, each with an exported adapter (a
    random prompt): `promptfleet eval` scores them in one `evaluate_tasks` pass, and each task's record
    and predictions file are what `evaluate_task` gives it alone."""
    from tuner import evaluate_cli
    from tuner.config import load_job_config
    from tuner.evaluate_cli import evaluate_command
    from tuner.export import TaskAdapter, TaskMeta, save_adapter
    from tuner.model.backbone import load_backbone

    paths = [*write_tiny_tasks(tmp_path, n_train=8, n_eval=6), write_generation_task(tmp_path)]
    write_ner_tasks(tmp_path)
    paths.append(tmp_path / "ner_a.yaml")
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, paths)
    cfg = load_job_config(job, [])
    tok = load_tokenizer(str(tiny_backbone_dir))
    lm = PromptTunedLM(load_backbone(str(tiny_backbone_dir), torch.float32))
    run_dir, tasks = tmp_path / "run", {}
    for i, path in enumerate(paths):
        spec = TaskSpec.load(path)
        data = TaskData.load(
            spec, tok, max_eval=cfg.data.max_eval_examples, seed=cfg.data.seed, need_train=False
        )
        meta = TaskMeta.from_spec(spec, data.prefix, max_len=cfg.model.max_seq_len, virtual_tokens=4)
        adapter = TaskAdapter(spec.name, prompt_of(20 + i), str(tiny_backbone_dir), meta)
        save_adapter(run_dir / "adapters", adapter, lm.backbone.config)
        tasks[spec.name] = (data, adapter.prompt)
    passes = []
    one_pass = evaluate_cli.evaluate_tasks

    def spy(lm, tok, tasks, *args, **kwargs):
        passes.append(list(tasks))
        return one_pass(lm, tok, tasks, *args, **kwargs)

    monkeypatch.setattr(evaluate_cli, "evaluate_tasks", spy)
    out = evaluate_command(str(run_dir), str(job), [], zero_shot=False, progress=False)
    assert passes == [list(tasks)] == [["pos_neg", "colors", "echo", "ner_a"]]
    for name, (data, prompt) in tasks.items():
        alone = evaluate_task(lm, tok, data, prompt, cfg.model.max_seq_len)
        assert out["tasks"][name]["tuned"] == alone.to_json()
        written = (run_dir / "predictions" / "eval_tuned" / f"{name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in written]
        assert [{**r, "scores": None} for r in rows] == [{**p, "scores": None} for p in alone.predictions]
        for r, p in zip(rows, alone.predictions):  # label log-probabilities: packed rows, float sums
            assert r["scores"] == pytest.approx(p["scores"], abs=1e-4)
