"""Every shipped task reads its real data from ../shared/data and renders examples; the NER and
summarisation tasks score a few zero-shot examples with the real backbone."""

from collections import Counter

import pytest
from conftest import REPO

from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_task
from tuner.tasks.kinds.ner import iob2_entities, parse_entities
from tuner.tasks.readers import check_columns, read_rows
from tuner.tasks.spec import TaskSpec, build_examples

pytestmark = pytest.mark.integration
TASKS = sorted((REPO / "configs" / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_task_reads_real_rows(path):
    spec = TaskSpec.load(path)
    for split in ("train", "eval"):
        rows = read_rows(spec, split)
        assert len(rows) > 40
        examples = build_examples(spec, split, limit=50, seed=0)
        assert len(examples) == 50
        assert all(e.prompt.strip() and e.target.strip() for e in examples)
        if spec.kind == "classification":
            assert {e.label for e in build_examples(spec, split, seed=0)} == set(spec.verbaliser)
    check_columns(spec)  # what `promptfleet validate` reads agrees with the rows


def test_known_sizes_and_cleaning():
    sst2 = TaskSpec.load(REPO / "configs/tasks/sst2.yaml")
    assert len(read_rows(sst2, "train")) == 67349 and len(read_rows(sst2, "eval")) == 872
    ag = TaskSpec.load(REPO / "configs/tasks/ag_news.yaml")
    assert len(read_rows(ag, "train")) == 21597 - 29  # rows whose text is also in test are dropped
    mt = TaskSpec.load(REPO / "configs/tasks/multi30k_en_de.yaml")
    rows = read_rows(mt, "eval")
    assert len(rows) == 1000 and rows[0]["source"] and rows[0]["target"]


def test_conll2003_counts_and_lossless_targets():
    """The official counts, and every sentence's target text parses back to exactly its gold tags."""
    spec = TaskSpec.load(REPO / "configs/tasks/conll2003_ner.yaml")
    check_columns(spec)
    train = read_rows(spec, "train")
    counts = Counter(e.type for r in train for e in iob2_entities(r["tags"]))
    assert len(train) == 14041 and sum(len(r["tokens"]) for r in train) == 203621
    assert counts == {"PER": 6600, "LOC": 7140, "ORG": 6321, "MISC": 3438}
    for split in ("train", "eval"):
        for e in build_examples(spec, split):
            assert parse_entities(e.target, e.words, spec.verbaliser) == e.tags, e.prompt
    assert len(read_rows(spec, "eval")) == 3250


@pytest.fixture(scope="module")
def smollm2():
    from tuner.model.backbone import load_backbone, load_tokenizer
    from tuner.model.model_cache import resolve_backbone
    from tuner.model.prompt_lm import PromptTunedLM

    path = resolve_backbone("smollm2-135m")
    return PromptTunedLM(load_backbone(path)), load_tokenizer(path)


@pytest.mark.parametrize("task, n", [("samsum", 3), ("conll2003_ner", 3)])
def test_zero_shot_generation_on_real_data(smollm2, task, n):
    """SAMSum zero-shot starts its answers with a newline: the hypotheses must not be empty any more.
    NER: whatever the untuned backbone writes parses and scores (entity-level)."""
    lm, tok = smollm2
    spec = TaskSpec.load(REPO / f"configs/tasks/{task}.yaml")
    spec.max_new_tokens = 24  # a few seconds on a quiet 2-core machine
    data = TaskData.load(spec, tok, max_eval=n, need_train=False)
    m = evaluate_task(lm, tok, data, None, max_len=512)
    assert m["n"] == n and 0.0 <= m["score"] <= 100.0 and len(m["samples"]) == n
    if task == "samsum":
        assert all(s["hyp"] for s in m["samples"]) and m["chrf"] > 0 and m["rouge_l"] > 0
    else:
        assert {"precision", "recall", "entity_f1", "per_label"} <= set(m)
