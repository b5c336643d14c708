"""In-batch hyperparameter search (`tuner.search.state`): expansion, halving, per-row Adam, held-out slice,
and the recipe end to end on the tiny backbone (a variant trains as it would alone; resume keeps the search)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_job_yaml, write_generation_task, write_tiny_tasks

from cluster.launch import train_local
from tuner.config import ConfigError, JobConfig, from_dict, load_job_config
from tuner.prompts.optim import SparseRowAdam
from tuner.scores import classification_metrics
from tuner.search.evidence import Evidence, paired_se
from tuner.search.space import expand_space
from tuner.search.state import SearchState, halving_rungs

SPACE = {"optim.lr": [0.01, 0.1, 1.0], "prompt.init": ["vocab", "random"]}


def job_with(space, **over) -> JobConfig:
    return from_dict(JobConfig, {"search": {"space": space}, **over})


# ------------------------------------------------------------------------------ config and expansion


def test_space_expands_to_the_cartesian_product_with_validated_sections():
    cfg = job_with({"optim": {"lr": [0.01, 0.1]}, "prompt.init": ["vocab", "class_labels"]})
    variants = expand_space(cfg)
    assert [v.values for v in variants] == [
        {"optim.lr": a, "prompt.init": b} for a in (0.01, 0.1) for b in ("vocab", "class_labels")
    ]
    assert [v.optim.lr for v in variants] == [0.01, 0.01, 0.1, 0.1]
    assert variants[1].prompt.init == "class_labels" and variants[1].optim.max_steps == cfg.optim.max_steps


@pytest.mark.parametrize(
    "space, message",
    [
        ({"prompt.num_virtual_tokens": [8, 16]}, "cannot vary inside one job.*promptfleet tune"),
        ({"optim.batch_size": [8, 16]}, "cannot vary inside one job"),
        ({"optim.nope": [1, 2]}, "unknown setting 'optim.nope'"),
        ({"optim.lr": [0.1, -1.0]}, r"optim.lr=-1.0: must be > 0"),
        ({"prompt.init": ["vocab", "bogus"]}, "prompt.init='bogus'"),
        ({"optim.lr": [0.1, 0.1]}, "distinct values"),
    ],
)
def test_bad_search_spaces_are_one_line_config_errors(space, message):
    with pytest.raises(ConfigError, match=message) as e:
        job_with(space)
    assert "\n" not in str(e.value)


def test_search_needs_the_independent_method():
    with pytest.raises(ConfigError, match="prompt.method=independent"):
        job_with({"optim.lr": [0.1, 0.2]}, prompt={"method": "residual"})


def test_halving_rungs():
    # 6 variants, eta 3: 6 -> 2 after T/9, 2 -> 1 after T/3 (the rest of training costs one variant)
    assert halving_rungs(90, 6, 3) == [10, 30]
    assert halving_rungs(80, 8, 2) == [10, 20, 40]
    assert halving_rungs(90, 1, 3) == []
    assert halving_rungs(10, 6, 3, rungs=[2, 5, 10]) == [2, 5]


def test_heldout_schedule_grows_with_the_steps_to_the_whole_slice_at_the_last_rung():
    cfg = job_with(SPACE, optim={"max_steps": 90})  # 6 variants, eta 3: rungs after steps 10 and 30
    state = SearchState.build(cfg, ["a"])
    assert state.rungs == [10, 30] and state.heldout_schedule == "grow"
    assert state.heldout_size(10, 64) == 22  # ceil(64 x 10 / 30)
    assert state.heldout_size(30, 64) == 64 and state.heldout_size(90, 64, final=True) == 64
    assert state.heldout_size(10, 30) == 16  # never below 16 ...
    assert state.heldout_size(10, 9) == 9  # ... nor above what the slice holds
    fixed = SearchState.build(
        job_with(SPACE, optim={"max_steps": 90}, search={"space": SPACE, "heldout_schedule": "fixed"}), ["a"]
    )
    assert fixed.heldout_size(10, 64) == 64
    with pytest.raises(ConfigError, match="search.heldout_schedule='half': expected one of grow, fixed"):
        job_with(SPACE, search={"space": SPACE, "heldout_schedule": "half"})


def test_state_expands_draws_halves_with_deterministic_ties_and_round_trips():
    cfg = job_with(SPACE, optim={"max_steps": 90})
    state = SearchState.build(cfg, ["a", "b"])
    assert state.rungs == [10, 30] and len(state.rows()) == 12 and state.rows()[:2] == ["a~0", "a~1"]
    assert state.expand([("a", 3)]) == [(f"a~{k}", 3) for k in range(6)]
    scores = {f"a~{k}": s for k, s in enumerate([0.5, 0.9, 0.5, 0.9, 0.1, 0.2])}
    scores |= {f"b~{k}": 0.3 for k in range(6)}  # all tied: the lowest indices stay
    results = state.apply_rung(10, scores)
    assert state.live == {"a": [1, 3], "b": [0, 1]}
    assert [r.kept for r in results] == [[1, 3], [0, 1]]
    assert state.leader("a") == "a~1" and state.expand([("b", 2)]) == [("b~0", 2), ("b~1", 2)]
    hp = state.row_hparams(["a~1", "a~2"], step=0, max_steps=90)
    assert hp.lr[0] != hp.lr[1] and len(hp.weight_decay) == 2

    again = SearchState.build(cfg, ["a", "b"])
    again.load_json(json.loads(json.dumps(state.to_json())))
    assert again.live == state.live and again.results == state.results
    other = SearchState.build(job_with({"optim.lr": [0.1, 0.2]}), ["a", "b"])
    with pytest.raises(ValueError, match="another search space"):
        other.load_json(state.to_json())

    state.apply_rung(90, {r: 0.7 if r == "a~3" else 0.1 for r in state.rows_to_score(final=True)}, final=True)
    summary = state.summary()
    assert summary["a"]["chosen_row"] == "a~3" and summary["a"]["chosen"] == {
        "optim.lr": 0.1,
        "prompt.init": "random",
    }
    outcomes = {v["index"]: v["outcome"] for v in summary["a"]["variants"]}
    assert outcomes[3] == "won" and outcomes[1] == "dropped at rung 1 (step 90)"
    assert outcomes[0] == "dropped at rung 0 (step 10)"
    assert summary["a"]["variants"][3]["heldout"] == [[10, 0.9], [90, 0.7]]


def test_tied_scores_go_to_the_lower_training_loss_then_the_lower_index():
    state = SearchState.build(job_with({"optim.lr": [0.01, 0.1, 1.0]}, optim={"max_steps": 90}), ["a"])
    tied = {"a~0": 0.5, "a~1": 0.5, "a~2": 0.5}
    state.apply_rung(10, tied, train_loss={"a~0": 2.0, "a~1": 1.5, "a~2": 1.0})
    assert state.live["a"] == [2] and state.results[0].train_loss == {0: 2.0, 1: 1.5, 2: 1.0}
    again = SearchState.build(job_with({"optim.lr": [0.01, 0.1, 1.0]}, optim={"max_steps": 90}), ["a"])
    again.load_json(json.loads(json.dumps(state.to_json())))
    assert again.results == state.results
    no_loss = SearchState.build(job_with({"optim.lr": [0.01, 0.1, 1.0]}, optim={"max_steps": 90}), ["a"])
    no_loss.apply_rung(10, tied)
    assert no_loss.live["a"] == [0]


def test_survivors_halve_the_variants_rung_by_rung():
    state = SearchState.build(job_with({"optim.lr": [0.1 * k for k in range(1, 9)]}), ["a"])  # eta 3
    assert [state.survivors("a", r) for r in range(3)] == [3, 1, 1]  # ceil(8 / 3), ceil(8 / 9)
    two = SearchState.build(
        job_with(
            {"optim.lr": [0.1 * k for k in range(1, 9)]},
            search={"eta": 2, "space": {"optim.lr": [0.1 * k for k in range(1, 9)]}},
        ),
        ["a"],
    )
    assert [two.survivors("a", r) for r in range(4)] == [4, 2, 1, 1]


def test_variants_that_train_alike_on_a_task_are_trained_once():
    """A task without label words (generation) initialises `class_labels` as `vocab`: of 3 learning rates
    x those 2 inits it trains 3 variants, the job's own configuration among them, and keeps as many at
    each rung as the 6-variant schedule does (2, then 1); the report says which variant each copy follows."""
    space = {"optim.lr": [0.01, 0.1, 1.0], "prompt.init": ["class_labels", "vocab"]}
    cfg = job_with(
        space,
        optim={"lr": 0.1, "max_steps": 90},
        prompt={"init": "vocab"},
        search={"space": space, "base_margin": 0},  # ranked by score alone
    )
    state = SearchState.build(cfg, ["cls", "gen"], labelled={"cls"})
    assert state.base == 3  # lr 0.1, vocab
    # each pair trains as its lower index does, or as the base where the base is in the pair
    assert state.live == {"cls": [0, 1, 2, 3, 4, 5], "gen": [0, 3, 4]}
    assert state.same == {"gen": {1: 0, 2: 3, 5: 4}}
    assert state.expand([("gen", 7)]) == [("gen~0", 7), ("gen~3", 7), ("gen~4", 7)]
    scores = {f"cls~{k}": k / 10 for k in range(6)} | {"gen~0": 0.3, "gen~3": 0.2, "gen~4": 0.1}
    state.apply_rung(10, scores)
    assert state.live == {"cls": [4, 5], "gen": [0, 3]}
    state.apply_rung(30, {"cls~4": 0.1, "cls~5": 0.2, "gen~0": 0.1, "gen~3": 0.2})
    assert state.live == {"cls": [5], "gen": [3]} and state.rows_to_score(final=True) == []
    outcomes = {v["index"]: v["outcome"] for v in state.summary()["gen"]["variants"]}
    assert outcomes[1] == "trains as variant 0 on this task (not trained twice)"
    assert outcomes[3] == "won" and outcomes[0] == "dropped at rung 1 (step 30)"
    # every task labelled (the default): nothing is merged
    assert SearchState.build(cfg, ["cls", "gen"]).same == {}
    # init_std matters only to random init, init_text only to text
    std = {"prompt.init": ["vocab", "random"], "prompt.init_std": [0.01, 0.02]}
    merged = SearchState.build(job_with(std, prompt={"init": "vocab", "init_std": 0.02}), ["a"])
    assert merged.base == 1 and merged.live["a"] == [1, 2, 3] and merged.same == {"a": {0: 1}}
    # a task left with one variant is decided: no rung and no final selection scores it
    one = SearchState.build(job_with({"prompt.init": ["class_labels", "vocab"]}), ["gen"], labelled=())
    assert one.live["gen"] == [0] and one.rows_to_score(final=True) == []


def test_a_generation_tasks_class_labels_and_vocab_variants_are_one_prompt_trained_once(
    tmp_path, tiny_backbone_dir
):
    """What makes merging them right: without label words both inits give the task the same prompt (its
    own stream), and the copy is not in the batch; a classification task's two inits differ."""
    from tuner.recipe import MultiTaskPromptTuningRecipe

    tasks = [write_generation_task(tmp_path), *write_tiny_tasks(tmp_path, n_train=16, names=("pos_neg",))]
    space = {"optim.lr": [0.05, 0.3], "prompt.init": ["class_labels", "vocab"]}
    job = tiny_job_yaml(
        tmp_path, tiny_backbone_dir, tasks, **{"search.space": space, "search.heldout_examples": 4}
    )
    r = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    r.setup()
    # the job's own configuration (lr 0.05, vocab) stays; of the other pair the lower index
    assert r.search.same == {"echo": {0: 1, 3: 2}} and r.search.live["echo"] == [1, 2]
    before = {row: r.bank.prompt(row).clone() for row in r.bank.task_names}
    assert torch.equal(before["echo~0"], before["echo~1"]) and torch.equal(before["echo~2"], before["echo~3"])
    assert not torch.equal(before["pos_neg~0"], before["pos_neg~1"])  # label words vs sampled vocabulary
    metrics = r.train_step([("echo", 0), ("pos_neg", 1), ("echo", 2)])
    assert {row for row in metrics.task_loss if row.startswith("echo")} == {"echo~1", "echo~2"}
    assert len([row for row in metrics.task_loss if row.startswith("pos_neg")]) == 4
    assert torch.equal(r.bank.prompt("echo~0"), before["echo~0"])
    assert not torch.equal(r.bank.prompt("echo~1"), before["echo~1"])


