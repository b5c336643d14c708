"""bench/hp_search.py without training: how (c) picks a variant per task, the table and the cost ratios.

`timed_run` is replaced by a stand-in that returns summaries shaped like the recipe's, with known numbers;
the expected values are worked out by hand in the test.
"""

from __future__ import annotations

import pytest

from bench import hp_search

TASKS = ["sst2", "trec"]


def fake_runs(monkeypatch, heldout_by_job: dict[str, dict[str, float]]):
    calls = []

    def timed_run(cfg):
        calls.append(cfg.name)
        k = len(calls)
        summary = {
            "setup_s": 1.0,
            "train_s": 10.0 * k,
            "train_cpu_s": 20.0 * k,
            "config": {"search": {"rungs": [], "criterion": cfg.search.criterion}},
            "tasks": {t: {"metric": "accuracy", "tuned": {"score": k / 100}} for t in TASKS},
            "search_scoring_s": 3.0 if cfg.search.space else 0.0,
        }
        if cfg.search.space:
            held = heldout_by_job.get(cfg.name, {})
            summary["search"] = {
                t: {"chosen": {"optim.lr": 0.01}, "variants": [{"heldout": [[6, held.get(t, 0.5)]]}]}
                for t in TASKS
            }
        return summary

    monkeypatch.setattr(hp_search, "timed_run", timed_run)
    return calls


def test_naive_picks_the_best_heldout_job_per_task_and_costs_add_up(monkeypatch):
    # naive jobs 0..5 (calls 3..8); sst2 best at job 4, trec tied between jobs 1 and 2 (the first wins)
    held = {
        f"naive-{k}": {"sst2": 0.1 * k if k != 5 else 0.0, "trec": 0.9 if k in (1, 2) else 0.2}
        for k in range(6)
    }
    calls = fake_runs(monkeypatch, held)
    # the job's hand-set configuration (lr 0.03, class_labels) is outside this space: (a') is a run of its own
    out = hp_search.main(
        ["--quick", "--tasks", "sst2,trec", "--space", "optim.lr=0.003,0.01,0.03", "prompt.init=vocab,random"]
    )
    assert calls == [
        "hand-set",
        "in-batch",
        *(f"naive-{k}" for k in range(6)),
        "hand-set-heldout",
        "hand-set-again",
    ]
    assert out["chosen"]["c"]["sst2"] == {"optim.lr": 0.03, "prompt.init": "vocab"}  # job 4
    assert out["chosen"]["c"]["trec"] == {"optim.lr": 0.003, "prompt.init": "random"}  # job 1 (tie with 2)
    assert out["scores"]["c"] == pytest.approx({"sst2": 7.0, "trec": 4.0})  # calls 7 and 4, in points
    assert out["scores"]["a_held"] == pytest.approx({"sst2": 9.0, "trec": 9.0})  # call 9
    assert out["draw_noise"] == pytest.approx({"sst2": 1.0 - 9.0, "trec": 1.0 - 9.0})
    assert out["setup"]["hand_set"] == {"optim.lr": 0.03, "prompt.init": "class_labels"}
    # what --pool compares: the job relative to the clone, the seed, the base rule
    assert out["setup"]["job"] == "configs/multitask_all.yaml" and out["setup"]["seed"] == 0
    assert (
        out["setup"]["base_rungs"] == "every"
    )  # the stand-in's config names none: the rule before it existed
    c = out["cost"]
    assert (
        c["a_train_s"] == (10 + 100) / 2 and c["b_train_s"] == 20 and c["c_train_s"] == sum(range(30, 90, 10))
    )
    assert c["b_over_a"] == pytest.approx(20 / 55) and c["c_over_b"] == pytest.approx(330 / 20)
    assert c["c_over_b_cpu"] == pytest.approx(660 / 40) and c["b_rung_scoring_s"] == 3.0
    # means: (a) 1, (a') 9, (b) 2, (c) (7 + 4) / 2; (b) - (a) +1, (b) - (a') -7
    assert "| mean |  | 1.0 | 9.0 | 2.0 | 5.5 | +1.0 | -7.0 |  |  |" in out["table"]


def test_a_prime_is_the_naive_job_of_the_hand_set_configuration_when_the_space_has_it(monkeypatch):
    calls = fake_runs(monkeypatch, {})
    out = hp_search.main(
        ["--quick", "--tasks", "sst2,trec", "--space", "optim.lr=0.01,0.03", "prompt.init=class_labels"]
    )
    assert calls == ["hand-set", "in-batch", "naive-0", "naive-1", "hand-set-again"]
    assert out["scores"]["a_held"] == pytest.approx({"sst2": 4.0, "trec": 4.0})  # naive-1 (lr 0.03) is call 4


def test_skip_naive_runs_a_b_a_and_leaves_c_out(monkeypatch):
    calls = fake_runs(monkeypatch, {})
    out = hp_search.main(["--quick", "--skip-naive", "--tasks", "sst2,trec"])
    assert calls == ["hand-set", "in-batch", "hand-set-heldout", "hand-set-again"]
    assert set(out["scores"]) == {"a", "a_held", "b"} and out["same_choice"] is None
    assert "c_train_s" not in out["cost"] and out["cost"]["b_over_a"] == pytest.approx(20 / 25)
    assert out["table"].splitlines()[0] == (
        "| task | metric | (a) hand-set | (a') on (b)'s draws | (b) in-batch | (b) - (a) | (b) - (a') | (b) chose |"
    )
    assert out["setup"]["criterion"] == "auto"


