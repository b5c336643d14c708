"""What evaluation reports and how it shows itself: the two macro-F1s, the collapse warning, per-task eval
sizes, per-example predictions files, and the progress of an evaluation pass (issue 36, items 4-6)."""

import json

import pytest
import tqdm
import tqdm.auto
import yaml
from conftest import tiny_job_yaml, write_generation_task, write_tiny_tasks

from tuner.config import ConfigError, load_job_config
from tuner.evaluate_cli import evaluate_command, render_results
from tuner.metrics import EvalProgress
from tuner.progress import EvalBarFromRecords, EvalPass
from tuner.report import RunSummary, TaskSummary, collapse_warnings, render_report
from tuner.scores import MACRO_F1_DEFINITIONS, TaskScores, classification_metrics
from tuner.tasks.spec import TaskSpec, build_examples

# ------------------------------------------------------------------------------------ macro-F1


def test_macro_f1_is_over_the_labels_present_and_the_variant_over_every_label():
    """Labels a..d; `c` is predicted once but never gold, `d` never occurs at all.

    a: tp 1, fp 0, fn 1 -> F1 2/3;  b: tp 2, fp 1, fn 1 -> F1 2/3;  c: tp 0, fp 1 -> F1 0;  d: absent.
    """
    gold = ["a", "a", "b", "b", "b"]
    pred = ["a", "b", "b", "b", "c"]
    m = classification_metrics(gold, pred, ["a", "b", "c", "d"])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # a, b, c: in the gold or the predictions
    assert m["macro_f1_all_labels"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert m["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}
    assert m["per_label"]["d"]["support"] == 0 and m["per_label"]["d"]["predicted"] == 0
    from sklearn.metrics import f1_score  # a second check: the usual definition

    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    assert m["macro_f1_all_labels"] == pytest.approx(
        f1_score(gold, pred, labels=["a", "b", "c", "d"], average="macro", zero_division=0)
    )


def _summary(**tuned: TaskScores) -> RunSummary:
    tasks = {n: TaskSummary("classification", s.metric, zero_shot=None, tuned=s) for n, s in tuned.items()}
    return RunSummary("run", "tiny", 10, 1, 4, 100.0, tasks, config={})


def _scores(gold: list[str], pred: list[str], labels: list[str]) -> TaskScores:
    return TaskScores.of("macro_f1", classification_metrics(gold, pred, labels))


def test_summary_and_report_say_which_macro_f1_is_which():
    labels = ["flight", "fare", "airline", "meal"]  # meal never occurs
    s = _summary(atis=_scores(["flight", "fare", "airline"] * 3, ["flight", "fare", "fare"] * 3, labels))
    saved = s.to_json()
    assert saved["metric_definitions"] == MACRO_F1_DEFINITIONS
    record = saved["tasks"]["atis"]["tuned"]
    assert record["macro_f1"] > record["macro_f1_all_labels"]  # the absent label pulls the variant down
    report = render_report(s)
    assert "over the 3 labels present in the references or predictions (`macro_f1`)" in report
    assert "over all 4 labels (`macro_f1_all_labels`" in report
    assert "| label | precision | recall | F1 | support | predicted |" in report
    assert RunSummary.from_json(saved).tasks["atis"].tuned == record  # still reads back


# ------------------------------------------------------------------------------------ collapse


def test_a_classifier_that_collapsed_onto_one_label_is_warned_about():
    gold = ["flight", "fare"] * 10 + ["airline"] * 10
    collapsed = _scores(gold, ["flight"] * 28 + ["fare", "airline"], ["flight", "fare", "airline"])
    balanced = _scores(gold, gold, ["flight", "fare", "airline"])
    s = _summary(atis=collapsed, trec=balanced)
    want = "task atis: 93 % of predictions are 'flight' (collapsed onto one label)"
    assert collapse_warnings(s) == [want]
    assert f"- {want}" in render_report(s)
    # `promptfleet eval` prints it too, from the JSON records
    results = {
        "tasks": {
            n: {"metric": "macro_f1", "zero_shot": {}, "tuned": t.tuned.to_json()} for n, t in s.tasks.items()
        }
    }
    assert render_results(results).splitlines()[-1] == f"warning: {want}"


def test_ninety_percent_exactly_and_balanced_predictions_are_not_a_collapse():
    gold = ["a", "b"] * 10
    assert _scores(gold, ["a"] * 18 + ["b"] * 2, ["a", "b"]).collapsed_onto() is None  # 90 %: not more
    assert _scores(gold, gold, ["a", "b"]).collapsed_onto() is None
    assert not collapse_warnings(_summary(t=_scores(gold, gold, ["a", "b"])))
    # a record of an earlier release (no `predicted` counts) warns about nothing
    old = TaskScores.from_json(
        {
            "accuracy": 1.0,
            "per_label": {"a": {"precision": 1, "recall": 1, "f1": 1, "support": 2}},
            "n": 2,
            "metric": "accuracy",
            "score": 1.0,
        }
    )
    assert old.collapsed_onto() is None


# ------------------------------------------------------------------------------------ per-task eval sizes


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import smollm2_tokenizer_dir

    from tuner.model.backbone import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_dir())


def _with(path, **fields):
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, **fields}))
    return path


