"""Task families: N tasks from one YAML and one table with a task-id column (tuner/tasks/family.py)."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, smollm2_tokenizer_dir, tiny_job_yaml, write_tiny_tasks

from tuner.config import ConfigError, JobConfig
from tuner.job import PreparedJob, load_task_specs
from tuner.tasks.readers import read_rows

HEADER = "customer\tsentence\tlabel"
TRAIN = [
    ("acme", "a joy to watch", 1),
    ("acme", "awful pacing", 0),
    ("globex", "lovely music", 1),
    ("acme", "boring plot", 0),
    ("globex", "dull film", 0),
    ("initech", "great acting", 1),
    ("initech", "bad ending", 0),
]
EVAL = [("globex", "superb", 1), ("acme", "poor", 0)]


def write_family(root, train=TRAIN, eval_rows=EVAL, header=HEADER, **spec_keys):
    def tsv(rows):
        return "\n".join([header, *("\t".join(map(str, r)) for r in rows)]) + "\n"

    (root / "train.tsv").write_text(tsv(train), encoding="utf-8")
    (root / "eval.tsv").write_text(tsv(eval_rows), encoding="utf-8")
    spec = {
        "name": "reviews",
        "kind": "classification",
        "family": {"id_column": "customer"},
        "data": {"format": "tsv", "train": "train.tsv", "eval": "eval.tsv"},
        "template": "Review: {sentence}\nSentiment:",
        "verbaliser": {"0": " negative", "1": " positive"},
        **spec_keys,
    }
    path = root / "reviews.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_family_is_one_task_per_id_with_its_own_rows(tmp_path):
    specs = load_task_specs([str(write_family(tmp_path))])
    assert [s.name for s in specs] == ["reviews.acme", "reviews.globex", "reviews.initech"]
    acme = specs[0]
    assert acme.template == "Review: {sentence}\nSentiment:" and acme.verbaliser["1"] == " positive"
    assert [r["sentence"] for r in read_rows(acme, "train")] == [
        "a joy to watch",
        "awful pacing",
        "boring plot",
    ]
    assert [r["sentence"] for r in read_rows(acme, "eval")] == ["poor"]
    assert read_rows(specs[2], "eval") == []  # a task without eval rows has no eval split


def test_the_table_is_read_once_at_set_up(tmp_path):
    """Tasks keep their rows: once the specs are loaded, loading every task's data reads no file
    (the files are gone here), so set-up costs one read of the table, not one per task."""
    from transformers import AutoTokenizer

    path = write_family(tmp_path)
    specs = load_task_specs([str(path)])
    (tmp_path / "train.tsv").unlink()
    (tmp_path / "eval.tsv").unlink()
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    data = PreparedJob(JobConfig(tasks=[str(path)]), specs).load_data(tok)
    assert {n: (len(d.train), len(d.eval)) for n, d in data.items()} == {
        "reviews.acme": (3, 1),
        "reviews.globex": (2, 1),
        "reviews.initech": (2, 0),
    }
    assert data["reviews.globex"].eval_text[0].prompt == "Review: superb\nSentiment:"


def test_per_task_verbalisers_from_a_column(tmp_path):
    rows = [
        {"shop": "a", "text": "fine", "label": "ok", "verb": {"ok": " yes", "bad": " no"}},
        {"shop": "b", "text": "meh", "label": "0", "verb": '{"0": " cold", "1": " hot"}'},
        {"shop": "a", "text": "ugh", "label": "bad", "verb": {"ok": " yes", "bad": " no"}},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "shops",
        "family": {"id_column": "shop", "verbaliser_column": "verb"},
        "data": {"format": "jsonl", "train": "t.jsonl"},
        "template": "{text} ->",
    }
    (tmp_path / "shops.yaml").write_text(yaml.safe_dump(spec))
    a, b = load_task_specs([str(tmp_path / "shops.yaml")])
    assert a.verbaliser == {"ok": " yes", "bad": " no"} and b.verbaliser == {"0": " cold", "1": " hot"}


@pytest.mark.parametrize(
    "train, eval_rows, spec_keys, expected",
    [
        # an invisible character in an id: the line, and the value escaped
        ([*TRAIN[:3], ("ac\u200bme", "x", 1)], EVAL, {}, r"train.tsv:5: task id 'ac\\u200bme' does not make"),
        (
            [*TRAIN[:2], ("acme", "x", 7)],
            EVAL,
            {},
            r"train.tsv:4: task reviews.acme: label '7' has no verbaliser",
        ),
        (TRAIN, [("umbrella", "x", 1)], {}, r"eval.tsv:2: task id umbrella has eval rows but no train rows"),
        ([("a/b", "x", 1)], [], {}, r"train.tsv:2: task id a/b does not make a valid task name"),
    ],
)
def test_the_first_bad_row_is_named_by_file_and_line(tmp_path, train, eval_rows, spec_keys, expected):
    path = write_family(tmp_path, train, eval_rows, **spec_keys)
    with pytest.raises(ConfigError, match=expected):
        load_task_specs([str(path)])


def test_a_verbaliser_that_changes_within_a_task_is_named(tmp_path):
    header = "customer\tsentence\tlabel\tverb"
    v1, v2 = '{"0": " no", "1": " yes"}', '{"0": " no", "1": " yep"}'
    rows = [("acme", "a", 1, v1), ("globex", "b", 0, v2), ("acme", "c", 0, v2)]
    path = write_family(
        tmp_path, rows, [], header=header, family={"id_column": "customer", "verbaliser_column": "verb"}
    )
    with pytest.raises(ConfigError, match=r"train.tsv:4: task reviews.acme: verbaliser .* differs"):
        load_task_specs([str(path)])


def test_validate_checks_the_whole_family_in_one_line(tmp_path):
    good = write_family(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "validate", str(good)], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr
    bad = write_family(tmp_path, [*TRAIN, ("initech", "x", "1\u200b")], EVAL)
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "validate", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "train.tsv:9: task reviews.initech: label '1\\u200b' has no verbaliser entry" in lines[0]


def test_a_family_trains_beside_ordinary_tasks(tmp_path, tiny_backbone_dir):
    """One job: a family of three tasks and an ordinary task; every task is registered, trained and exported."""
    from cluster.launch import train_local
    from tuner.config import load_job_config

    (tmp_path / "fam").mkdir()
    family = write_family(tmp_path / "fam")
    (ordinary,) = write_tiny_tasks(tmp_path, n_train=8, n_eval=4, names=("colors",))
    job = tiny_job_yaml(
        tmp_path, tiny_backbone_dir, [family, ordinary], **{"optim.max_steps": 2, "optim.batch_size": 4}
    )
    summary = train_local(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    names = {"reviews.acme", "reviews.globex", "reviews.initech", "colors"}
    assert set(summary["tasks"]) == names
    from tuner.run_adapters import AdapterStore

    # a job with a family exports one packed store (`export_format: auto`), every task in it
    store = AdapterStore(tmp_path / "runs" / "tiny" / "adapters")
    assert store.index is not None and set(store.names) == names
    assert all(store.adapter(n).prompt.shape[0] > 0 for n in names)


def test_two_families_or_files_giving_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = write_family(tmp_path / "a")
    other = write_family(tmp_path / "b", name="reviews2")
    load_task_specs([str(one), str(other)])  # different family names: fine
    (tmp_path / "b" / "reviews.yaml").unlink()
    (tmp_path / "reviews.acme.yaml").write_text(
        yaml.safe_dump({"name": "reviews.acme", "data": {"format": "tsv", "train": "a/train.tsv"},
                        "template": "{sentence}", "verbaliser": {"0": " n", "1": " p"}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="two tasks of the job have the same name: reviews.acme"):
        load_task_specs([str(one), str(tmp_path / "reviews.acme.yaml")])


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"family": {"verbaliser_column": "v"}}, "family.verbaliser_column needs family.id_column"),
        ({"data": {"format": "txt", "train": "train.tsv"}}, "a family needs rows with columns"),
        (
            {"kind": "generation", "family": {"id_column": "customer", "verbaliser_column": "v"}},
            "has no verbaliser",
        ),
    ],
)
def test_family_settings_that_cannot_work_are_refused_in_one_line(tmp_path, keys, expected):
    with pytest.raises(ConfigError, match=expected):
        load_task_specs([str(write_family(tmp_path, **keys))])
