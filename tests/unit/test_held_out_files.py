"""Held-out files as a data scientist meets them: a byte-order mark, a latin-1 export, a column name
with an invisible character, and `validate` run on job and task files wherever they live.

A BOM is dropped in one place (`tuner.tasks.readers.open_text`) that `validate` and training both
read through, so they agree on every column name; `data.encoding` reads other encodings; error
messages show invisible characters escaped; `validate` tells a job from a task by its content and
reports every bad task of a job.
"""

import json
import re

import pytest

from cluster.cli import build_parser, main
from tuner.config import ConfigError, shown
from tuner.tasks.kinds import KINDS
from tuner.tasks.readers import check_columns, read_rows
from tuner.tasks.spec import TaskSpec, build_examples

BOM = "\ufeff"
VERBALISER = 'verbaliser: {"0": " no", "1": " yes"}\n'


def _mrpc_like(tmp_path, fmt: str, header_bom: bool = True) -> str:
    """MRPC's test.tsv shape: the label column (`Quality`) first, the file starting with a BOM."""
    rows = [("1", "a", "b"), ("0", "c", "d")]
    if fmt == "jsonl":
        text = "".join(json.dumps({"Quality": int(q), "s1": x, "s2": y}) + "\n" for q, x, y in rows)
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = "".join(sep.join(r) + "\n" for r in [("Quality", "s1", "s2"), *rows])
    data = tmp_path / f"test.{fmt}"
    data.write_text((BOM if header_bom else "") + text, encoding="utf-8")
    return f"data: {{format: {fmt}, train: {data.name}, eval: {data.name}}}\n"


def _task(tmp_path, body: str, name: str = "mrpc", folder: str = "") -> str:
    where = tmp_path / folder if folder else tmp_path
    where.mkdir(exist_ok=True)
    path = where / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + body)
    return str(path)