def test_a_tasks_max_eval_examples_overrides_the_jobs(tmp_path, tokenizer):
    from tuner.tasks.data import TaskData

    small, other = write_tiny_tasks(tmp_path, n_train=8, n_eval=16)
    _with(small, max_eval_examples=5)
    assert len(TaskData.load(TaskSpec.load(small), tokenizer, max_eval=8).eval) == 5
    assert len(TaskData.load(TaskSpec.load(other), tokenizer, max_eval=8).eval) == 8  # the job's
    _with(small, max_eval_examples=0)  # 0: the whole eval split, whatever the job says
    assert len(build_examples(TaskSpec.load(small), "eval", limit=8)) == 16


@pytest.mark.parametrize("bad", [-1, "many", True])
def test_a_bad_max_eval_examples_is_a_one_line_error(tmp_path, bad):
    path, _ = write_tiny_tasks(tmp_path, n_train=8, n_eval=4)
    _with(path, max_eval_examples=bad)
    with pytest.raises(ConfigError, match="max_eval_examples") as e:
        TaskSpec.load(path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ promptfleet eval


def test_eval_cli_scores_each_tasks_own_size_shows_a_bar_and_writes_predictions(
    tmp_path, tiny_backbone_dir, capsys
):
    small, other = write_tiny_tasks(tmp_path, n_train=8, n_eval=16)
    _with(small, max_eval_examples=5)
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, [small, other])  # data.max_eval_examples: 8
    out = evaluate_command(None, str(job), [], zero_shot=True, predictions_dir=tmp_path / "preds")
    assert out["tasks"]["pos_neg"]["zero_shot"]["n"] == 5 and out["tasks"]["colors"]["zero_shot"]["n"] == 8
    err = capsys.readouterr().err
    assert "zero-shot eval" in err and "/13" in err and "ex/s" in err  # one bar over both tasks' 5 + 8
    for name, n in (("pos_neg", 5), ("colors", 8)):
        lines = (tmp_path / "preds" / f"{name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == n
        spec = TaskSpec.load(small if name == "pos_neg" else other)
        for r in rows:
            assert set(r) == {"input", "references", "output", "correct", "scores"}
            assert r["input"].startswith("Text: ") and r["input"].endswith("\nAnswer:")
            assert set(r["scores"]) == set(spec.verbaliser)  # each label's log-probability
            assert r["output"] == max(r["scores"], key=r["scores"].get)
            assert r["correct"] == (r["references"] == [r["output"]])
        accuracy = sum(r["correct"] for r in rows) / n
        assert accuracy == pytest.approx(out["tasks"][name]["zero_shot"]["accuracy"])


def test_eval_cli_quiet_draws_no_bar(tmp_path, tiny_backbone_dir, capsys):
    tasks = write_tiny_tasks(tmp_path, n_train=8, n_eval=4, names=("pos_neg",))
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks)
    evaluate_command(None, str(job), [], zero_shot=True, progress=False)
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "runs").exists()  # no run directory, no predictions_dir: nothing written