# ------------------------------------------------------------------------------ the base variant's protection


def test_evidence_scores_each_resample_as_the_metric_would():
    """Per-example evidence recomputes accuracy and macro-F1 on any resample of the examples exactly as
    `classification_metrics` does on the resampled lists (labels that never occur in a resample included)."""
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    gold, pred = rng.integers(0, 4, 30), rng.integers(0, 4, 30)
    idx = np.vstack([np.arange(30), rng.integers(0, 30, (5, 30)), np.zeros((1, 30), dtype=int)])
    f1 = Evidence(pred, gold, len(labels)).scores(idx)
    acc = Evidence((gold == pred).astype(float)).scores(idx)
    for b, row in enumerate(idx):
        m = classification_metrics([labels[g] for g in gold[row]], [labels[p] for p in pred[row]], labels)
        assert f1[b] == pytest.approx(m["macro_f1"]) and acc[b] == pytest.approx(m["accuracy"])


def test_paired_se_is_the_standard_error_of_the_paired_difference():
    """For a mean, the bootstrap standard error of the gap is the plug-in one, std(a_i - b_i) / sqrt(n);
    examples both variants get right (or wrong) cancel, so it is below the unpaired one."""
    rng = np.random.default_rng(1)
    both = rng.random(200) < 0.6
    a = (both | (rng.random(200) < 0.3)).astype(float)  # b's right answers and some more
    b = (both & (rng.random(200) < 0.9)).astype(float)
    se = paired_se(Evidence(a), Evidence(b), seed=3, rounds=4000)
    assert se == pytest.approx(np.std(a - b) / np.sqrt(200), rel=0.08)
    assert se < np.sqrt(np.var(a) / 200 + np.var(b) / 200) * 0.9
    assert se == paired_se(Evidence(a), Evidence(b), seed=3, rounds=4000)  # seeded: every rank agrees
    assert paired_se(Evidence(a), Evidence(a), seed=0) == 0.0


