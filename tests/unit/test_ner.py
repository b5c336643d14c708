"""NER from YAML alone: CoNLL files, IOB2 decoding, tagged-span targets and their parse, entity scores,
and an NER task's examples in a packed mixed batch."""

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from tuner.config import ConfigError
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import collate
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_task
from tuner.tasks.kinds.ner import (
    NO_ENTITIES,
    Entity,
    entity_metrics,
    iob2_entities,
    parse_entities,
    render_entities,
)
from tuner.tasks.readers import check_columns, read_conll
from tuner.tasks.spec import TaskSpec, build_examples

NAMES = {"PER": "person", "ORG": "organization", "LOC": "location", "MISC": "misc"}

EDGE_CASES = {
    "entity at sentence end": (["O", "B-PER", "I-PER"], [Entity("PER", 1, 3)]),
    "single-word entity at the end": (["O", "O", "B-LOC"], [Entity("LOC", 2, 3)]),
    "I- without B-": (["I-ORG", "I-ORG", "O", "I-PER"], [Entity("ORG", 0, 2), Entity("PER", 3, 4)]),
    "adjacent entities of one type": (
        ["B-PER", "I-PER", "B-PER", "B-PER"],
        [Entity("PER", 0, 2), Entity("PER", 2, 3), Entity("PER", 3, 4)],
    ),
    "type change inside a run": (["B-ORG", "I-LOC", "I-LOC"], [Entity("ORG", 0, 1), Entity("LOC", 1, 3)]),
    "no entity": (["O", "O"], []),
    "empty sentence": ([], []),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_iob2_decoding_edge_cases(case):
    tags, expected = EDGE_CASES[case]
    assert iob2_entities(tags) == expected
    # seqeval's reading (conlleval rules) as a second oracle: (type, first, last) inclusive
    assert [(e.type, e.start, e.end - 1) for e in expected] == get_entities(tags)


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_target_text_parses_back_to_the_same_entities(case):
    tags, expected = EDGE_CASES[case]
    words = [f"w{i}" for i in range(len(tags))]
    text = render_entities(words, tags, NAMES)
    assert iob2_entities(parse_entities(text, words, NAMES)) == expected


def test_target_text_format():
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert render_entities(words, tags, NAMES) == "EU [organization] | German [misc] | British [misc]"
    assert render_entities(words, tags) == "EU [ORG] | German [MISC] | British [MISC]"
    assert render_entities(words, ["O"] * len(words), NAMES) == NO_ENTITIES


@pytest.mark.parametrize(
    "text, tags",
    [
        (" Paris [location] | Paris [location]", ["B-LOC", "O", "B-LOC", "O"]),  # repeated word: in order
        ("Paris [location] | Paris [location] | Paris [location]", ["B-LOC", "O", "B-LOC", "O"]),
        ("Paris or Nice [location]", ["O"] * 4),  # the span is not in the sentence
        ("Paris [city]", ["O"] * 4),  # unknown type
        ("Paris [location", ["O"] * 4),  # malformed
        ("[location] | [] | | [[x]]", ["O"] * 4),
        ("none", ["O"] * 4),
        ("", ["O"] * 4),
        ("Paris [location] garbage", ["O"] * 4),
        ("Paris and [location] | and [person]", ["B-LOC", "I-LOC", "O", "O"]),  # overlaps an earlier span
        ("Nice [location] | Paris [person]", ["B-PER", "O", "O", "B-LOC"]),  # out of order: found anyway
    ],
)
def test_parse_is_robust(text, tags):
    assert parse_entities(text, ["Paris", "and", "Paris", "Nice"], NAMES) == tags


def test_entity_metrics_equal_a_direct_count_and_seqeval():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],
        ["B-ORG", "O", "B-PER", "B-PER"],
        ["O", "B-MISC", "I-MISC", "I-MISC"],
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG"],  # PER right, LOC typed as ORG
        ["B-ORG", "O", "B-PER", "I-PER"],  # ORG right, two adjacent PERs merged into one
        ["O", "B-MISC", "I-MISC", "O"],  # MISC with a wrong end
    ]
    m = entity_metrics(gold, pred)
    # Direct count: gold entities {PER x3, LOC, ORG, MISC} = 6, predicted {PER x2, ORG x2, MISC} = 5,
    # exactly right: PER (sentence 1), ORG (sentence 2) -> tp = 2.
    p, r = 2 / 5, 2 / 6
    assert m["precision"] == pytest.approx(p) and m["recall"] == pytest.approx(r)
    assert m["entity_f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["per_label"]["PER"] == {
        "precision": 0.5,
        "recall": pytest.approx(1 / 3),
        "f1": 0.4,
        "support": 3,
    }
    assert m["per_label"]["ORG"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }
    assert m["per_label"]["LOC"]["support"] == 1 and m["per_label"]["LOC"]["f1"] == 0.0
    assert m["per_label"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["precision"] == pytest.approx(precision_score(gold, pred))
    assert m["recall"] == pytest.approx(recall_score(gold, pred))
    assert m["entity_f1"] == pytest.approx(f1_score(gold, pred))
    assert m["n"] == 3


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


def _write_ner_task(tmp_path, train=CONLL, dev=CONLL):
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "valid.txt").write_text(dev)
    path = tmp_path / "ner.yaml"
    path.write_text(
        "name: ner\nkind: ner\ndata: {format: conll, train: train.txt, eval: valid.txt, tag_column: 3}\n"
        'template: "Sentence: {text}\\nEntities:"\n'
        "verbaliser: {PER: person, ORG: organization, LOC: location, MISC: misc}\n"
        'stop: ["\\n"]\n'
    )
    return path


