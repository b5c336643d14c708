"""Task files -> examples (templates, few-shot, Hub-style dataset ids) and prompt initialisation."""

import json
import re

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama

from tuner.config import ConfigError
from tuner.model.backbone import load_tokenizer
from tuner.prompts.bank import PromptBank, init_prompts
from tuner.tasks.readers import read_rows
from tuner.tasks.spec import TaskSpec, build_examples, task_prefix


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def task_file(tmp_path):
    _write(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "y": i % 2} for i in range(20)])
    _write(tmp_path / "dev.jsonl", [{"sentence": f"d{i}", "y": i % 2} for i in range(6)])
    path = tmp_path / "t.yaml"
    path.write_text(
        "name: t\ndata: {format: jsonl, train: train.jsonl, eval: dev.jsonl}\nfields: {text: sentence}\n"
        'description: "Classify."\ntemplate: "In: {text}\\nOut:"\nlabel_field: y\n'
        'verbaliser: {"0": " no", "1": " yes"}\nfew_shot: 2\n'
    )
    return path


def test_examples_from_template_and_few_shot(task_file):
    spec = TaskSpec.load(task_file)
    prefix = task_prefix(spec, read_rows(spec, "train"), seed=0)
    assert prefix.startswith("Classify.\n\n") and prefix.count("Out:") == 2  # two demonstrations
    ex = build_examples(spec, "eval", seed=0, prefix=prefix)
    assert (
        len(ex) == 6
        and ex[1].prompt == prefix + "In: d1\nOut:"
        and ex[1].target == " yes"
        and ex[1].label == "1"
    )
    assert task_prefix(spec, read_rows(spec, "train"), seed=0) == prefix  # deterministic
    sub = build_examples(spec, "train", limit=5, seed=1)
    assert len(sub) == 5 and sub == build_examples(spec, "train", limit=5, seed=1)


def test_dataset_directory_like_a_hub_id(tmp_path):
    """`format: hub` goes through `datasets.load_dataset(id, split=...)`; a local dataset repo dir takes the same path."""
    repo = tmp_path / "my_dataset"
    repo.mkdir()
    _write(repo / "train.jsonl", [{"text": f"a{i}", "label": "x" if i % 2 else "y"} for i in range(8)])
    _write(repo / "validation.jsonl", [{"text": "b", "label": "x"}])
    path = tmp_path / "h.yaml"
    path.write_text(
        f'name: h\ndata: {{format: hub, hub_id: "{repo}", train: train, eval: validation}}\n'
        'template: "{text}"\nverbaliser: {x: " X", y: " Y"}\n'
    )
    spec = TaskSpec.load(path)
    assert len(read_rows(spec, "train")) == 8 and read_rows(spec, "eval")[0]["text"] == "b"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("name: ../x\ntemplate: '{a}'\nverbaliser: {a: b, c: d}\n", "not a valid name"),
        ("name: x\ntemplate: '{a}'\nverbaliser: {a: b}\n", ">= 2 labels"),
        ("name: x\ntemplate: 'no fields'\nverbaliser: {a: b, c: d}\n", "uses no field"),
        ("name: x\nkind: generation\ntemplate: '{a}'\nmetric: accuracy\n", "does not fit"),
        ("name: x\ntemplate: '{a}'\nverbaliser: {a: b, c: d}\nsurprise: 1\n", "unknown key 'surprise'"),
        # str.format's specs and lookups: a width like this allocated gigabytes for every row
        ("name: x\ntemplate: '{a:>99999999999}'\nverbaliser: {a: b, c: d}\n", "only plain"),
        ("name: x\ntemplate: '{a!r}'\nverbaliser: {a: b, c: d}\n", "only plain"),
        ("name: x\ntemplate: '{a.__class__}'\nverbaliser: {a: b, c: d}\n", "only plain"),
        ("name: x\ntemplate: '{a[0]}'\nverbaliser: {a: b, c: d}\n", "only plain"),
        ("name: x\ntemplate: '{} {a}'\nverbaliser: {a: b, c: d}\n", "only plain"),
        ("name: x\ntemplate: '{a} }'\nverbaliser: {a: b, c: d}\n", "literal brace"),
        ("name: x\ntemplate: '{a}'\nverbaliser: {a: ' same', c: ' same'}\n", "two labels have"),
        ("name: x\ntemplate: '{a}'\nverbaliser: {a: '', c: d}\n", "non-empty"),
    ],
)
def test_bad_task_files(tmp_path, bad, message):
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match=message):
        TaskSpec.load(path)


