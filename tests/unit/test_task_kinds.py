"""Task kinds as plug-ins (`tuner.tasks.kinds`): each kind is one module everything else asks.

A kind written here, in the test, runs through a task YAML, data loading, a training batch (its loss
is the plain forward's, computed directly) and evaluation with nothing else changed; the registered
kinds keep their contract; no code outside the kinds package tests a kind's name; and an evaluation
record reads and writes as `summary.json` always held it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama

from tuner.config import ConfigError
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.scores import TaskScores
from tuner.tasks import kinds
from tuner.tasks.batching import collate
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import KINDS, evaluate_task, kind_of
from tuner.tasks.kinds.base import CLASSIFY, COMPLETE, TaskKind, decoded_scores
from tuner.tasks.spec import TaskSpec

REPO = Path(__file__).resolve().parents[2]
P = 4


class Reverse(TaskKind):
    """A kind that exists only in this test: write the input's words in reverse order."""

    name = "reverse"
    metrics = ("word_accuracy",)

    def required_fields(self, spec, split):
        return []

    def target_text(self, spec, row):
        return " " + " ".join(reversed(str(row["text"]).split())), None

    def evaluate(self, setup, data, prompt):
        def score(data, hyps):
            gold = [e.target.strip() for e in data.eval_text]
            return {"word_accuracy": sum(g == h for g, h in zip(gold, hyps)) / len(gold), "n": len(gold)}

        return decoded_scores(setup, data, prompt, score)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


def _reverse_task(tmp_path: Path) -> Path:
    rows = ["red green blue", "one two", "a b c d", "sun moon"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    path = tmp_path / "reverse.yaml"
    path.write_text(
        "name: rev\nkind: reverse\ndata: {format: jsonl, train: rows.jsonl, eval: rows.jsonl}\n"
        'template: "Words: {text}\\nReversed:"\nmax_new_tokens: 4\n'
    )
    return path


def test_a_kind_defined_outside_the_package_trains_and_evaluates(tmp_path, tokenizer, monkeypatch):
    """Registering one `TaskKind` is all a new kind needs: the spec accepts it, examples get its target
    text, a packed training batch scores it (loss equal to a direct forward), evaluation reports its metric."""
    monkeypatch.setitem(KINDS, "reverse", Reverse())
    spec = TaskSpec.load(_reverse_task(tmp_path))
    assert spec.metric == "word_accuracy" and spec.task_kind.serves == frozenset({COMPLETE})
    data = TaskData.load(spec, tokenizer)
    assert data.train_text[0].target == " blue green red"
    assert data.train[0].target_ids[-1] == tokenizer.eos_token_id  # a free-length answer learns to stop

    torch.manual_seed(0)
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    prompt = torch.randn(P, 32)
    ex = data.train[1]
    batch = collate([ex], {"rev": 0}, P, max_len=64, pad_id=tokenizer.pad_token_id)
    got = lm(batch, prompt[None]).seg_loss[0]
    ids = torch.tensor(ex.input_ids + ex.target_ids[:-1])
    with torch.no_grad():
        logits = lm.backbone(inputs_embeds=torch.cat([prompt, lm.embed(ids[None])[0]])[None]).logits[0]
    start = P + len(ex.input_ids) - 1
    want = torch.nn.functional.cross_entropy(
        logits[start : start + len(ex.target_ids)], torch.tensor(ex.target_ids)
    )
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)

    scores = evaluate_task(lm, tokenizer, data, prompt, max_len=64)
    assert scores.metric == "word_accuracy" and scores.values["n"] == 4 and 0.0 <= scores.score <= 1.0
    assert len(scores.samples) == 3 and scores.samples[0]["ref"] == "blue green red"


def test_an_unknown_kind_is_a_one_line_error_naming_the_kinds(tmp_path):
    path = _reverse_task(tmp_path)  # "reverse" is not registered here
    with pytest.raises(ConfigError, match=r"kind='reverse': expected classification, generation, ner"):
        TaskSpec.load(path)
    with pytest.raises(ValueError, match="kind must be one of classification, generation, ner"):
        kind_of("reverse")


def test_every_registered_kind_keeps_the_contract():
    assert set(KINDS) == {"classification", "generation", "ner"}
    for name, kind in KINDS.items():
        assert kind.name == name and kind.metrics and isinstance(kind, TaskKind)
        assert COMPLETE in kind.serves and kind.serves <= {COMPLETE, CLASSIFY}
        # what serving may classify is exactly what evaluation scores by labels
        assert (CLASSIFY in kind.serves) == kind.label_scored
    assert kind_of("classification").rung_criterion("auto") == "metric"
    assert kind_of("generation").rung_criterion("auto") == "loss"
    assert kind_of("ner").rung_criterion("label_loss") == "loss"
    assert kind_of("classification").rung_criterion("label_loss") == "label_loss"


def _kind_name_tests(path: Path) -> list[str]:
    """Comparisons of something named `kind` (or `.get("kind")`) with a registered kind's name."""
    names = set(KINDS)
    found = []

    def is_kind(node: ast.AST) -> bool:
        if isinstance(node, ast.Name | ast.Attribute):
            return (node.id if isinstance(node, ast.Name) else node.attr) == "kind"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            return any(isinstance(a, ast.Constant) and a.value == "kind" for a in node.args[:1])
        return False

    def is_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(is_name(e) for e in node.elts)
        return False

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_kind(s) for s in sides) and any(is_name(s) for s in sides):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_nothing_outside_the_kinds_package_tests_a_kinds_name():
    package = Path(kinds.__file__).parent
    offenders = [
        hit
        for root in ("tuner", "serving", "cluster", "bench")
        for path in sorted((REPO / root).rglob("*.py"))
        if package not in path.parents
        for hit in _kind_name_tests(path)
    ]
    assert not offenders, f"ask the task kind (tuner.tasks.kinds) instead of testing its name: {offenders}"


RECORDS = {
    "classification": {
        "accuracy": 0.75,
        "macro_f1": 0.7,
        "per_label": {"0": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}},
        "n": 4,
        "metric": "accuracy",
        "score": 0.75,
    },
    "generation": {
        "chrf": 41.0,
        "rouge_l": 30.5,
        "exact_match": 0.0,
        "n": 2,
        "samples": [{"ref": "a", "hyp": "b"}],
        "metric": "rouge_l",
        "score": 30.5,
    },
}


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_a_scores_record_reads_and_writes_as_summary_json_holds_it(kind):
    record = RECORDS[kind]
    scores = TaskScores.from_json(record)
    assert scores.score == record["score"] and scores.metric == record["metric"]
    assert json.dumps(scores.to_json()) == json.dumps(record)  # same keys, same order
    assert scores == record and dict(scores) == record
    assert TaskScores.from_json({}) is None