def test_ab_only_runs_a_and_b_once_and_shows_no_a_prime(monkeypatch):
    calls = fake_runs(monkeypatch, {})
    out = hp_search.main(["--quick", "--skip-naive", "--ab-only", "--tasks", "sst2,trec"])
    assert calls == ["hand-set", "in-batch"]
    assert set(out["scores"]) == {"a", "b"} and out["draw_noise"] is None
    assert out["cost"]["a_train_s_first_last"] == [out["cost"]["a_train_s"]]
    assert (
        out["table"].splitlines()[0]
        == "| task | metric | (a) hand-set | (b) in-batch | (b) - (a) | (b) chose |"
    )
    # (c) is what the naive search costs: --ab-only leaves out (a') and the repeat only
    with pytest.raises(SystemExit):
        hp_search.main(["--quick", "--ab-only"])


def test_points_put_every_metric_on_0_to_100():
    from bench.common import points

    assert points("accuracy", 0.731) == pytest.approx(73.1) and points("macro_f1", 0.5) == 50.0
    assert points("entity_f1", 0.25) == 25.0
    assert points("chrf", 17.8) == 17.8 and points("rouge_l", 21.0) == 21.0  # already in points


def seed_result(seed: int, a: dict[str, float], b: dict[str, float], b_over_a: float, **setup) -> dict:
    return {
        "benchmark": "hp_search",
        "setup": {"tasks": list(a), "steps": 90, "seed": seed, "load_avg": [seed, 0, 0], **setup},
        "scores": {"a": a, "b": b},
        "cost": {"b_over_a": b_over_a},
    }


def test_pool_pairs_b_and_a_per_task_over_the_seeds(tmp_path):
    runs = [
        seed_result(0, {"sst2": 80.0, "trec": 60.0}, {"sst2": 84.0, "trec": 58.0}, 1.9),
        seed_result(1, {"sst2": 70.0, "trec": 50.0}, {"sst2": 72.0, "trec": 54.0}, 2.1),
        seed_result(2, {"sst2": 75.0, "trec": 55.0}, {"sst2": 75.0, "trec": 52.0}, 1.8),
    ]
    out = hp_search.pool(runs, quick=True)
    assert out["diff"] == {"sst2": [4.0, 2.0, 0.0], "trec": [-2.0, 4.0, -3.0]}
    assert out["per_seed_mean"] == pytest.approx([1.0, 3.0, -1.5])
    assert "| sst2 | +4.0 | +2.0 | +0.0 | +2.0 | 2.0 | 3/3 |" in out["table"]
    assert "| trec | -2.0 | +4.0 | -3.0 | -0.3 | 3.8 | 1/3 |" in out["table"]  # sd of (-2, 4, -3): 3.79
    v = out["verdict"]
    assert v["mean_gain"] == pytest.approx(2.5 / 3) and v["tasks_below_a"] == ["trec"]
    assert v["targets_met"] is False and out["setup"]["seeds"] == [0, 1, 2]
    assert "load_avg" not in out["setup"]


def test_pool_refuses_other_setups_repeated_seeds_and_unseeded_files(tmp_path):
    one = seed_result(0, {"sst2": 80.0}, {"sst2": 81.0}, 1.9)
    other = seed_result(1, {"sst2": 80.0}, {"sst2": 81.0}, 1.9, trained_variants={"sst2": 6})
    with pytest.raises(ValueError, match=r"seeds 0 and 1 differ in setup \(trained_variants\)"):
        hp_search.pool([one, other])
    with pytest.raises(ValueError, match="two or more distinct seeds"):
        hp_search.pool([one, one])
    import json

    old = tmp_path / "old.json"
    old.write_text(json.dumps({**one, "setup": {"tasks": ["sst2"]}}))
    with pytest.raises(ValueError, match="records no seed"):
        hp_search.load_result(old)
    (tmp_path / "cut.json").write_text('{"bench')
    with pytest.raises(SystemExit) as e:
        hp_search.main(["--pool", str(old), str(tmp_path / "cut.json")])
    assert e.value.code == 2


def test_pool_tells_scoring_apart_and_reads_old_results_as_heldout(capsys):
    old = seed_result(0, {"sst2": 80.0}, {"sst2": 81.0}, 1.9)  # recorded before `scoring` was
    heldout = seed_result(1, {"sst2": 80.0}, {"sst2": 79.0}, 1.9, scoring="heldout")
    preq = seed_result(2, {"sst2": 80.0}, {"sst2": 82.0}, 1.7, scoring="prequential")
    assert hp_search.pool([old, heldout], quick=True)["diff"] == {"sst2": [1.0, -1.0]}
    with pytest.raises(ValueError, match=r"differ in setup \(scoring\)"):
        hp_search.pool([old, preq], quick=True)


def test_result_name_is_a_stem_not_a_path(capsys):
    for bad in ("../x", "a/b", "x" * 65, "a b"):
        with pytest.raises(SystemExit) as e:
            hp_search.main(["--pool", "x.json", "y.json", "--name", bad])
        assert e.value.code == 2
        assert "letters, digits, _ and - only (a name, not a path)" in capsys.readouterr().err
