"""Every shipped task reads its real data from ../shared/data and renders examples."""

import pytest
from conftest import REPO

from tuner.tasks import TaskSpec, build_examples, read_rows

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


def test_known_sizes_and_cleaning():
    sst2 = TaskSpec.load(REPO / "configs/tasks/sst2.yaml")
    assert len(read_rows(sst2, "train")) == 67349 and len(read_rows(sst2, "eval")) == 872
    ag = TaskSpec.load(REPO / "configs/tasks/ag_news.yaml")
    assert len(read_rows(ag, "train")) == 21597 - 29  # rows whose text is also in test are dropped
    mt = TaskSpec.load(REPO / "configs/tasks/multi30k_en_de.yaml")
    rows = read_rows(mt, "eval")
    assert len(rows) == 1000 and rows[0]["source"] and rows[0]["target"]