def base_state(margin: float = 1.0) -> SearchState:
    """3 learning rates, one rung (step 30) that keeps 1; the job's own lr (0.01) is variant 1."""
    cfg = job_with({"optim.lr": [0.003, 0.01, 0.03]}, optim={"lr": 0.01, "max_steps": 90})
    cfg.search.base_margin = margin
    return SearchState.build(cfg, ["a"])


def right(n_right: int, n: int = 20, offset: int = 0) -> Evidence:
    """Accuracy evidence: examples offset .. offset + n_right - 1 (mod n) right."""
    return Evidence(np.array([float((i - offset) % n < n_right) for i in range(n)]))


def test_the_jobs_own_configuration_stays_unless_beaten_beyond_noise():
    state = base_state()
    assert state.base == 1 and state.rungs == [30]
    # the leader (variant 0) is 1 example of 20 ahead: within one paired standard error, so the base stays
    scores = {"a~0": 0.55, "a~1": 0.5, "a~2": 0.1}
    ev = {"a~0": right(11, offset=3), "a~1": right(10), "a~2": right(2)}
    [r] = state.apply_rung(30, scores, evidence=ev)
    assert state.live["a"] == [1] and state.winner("a").row == "a~1" and r.kept == [1]
    check = r.base_check
    assert check["leader"] == 0 and check["gap"] == pytest.approx(0.05) and check["kept"]
    assert check["se"] == pytest.approx(paired_se(ev["a~0"], ev["a~1"], seed=30 * 100_003))
    again = base_state()
    again.load_json(json.loads(json.dumps(state.to_json())))
    assert again.results == state.results and again.winner("a").row == "a~1"
    won = {v["index"]: v for v in state.summary()["a"]["variants"]}[1]
    assert won["base"] and won["outcome"].startswith(
        "won (the job's own configuration; the leader's lead 0.0500"
    )

    # 18 of 20 against 10 of 20: beaten beyond noise
    beaten = base_state()
    beaten.apply_rung(30, {**scores, "a~0": 0.9}, evidence={**ev, "a~0": right(18)})
    assert beaten.live["a"] == [0] and not beaten.results[0].base_check["kept"]
    outcome = {v["index"]: v["outcome"] for v in beaten.summary()["a"]["variants"]}[1]
    assert outcome.startswith("dropped at rung 0 (step 30), beaten by 0.4000 > 1 x paired SE")

    plain = base_state(margin=0.0)  # off: rank by score alone
    plain.apply_rung(30, scores, evidence=ev)
    assert plain.live["a"] == [0] and plain.results[0].base_check == {}
    no_evidence = base_state()  # a decoded metric has no per-example evidence: rank by score alone
    no_evidence.apply_rung(30, scores)
    assert no_evidence.live["a"] == [0]


def test_the_base_takes_the_last_place_kept_and_is_the_tasks_prompt_meanwhile():
    cfg = job_with({"optim.lr": [0.003, 0.01, 0.03], "prompt.init": ["vocab", "class_labels"]})
    cfg.optim.lr, cfg.optim.max_steps, cfg.prompt.init = 0.03, 90, "class_labels"
    state = SearchState.build(cfg, ["a"])
    assert state.base == 5 and state.rungs == [10, 30]
    scores = {f"a~{k}": s for k, s in enumerate([0.6, 0.7, 0.65, 0.2, 0.1, 0.6])}
    ev = {"a~1": right(14), "a~5": right(12, offset=4)}  # 2 of 20 behind the leader: within noise
    state.apply_rung(10, scores, evidence=ev)
    assert state.live["a"] == [1, 5] and state.leader("a") == "a~5"  # not 1 and 2
    # no per-task base: a space without the job's own values, or one variant
    assert SearchState.build(job_with({"optim.lr": [0.1, 0.2]}), ["a"]).base is None
    assert SearchState.build(job_with({"optim.lr": [cfg.optim.lr]}), ["a"]).base is None


