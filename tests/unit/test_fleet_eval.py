"""A fleet's evaluation: the zero-shot pass recorded once per task data and backbone (tuner/zero_shot.py),
reused by a run started again; the report's fleet section (tuner/fleet_summary.py)."""

import json

import pytest
from conftest import smollm2_tokenizer_dir, tiny_job_yaml, tiny_llama, write_tiny_tasks

from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.report import RunSummary, TaskSummary
from tuner.scores import TaskScores
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_tasks
from tuner.tasks.spec import TaskSpec
from tuner.zero_shot import ZERO_SHOT_FILE, zero_shot_scores


def test_zero_shot_scores_are_recorded_and_scored_again_only_where_their_data_or_backbone_changed(tmp_path):
    from tuner.config import ModelConfig

    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    paths = write_tiny_tasks(tmp_path, n_train=4, n_eval=4, names=("pos_neg", "colors", "sizes"))
    tasks = {s.name: TaskData.load(s, tok) for s in map(TaskSpec.load, paths)}
    passes = []

    def evaluate(some):
        passes.append(sorted(some))
        return evaluate_tasks(lm, tok, some, None, 64)

    model = ModelConfig(name="tiny", max_seq_len=64)
    first = zero_shot_scores(tmp_path / "run", tasks, model, evaluate)
    again = zero_shot_scores(tmp_path / "run", tasks, model, evaluate)
    assert passes == [["colors", "pos_neg", "sizes"]]  # the second call scored nothing
    assert {n: s.to_json() for n, s in again.items()} == {n: s.to_json() for n, s in first.items()}
    assert list(again) == list(tasks)
    # one task's verbaliser changes, then the backbone settings: only what they touch is scored again
    tasks["colors"].spec.verbaliser = {"0": " cold", "1": " warm"}
    zero_shot_scores(tmp_path / "run", tasks, model, evaluate)
    zero_shot_scores(tmp_path / "run", tasks, ModelConfig(name="tiny", max_seq_len=48), evaluate)
    assert passes[1:] == [["colors"], ["colors", "pos_neg", "sizes"]]
    recorded = json.loads((tmp_path / "run" / ZERO_SHOT_FILE).read_text())
    assert set(recorded) == {"colors", "pos_neg", "sizes"}


def test_a_run_started_again_before_its_first_checkpoint_reuses_its_zero_shot_pass(
    tmp_path, tiny_backbone_dir
):
    from tuner.config import load_job_config
    from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks

    tasks = write_tiny_tasks(tmp_path, n_train=8, n_eval=4)
    job = tiny_job_yaml(
        tmp_path,
        tiny_backbone_dir,
        tasks,
        **{"eval_zero_shot": True, "checkpoint_every": 3, "optim.max_steps": 3},
    )

    class Killed(Exception):
        pass

    def kill(metrics):
        raise Killed

    def run(hooks):
        r = MultiTaskPromptTuningRecipe(
            load_job_config(job, ["cluster.num_workers=1"]), hooks, progress=False
        )
        r.setup()
        return r

    progress = []
    first = run(RecipeHooks(on_step=kill, on_eval_progress=progress.append))
    with pytest.raises(Killed):
        first.train()
    assert {p.what for p in progress} == {"zero-shot"}
    progress.clear()
    second = run(RecipeHooks(on_eval_progress=progress.append))
    assert second.step == 0  # no checkpoint was written
    second.train()
    assert "zero-shot" not in {p.what for p in progress}  # recorded: not scored again
    assert {n: s.to_json() for n, s in second.history.zero_shot.items()} == {
        n: s.to_json() for n, s in first.history.zero_shot.items()
    }


def _summary(gains: dict[str, float]) -> RunSummary:
    def scores(v):
        return TaskScores("accuracy", v, {"accuracy": v, "n": 10})

    tasks = {
        n: TaskSummary("classification", "accuracy", scores(0.5), scores(0.5 + g)) for n, g in gains.items()
    }
    return RunSummary("fleet", "tiny", 10, 1, 4, 0.0, tasks, {})


def test_the_fleet_section_shows_the_spread_of_gains_and_the_worst_tasks():
    from tuner.fleet_summary import render_fleet_summary
    from tuner.report import render_report

    gains = {f"fam.t{i:02d}": i / 100 for i in range(25)}  # 0 to 24 points
    gains["fam.t07"] = -0.2
    text = render_fleet_summary(_summary(gains))
    assert "## Fleet" in text and "23 of 25 gained" in text  # t00 gained nothing, t07 lost
    rows = [line for line in text.splitlines() if line.startswith("| classification")]
    assert rows == ["| classification | accuracy | 25 | -20.0 | +1.4 | +12.0 | +21.6 | +24.0 | +10.9 |"]
    least = text.split("**Least gain**")[1].splitlines()
    assert least[4].startswith("| fam.t07 | accuracy | 50.0 | 30.0 | -20.0 |")
    assert least[5].startswith("| fam.t00 |")
    assert render_fleet_summary(_summary({"a": 0.1, "b": 0.2})) == ""  # a few tasks: the table says it all
    assert "fam.t07" in render_report(_summary(gains))  # the per-task report is unchanged beside it