def _validate(capsys, *paths) -> tuple[int, str, list[str]]:
    code = main(["validate", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_a_bom_file_loads_with_its_first_column_named(tmp_path, capsys, fmt):
    raw = (tmp_path / f"test.{fmt}").as_posix()
    path = _task(
        tmp_path,
        _mrpc_like(tmp_path, fmt) + "template: '{s1} / {s2}'\nlabel_field: Quality\n" + VERBALISER,
    )
    assert open(raw, encoding="utf-8").read(1) == BOM  # the file really starts with one
    spec = TaskSpec.load(path)
    check_columns(spec)  # what `validate` reads
    rows = read_rows(spec, "eval")  # what training reads
    assert list(rows[0])[0] == "Quality" and not any(BOM in str(k) for r in rows for k in r)
    assert [(e.prompt, e.label) for e in build_examples(spec, "eval")] == [("a / b", "1"), ("c / d", "0")]
    code, out, err = _validate(capsys, path)
    assert code == 0 and out.startswith("ok") and not err


def test_a_bom_in_text_and_conll_files_is_not_data(tmp_path):
    (tmp_path / "a.txt").write_text(BOM + "first line\nsecond\n", encoding="utf-8")
    spec = TaskSpec.load(
        _task(tmp_path, "kind: generation\ndata: {format: txt, train: a.txt}\ntarget_field: text\n")
    )
    assert [r["text"] for r in read_rows(spec, "train")] == ["first line", "second"]
    (tmp_path / "n.conll").write_text(BOM + "-DOCSTART- O\n\nEU B-ORG\nsays O\n", encoding="utf-8")
    spec = TaskSpec.load(_task(tmp_path, "kind: ner\ndata: {format: conll, train: n.conll}\n", name="ner"))
    check_columns(spec)
    assert [r["tokens"] for r in read_rows(spec, "train")] == [["EU", "says"]]  # no "\ufeff-DOCSTART-"


@pytest.mark.parametrize("encoding, word", [("latin-1", "café"), ("cp1252", "5 €"), ("utf-16", "naïve")])
def test_data_encoding_reads_other_encodings(tmp_path, capsys, encoding, word):
    data = tmp_path / "d.tsv"
    data.write_bytes(f"text\tlabel\n{word}\t1\nplain\t0\n".encode(encoding))
    body = (
        f"data: {{format: tsv, train: d.tsv, eval: d.tsv, encoding: {encoding}}}\n"
        "template: '{text}'\n" + VERBALISER
    )
    spec = TaskSpec.load(_task(tmp_path, body))
    assert [r["text"] for r in read_rows(spec, "train")] == [word, "plain"]
    assert _validate(capsys, tmp_path / "mrpc.yaml")[0] == 0
    if encoding != "utf-16":  # read as UTF-8 (the default) the same bytes fail, and say what to set
        spec.data.encoding = "utf-8"
        with pytest.raises(ConfigError, match=r"d\.tsv .*not utf-8 text: set the task's data\.encoding"):
            read_rows(spec, "train")


@pytest.mark.parametrize("codec", ["utf-9", "base64", ""])
def test_an_unknown_codec_is_a_one_line_error(tmp_path, capsys, codec):
    (tmp_path / "d.tsv").write_text("text\tlabel\nx\t1\n")
    path = _task(
        tmp_path,
        f"data: {{format: tsv, train: d.tsv, encoding: '{codec}'}}\ntemplate: '{{text}}'\n" + VERBALISER,
    )
    with pytest.raises(ConfigError, match=re.escape(f"data.encoding={codec!r}: not a text encoding")):
        TaskSpec.load(path)
    code, out, err = _validate(capsys, path)
    assert code == 2 and not out and len(err) == 1 and "data.encoding" in err[0], err


def test_invisible_characters_in_column_names_are_shown_escaped(tmp_path, capsys):
    assert shown("Quality") == "Quality" and shown("#1 String") == "#1 String"
    assert shown(BOM + "Quality") == "'\\ufeffQuality'" and shown("a\u200bb") == "'a\\u200bb'"
    assert shown("label ") == "'label '" and shown("") == "''"
    # a BOM inside the header (a file pasted onto another) is data: it must be seen in the message
    (tmp_path / "d.tsv").write_text(f"s1\ts2\t{BOM}Quality\na\tb\t1\n", encoding="utf-8")
    path = _task(
        tmp_path,
        "data: {format: tsv, train: d.tsv}\ntemplate: '{s1} / {s2}'\nlabel_field: Quality\n" + VERBALISER,
    )
    spec = TaskSpec.load(path)
    messages = []
    for read in (check_columns, lambda s: read_rows(s, "train")):  # validate and training say the same
        with pytest.raises(ConfigError) as e:
            read(spec)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert "field 'Quality' not in the data (columns: s1, s2, '\\ufeffQuality')" in messages[0]
    assert BOM not in messages[0]
    code, _, err = _validate(capsys, path)
    assert code == 2 and len(err) == 1 and "'\\ufeffQuality'" in err[0] and BOM not in err[0]


def test_a_label_field_spelled_with_the_bom_fails_alike_in_validate_and_training(tmp_path):
    """The issue's mirror case: `"\\ufeffQuality"` passed validate, then training said it was missing."""
    path = _task(
        tmp_path,
        _mrpc_like(tmp_path, "tsv") + "template: '{s1}'\nlabel_field: \"\\ufeffQuality\"\n" + VERBALISER,
    )
    spec = TaskSpec.load(path)
    for read in (check_columns, lambda s: read_rows(s, "eval")):
        with pytest.raises(
            ConfigError, match=re.escape("'\\ufeffQuality' not in the data (columns: Quality,")
        ):
            read(spec)


def _job(tmp_path, folder: str, tasks: list[str], extra: str = "") -> str:
    where = tmp_path / folder
    where.mkdir(exist_ok=True)
    path = where / "job.yaml"
    path.write_text(f"name: j\noutput_dir: {tmp_path / 'runs'}\ntasks: {json.dumps(tasks)}\n{extra}")
    return str(path)


def test_validate_reads_what_a_file_is_from_its_content_not_its_folder(tmp_path, capsys):
    mrpc = _mrpc_like(tmp_path, "tsv", header_bom=False).replace("test.tsv", "../test.tsv")
    task = _task(tmp_path, mrpc + "template: '{s1}'\nlabel_field: Quality\n" + VERBALISER, folder="jobs")
    job = _job(tmp_path, "tasks", ["../jobs/mrpc.yaml"], extra="checkpoint_every: 5\n")
    code, out, err = _validate(capsys, task, job)
    assert code == 0 and not err and out.splitlines() == [f"ok  {task}", f"ok  {job}"]
    # a stray key is reported as what it is in that kind of file, wherever the file lies
    (tmp_path / "jobs" / "mrpc.yaml").write_text(open(task).read() + "checkpoint_every: 5\n")
    _job(tmp_path, "tasks", ["../jobs/mrpc.yaml"], extra="kind: generation\n")
    code, out, err = _validate(capsys, task, job)
    assert code == 2 and not out and len(err) == 2, err
    assert err[0].startswith(f"promptfleet: error: {task}: unknown key 'checkpoint_every'")
    assert err[1].startswith(f"promptfleet: error: {job}: unknown key 'kind'")
    # a file that is neither says so, in one line
    (tmp_path / "odd.yaml").write_text("name: x\n")
    code, _, err = _validate(capsys, tmp_path / "odd.yaml")
    assert code == 2 and len(err) == 1 and "cannot tell a job file" in err[0]


def test_validate_reports_every_bad_task_of_a_job(tmp_path, capsys):
    (tmp_path / "d.tsv").write_text("text\tlabel\nx\t1\n")
    data = "data: {format: tsv, train: ../d.tsv}\n"
    _task(tmp_path, data + "template: '{text}'\n" + VERBALISER, name="good", folder="t")
    _task(tmp_path, data + "template: '{text}'\nbogus: 1\n" + VERBALISER, name="bad1", folder="t")
    _task(tmp_path, data + "template: '{sentence}'\n" + VERBALISER, name="bad2", folder="t")
    tasks = ["t/good.yaml", "t/bad1.yaml", "t/bad2.yaml", "t/absent.yaml"]
    job = _job(tmp_path, "jobs", [f"../{t}" for t in tasks])
    code, out, err = _validate(capsys, job)
    assert code == 2 and not out and len(err) == 3, err
    assert all(line.startswith(f"promptfleet: error: {job}: task ../t/") for line in err)
    assert "bad1.yaml: unknown key 'bogus'" in err[0]
    assert "bad2.yaml: task bad2: train split" in err[1] and "template field 'sentence'" in err[1]
    assert "absent.yaml: task file not found" in err[2]
    # the same job with its bad tasks fixed is ok, and two tasks of one name are still caught
    job = _job(tmp_path, "jobs", ["../t/good.yaml", "../t/good.yaml"])
    code, _, err = _validate(capsys, job)
    assert code == 2 and len(err) == 1 and "same task name: good" in err[0]


def test_eval_help_lists_every_metric_the_task_kinds_compute(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = re.sub(r"[\s_-]", "", capsys.readouterr().out.lower())
    metrics = {m for kind in KINDS.values() for m in kind.metrics}
    assert {"chrf", "rouge_l", "exact_match", "entity_f1", "accuracy", "macro_f1"} <= metrics
    missing = sorted(m for m in metrics if m.replace("_", "") not in text)
    assert not missing, f"eval --help does not name {missing}"