def test_before_the_last_rung_the_jobs_own_configuration_always_stays():
    """base_rungs last (the default): at a rung before the last the base stays however far it trails (a
    lead after a ninth of the schedule is horizon, not noise: BENCHMARKS.md hp_search run 9); the last rung
    applies the evidence rule; base_rungs every applies it at every rung."""
    space = {"optim.lr": [0.003, 0.01, 0.03], "prompt.init": ["vocab", "class_labels"]}

    def state(base_rungs: str) -> SearchState:
        search = {"space": space, "base_rungs": base_rungs}
        cfg = job_with(
            space, optim={"lr": 0.03, "max_steps": 90}, prompt={"init": "class_labels"}, search=search
        )
        return SearchState.build(cfg, ["a"])

    far = {f"a~{k}": x for k, x in enumerate([0.9, 0.8, 0.3, 0.2, 0.1, 0.1])}
    ev = {"a~0": right(18), "a~5": right(2)}
    last = state("last")
    assert last.base == 5 and last.rungs == [10, 30]
    [r] = last.apply_rung(10, far, evidence=ev)
    assert last.live["a"] == [0, 5] and r.base_check["early"] and r.base_check["kept"]
    assert r.base_check["gap"] == pytest.approx(0.8) and r.base_check["se"] > 0
    [r] = last.apply_rung(30, {"a~0": 0.9, "a~5": 0.1}, evidence=ev)  # the last rung: the evidence decides
    assert last.live["a"] == [0] and not r.base_check["kept"] and "early" not in r.base_check

    every = state("every")
    every.apply_rung(10, far, evidence=ev)
    assert every.live["a"] == [0, 1] and not every.results[0].base_check["kept"]
    no_evidence = state("last")  # a decoded metric: no standard error, still kept before the last rung
    [r] = no_evidence.apply_rung(10, far)
    assert no_evidence.live["a"] == [0, 5] and r.base_check["se"] is None

    # the report says why the base won at the rung that decided the task, not at an earlier one
    won = state("last")
    won.apply_rung(10, far, evidence=ev)
    won.apply_rung(30, {"a~0": 0.5, "a~5": 0.6}, evidence=ev)  # ranked first at the last rung
    assert {v["index"]: v["outcome"] for v in won.summary()["a"]["variants"]}[5] == "won"
    close = state("last")  # trails early, then within noise at the last rung: kept by the rule there
    close.apply_rung(10, far, evidence=ev)
    close.apply_rung(30, {"a~0": 0.55, "a~5": 0.5}, evidence={"a~0": right(11, offset=3), "a~5": right(10)})
    assert close.live["a"] == [5]
    outcome = {v["index"]: v["outcome"] for v in close.summary()["a"]["variants"]}[5]
    assert outcome.startswith("won (the job's own configuration; the leader's lead 0.0500 <= 1 x paired SE")
    assert outcome.endswith("at step 30)")
    with pytest.raises(ConfigError, match="search.base_rungs='first'"):
        job_with(space, search={"space": space, "base_rungs": "first"})


@pytest.mark.parametrize("margin", [-1, float("inf"), "x"])
def test_base_margin_must_be_a_finite_number_of_standard_errors(margin):
    with pytest.raises(ConfigError, match="search.base_margin"):
        job_with({"optim.lr": [0.1, 0.2]}, search={"space": {"optim.lr": [0.1, 0.2]}, "base_margin": margin})


# ------------------------------------------------------------------------------ optimiser and data


def test_per_row_settings_equal_separate_steps_with_each_rows_own_settings():
    torch.manual_seed(0)
    names, values = ["a", "b", "c"], torch.randn(3, 4, 8)
    lrs, decays, clips = [0.1, 0.01, 0.5], [0.0, 0.1, 0.01], [1.0, 0.0, 2.0]
    joint = SparseRowAdam(lr=1.0)
    alone = [SparseRowAdam(lrs[i], weight_decay=decays[i], grad_clip=clips[i]) for i in range(3)]
    v_joint, v_alone = values, [values[i : i + 1] for i in range(3)]
    for _ in range(3):  # a few steps: the moments and bias corrections too
        g = torch.randn(3, 4, 8) * 5
        v_joint = joint.step(names, v_joint, g, lrs, decays, clips)
        v_alone = [opt.step([n], v, g[i : i + 1]) for i, (opt, n, v) in enumerate(zip(alone, names, v_alone))]
        torch.testing.assert_close(v_joint, torch.cat(v_alone))
    grads = torch.randn(3, 4, 8)
    # a direct computation of the first step for row b: no clipping, decay then Adam's lr-sized step
    ref = SparseRowAdam(lr=1.0)
    first = ref.step(["b"], values[1:2], grads[1:2], [0.01], [0.1], [0.0])
    expected = values[1] * (1 - 0.01 * 0.1) - 0.01 * grads[1] / (grads[1].abs() + 1e-8)
    torch.testing.assert_close(first[0], expected)


def test_heldout_slice_is_the_end_of_the_first_epoch_and_never_drawn():
    """The held-out slice is the last k of a task's first-epoch order: every draw before it is the one the
    sampler makes without a slice (same task mix, same examples), and no epoch ever draws it."""
    from tuner.tasks.data import MultiTaskSampler

    sizes = {"a": 40, "b": 300}
    plain, held = MultiTaskSampler(sizes, 8, seed=3), MultiTaskSampler(sizes, 8, seed=3)
    out = held.hold_out("a", 10)
    assert len(set(out)) == 10 and out != sorted(out)  # shuffled: any prefix is a random sample
    assert out == MultiTaskSampler(sizes, 8, seed=3).hold_out("a", 10)
    assert out != MultiTaskSampler(sizes, 8, seed=4).hold_out("a", 10)
    steps = [(plain.next_batch(), held.next_batch()) for _ in range(60)]
    assert [[t for t, _ in p] for p, _ in steps] == [[t for t, _ in h] for _, h in steps]  # same task mix
    seq = lambda k, task: [i for pair in steps for t, i in pair[k] if t == task]  # noqa: E731
    assert seq(0, "b") == seq(1, "b")  # a task without a slice: untouched
    a_plain, a_held = seq(0, "a"), seq(1, "a")
    assert len(a_held) > 3 * 30
    assert a_held[:30] == a_plain[:30] and a_plain[30:40] == out  # the plain sampler reaches them last
    kept = set(range(40)) - set(out)
    for e in range(3):  # each epoch: every kept example once, none held out
        assert set(a_held[30 * e : 30 * (e + 1)]) == kept
    with pytest.raises(RuntimeError, match="before the first draw"):
        held.hold_out("b", 5)
    with pytest.raises(ValueError, match="cannot hold out 40 of 40"):
        MultiTaskSampler(sizes, 8).hold_out("a", 40)
    # a checkpoint's sampler state carries the slice: resuming without it (or with another) is refused
    state = held.state_dict()
    assert state["held_out"] == {"a": 10}
    with pytest.raises(ValueError, match="held-out slices changed"):
        MultiTaskSampler(sizes, 8, seed=3).load_state_dict(state)
    again = MultiTaskSampler(sizes, 8, seed=3)
    again.hold_out("a", 10)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(5)] == [held.next_batch() for _ in range(5)]


def test_heldout_view_and_count(tmp_path, tiny_backbone_dir):
    from transformers import AutoTokenizer

    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskSpec

    (spec_path,) = write_tiny_tasks(tmp_path, n_train=40, names=("pos_neg",))
    data = TaskData.load(TaskSpec.load(spec_path), AutoTokenizer.from_pretrained(tiny_backbone_dir))
    assert data.heldout_count(64, 0.25) == 10 and data.heldout_count(4, 0.25) == 4  # capped by the fraction
    with pytest.raises(ValueError, match="too few for a held-out slice"):
        data.heldout_count(64, 0.01)
    view = data.heldout_view([7, 3, 30])
    assert [e.uid for e in view.eval] == [7, 3, 30] and not view.train and len(data.train) == 40
    assert [t.target for t in view.eval_text] == [data.train_text[i].target for i in (7, 3, 30)]