def test_missing_template_field_is_a_clear_error(task_file):
    spec = TaskSpec.load(task_file)
    spec.template = "{nope}"
    with pytest.raises(ConfigError, match="template field 'nope' not in the data"):
        build_examples(spec, "eval")


def test_prompt_initialisation_methods():
    model = tiny_llama(vocab_size=49152)
    tok = load_tokenizer(smollm2_tokenizer_dir())
    emb = model.get_input_embeddings()
    bank = PromptBank(["cls", "gen"], 6, 32)
    init_prompts(
        bank, emb, tok, "class_labels", label_words={"cls": [" negative", " positive"], "gen": []}, seed=0
    )
    ids = (
        tok(" negative", add_special_tokens=False).input_ids
        + tok(" positive", add_special_tokens=False).input_ids
    )
    torch.testing.assert_close(bank.prompt("cls")[: len(ids)], emb.weight[ids])
    rows = bank.prompt("gen")  # no label words: sampled vocabulary rows
    assert all(any(torch.equal(r, e) for e in emb.weight[:5000]) for r in rows)
    init_prompts(bank, emb, tok, "text", text="Classify the sentiment", seed=0)
    tid = tok("Classify the sentiment", add_special_tokens=False).input_ids
    torch.testing.assert_close(bank.prompt("cls")[: len(tid)], emb.weight[tid])
    init_prompts(bank, emb, tok, "random", std=0.02, seed=0)
    assert 0.01 < bank.weight.std() < 0.03


@pytest.mark.parametrize("method", ["class_labels", "vocab", "random"])
def test_a_tasks_initial_prompt_is_its_own_whatever_else_is_in_the_job(method):
    """Each task draws from its own random stream: its initial prompt is the same alone, beside other
    tasks in any order, or as a search variant's row drawing its task's stream; another seed moves it."""
    model = tiny_llama(vocab_size=49152)
    tok = load_tokenizer(smollm2_tokenizer_dir())
    emb = model.get_input_embeddings()
    words = {"cls": [" negative", " positive"], "gen": [], "other": [" yes"]}

    def init(names, seed=0, streams=None) -> PromptBank:
        bank = PromptBank(names, 16, 32)
        label_words = {n: words[(streams or {}).get(n, n)] for n in names}
        init_prompts(bank, emb, tok, method, label_words=label_words, seed=seed, streams=streams)
        return bank

    alone = {n: init([n]).prompt(n) for n in ("cls", "gen")}
    for names in (["cls", "gen", "other"], ["other", "gen", "cls"]):
        bank = init(names)
        for n in alone:
            torch.testing.assert_close(bank.prompt(n), alone[n])
    variants = init(["cls~0", "gen~0", "cls~1"], streams={"cls~0": "cls", "cls~1": "cls", "gen~0": "gen"})
    for row in ("cls~0", "cls~1"):
        torch.testing.assert_close(variants.prompt(row), alone["cls"])
    torch.testing.assert_close(variants.prompt("gen~0"), alone["gen"])
    assert not torch.equal(init(["gen"], seed=1).prompt("gen"), alone["gen"])
    assert not torch.equal(bank.prompt("gen"), bank.prompt("other"))  # tasks differ from each other


@pytest.mark.parametrize(
    "fmt, content, message",
    [
        ("jsonl", b'{"text": "caf\xe9", "label": "x"}\n', "UnicodeDecodeError"),
        ("tsv", b"text\tlabel\nfine\tx\n1\t2\t3\t4\n", "Expected 2 fields in line 3"),
    ],
)
def test_unreadable_data_files_are_one_line_errors_naming_the_file(tmp_path, fmt, content, message):
    """Bad bytes or ragged rows used to surface as the parser's bare error, naming no file."""
    data = tmp_path / f"d.{fmt}"
    data.write_bytes(content)
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text(
        f"name: t\ndata: {{format: {fmt}, train: {data.name}, eval: {data.name}}}\n"
        "template: '{text}'\nverbaliser: {x: ' a', y: ' b'}\n"
    )
    with pytest.raises(ConfigError, match=f"cannot read its train file {re.escape(str(data))} .*{message}"):
        read_rows(TaskSpec.load(spec_path), "train")