def test_read_conll(tmp_path):
    (tmp_path / "a.txt").write_text(CONLL)
    rows = read_conll(tmp_path / "a.txt", tag_column=3)
    assert [r["text"] for r in rows] == ["EU rejects German call .", "Peter Blackburn", "BRUSSELS 1996-08-22"]
    assert rows[1]["tags"] == ["B-PER", "I-PER"]
    assert read_conll(tmp_path / "a.txt") == rows  # the tag column defaults to the last
    assert len(read_conll(tmp_path / "a.txt", max_sentences=2)) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP X-ORG\n", r"a\.txt:2: tag 'X-ORG' is not IOB2"),
        ("EU NNP B-NP B-ORG\nrejects\n", r"a\.txt:2: no column 3"),
    ],
)
def test_bad_conll_files_name_the_line(tmp_path, text, message):
    (tmp_path / "a.txt").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_conll(tmp_path / "a.txt", tag_column=3)


def test_ner_task_from_yaml(tmp_path):
    spec = TaskSpec.load(_write_ner_task(tmp_path))
    assert spec.kind == "ner" and spec.metric == "entity_f1"
    check_columns(spec)
    ex = build_examples(spec, "eval")
    assert ex[0].prompt == "Sentence: EU rejects German call .\nEntities:"
    assert ex[0].target == " EU [organization] | German [misc]"
    assert ex[0].words == ["EU", "rejects", "German", "call", "."] and ex[0].tags[0] == "B-ORG"
    assert ex[2].target == " BRUSSELS [location]"


def test_ner_task_with_a_bad_tag_column_fails_validation(tmp_path):
    path = _write_ner_task(tmp_path)
    path.write_text(path.read_text().replace("tag_column: 3", "tag_column: 1"))
    with pytest.raises(ConfigError, match=r"train.txt:3: tag 'NNP' is not IOB2"):
        check_columns(TaskSpec.load(path))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


def test_ner_examples_in_a_packed_mixed_batch_equal_each_alone(tmp_path, tokenizer):
    """An NER task's examples next to another task's in one packed batch: same loss and prompt gradient."""
    ner = TaskData.load(TaskSpec.load(_write_ner_task(tmp_path)), tokenizer)
    (tmp_path / "cls.jsonl").write_text('{"text": "fine", "y": 1}\n{"text": "bad movie", "y": 0}\n')
    (tmp_path / "cls.yaml").write_text(
        'name: cls\ndata: {format: jsonl, train: cls.jsonl}\ntemplate: "{text}"\nlabel_field: y\n'
        'verbaliser: {"0": " no", "1": " yes"}\n'
    )
    cls = TaskData.load(TaskSpec.load(tmp_path / "cls.yaml"), tokenizer)
    assert all(e.target_ids[-1] == tokenizer.eos_token_id for e in ner.train)  # answers end with EOS
    assert all(e.target_ids[-1] != tokenizer.eos_token_id for e in cls.train)
    examples = [ner.train[0], cls.train[0], ner.train[1], cls.train[1], ner.train[2]]
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(0)
    bank = {"ner": torch.randn(4, 32, generator=g), "cls": torch.randn(4, 32, generator=g)}

    def run(exs, packing):
        tasks = sorted({e.task for e in exs})
        rows = {t: i for i, t in enumerate(tasks)}
        batch = collate(exs, rows, 4, max_len=128, pad_id=0, packing=packing)
        prompts = torch.stack([bank[t] for t in tasks]).clone().requires_grad_(True)
        out = lm(batch, prompts)
        out.loss.backward()
        return out.seg_loss, {t: prompts.grad[i] for t, i in rows.items()}, batch

    loss, grad, batch = run(examples, packing=True)
    assert batch.input_ids.shape[0] < len(examples)  # segments really share rows
    idx = [0, 2, 4]
    alone_loss, alone_grad, _ = run([examples[i] for i in idx], packing=False)
    torch.testing.assert_close(loss[idx], alone_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad["ner"], alone_grad["ner"], rtol=1e-4, atol=1e-6)


def test_ner_evaluation_scores_what_the_model_wrote(tmp_path, tokenizer):
    """End to end on a random tiny model: whatever it generates parses (no crash), and the score is
    the entity metric of the parsed tags against the gold tags."""
    data = TaskData.load(TaskSpec.load(_write_ner_task(tmp_path)), tokenizer)
    data.spec.max_new_tokens = 6
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    m = evaluate_task(lm, tokenizer, data, torch.randn(4, 32), max_len=128)
    assert m["metric"] == "entity_f1" and m["n"] == 3
    hyps = [s["hyp"] for s in m["samples"]]
    pred = [parse_entities(h, e.words, NAMES) for h, e in zip(hyps, data.eval_text)]
    assert m == {**m, **entity_metrics([e.tags for e in data.eval_text], pred), "score": m["entity_f1"]}


def test_ner_rows_from_jsonl_need_iob2_string_tags(tmp_path):
    """Tags as class ids (a Hub dump's `ner_tags`) are a clear error, not a crash."""
    (tmp_path / "ner.jsonl").write_text('{"tokens": ["EU", "rejects"], "tags": [3, 0]}\n')
    (tmp_path / "ner.yaml").write_text(
        'name: n\nkind: ner\ndata: {format: jsonl, train: ner.jsonl}\ntemplate: "{tokens}"\n'
    )
    with pytest.raises(ConfigError, match="tag 3 is not IOB2"):
        build_examples(TaskSpec.load(tmp_path / "ner.yaml"), "train")