# ------------------------------------------------------------------------------ the recipe


def test_a_one_variant_search_trains_exactly_the_plain_job(tmp_path, tiny_backbone_dir):
    """The held-out slice costs the plain job's draws nothing: a search whose one variant is the job's own
    configuration draws the same batches and ends with the same prompts as the job without `search:`
    (what makes hp_search's (b) - (a) the effect of the search's choices, not of another draw)."""
    from tuner.recipe import MultiTaskPromptTuningRecipe

    tasks = write_tiny_tasks(tmp_path, n_train=64)

    def run(**more):
        job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **{"optim.lr": 0.3, **more})
        r = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
        r.setup()
        draws = [r.sampler.next_batch() for _ in range(6)]
        for d in draws:
            r.train_step(d)
        return r, draws

    plain, plain_draws = run()
    search, search_draws = run(**{"search.space": {"optim.lr": [0.3]}, "search.heldout_examples": 8})
    assert search.bank.task_names == ["pos_neg~0", "colors~0"] and search_draws == plain_draws
    held = {t: {e.uid for e in search.heldout[t].eval} for t in ("pos_neg", "colors")}
    assert all(len(h) == 8 for h in held.values())
    assert not any(i in held[t] for d in search_draws for t, i in d)
    for t in ("pos_neg", "colors"):
        torch.testing.assert_close(search.bank.prompt(f"{t}~0"), plain.bank.prompt(t), rtol=1e-5, atol=1e-6)


def test_a_variant_steps_exactly_as_its_configuration_would_alone(tmp_path, tiny_backbone_dir):
    """Variant k of a task starts from the prompt a plain job with k's settings starts from and, in a
    batch with the other variants and tasks, gets the update that job makes on the same examples."""
    from tuner.recipe import MultiTaskPromptTuningRecipe

    tasks = write_tiny_tasks(tmp_path, n_train=16)
    over = {
        "optim.batch_size": 6,
        "optim.warmup_steps": 2,
        "optim.schedule": "linear",
        "optim.weight_decay": 0.1,
    }

    def recipe(**more):
        job = tiny_job_yaml(tmp_path, tiny_backbone_dir, tasks, **over, **more)
        r = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
        r.setup()
        return r

    search = recipe(**{"search.space": {"optim.lr": [0.01, 0.3], "optim.grad_clip": [0.0, 1.0]}})
    assert search.bank.task_names == [f"{t}~{k}" for t in ("pos_neg", "colors") for k in range(4)]
    draw = [("colors", 0), ("pos_neg", 1), ("colors", 2), ("pos_neg", 3), ("pos_neg", 4), ("colors", 5)]
    settings = [search.search.variant(f"pos_neg~{k}").settings for k in range(4)]
    assert sorted((v.optim.lr, v.optim.grad_clip) for v in settings) == [
        (0.01, 0),
        (0.01, 1),
        (0.3, 0),
        (0.3, 1),
    ]
    before = {r: search.bank.prompt(r).clone() for r in search.bank.task_names}
    metrics = search.train_step(draw)
    assert set(metrics.task_loss) == set(search.bank.task_names)
    for k, v in enumerate(settings):
        plain = recipe(**{"optim.lr": v.optim.lr, "optim.grad_clip": v.optim.grad_clip})
        # every variant starts from the task's own initial prompt: the one the plain job starts from
        torch.testing.assert_close(before[f"pos_neg~{k}"], plain.bank.prompt("pos_neg"), rtol=0, atol=0)
        plain.train_step(draw)
        got = search.bank.prompt(f"pos_neg~{k}")
        assert not torch.equal(got, before[f"pos_neg~{k}"])
        torch.testing.assert_close(got, plain.bank.prompt("pos_neg"), rtol=1e-4, atol=1e-6)


