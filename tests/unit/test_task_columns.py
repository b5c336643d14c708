"""Real datasets name columns differently per split and carry several references; `validate` reads each
split's header and names the first field a task needs that a split lacks."""

import json
import re

import pytest
from conftest import smollm2_tokenizer_dir

from cluster.cli import main
from tuner.config import ConfigError
from tuner.model.backbone import load_tokenizer
from tuner.tasks.data import TaskData
from tuner.tasks.readers import check_columns, read_rows
from tuner.tasks.spec import TaskSpec, build_examples


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def dialogsum(tmp_path):
    """DialogSum's shape: `summary` in dev, `summary1..3` in test."""
    _jsonl(tmp_path / "dev.jsonl", [{"dialogue": f"d{i}", "summary": f"s{i}"} for i in range(4)])
    _jsonl(
        tmp_path / "test.jsonl",
        [{"dialogue": "t0", "summary1": "a b", "summary2": "a c", "summary3": "b c"}]
        + [{"dialogue": "t1", "summary1": "x", "summary2": "", "summary3": "y"}],
    )
    (tmp_path / "tasks").mkdir()  # `promptfleet validate` reads YAMLs under a tasks/ directory as task files
    path = tmp_path / "tasks" / "dialogsum.yaml"
    path.write_text(
        "name: dialogsum\nkind: generation\n"
        "data: {format: jsonl, train: ../dev.jsonl, eval: ../test.jsonl}\n"
        'template: "Dialogue:\\n{dialogue}\\nSummary:"\n'
        "target_field: [summary1, summary2, summary3]\nsplit_fields: {train: {summary1: summary}}\n"
        'metric: rouge_l\nstop: ["\\n"]\n'
    )
    return path


def test_several_references_and_per_split_columns(dialogsum):
    spec = TaskSpec.load(dialogsum)
    check_columns(spec)
    train = build_examples(spec, "train")
    assert [e.target for e in train[:2]] == [" s0", " s1"] and train[0].references == ["s0"]
    ev = build_examples(spec, "eval")
    assert ev[0].target == " a b" and ev[0].references == ["a b", "a c", "b c"]
    assert ev[1].references == ["x", "y"]  # an empty reference is left out


def test_generation_targets_end_with_eos(dialogsum):
    tok = load_tokenizer(smollm2_tokenizer_dir())
    data = TaskData.load(TaskSpec.load(dialogsum), tok)
    assert data.train[0].target_ids == [*tok(" s0", add_special_tokens=False).input_ids, tok.eos_token_id]


def test_mrpc_like_tsv_with_other_headers_in_test(tmp_path):
    (tmp_path / "train.tsv").write_text("label\tsentence1\tsentence2\n1\ta\tb\n0\tc\td\n")
    (tmp_path / "test.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\te\tf\n")
    path = tmp_path / "mrpc.yaml"
    path.write_text(
        "name: mrpc\ndata: {format: tsv, train: train.tsv, eval: test.tsv}\n"
        'template: "{sentence1}\\n{sentence2}\\nSame?"\nverbaliser: {"0": " no", "1": " yes"}\n'
        'split_fields: {eval: {sentence1: "#1 String", sentence2: "#2 String", label: Quality}}\n'
    )
    spec = TaskSpec.load(path)
    check_columns(spec)
    assert build_examples(spec, "eval")[0].prompt == "e\nf\nSame?"
    assert [e.label for e in build_examples(spec, "train")] == ["1", "0"]
    # without the per-split renames the test split is caught before any training, in one line
    spec.split_fields = {}
    with pytest.raises(ConfigError) as err:
        check_columns(spec)
    msg = str(err.value)
    assert "eval split" in msg and "test.tsv" in msg and "'sentence1'" in msg and "#1 String" in msg
    with pytest.raises(ConfigError, match="template field 'sentence1' not in the data"):
        read_rows(spec, "eval")  # training reads the same check


@pytest.mark.parametrize(
    "change, message",
    [
        ("target_field: [summary1, summary2, summary3]", None),
        (
            "target_field: [summary1, summary4]",
            r"eval split \(.*test\.jsonl\): field 'summary4' not in the data",
        ),
        (
            "split_fields: {train: {summary1: abstract}}",
            r"train split .*column 'abstract' \(renamed to 'summary1'\)",
        ),
        (
            'template: "{dialog}"',
            r"train split .*template field 'dialog' not in the data \(columns: dialogue",
        ),
    ],
)
def test_validate_names_the_split_file_field_and_columns(dialogsum, capsys, change, message):
    key = change.split(":")[0]
    text = dialogsum.read_text().splitlines()
    dialogsum.write_text("\n".join(change if line.startswith(key + ":") else line for line in text) + "\n")
    code = main(["validate", str(dialogsum)])
    out, err = capsys.readouterr()
    if message is None:
        assert code == 0 and out.startswith("ok")
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert re.search(message, err), err


@pytest.mark.parametrize(
    "bad, message",
    [
        ("kind: ner\nmetric: chrf\n", "metric 'chrf' does not fit a ner task"),
        ("kind: generation\nstop: ['']\n", "empty string would stop"),
        ("kind: generation\nsplit_fields: {test: {a: b}}\n", r"split_fields.test: expected a split"),
        ("kind: generation\ntarget_field: []\n", "target_field must name"),
        ("kind: summarise\n", "kind='summarise'"),
    ],
)
def test_bad_task_options(tmp_path, bad, message):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntemplate: '{a}'\n" + bad)
    with pytest.raises(ConfigError, match=message):
        TaskSpec.load(path)


def test_metric_defaults_to_the_kinds_first(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nkind: generation\ntemplate: '{a}'\n")
    assert TaskSpec.load(path).metric == "chrf" and TaskSpec.load(path).target_fields == ["target"]
