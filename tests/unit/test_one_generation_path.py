"""One generation path: the answers evaluation scores are the answers the server gives.

Evaluation (`tuner.evaluate.generate_greedy`) decodes with the server's scheduler, model runner and
output path (`serving.offline`), and both cut a long input by the rule the adapter records
(`tuner.tasks.input_budget`, `TaskMeta.max_input_tokens`). So:
  1. on a tiny Llama, evaluation's greedy answers are the same at batch 1 and 16 (and in lockstep
     waves, as ZeRO-3 ranks decode) and equal a direct greedy loop written here (full forward of
     [prompt embeddings][token embeddings] per token, no cache, argmax);
  2. on the real SmolLM2 backbone in fp32, a generation task's and the NER task's answers on real
     data at evaluation batch 1 and 16 equal what the serving engine streams for the same input;
  3. a long input is cut identically: the token ids evaluation feeds are the ids the server feeds.

bf16: not tested. The path is one and the same in bf16 (evaluation still gets the server's text for
the same rows in the same steps), and each row still decodes on its own KV, but a bf16 matmul may
round a row differently with the number of rows beside it (another kernel shape), and at bf16's
precision that can flip a near-tie between two tokens; so batch 1 and batch 16 agree exactly only
where no such tie arises. Measured (2026-12-05, SmolLM2 bf16 on a 2-core CPU without AMX, 16 real eval
examples, a 16-token seeded prompt, 32 new tokens): batch 1 == batch 16 on 9/16 SAMSum answers and
15/16 CoNLL NER answers. A bf16 server is batch-dependent in the same way, so in bf16 "the served
answer" depends on what else the server is decoding. fp32 (what these tests run) leaves no tie within
reach on these examples.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import REPO, smollm2_tokenizer_dir, tiny_llama
from test_serving_runner import sharp_llama

from serving.engine import Engine, EngineConfig
from serving.offline import generate_texts, generate_texts_of_tasks
from serving.types import GenerationRequest, SamplingParams
from tuner import evaluate
from tuner.evaluate import cut_at_stop, generate_greedy
from tuner.export import TaskAdapter, TaskMeta, save_adapter
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample
from tuner.tasks.data import TaskData
from tuner.tasks.input_budget import cut_input, max_input_tokens
from tuner.tasks.readers import read_rows
from tuner.tasks.spec import TaskSpec, format_input
from tuner.tasks.stops import find_stop

HIDDEN = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


@torch.no_grad()
def direct_answer(model, tokenizer, prompt, ids: list[int], new_tokens: int, stop=()) -> str:
    """Greedy decoding by definition: [prompt embeddings][token embeddings] -> full forward -> argmax,
    until EOS (the model's or the tokenizer's), a stop string after the answer began, or the limit.
    Tiny-model tokens are single bytes here (ids below 128), so a trailing incomplete character is
    exactly the trailing replacement characters of the decoded text."""
    eos = {model.generation_config.eos_token_id, tokenizer.eos_token_id}
    out: list[int] = []
    for _ in range(new_tokens):
        embeds = model.get_input_embeddings()(torch.tensor([ids + out]))
        if prompt is not None:
            embeds = torch.cat([prompt[None], embeds], dim=1)
        positions = torch.arange(embeds.shape[1])[None]
        logits = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] in eos or find_stop(tokenizer.decode(out, skip_special_tokens=True), stop) >= 0:
            break
    # The text a client reads: the server never shows a character whose bytes are not all out yet.
    return cut_at_stop(tokenizer.decode(out, skip_special_tokens=True).rstrip("\ufffd"), stop)


def tiny_examples(n: int = 20, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (n,), generator=g).tolist()
    return [TokenizedExample("t", torch.randint(3, 128, (k,), generator=g).tolist(), [0]) for k in lengths]


@pytest.mark.parametrize("zero_shot", [False, True], ids=["prompt", "zero-shot"])
def test_answers_at_batch_1_and_16_equal_a_direct_greedy_loop(tokenizer, zero_shot, one_thread):
    model = sharp_llama()
    lm = PromptTunedLM(model)
    prompt = None if zero_shot else torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.5
    examples = tiny_examples()
    new = 8
    want = [direct_answer(model, tokenizer, prompt, e.input_ids, new) for e in examples]
    assert sum(bool(w) for w in want) > len(want) // 2  # answers with text: the comparison is not vacuous
    for batch in (1, 16):
        got = generate_greedy(lm, tokenizer, examples, prompt, new, max_len=64, batch_size=batch)
        assert got == want, f"batch {batch}"
    # ZeRO-3 ranks admit requests in waves and step in lockstep: the same answers.
    waves = generate_texts(
        model, tokenizer, prompt, [e.input_ids for e in examples], new, batch_size=6, any_busy=bool
    )
    assert [t.strip() for t in waves] == want


def test_stop_strings_cut_answers_as_the_direct_loop_does(tokenizer, one_thread):
    model = sharp_llama()
    lm = PromptTunedLM(model)
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(2)) * 0.5
    examples = tiny_examples(12, seed=3)
    full = generate_greedy(lm, tokenizer, examples, prompt, 10, max_len=64, batch_size=16)
    stop = next(h[1] for h in full if len(h) > 2 and not h[1].isspace())  # a character answers contain
    got = generate_greedy(lm, tokenizer, examples, prompt, 10, max_len=64, batch_size=16, stop=[stop])
    want = [direct_answer(model, tokenizer, prompt, e.input_ids, 10, [stop]) for e in examples]
    assert got == want and got != full


def test_an_idle_rank_keeps_stepping_with_the_others(tokenizer, one_thread):
    """Lockstep: a rank with no inputs runs one forward per step until every rank is done."""
    model = sharp_llama()
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    steps = iter([True] * 5 + [False])
    assert generate_texts(model, tokenizer, None, [], 4, any_busy=lambda busy: next(steps)) == []
    assert len(forwards) == 5


# ------------------------------------------------------------------------------------ the input cut


def long_task(tmp_path, max_new_tokens: int) -> TaskSpec:
    words = " ".join(f"word{i}" for i in range(120))
    (tmp_path / "long.jsonl").write_text(
        f'{{"text": "{words}", "y": "short"}}\n{{"text": "a few words", "y": "ok"}}\n'
    )
    (tmp_path / "long.yaml").write_text(
        "name: long\nkind: generation\ndata: {format: jsonl, train: long.jsonl, eval: long.jsonl}\n"
        f'description: "Summarise the text."\ntemplate: "Text: {{text}}\\nSummary:"\n'
        f"target_field: y\nmax_new_tokens: {max_new_tokens}\n"
    )
    return TaskSpec.load(tmp_path / "long.yaml")


def serve(engine: Engine, task: str, texts: list[str], new: int) -> tuple[list[str], list[list[int]]]:
    """Each text's served answer and the prompt ids the engine queued for it (all at once)."""
    fed: dict[str, list[int]] = {}
    add = engine.scheduler.add

    def spy(req):
        fed[req.request_id] = list(req.prompt_ids)
        add(req)

    engine.scheduler.add = spy

    async def one(i: int, text: str) -> str:
        req = GenerationRequest(f"r{i}", task, text, SamplingParams(max_tokens=new))
        return "".join([out.text async for out in engine.generate(req)])

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        finally:
            await engine.stop()

    answers = asyncio.run(main())
    return list(answers), [fed[f"r{i}"] for i in range(len(texts))]