def tiny_search_job(root, backbone, steps: int, checkpoint_every: int, n_train: int = 48, **search):
    """A job YAML over the two tiny tasks (`n_train` train examples each, 8 held out unless `search`
    says otherwise) with `search.<key>` settings."""
    tasks = write_tiny_tasks(root, n_train=n_train)
    settings = {"optim.max_steps": steps, "checkpoint_every": checkpoint_every, "search.heldout_examples": 8}
    settings.update({f"search.{k}": v for k, v in search.items()})
    return tiny_job_yaml(root, backbone, tasks, **settings)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("search")
    job = tiny_search_job(
        root,
        tiny_backbone_dir,
        steps=8,
        checkpoint_every=4,
        space={"optim.lr": [0.01, 0.3, 1.0], "prompt.init": ["vocab", "random"]},
        rungs=[2, 6],
        eta=2,
    )
    summary = train_local(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    return root, job, summary


def test_search_run_exports_one_adapter_per_task_and_reports_every_variant(searched):
    root, _, summary = searched
    run_dir = root / "runs" / "tiny"
    adapters = sorted(p.name for p in (run_dir / "adapters").iterdir() if not p.name.startswith("."))
    assert adapters == ["colors", "pos_neg"]
    assert (run_dir / "search.png").is_file()
    report = (run_dir / "report.md").read_text()
    for task, t in summary["search"].items():
        outcomes = [v["outcome"] for v in t["variants"]]
        # 6 -> 3 at step 2, 3 -> 2 at step 6, 2 -> 1 at the end (step 8)
        assert outcomes.count("won") == 1
        assert sum(o.startswith("dropped at rung 0") for o in outcomes) == 3
        assert sum(o.startswith("dropped at rung 1") for o in outcomes) == 1
        assert sum(o.startswith("dropped at rung 2") for o in outcomes) == 1
        won = next(v for v in t["variants"] if v["outcome"] == "won")
        assert [s for s, _ in won["heldout"]] == [2, 6, 8] and t["chosen"] == won["values"]
        assert f"### {task}: chose" in report
    # the adapter is the winning variant's row
    from safetensors.torch import load_file

    state_dir = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    state = json.loads((state_dir / "state.json").read_text())
    bank = load_file(str(state_dir / "tensors.safetensors"))["bank"]
    for task, t in summary["search"].items():
        saved = load_file(str(run_dir / "adapters" / task / "adapter_model.safetensors"))["prompt_embeddings"]
        torch.testing.assert_close(saved.float(), bank[state["task_names"].index(t["chosen_row"])])


def three_rate_search(tmp_path, backbone, criterion: str, rates=(0.001, 0.3, 3.0), **search):
    """A 4-step search of 3 learning rates per task ranked by `criterion`: 3 -> 2 at step 2, 2 -> 1 on
    the whole held-out slice at the end. Returns (config, summary, run dir)."""
    job = tiny_search_job(
        tmp_path,
        backbone,
        steps=4,
        checkpoint_every=0,
        space={"optim.lr": list(rates)},
        rungs=[2],
        eta=2,
        criterion=criterion,
        **search,
    )
    cfg = load_job_config(job, ["cluster.num_workers=1"])
    return cfg, train_local(cfg, progress=False), tmp_path / "runs" / "tiny"


@pytest.mark.parametrize("criterion", ["metric", "loss"])
def test_a_run_keeps_the_jobs_own_configuration_unless_beaten_beyond_noise(
    tmp_path, tiny_backbone_dir, criterion
):
    """End to end, the recipe hands each rung its per-example evidence: with a margin no gap can clear,
    every task keeps the job's own learning rate (0.05), and wherever a rung would have dropped it the
    run records the check (the leader, the gap and its paired standard error) and the report says why."""
    _, summary, run_dir = three_rate_search(
        tmp_path, tiny_backbone_dir, criterion, rates=(0.001, 0.05, 3.0), base_margin=1e6
    )
    report = (run_dir / "report.md").read_text()
    checks = 0
    for task, t in summary["search"].items():
        assert t["chosen"] == {"optim.lr": 0.05}, task
        base = next(v for v in t["variants"] if v["base"])
        if base["outcome"] != "won":  # a leader was ahead of it where it would have been dropped
            checks += 1
            assert base["outcome"].startswith("won (the job's own configuration; the leader's lead")
            assert base["outcome"] in report
    assert checks, "no rung put another variant ahead of the base: the test exercised nothing"


def test_a_task_cut_to_one_variant_is_not_scored_again():
    """The final selection scores only tasks still undecided, and a task no rung scored (a one-variant
    search, e.g. one job of a naive search, compared on its held-out number)."""
    state = SearchState.build(job_with({"optim.lr": [0.1, 0.2, 0.3]}, optim={"max_steps": 9}), ["a", "b"])
    state.apply_rung(3, {"a~0": 0.9, "a~1": 0.1, "a~2": 0.2, "b~0": 0.1, "b~1": 0.2, "b~2": 0.3})
    assert state.live == {"a": [0], "b": [2]} and state.rows_to_score(final=True) == []
    assert state.apply_rung(9, {}, final=True) == [] and state.winner("b").row == "b~2"
    alone = SearchState.build(job_with({"optim.lr": [0.1]}), ["a"])
    assert alone.rows_to_score() == [] and alone.rows_to_score(final=True) == ["a~0"]


def test_search_ranked_by_the_gold_labels_nll_among_the_labels(tmp_path, tiny_backbone_dir):
    """criterion label_loss: a rung's number for a classification task is minus `mean_label_nll` on its
    held-out slice; the winner's last one is that of its exported prompt."""
    from safetensors.torch import load_file

    from tuner.evaluate import mean_label_nll
    from tuner.recipe import MultiTaskPromptTuningRecipe

    cfg, summary, run_dir = three_rate_search(tmp_path, tiny_backbone_dir, "label_loss")
    assert "ranked at each rung by minus the mean NLL of the gold label among the task's labels" in (
        (run_dir / "report.md").read_text()
    )
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=False)
    recipe.setup()  # the same tasks, tokeniser and held-out slices as the run
    try:
        for task, t in summary["search"].items():
            assert t["criterion"] == "-label_loss"
            prompt = load_file(str(run_dir / "adapters" / task / "adapter_model.safetensors"))[
                "prompt_embeddings"
            ]
            held = recipe.heldout[task]
            nll = mean_label_nll(
                recipe.lm,
                recipe.tokenizer,
                held.eval,
                held.spec.verbaliser,
                prompt.float(),
                cfg.model.max_seq_len,
            )
            won = next(v for v in t["variants"] if v["outcome"] == "won")
            assert won["heldout"][-1] == [4, pytest.approx(-nll, rel=1e-4)]
            rung0 = {v["index"]: dict(v["heldout"])[2] for v in t["variants"]}
            kept = [v["index"] for v in t["variants"] if not v["outcome"].startswith("dropped at rung 0")]
            assert kept == sorted(sorted(rung0, key=rung0.get)[1:])  # the best two by minus the label NLL
    finally:
        recipe.cleanup()