def test_generation_predictions_carry_each_examples_scores(tmp_path, tiny_backbone_dir):
    """The per-example ROUGE-L and exact match average to the corpus values (both are means)."""
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, [write_generation_task(tmp_path)])
    out = evaluate_command(None, str(job), [], zero_shot=True, progress=False, predictions_dir=tmp_path / "p")
    record = out["tasks"]["echo"]["zero_shot"]
    rows = [json.loads(line) for line in (tmp_path / "p" / "echo.jsonl").read_text().splitlines()]
    assert len(rows) == record["n"] == 8
    assert all(set(r["scores"]) == {"chrf", "rouge_l", "exact_match"} for r in rows)
    assert all(r["correct"] == (r["scores"]["exact_match"] == 1.0) for r in rows)
    assert sum(r["scores"]["rouge_l"] for r in rows) / 8 == pytest.approx(record["rouge_l"])
    assert sum(r["scores"]["exact_match"] for r in rows) / 8 == pytest.approx(record["exact_match"])
    assert all(r["references"] and r["input"].startswith("Word: ") for r in rows)


def test_ner_predictions_score_each_sentence(tmp_path, tokenizer):
    """A sentence's entity F1 counted by hand, and each NER prediction record checked against the tags
    parsed from its output (a random tiny model: whatever it writes)."""
    import torch
    from conftest import tiny_llama

    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.tasks.data import TaskData
    from tuner.tasks.kinds import evaluate_task
    from tuner.tasks.kinds.ner import parse_entities, sentence_entity_f1

    # gold {PER 0-2, LOC 3}, predicted {PER 0-2, ORG 3}: one of two on each side, F1 2 * 1 / (2 + 2)
    assert sentence_entity_f1(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-ORG"]) == 0.5
    assert sentence_entity_f1(["O", "O"], ["O", "O"]) == 1.0  # nothing to find, nothing found
    assert sentence_entity_f1(["B-PER"], ["O"]) == 0.0
    (tmp_path / "d.txt").write_text("EU B-ORG\nrejects O\nGerman B-MISC\n\nPeter B-PER\nBlackburn I-PER\n")
    (tmp_path / "ner.yaml").write_text(
        "name: ner\nkind: ner\ndata: {format: conll, train: d.txt, eval: d.txt}\n"
        'template: "Sentence: {text}\\nEntities:"\nmax_new_tokens: 6\n'
    )
    data = TaskData.load(TaskSpec.load(tmp_path / "ner.yaml"), tokenizer)
    torch.manual_seed(0)
    m = evaluate_task(PromptTunedLM(tiny_llama(vocab_size=49152)), tokenizer, data, torch.randn(4, 32), 128)
    assert len(m.predictions) == 2
    for p, e in zip(m.predictions, data.eval_text):
        pred = parse_entities(p["output"], e.words, data.spec.verbaliser)
        assert p["input"] == "Sentence: " + " ".join(e.words) + "\nEntities:"
        assert p["references"] == [e.target.strip()] and p["correct"] == (pred == e.tags)
        assert p["scores"] == {"entity_f1": sentence_entity_f1(e.tags, pred)}


# ------------------------------------------------------------------------------------ training


def test_training_writes_predictions_and_reports_each_passs_progress(tmp_path, tiny_backbone_dir):
    from tuner.job import prepare_job
    from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks

    tasks = write_tiny_tasks(tmp_path, n_train=16, n_eval=6)
    overrides = {"optim.max_steps": 2, "eval_zero_shot": True, "eval_every": 1}
    cfg = load_job_config(
        tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **overrides), ["cluster.num_workers=1"]
    )
    job = prepare_job(cfg, claim=True)
    records: list[EvalProgress] = []
    recipe = MultiTaskPromptTuningRecipe(
        job.cfg, RecipeHooks(on_eval_progress=records.append), progress=False
    )
    try:
        recipe.setup()
        recipe.train()
        recipe.finish()
    finally:
        recipe.cleanup()
    passes = list(dict.fromkeys(r.what for r in records))
    assert passes == ["zero-shot", "eval @ step 1", "final eval"]
    for what in passes:
        mine = [r for r in records if r.what == what]
        assert mine[0].done == 0 and mine[-1].done == mine[-1].total == 12  # both tasks' 6 examples
    run_dir = tmp_path / "runs" / "tiny"
    for which in ("zero_shot", "tuned"):
        for name in ("pos_neg", "colors"):
            rows = (run_dir / "predictions" / which / f"{name}.jsonl").read_text().splitlines()
            assert len(rows) == 6 and {"input", "output", "correct"} <= set(json.loads(rows[0]))
    assert not list((run_dir / "predictions").rglob(".*.tmp"))  # written by rename, nothing left over