def test_a_long_input_is_cut_the_same_way_by_evaluation_and_serving(tmp_path, tokenizer, monkeypatch):
    new, P, max_len = 6, 4, 48
    spec = long_task(tmp_path, new)
    data = TaskData.load(spec, tokenizer, need_train=False)
    limit = max_input_tokens(max_len, P, new)
    assert len(data.eval[0].input_ids) > limit >= len(data.eval[1].input_ids)  # one is cut, one is not
    model = tiny_llama(vocab_size=49152)
    prompt = torch.randn(P, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.5
    meta = TaskMeta.from_spec(spec, data.prefix, max_len=max_len, virtual_tokens=P)
    assert meta.max_input_tokens == limit
    save_adapter(tmp_path / "store", TaskAdapter("long", prompt, "tiny", meta), model.config)

    fed_eval: list[list[int]] = []

    def spy(model, tokenizer, tasks, inputs, **kwargs):
        fed_eval.extend(list(ids) for _, ids in inputs)
        return generate_texts_of_tasks(model, tokenizer, tasks, inputs, **kwargs)

    monkeypatch.setattr(evaluate, "generate_texts_of_tasks", spy)
    evaluated = generate_greedy(PromptTunedLM(model), tokenizer, data.eval, prompt, new, max_len)

    engine = Engine(
        EngineConfig(backbone="tiny", prompt_store=str(tmp_path / "store")),
        model=model,
        tokenizer=tokenizer,
    )
    rows = read_rows(spec, "eval")
    served, fed_serve = serve(engine, "long", [r["text"] for r in rows], new)
    assert fed_eval == fed_serve == [cut_input(e.input_ids, limit) for e in data.eval]
    assert len(fed_serve[0]) == limit and fed_serve[0] == data.eval[0].input_ids[-limit:]
    assert evaluated == [s.strip() for s in served]


def test_the_input_rule_in_task_metadata(tmp_path):
    assert TaskMeta.from_dict({"kind": "generation"}).max_input_tokens is None  # an adapter from before
    for bad in (0, -3, True, 1.5, "9", 1 << 30):
        with pytest.raises(ValueError, match="max_input_tokens"):
            TaskMeta(max_input_tokens=bad)
    classify = TaskSpec.load(REPO / "configs/tasks/sst2.yaml")
    assert TaskMeta.from_spec(classify, "", max_len=256, virtual_tokens=8).max_input_tokens is None
    with pytest.raises(ValueError, match="no room"):
        max_input_tokens(16, 8, 8)
    assert cut_input([1, 2, 3], None) == [1, 2, 3] and cut_input([1, 2, 3], 2) == [2, 3]


def test_training_writes_the_input_rule_into_each_decoded_tasks_adapter(tmp_path, tiny_backbone_dir):
    import json

    from conftest import tiny_job_yaml, write_generation_task, write_tiny_tasks

    from tuner.config import load_job_config
    from tuner.recipe import run

    tasks = [write_generation_task(tmp_path), write_tiny_tasks(tmp_path, n_train=8, names=("pos_neg",))[0]]
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **{"optim.max_steps": 1, "checkpoint_every": 0})
    summary = run(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    adapters = tmp_path / "runs" / summary.name / "adapters"
    meta = {t: json.loads((adapters / t / "promptfleet_task.json").read_text()) for t in ("echo", "pos_neg")}
    assert meta["echo"]["max_input_tokens"] == max_input_tokens(64, 4, meta["echo"]["max_new_tokens"])
    assert meta["pos_neg"]["max_input_tokens"] is None  # label-scored: cut per label, not by this rule


# ------------------------------------------------------------------------------------ real backbone

BACKBONE = "smollm2-135m"
REAL_TASKS = {"samsum": 128, "conll2003_ner": 96}  # config -> max_seq_len (some samsum inputs are cut)


@pytest.fixture(scope="module")
def smollm2():
    from tuner.model.backbone import load_backbone
    from tuner.model.model_cache import resolve_backbone

    path = resolve_backbone(BACKBONE)
    return load_backbone(path, torch.float32), load_tokenizer(path)


@pytest.mark.integration
@pytest.mark.parametrize("config", list(REAL_TASKS))
def test_real_evaluation_answers_are_the_served_answers(tmp_path, smollm2, config, one_thread):
    model, tok = smollm2
    spec = TaskSpec.load(REPO / f"configs/tasks/{config}.yaml")
    spec.max_new_tokens = new = 8
    data = TaskData.load(spec, tok, need_train=False)
    rows = read_rows(spec, "eval")[:4]
    where = {e.prompt: i for i, e in enumerate(data.eval_text)}
    examples = [data.eval[where[format_input(spec, r, data.prefix)]] for r in rows]
    embed = model.get_input_embeddings().weight
    prompt = embed[torch.randint(100, embed.shape[0], (8,), generator=torch.Generator().manual_seed(0))]
    max_len = REAL_TASKS[config]
    meta = TaskMeta.from_spec(spec, data.prefix, max_len=max_len, virtual_tokens=8)
    save_adapter(tmp_path / "store", TaskAdapter(spec.name, prompt.clone(), BACKBONE, meta), model.config)

    lm = PromptTunedLM(model)
    at_1 = generate_greedy(lm, tok, examples, prompt, new, max_len, batch_size=1)
    at_16 = generate_greedy(lm, tok, examples, prompt, new, max_len, batch_size=16)
    engine = Engine(
        EngineConfig(backbone=BACKBONE, prompt_store=str(tmp_path / "store"), dtype="fp32"),
        model=model,
        tokenizer=tok,
    )
    (field,) = meta.input_fields
    served, fed = serve(engine, spec.name, [r[field] for r in rows], new)
    assert fed == [cut_input(e.input_ids, meta.max_input_tokens) for e in examples]
    assert at_1 == at_16 == [s.strip() for s in served]
    assert any(at_1), "every answer is empty: the comparison would be vacuous"