def test_resume_mid_search_reaches_the_same_variants_and_prompts(searched):
    """A run resumed from the step-4 checkpoint (after rung 0, before rung 1) ends where the uninterrupted one did."""
    root, job, summary = searched
    ref = root / "runs" / "tiny"
    state = json.loads((ref / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert [r["step"] for r in state["search"]["results"]] == [2, 2]  # rung 0 of both tasks is in it
    assert_resumes_to_the_same_search(job, ref, 4, summary)


def assert_resumes_to_the_same_search(job, ref, step: int, summary: dict) -> None:
    """Run `resumed`, started from a copy of run `ref`'s step-`step` checkpoint, ends with `summary`'s search
    results and bitwise the same adapters."""
    from safetensors.torch import load_file

    run_dir = ref.parent / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    info = json.loads((ref / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "name": "resumed", "status": "running"}))
    name = f"step_{step:08d}"
    shutil.copytree(ref / "checkpoints" / name, run_dir / "checkpoints" / name)
    resumed = train_local(load_job_config(job, ["cluster.num_workers=1", "name=resumed"]), progress=False)
    assert resumed["search"] == json.loads(json.dumps(summary["search"]))
    for task in summary["search"]:
        a = load_file(str(ref / "adapters" / task / "adapter_model.safetensors"))["prompt_embeddings"]
        b = load_file(str(run_dir / "adapters" / task / "adapter_model.safetensors"))["prompt_embeddings"]
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ rung criterion


def test_rung_criterion_auto_decodes_only_where_the_metric_is_one_forward():
    from types import SimpleNamespace

    from tuner.recipe import MultiTaskPromptTuningRecipe as Recipe

    tasks = {
        k: SimpleNamespace(spec=SimpleNamespace(kind=k)) for k in ("classification", "generation", "ner")
    }
    for setting, want in [
        ("auto", {"classification": "metric", "generation": "loss", "ner": "loss"}),
        ("metric", dict.fromkeys(tasks, "metric")),
        ("loss", dict.fromkeys(tasks, "loss")),
        ("label_loss", {"classification": "label_loss", "generation": "loss", "ner": "loss"}),
    ]:
        recipe = SimpleNamespace(
            cfg=job_with(SPACE, search={"space": SPACE, "criterion": setting}), tasks=tasks
        )
        assert {t: Recipe.rung_criterion(recipe, t) for t in tasks} == want
    with pytest.raises(
        ConfigError, match="search.criterion='f1': must be one of auto, metric, loss, label_loss"
    ):
        job_with(SPACE, search={"space": SPACE, "criterion": "f1"})


def test_search_ranked_by_heldout_loss(tmp_path, tiny_backbone_dir):
    """criterion loss: each rung ranks a task's variants by minus the mean target NLL on its held-out slice,
    and the winner's last held-out number is that of its exported prompt."""
    from safetensors.torch import load_file

    from tuner.evaluate import mean_target_loss
    from tuner.recipe import MultiTaskPromptTuningRecipe
    from tuner.tasks.data import TaskData

    cfg, summary, run_dir = three_rate_search(tmp_path, tiny_backbone_dir, "loss")
    assert "ranked at each rung by minus the mean target NLL" in (run_dir / "report.md").read_text()
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=False)
    recipe.setup()  # the same tasks, tokeniser and held-out slices as the run (a fresh run dir is not needed)
    try:
        for task, t in summary["search"].items():
            assert t["criterion"] == "-loss"
            rung0 = {v["index"]: dict(v["heldout"])[2] for v in t["variants"]}
            assert all(x < 0 for x in rung0.values())
            kept = [v["index"] for v in t["variants"] if not v["outcome"].startswith("dropped at rung 0")]
            assert kept == sorted(
                sorted(rung0, key=rung0.get)[1:]
            )  # 3 variants, eta 2: the best two by -loss
            prompt = load_file(str(run_dir / "adapters" / task / "adapter_model.safetensors"))[
                "prompt_embeddings"
            ]
            held: TaskData = recipe.heldout[task]
            loss = mean_target_loss(
                recipe.lm,
                held.eval,
                {"p": prompt.float()},
                max_len=cfg.model.max_seq_len,
                pad_id=recipe.tokenizer.pad_token_id,
            )["p"]
            won = next(v for v in t["variants"] if v["outcome"] == "won")
            assert won["heldout"][-1] == [4, pytest.approx(-loss, rel=1e-4)]
    finally:
        recipe.cleanup()


def test_early_rungs_score_the_first_examples_of_the_heldout_slice(tmp_path, tiny_backbone_dir):
    """heldout_schedule grow: the rung after step 2 (of rungs 2, 3) scores each variant on the first
    ceil(48 x 2 / 3) = 32 examples of the 48 held out, exactly; the last rung and the end on all 48."""
    from safetensors.torch import load_file

    from tuner.evaluate import mean_target_loss
    from tuner.recipe import MultiTaskPromptTuningRecipe

    job = tiny_search_job(
        tmp_path,
        tiny_backbone_dir,
        steps=4,
        checkpoint_every=2,  # steps 2 and 4 (the last two are kept)
        n_train=120,
        space={"optim.lr": [0.01, 0.3, 1.0, 3.0]},
        rungs=[2, 3],
        eta=2,
        criterion="loss",
        heldout_examples=48,
        heldout_fraction=0.5,
    )
    cfg = load_job_config(job, ["cluster.num_workers=1"])
    summary = train_local(cfg, progress=False)
    run_dir = tmp_path / "runs" / "tiny"
    # 4 -> 2 at step 2, 2 -> 1 at step 3: decided, so the end scores nothing more
    assert "examples scored: 32 @ step 2, 48 @ step 3\n" in (run_dir / "report.md").read_text()
    state_dir = run_dir / "checkpoints" / "step_00000002"  # the prompts rung 0 scored
    names = json.loads((state_dir / "state.json").read_text())["task_names"]
    bank = load_file(str(state_dir / "tensors.safetensors"))["bank"]
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=False)
    recipe.setup()  # the same tasks, tokeniser and held-out slices as the run
    try:
        for task, t in summary["search"].items():
            assert t["heldout_examples"] == {"2": 32, "3": 48}
            held = recipe.heldout[task].eval
            assert len(held) == 48
            prompts = {v["row"]: bank[names.index(v["row"])] for v in t["variants"]}
            first = mean_target_loss(
                recipe.lm,
                held[:32],
                prompts,
                max_len=cfg.model.max_seq_len,
                pad_id=recipe.tokenizer.pad_token_id,
            )
            whole = mean_target_loss(
                recipe.lm, held, prompts, max_len=cfg.model.max_seq_len, pad_id=recipe.tokenizer.pad_token_id
            )
            for v in t["variants"]:
                got = dict(v["heldout"])[2]
                assert got == pytest.approx(-first[v["row"]], rel=1e-4)
                assert abs(got + whole[v["row"]]) > 1e-3  # not the whole slice's number
    finally:
        recipe.cleanup()


# ------------------------------------------------------------------------------ prequential scoring


def test_prequential_window_is_the_latter_half_and_survives_a_checkpoint():
    """`record` keeps each draw's result under every live variant (in `expand`'s order); a rung after step
    s reads the draws after step s // 2; `forget_before` drops what no later rung reads; the JSON keeps it."""
    cfg = job_with(
        {"optim.lr": [0.1, 0.2, 0.3]},
        optim={"max_steps": 12},
        search={"space": {"optim.lr": [0.1, 0.2, 0.3]}, "scoring": "prequential", "eta": 2},
    )
    state = SearchState.build(cfg, ["a", "b"])
    assert state.prequential and state.wants_prequential()
    for step in range(1, 7):  # a drawn twice, b once per step; results: step + variant / 10 (b: minus)
        draws = [("a", step), ("b", step), ("a", step + 100)]
        values = [step + k / 10 for k in range(3)] + [-(step + k / 10) for k in range(3)] + [step] * 3
        state.record(step, draws, values, gold=[step % 2, -1, 0])
    gold, results = state.window("a", 6)  # steps 4, 5, 6
    assert gold.tolist() == [0, 0, 1, 0, 0, 0]
    np.testing.assert_allclose(results[2], [4.2, 4, 5.2, 5, 6.2, 6])
    np.testing.assert_allclose(state.window("b", 6)[1][0], [-4, -5, -6])
    fresh = SearchState.build(cfg, ["a", "b"])  # nothing drawn yet: an empty window, not an error
    assert len(fresh.window("a", 6)[0]) == 0 and {k: len(v) for k, v in fresh.window("a", 6)[1].items()} == {
        0: 0,
        1: 0,
        2: 0,
    }
    kept = json.dumps(state.to_json())
    with pytest.raises(ValueError, match=r"7 results and 3 gold labels for 3 draws \(9 "):
        state.record(7, [("a", 1), ("b", 1), ("a", 2)], [0.0] * 7, [0, 0, 0])
    assert json.dumps(state.to_json()) == kept  # refused whole: nothing half-recorded
    state.apply_rung(6, {"a~0": 0.1, "a~1": 0.3, "a~2": 0.2, "b~0": 0.3, "b~1": 0.2, "b~2": 0.1})
    state.forget_before(6)
    assert state.drawn["a"]["step"] == [4, 4, 5, 5, 6, 6] and set(state.drawn["a"]["values"]) == {1, 2}
    copy = SearchState.build(cfg, ["a", "b"])
    copy.load_json(json.loads(json.dumps(state.to_json())))
    assert copy.drawn == state.drawn and copy.live == state.live
    np.testing.assert_allclose(copy.window("a", 8)[1][1], [5.1, 5, 6.1, 6])  # after step 4 only
    state.apply_rung(9, {"a~1": 0.5, "a~2": 0.4, "b~0": 0.1, "b~1": 0.2})
    assert not state.wants_prequential()  # every task decided: forwards need not score their examples


