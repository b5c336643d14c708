"""A task's stop strings (`TaskMeta.stop`): served answers end where the task's evaluation cuts them.

The engine runs the tiny sharp Llama with a character tokenizer in which one chosen token decodes to
"\\n", so the greedy output is known to hold a newline where the test wants it. The expected answer
comes from the same direct greedy loop the engine tests use, then evaluation's rule written out
here: the answer begins at the first non-whitespace character and ends at the first stop after it.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from serving_helpers import server_config
from test_serving_engine import EOS, CharTokenizer, make_engine, model, request, run, save

from serving.api import create_app
from serving.detokenizer import IncrementalText
from serving.runner import ModelRunner
from serving.types import GenerationRequest, InvalidRequest, SamplingParams
from tuner.evaluate import cut_at_stop
from tuner.export import TASK_META, TaskAdapter, TaskMeta, load_adapter, save_adapter
from tuner.tasks.spec import TaskSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "hello"
MAX_TOKENS = 24


class NewlineTokenizer(CharTokenizer):
    """`CharTokenizer` in which the tokens `newline_ids` decode to "\\n" (set once the greedy tokens are known)."""

    newline_ids: frozenset[int] = frozenset()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join("\n" if i in self.newline_ids else CharTokenizer.decode(self, [i]) for i in ids)


def evaluation_rule(text: str, stop: list[str]) -> str:
    """Written out: skip leading whitespace, then cut before the first stop string."""
    lead = len(text) - len(text.lstrip())
    cuts = [text.find(s, lead) for s in stop if text.find(s, lead) >= 0]
    return text[: min(cuts)] if cuts else text


def engine_with_task(tmp_path, stop: list[str]):
    tok = NewlineTokenizer()
    engine = make_engine(tmp_path)
    engine.tokenizer = tok
    save(tmp_path, "t", engine.runner.model, {"kind": "generation", "stop": stop})
    engine.registry.refresh()
    return engine, tok


def greedy_ids(engine, prompt: str = PROMPT) -> list[int]:
    """The runner alone, greedy, token by token with a full recompute each time."""
    ref, entry = ModelRunner(engine.runner.model), engine.registry.get("t")
    seq, out = CharTokenizer()(prompt).input_ids, []
    for _ in range(MAX_TOKENS):
        out.append(int(ref.next_token_logits([entry], [seq + out])[0].argmax()))
        if out[-1] == EOS:
            break
    return out


def newline_after_text(engine, tok: NewlineTokenizer) -> tuple[list[int], int]:
    """The greedy ids and the index `j` of their first token unlike the first, made to decode to "\\n"
    (so the output is some text, then a newline)."""
    want = greedy_ids(engine)
    j = next(i for i, t in enumerate(want) if t != want[0] and t != EOS)
    tok.newline_ids = frozenset({want[j]})
    return want, j


def serve(engine, *reqs) -> list[str]:
    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(run(engine, r) for r in reqs))
        finally:
            await engine.stop()

    return ["".join(o.text for o in outs) for outs in asyncio.run(main())]


def test_served_answer_is_evaluations_cut_answer_and_raw_prompts_are_not_cut(tmp_path):
    engine, tok = engine_with_task(tmp_path, ["\n"])
    want, j = newline_after_text(engine, tok)
    text = tok.decode(want)
    assert text.index("\n") == j > 0
    params = SamplingParams(max_tokens=MAX_TOKENS)
    served, raw = serve(
        engine,
        GenerationRequest("a", "t", PROMPT, params),
        GenerationRequest("b", "t", PROMPT, params, raw=True),
    )
    assert served == evaluation_rule(text, ["\n"]) == text[:j]
    assert served.strip() == cut_at_stop(text, ["\n"])
    # A raw prompt (no template here, so the same model input) gets only its own stop strings.
    assert raw == text


def test_a_leading_newline_is_not_a_task_stop_but_is_a_request_stop(tmp_path):
    engine, tok = engine_with_task(tmp_path, ["\n"])
    want = greedy_ids(engine)
    # The answer's first token is a newline, and so is a later one (after some text).
    k = next(i for i, t in enumerate(want) if i > 1 and t not in (want[0], want[1], EOS))
    tok.newline_ids = frozenset({want[0], want[k]})
    text = tok.decode(want)
    assert text.startswith("\n") and text[1:].index("\n") > 0
    served, own_stop = serve(
        engine,
        request("a", "t", PROMPT, max_tokens=MAX_TOKENS),
        request("b", "t", PROMPT, max_tokens=MAX_TOKENS, stop=["\n"]),
    )
    assert served == evaluation_rule(text, ["\n"]) == text[: 1 + text[1:].index("\n")]
    assert served.strip() == cut_at_stop(text, ["\n"])
    assert own_stop == ""  # the request's own stop keeps OpenAI's meaning: it matches anywhere


def test_streamed_and_whole_completions_agree_and_stop_where_evaluation_cuts(tmp_path):
    engine, tok = engine_with_task(tmp_path, ["\n"])
    want, j = newline_after_text(engine, tok)
    expected = evaluation_rule(tok.decode(want), ["\n"])
    cfg = server_config(engine.config)
    body = {"model": "t", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    with TestClient(create_app(engine, cfg)) as http:
        whole = http.post("/v1/completions", json=body).json()
        resp = http.post("/v1/completions", json={**body, "stream": True})
    blocks = [b[len("data: ") :] for b in resp.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    chunks = [json.loads(b)["choices"][0] for b in blocks[:-1]]
    assert whole["choices"][0]["text"] == "".join(c["text"] for c in chunks) == expected
    assert whole["choices"][0]["finish_reason"] == chunks[-1]["finish_reason"] == "stop"


def test_task_stop_applies_on_top_of_the_requests_four(tmp_path):
    engine, tok = engine_with_task(tmp_path, ["\n"])
    want, j = newline_after_text(engine, tok)
    four = ["@@1", "@@2", "@@3", "@@4"]  # the request's limit is 4; the task's stop is not counted
    (served,) = serve(engine, request("a", "t", PROMPT, max_tokens=MAX_TOKENS, stop=four))
    assert served == tok.decode(want)[:j]
    with pytest.raises(InvalidRequest, match="at most 4"):
        engine._check_params(SamplingParams(stop=[*four, "@@5"]))


def test_a_ner_task_is_served_as_generation_and_refused_by_classify(tmp_path):
    engine = make_engine(tmp_path)
    m = engine.runner.model
    save(tmp_path, "ner", m, {"kind": "ner", "verbaliser": {"PER": "person"}, "stop": ["\n"]})
    engine.registry.refresh()
    assert engine.task_info("ner")["kind"] == "ner" and engine.task_info("ner")["stop"] == ["\n"]

    async def main():
        await engine.start()
        try:
            outs = await run(engine, request("r", "ner", max_tokens=3))
            with pytest.raises(InvalidRequest, match="not a classification task"):
                await engine.classify("ner", "hello")
            return outs
        finally:
            await engine.stop()

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].completion_tokens > 0


def test_task_meta_stop_round_trips_and_old_adapters_load_without_it(tmp_path):
    m = model()
    spec = TaskSpec(name="s", kind="generation", template="X: {x}\nY:", target_field="y", stop=["\n", "###"])
    meta = TaskMeta.from_spec(spec, prefix="")
    assert meta.stop == ["\n", "###"]
    prompt = m.get_input_embeddings().weight[:4].detach()
    path = save_adapter(tmp_path, TaskAdapter("s", prompt, "tiny", meta), m.config)
    assert load_adapter(path).meta.stop == ["\n", "###"]
    # An adapter written before `stop` existed: end of sequence only, and nothing lands in `extra`.
    written = json.loads((path / TASK_META).read_text())
    del written["stop"]
    (path / TASK_META).write_text(json.dumps(written))
    old = load_adapter(path).meta
    assert old.stop == [] and "stop" not in old.extra and old.to_dict()["stop"] == []
    with pytest.raises(ValueError, match="stop must be"):
        TaskMeta.from_dict({"stop": "\n"})


def test_streamed_increments_never_show_a_task_stop_and_match_the_whole_text():
    """Evaluation's rule on the incremental detokeniser, one character per token: a leading "\\n\\n"
    is kept, the stop after the answer is held back while it may still be a partial match."""
    text = "\n\nab\n#\n\ncd\n\n"
    stop = ["\n\n", "##"]
    inc = IncrementalText(lambda ids: "".join(text[i] for i in ids), task_stop=stop)
    deltas = []
    for i in range(len(text)):
        inc.append(i)
        deltas.append(inc.take_delta(final=inc.stopped))
        if inc.stopped:
            break
    assert "".join(deltas) == evaluation_rule(text, stop) == "\n\nab\n#"
    assert cut_at_stop(text, stop) == "ab\n#"