# ------------------------------------------------------------------------------------ the bars


class _Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _spy_on_bars(monkeypatch) -> list[dict]:
    """The keyword arguments of every bar `tqdm.auto.tqdm` makes from here on (drawn into a buffer)."""
    import io

    created, real = [], tqdm.auto.tqdm

    def spy(*args, **kwargs):
        created.append(kwargs)
        return real(*args, **{**kwargs, "file": io.StringIO()})

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    return created


def test_an_eval_pass_shows_a_bar_over_its_examples_and_leaves_its_time_out_of_training(monkeypatch):
    """A fake clock: the pass lasts 30 s; the training bar's start (its rate and ETA) moves by that much."""
    import io

    clock = _Clock()
    monkeypatch.setattr("tuner.progress._now", clock)
    training = tqdm.tqdm(total=10, file=io.StringIO())
    training.update(1)
    start, printed = training.start_t, training.last_print_t
    created = _spy_on_bars(monkeypatch)
    seen = []
    with EvalPass("eval @ step 1", 40, show=True, on_progress=seen.append, training_bar=training) as p:
        clock.t += 30.0
        p.advance(32)
        p.advance(8)
    assert created and created[0]["total"] == 40 and created[0]["unit"] == "ex"
    assert training.start_t == pytest.approx(start + 30.0)
    assert training.last_print_t <= training._time() and training.last_print_t >= printed
    assert (seen[0].done, seen[-1].done, seen[-1].total) == (0, 40, 40)
    training.close()


def test_the_drivers_bar_follows_rank_0s_records(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("tuner.progress._now", clock)

    class Bar:  # what the driver's training bar offers
        disable, start_t, last_print_t = False, 0.0, 0.0

        def _time(self):
            return 1e9

    bars = EvalBarFromRecords(Bar(), show=False)
    bars.update(EvalProgress("zero-shot", 0, 10))
    clock.t += 5.0
    bars.update(EvalProgress("zero-shot", 4, 10))
    assert bars._pass is not None and bars._pass.done == 4
    clock.t += 5.0
    bars.update(EvalProgress("zero-shot", 10, 10))
    assert bars._pass is None and bars.training_bar.start_t == pytest.approx(10.0)


def test_the_ray_drivers_bars_draw_rank_0s_eval_passes(monkeypatch):
    """`promptfleet train` on Ray: rank 0's `EvalProgress` records reach the driver through its queue; the
    driver draws the pass's bar and takes the pass, and the setup before rank 0's first record, out of
    the training bar's rate (a clock that moves 10 s per reading: the pass is read twice, at its first
    and last record)."""
    import time
    from dataclasses import asdict

    from ray.util.queue import Empty

    from cluster.launch import _DriverProgress

    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr("tuner.progress._now", lambda: float(next(ticks)))
    created = _spy_on_bars(monkeypatch)

    class Queue:  # what `ray.util.queue.Queue` offers the driver
        def __init__(self, items):
            self.items = list(items)

        def qsize(self):
            return len(self.items)

        def get_nowait_batch(self, n):
            out, self.items = self.items[:n], self.items[n:]
            return out

        def get(self, timeout):
            if not self.items:
                time.sleep(0.01)
                raise Empty
            return self.items.pop(0)

    records = [("eval_progress", asdict(EvalProgress("zero-shot", done, 12))) for done in (0, 6, 12)]
    queue = Queue([])
    with _DriverProgress(queue, total=4, show=True) as driver:
        driver.bar.start_t -= 600.0  # ten minutes of setup (Ray, the model) before rank 0's first record
        queued = driver.bar._time()
        queue.items.extend(records)
    # leaving it drained the queue: whether its thread or the last drain read the records, all are shown
    assert [(k["desc"], k["total"], k["unit"]) for k in created] == [
        ("prompt tuning", 4, "step"),
        ("zero-shot", 12, "ex"),
    ]
    # the setup is not training time, and neither is the pass
    assert queued + 10.0 <= driver.bar.start_t <= driver.bar._time() + 10.0 and driver.evals._pass is None