def prequential_recipe(tmp_path, backbone, tasks, criterion="auto", steps=12, rungs=(8,), **over):
    from tuner.recipe import MultiTaskPromptTuningRecipe

    job = tiny_job_yaml(
        tmp_path,
        backbone,
        tasks,
        **{
            "optim.max_steps": steps,
            "optim.batch_size": 8,
            "search.space": {"optim.lr": [0.01, 0.3]},
            "search.scoring": "prequential",
            "search.criterion": criterion,
            "search.rungs": list(rungs),
            "search.heldout_examples": 8,
            **over,
        },
    )
    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    recipe.setup()
    return recipe


@pytest.mark.parametrize("criterion", ["metric", "label_loss", "loss"])
def test_prequential_results_are_each_examples_score_before_its_update(
    tmp_path, tiny_backbone_dir, criterion
):
    """What a training step records for a drawn example under a variant is what that variant's prompt
    scored on it before the step, computed directly: the arg-max over the labels' tokens at the answer
    position (metric), the gold label's log-probability among them (label_loss), minus the mean target
    NLL (loss; and for a generation task under any criterion)."""
    from tuner.evaluate import score_labels, target_losses

    tasks = [*write_tiny_tasks(tmp_path, n_train=24), write_generation_task(tmp_path)]
    recipe = prequential_recipe(tmp_path, tiny_backbone_dir, tasks, criterion)
    try:
        assert recipe._label_tokens("pos_neg") is not None  # one token per label: ranked from the logits
        before = {r: recipe.bank.prompt(r).clone() for r in recipe.bank.task_names}
        draw = [("pos_neg", 0), ("echo", 1), ("colors", 2), ("pos_neg", 3), ("echo", 4), ("pos_neg", 5)]
        recipe.train_step(draw)
        for task in ("pos_neg", "colors", "echo"):
            data, idx = recipe.tasks[task], [i for t, i in draw if t == task]
            examples = [data.train[i] for i in idx]
            gold, results = recipe.search.window(task, recipe.step)  # step 1: all of it
            assert len(gold) == len(idx)
            for k, got in results.items():
                prompt = before[f"{task}~{k}"]
                if task == "echo" or criterion == "loss":
                    nll = target_losses(
                        recipe.lm, examples, {"p": prompt}, max_len=64, pad_id=recipe.tokenizer.pad_token_id
                    )["p"]
                    np.testing.assert_allclose(got, -np.array(nll), rtol=1e-4)
                    assert gold.tolist() == [-1] * len(idx)
                    continue
                labels = data.spec.labels
                logp = score_labels(recipe.lm, recipe.tokenizer, examples, data.spec.verbaliser, prompt, 64)
                assert gold.tolist() == [labels.index(e.label) for e in examples]
                if criterion == "metric":
                    assert got.tolist() == [labels.index(max(s, key=s.get)) for s in logp]
                else:
                    want = [
                        s[e.label] - np.logaddexp.reduce(list(s.values())) for s, e in zip(logp, examples)
                    ]
                    np.testing.assert_allclose(got, want, rtol=1e-4)
    finally:
        recipe.cleanup()


def test_a_prequential_search_ranks_on_the_window_and_resumes_to_the_same_winners(
    tmp_path, tiny_backbone_dir
):
    """End to end: rungs rank on the drawn examples (their count is every draw of the task after step
    s // 2), a task with too few of them on its held-out slice; a run resumed from a checkpoint between
    the rungs ends on the same variants and prompts."""

    tasks = write_tiny_tasks(tmp_path, n_train=48, names=("pos_neg", "colors", "sizes"))
    job = tiny_job_yaml(
        tmp_path,
        tiny_backbone_dir,
        tasks,
        **{
            "optim.max_steps": 10,
            "optim.batch_size": 12,
            "checkpoint_every": 5,
            "search.space": {"optim.lr": [0.01, 0.1, 1.0], "prompt.init": ["vocab", "random"]},
            "search.scoring": "prequential",
            "search.rungs": [4, 8],
            "search.eta": 2,
            "search.heldout_examples": 8,
            "data.mixing": "uniform",
        },
    )
    cfg = load_job_config(job, ["cluster.num_workers=1"])
    summary = train_local(cfg, progress=False)
    run_dir = tmp_path / "runs" / "tiny"
    report = (run_dir / "report.md").read_text()
    assert "scored before its update (prequential)" in report
    sources = {s for t in summary["search"].values() for s in t["scored_on"].values()}
    assert sources == {"heldout", "prequential"}, summary["search"]  # and the fallback where too few
    for t in summary["search"].values():
        for step, n in t["heldout_examples"].items():
            if t["scored_on"][step] == "prequential":
                assert n >= 16  # 12 draws a step over 3 tasks: ~4 per step, 2 to 4 steps in the window
            else:
                assert n <= 8  # the held-out slice
        assert sum(v["outcome"] == "won" for v in t["variants"]) == 1
    state = json.loads((run_dir / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["search"]["drawn"], "the checkpoint must carry the drawn results of the next rung's window"

    assert_resumes_to_the_same_search(job, run_dir, 5, summary)


def test_search_scoring_is_validated():
    with pytest.raises(ConfigError, match="search.scoring='later'"):
        job_with(SPACE, search={"space": SPACE, "scoring": "later"})
