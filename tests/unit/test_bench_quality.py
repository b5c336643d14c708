"""bench/quality.py: arguments, task-set expansion and the summary arithmetic (no model); on the tiny
backbone, the leave-one-out transfer sources and the PEFT baseline taking our steps.

The arithmetic is checked against sums written out in the test on hand-made scores.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_job_yaml, write_tiny_tasks

from bench.quality import (
    OURS,
    expand_methods,
    expand_tasks,
    halves,
    leave_one_out_sources,
    parse_args,
    setup_of,
    shipped_tasks,
)
from bench.quality_results import (
    PEFT,
    ZERO_SHOT,
    SeedResult,
    earlier_seeds,
    paired,
    render,
    result_of,
    seed_gains,
    verdict,
)
from tuner.config import OptimConfig

AVAILABLE = ["ag_news", "cb", "rte", "sst2", "trec"]


def test_shipped_tasks_are_the_task_configs():
    names = shipped_tasks()
    assert {"cb", "rte", "sst2", "trec", "ag_news", "emotion", "samsum", "multi30k_en_de"} <= set(names)
    assert names == sorted(names)


def test_expand_tasks():
    assert expand_tasks("all", AVAILABLE) == AVAILABLE
    assert expand_tasks(" rte, cb ,", AVAILABLE) == ["rte", "cb"]  # order kept, blanks dropped
    with pytest.raises(ValueError, match="no task 'mnli'"):
        expand_tasks("cb,mnli", AVAILABLE)
    with pytest.raises(ValueError, match="twice"):
        expand_tasks("cb,cb", AVAILABLE)
    with pytest.raises(ValueError, match="at least one"):
        expand_tasks(" , ", AVAILABLE)


def test_expand_methods_and_halves():
    assert expand_methods("transfer,independent") == ["independent", "transfer"]  # OURS order
    assert expand_methods(",".join(OURS)) == list(OURS)
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        expand_methods("lora,residual")
    assert halves(["cb", "rte", "sst2", "trec", "emotion"]) == (["cb", "sst2", "emotion"], ["rte", "trec"])


def test_parse_args_defaults_and_errors(capsys):
    args, tasks, methods, seeds = parse_args([])
    assert tasks == ["sst2", "ag_news", "trec"] and methods == list(OURS) and seeds == [0, 1, 2, 3, 4, 5]
    assert (args.steps, args.batch_size) == (80, 16)
    _, tasks, methods, seeds = parse_args(
        ["--tasks", "all", "--methods", "residual", "--seeds", "3,1", "--quick"]
    )
    assert tasks == shipped_tasks() and methods == ["residual"] and seeds == [3]
    for argv, message in [
        (["--tasks", "cb,nope"], "no task 'nope'"),
        (["--methods", "prefix"], "unknown method 'prefix'"),
        (["--seeds", "a"], "comma-separated integers"),
        (["--tasks", "cb"], "at least two tasks"),
        (["--steps", "0"], "--steps must be positive"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
    ]:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_our_learning_rate_and_the_start_reach_every_run_and_are_part_of_the_setup():
    """`--lr` sets optim.lr of our methods' runs (PEFT's rates stay its grid's) and `--init` every run's
    prompt.init (PEFT starts from a run's prompts); seeds run at another rate or from another start are a
    different setup, so `--add` and `--pool` refuse to mix them."""
    import bench.quality as quality

    default = parse_args([])[0]
    assert (default.lr, default.init) == (OptimConfig().lr, "class_labels")
    args = parse_args(["--lr", "0.1", "--peft-lr-grid", "0.1", "--init", "random"])[0]
    benches = [quality.SeedBench(a, 0, ["cb", "rte"], steps=3, n_eval=8) for a in (default, args)]
    cfgs = [b.config(["cb", "rte"], "lr-test") for b in benches]
    for d in [d for b in benches for d in b.dirs]:
        shutil.rmtree(d, ignore_errors=True)
    assert [(c.optim.lr, c.prompt.init) for c in cfgs] == [
        (OptimConfig().lr, "class_labels"),
        (0.1, "random"),
    ]
    setups = [setup_of(a, ["cb", "rte"], ["ulpt"], 80, 200) for a in (default, args)]
    assert [(s["lr"], s["init"]) for s in setups] == [(OptimConfig().lr, "class_labels"), (0.1, "random")]
    assert "lr_grid" not in setups[0]  # results recorded before --lr-grid keep their setup


def test_our_learning_rate_grid_is_parsed_checked_and_part_of_the_setup(capsys):
    args, _, methods, _ = parse_args(["--methods", "ulpt,independent", "--lr-grid", "0.03, 0.1,0.3"])
    assert args.lr_grid == [0.03, 0.1, 0.3]
    assert setup_of(args, ["cb"], methods, 80, 200)["lr_grid"] == [0.03, 0.1, 0.3]
    for argv, message in [
        (["--methods", "ulpt", "--lr-grid", "0.1,0"], "--lr-grid needs distinct positive"),
        (["--methods", "ulpt", "--lr-grid", "0.1,x"], "--lr-grid takes comma-separated numbers"),
        (["--methods", "independent,transfer", "--lr-grid", "0.1"], "--lr-grid tunes residual"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def _runs() -> list[SeedResult]:
    # two seeds, three tasks, PEFT and two of our methods; scores in points
    s0 = {
        ZERO_SHOT: {"cb": 40.0, "rte": 50.0, "sst2": 70.0},
        PEFT: {"cb": 60.0, "rte": 55.0, "sst2": 80.0},
        "independent": {"cb": 62.0, "rte": 54.0, "sst2": 80.0},
        "residual": {"cb": 70.0, "rte": 62.0, "sst2": 81.0},
    }
    s1 = {
        ZERO_SHOT: {"cb": 42.0, "rte": 51.0, "sst2": 71.0},
        PEFT: {"cb": 58.0, "rte": 57.0, "sst2": 82.0},
        "independent": {"cb": 57.0, "rte": 58.0, "sst2": 83.0},
        "residual": {"cb": 66.0, "rte": 64.0, "sst2": 81.0},
    }
    return [SeedResult(0, s0), SeedResult(1, s1)]


def test_paired_differences_and_wins():
    p = paired(_runs(), "independent", "cb")
    assert p.diffs == [2.0, -1.0]
    assert p.mean == pytest.approx(0.5)
    assert p.sd == pytest.approx(math.sqrt(((2 - 0.5) ** 2 + (-1 - 0.5) ** 2) / 1))  # sample sd
    assert p.wins == 1
    assert paired(_runs(), "independent", "sst2").wins == 2  # a tie counts as >= PEFT


def test_verdict_picks_the_best_method_and_checks_the_targets():
    runs, tasks = _runs(), ["cb", "rte", "sst2"]
    v = verdict(runs, ["independent", "residual"], tasks)
    # residual - PEFT: cb (10 + 8) / 2 = 9, rte (7 + 7) / 2 = 7, sst2 (1 - 1) / 2 = 0
    assert v.best == "residual"
    assert v.mean_gain["residual"] == pytest.approx((9 + 7 + 0) / 3)
    # independent - PEFT: cb 0.5, rte 0, sst2 0.5
    assert v.mean_gain["independent"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert v.tasks_below_peft == []
    assert v.low_resource_gain == {"cb": pytest.approx(9.0), "rte": pytest.approx(7.0)}
    assert v.targets_met  # >= PEFT everywhere, +5.3 mean, cb and rte >= +5

    # one task below PEFT fails the targets though the mean gain is large
    runs[1].scores["residual"]["sst2"] = 70.0
    v = verdict(runs, ["independent", "residual"], tasks)
    assert v.best == "residual" and v.tasks_below_peft == ["sst2"] and not v.targets_met


def test_standard_error_of_the_mean_gain_is_over_seeds():
    runs, tasks = _runs(), ["cb", "rte", "sst2"]
    # residual - PEFT, mean over the three tasks: seed 0 (10 + 7 + 1) / 3 = 6, seed 1 (8 + 7 - 1) / 3 = 14 / 3
    g = seed_gains(runs, "residual", tasks)
    assert g == [pytest.approx(6.0), pytest.approx(14 / 3)]
    sd = abs(6.0 - 14 / 3) / math.sqrt(2)  # sample sd of two values
    v = verdict(runs, ["independent", "residual"], tasks)
    assert v.mean_gain_se["residual"] == pytest.approx(sd / math.sqrt(2))
    assert v.seeds_to_resolve["residual"] == 2  # sd < 1.4: two seeds already put +2 two SE from 0
    # a wide spread: seed gains +7 and -2 (sd 6.36) -> 2 * 6.36 / sqrt(k) <= 2 needs k >= 40.5
    runs[0].scores["residual"] = {t: runs[0].scores[PEFT][t] + 7 for t in tasks}
    runs[1].scores["residual"] = {t: runs[1].scores[PEFT][t] - 2 for t in tasks}
    v = verdict(runs, ["independent", "residual"], tasks)
    assert v.seeds_to_resolve["residual"] == 41
    line = render(runs, ["residual"], tasks, {t: "accuracy" for t in tasks})["verdict"]
    assert "mean gain over PEFT +2.5 points (SE 4.5 over 2 seeds; about 41 seeds would put +2" in line
    # one seed has no spread to estimate
    one = verdict(runs[:1], ["residual"], tasks)
    assert one.mean_gain_se["residual"] == 0.0 and one.seeds_to_resolve["residual"] is None
    assert (
        "(one seed: no standard error; target >= +2)"
        in render(runs[:1], ["residual"], tasks, {t: "accuracy" for t in tasks})["verdict"]
    )


def test_render_tables_and_verdict_line():
    out = render(
        _runs(),
        ["independent", "residual"],
        ["cb", "rte", "sst2"],
        {"cb": "macro_f1", "rte": "accuracy", "sst2": "accuracy"},
    )
    assert "| 0 | cb | macro_f1 | 40.0 | 60.0 | 62.0 | 70.0 | +2.0 | +10.0 |" in out["per_seed"]
    assert "| cb | macro_f1 | 41.0 +- 1.4 | 59.0 +- 1.4 | 59.5 +- 3.5 | 68.0 +- 2.8 |" in out["means"]
    assert "| rte | +0.0 +- 1.4, SE 1.0 (1/2) | +7.0 +- 0.0, SE 0.0 (2/2) |" in out["paired"]
    assert "| mean over tasks | +0.3 | +5.3 |" in out["paired"]
    assert (
        "| mean over tasks, per seed | +0.3 +0.3 (sd 0.0, SE 0.0) | +6.0 +4.7 (sd 0.9, SE 0.7) |"
        in out["paired"]
    )
    assert out["verdict"].startswith("best method: residual; mean gain over PEFT +5.3 points")
    assert (
        "low-resource gains (target >= +5): cb +9.0, rte +7.0; targets met: yes (2 seed(s))" in out["verdict"]
    )
    assert out["verdict_issue39"] == (
        "issue 39, best method residual against tuned PEFT: mean +5.3 (SE 0.7; target >= +2); "
        "CB +9.0 (SE 1.0; target >= +5); RTE +7.0 (SE 0.0; target >= +0); met: yes"
    )
    assert "peft_grid" not in out  # runs recorded before the tuned baseline


def test_issue39_verdict_says_by_how_much_a_target_is_missed():
    """independent: mean (0.5 + 0 + 0.5) / 3 = +0.3 (seeds +0.3, +0.3), CB +2 and -1 -> +0.5 (sd 2.1, SE
    1.5), RTE -1 and +1 -> +0.0 (SE 1.0), which meets >= PEFT."""
    line = render(
        _runs(), ["independent"], ["cb", "rte", "sst2"], {t: "accuracy" for t in ("cb", "rte", "sst2")}
    )
    assert line["verdict_issue39"] == (
        "issue 39, best method independent against tuned PEFT: mean +0.3 (SE 0.0; target >= +2, short by 1.7); "
        "CB +0.5 (SE 1.5; target >= +5, short by 4.5); RTE +0.0 (SE 1.0; target >= +0); met: no"
    )


def test_peft_grid_table_shows_every_rate_and_the_choice():
    runs = _runs()
    runs[0].peft_lr = {"cb": 0.1, "rte": 0.03, "sst2": 0.03}
    runs[0].peft_heldout_score = {
        "0.03": {"cb": 50.0, "rte": 60.0, "sst2": None},
        "0.1": {"cb": 70.0, "rte": 55.0, "sst2": None},
    }
    runs[0].peft_heldout_loss = {
        "0.03": {"cb": 0.9, "rte": 0.7, "sst2": 0.41},
        "0.1": {"cb": 0.8, "rte": 0.9, "sst2": 0.52},
    }
    runs[0].heldout_examples = {"cb": 50, "rte": 64, "sst2": 64}
    table = render(
        runs[:1], ["independent"], ["cb", "rte", "sst2"], {t: "accuracy" for t in ("cb", "rte", "sst2")}
    )["peft_grid"]
    assert "| seed | task | held out | lr 0.03 | lr 0.1 | chosen lr |" in table
    assert "| 0 | cb | 50 | 50.0 | 70.0 | 0.1 |" in table
    assert "| 0 | sst2 | 64 | loss 0.410 | loss 0.520 | 0.03 |" in table


def test_peft_learning_rate_choice_and_grid_parsing():
    from bench.quality_peft import choose, parse_grid

    grid = [0.01, 0.03, 0.1]
    loss = {"0.01": 0.9, "0.03": 0.5, "0.1": 0.7}
    assert choose(grid, {"0.01": 60.0, "0.03": 70.0, "0.1": 70.0}, loss) == 0.03  # tie on score: lower loss
    assert choose(grid, {"0.01": 80.0, "0.03": 70.0, "0.1": 70.0}, loss) == 0.01  # score first
    assert choose(grid, {"0.01": None, "0.03": None, "0.1": None}, loss) == 0.03  # by loss alone
    assert choose(grid, {k: 1.0 for k in loss}, {k: 0.5 for k in loss}) == 0.01  # full tie: grid order
    assert parse_grid("0.01, 0.3") == [0.01, 0.3]
    for bad in ("", "0.1,0.1", "-1", "x"):
        with pytest.raises(ValueError, match="--peft-lr-grid"):
            parse_grid(bad)
    args = parse_args(["--methods", "ulpt,superpos", "--peft-lr-grid", "0.03,0.3"])[0]
    assert args.peft_lr_grid == [0.03, 0.3]


def _setup(**change) -> dict:
    setup = {
        "tasks": ["cb", "rte", "sst2"],
        "methods": [ZERO_SHOT, PEFT, "independent", "residual"],
        "steps": 80,
    }
    return {**setup, **change}


def test_add_keeps_earlier_seeds_of_the_same_setup_and_refuses_others(tmp_path):
    metrics = {"cb": "macro_f1", "rte": "accuracy", "sst2": "accuracy"}
    path = tmp_path / "quality_methods.json"
    path.write_text(json.dumps(result_of(_setup(), _runs(), metrics, quick=False)))

    kept, got_metrics = earlier_seeds(path, _setup(), rerun=[1, 2])
    assert [r.seed for r in kept] == [0] and got_metrics == metrics  # seed 1 is run again now
    assert kept[0] == _runs()[0]  # scores survive the JSON round trip exactly

    # pooled: the earlier seed 0 and a new seed 1 give the same tables as one run of both
    new = _runs()[1]
    assert (
        result_of(_setup(), [new, *kept], metrics, False)["tables"]
        == result_of(_setup(), _runs(), metrics, False)["tables"]
    )

    with pytest.raises(ValueError, match=r"run with steps=80, this run has 40; seeds of different setups"):
        earlier_seeds(path, _setup(steps=40), rerun=[])
    with pytest.raises(ValueError, match="no earlier result"):
        earlier_seeds(tmp_path / "absent.json", _setup(), rerun=[])
    (tmp_path / "half.json").write_text('{"setup": {"tasks": ')  # a half-written file
    with pytest.raises(ValueError, match="not a result of this benchmark"):
        earlier_seeds(tmp_path / "half.json", _setup(), rerun=[])


def test_the_transfer_protocol_is_part_of_the_setup(tmp_path):
    """Seeds of the two transfer protocols never pool; a file written before `--transfer` existed
    (it names its halves) counts as `halves`."""
    tasks, methods = ["cb", "rte", "sst2"], ["independent", "residual"]

    def setup(*argv: str) -> dict:
        return setup_of(parse_args(["--tasks", ",".join(tasks), *argv])[0], tasks, methods, 80, 200)

    loo, halved = setup(), setup("--transfer", "halves")
    assert loo["transfer_protocol"] == "leave-one-out" and "transfer_halves" not in loo
    assert halved["transfer_protocol"] == "halves" and halved["transfer_halves"] == [["cb", "sst2"], ["rte"]]
    before = {k: v for k, v in halved.items() if k != "transfer_protocol"}  # a file from before --transfer
    metrics = {"cb": "macro_f1", "rte": "accuracy", "sst2": "accuracy"}
    path = tmp_path / "quality_methods.json"
    path.write_text(json.dumps(result_of(before, _runs(), metrics, quick=False)))
    assert [r.seed for r in earlier_seeds(path, halved, rerun=[])[0]] == [0, 1]
    with pytest.raises(ValueError, match="run with transfer_protocol='halves', this run has 'leave-one-out'"):
        earlier_seeds(path, loo, rerun=[])


def test_pool_joins_seeds_run_apart_and_refuses_what_would_mislead(tmp_path, monkeypatch, capsys):
    """`--pool`: seeds of one setup run by two processes give the tables of one run of them all;
    files of another setup, a seed in two files, a broken file or a result it would overwrite are
    refused with one line, and nothing is written."""
    import bench.quality as quality

    metrics = {"cb": "macro_f1", "rte": "accuracy", "sst2": "accuracy"}
    seed0, seed1 = _runs()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(
        json.dumps({"machine": {"torch_threads": 1}, **result_of(_setup(), [seed0], metrics, False)})
    )
    b.write_text(
        json.dumps({"machine": {"torch_threads": 2}, **result_of(_setup(), [seed1], metrics, False)})
    )
    results = tmp_path / "results"
    monkeypatch.setattr(quality, "RESULTS", results)
    monkeypatch.setattr("bench.common.RESULTS", results)

    out = quality.main(["--pool", str(b), str(a), "--out", "joined"])
    assert out["tables"] == result_of(_setup(), _runs(), metrics, False)["tables"]
    assert out["setup"]["seeds"] == [0, 1]
    assert out["pooled_from"] == [
        {"file": "b.json", "seeds": [1], "machine": {"torch_threads": 2}},
        {"file": "a.json", "seeds": [0], "machine": {"torch_threads": 1}},
    ]
    assert json.loads((results / "joined.json").read_text())["verdict"] == out["verdict"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps(result_of(_setup(steps=40), [seed1], metrics, False)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"setup": {"tasks": ')
    for argv, message in [
        (
            [str(a), str(other)],
            f"--pool: {other} was run with steps=40, {a} has 80; seeds of different setups",
        ),
        ([str(a), str(a)], f"--pool: seed(s) [0] of {a} are in an earlier file too"),
        ([str(a), str(broken)], f"--pool: {broken} is not a result of this benchmark"),
        ([str(a), str(tmp_path / "gone.json")], "--pool: no earlier result"),
        ([str(a), str(b)], f"--pool: {results / 'joined.json'} exists and is not one of the pooled files"),
    ]:
        before = (results / "joined.json").read_text()
        with pytest.raises(SystemExit) as e:
            quality.main(["--pool", *argv, "--out", "joined"])
        assert str(e.value).startswith("bench.quality: " + message), e.value
        assert (results / "joined.json").read_text() == before  # nothing written
    # pooling into one of its own inputs is allowed (the inputs are read first)
    again = quality.main(["--pool", str(results / "joined.json"), "--out", "joined"])
    assert again["setup"]["seeds"] == [0, 1]

    with pytest.raises(SystemExit):
        parse_args(["--pool", str(a)])
    assert "--pool needs --out NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--pool", str(a), "--out", "x", "--add"])
    assert "--pool runs nothing" in capsys.readouterr().err


def test_add_or_resume_with_quick_is_refused(capsys):
    for flag in ("--add", "--resume"):
        with pytest.raises(SystemExit):
            parse_args([flag, "--quick"])
        assert "--add and --resume keep recorded work" in capsys.readouterr().err


def test_leave_one_out_sources_pick_the_best_other_task_never_the_task_itself(tmp_path, tiny_backbone_dir):
    """Each task's source is the lowest-loss prompt (direct computation: `mean_target_loss` on its first
    `prompt.transfer_examples` examples) among the *other* tasks' prompts, even when its own fits best."""
    from tuner.config import load_job_config
    from tuner.evaluate import mean_target_loss
    from tuner.recipe import MultiTaskPromptTuningRecipe

    names = ("pos_neg", "colors", "sizes")
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=16, names=names))
    cfg = load_job_config(job, ["cluster.num_workers=1", "prompt.transfer_examples=4"])
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=False)
    recipe.setup()
    gen = torch.Generator().manual_seed(0)
    candidates = [torch.randn(4, 32, generator=gen) for _ in names]

    def losses(task: str, prompts: dict[str, torch.Tensor]) -> dict[str, float]:
        exs = recipe.tasks[task].train[:4]
        return mean_target_loss(recipe.lm, exs, prompts, max_len=64, pad_id=recipe.tokenizer.pad_token_id)

    # name the prompt that fits "sizes" best "sizes", so leaving the task's own prompt out matters
    fit = losses("sizes", {str(j): p for j, p in enumerate(candidates)})
    best = min(fit, key=fit.get)
    order = [best] + [j for j in map(str, range(3)) if j != best]
    prompts = {"sizes": candidates[int(order[0])], "colors": candidates[int(order[1])]}
    prompts["pos_neg"] = candidates[int(order[2])]
    chosen = leave_one_out_sources(recipe, prompts)
    assert set(chosen) == set(names)
    for task, (src, loss) in chosen.items():
        others = losses(task, {n: p for n, p in prompts.items() if n != task})
        assert src != task and src == min(others, key=others.get), (task, others)
        assert loss == pytest.approx(others[src])
    own = losses("sizes", prompts)
    assert min(own, key=own.get) == "sizes" and chosen["sizes"][0] != "sizes"
    with pytest.raises(ValueError, match="no other task's prompt for"):
        leave_one_out_sources(recipe, {"sizes": candidates[0]})


def test_the_peft_baseline_and_ours_take_the_same_steps(tmp_path, tiny_backbone_dir):
    """The baseline and `independent` solve one objective: from the same prompts on the same mixed draws,
    PEFT prompt tuning (AdamW, a padded batch per task) and our recipe's packed step (SparseRowAdam) give
    the same prompts, to float order, after each of the first steps. At the benchmark's budget they still
    end apart: tiny float differences grow step by step (BENCHMARKS.md, issue 14 run 4), not an update rule."""
    from bench.common import PeftPromptTuning, draw_batches, examples_by_task
    from tuner.config import load_job_config
    from tuner.prompts.optim import lr_at
    from tuner.recipe import MultiTaskPromptTuningRecipe

    names = ("pos_neg", "colors", "sizes")
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=32, names=names))
    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    recipe.setup()
    o, L, pad = recipe.cfg.optim, recipe.cfg.model.max_seq_len, recipe.tokenizer.pad_token_id
    initial = {t: recipe.prompt(t).detach().clone() for t in names}
    peft = PeftPromptTuning(
        recipe.lm.backbone,
        list(names),
        initial,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        grad_clip=o.grad_clip,
    )
    draws = draw_batches(recipe, 3)
    for k, draw in enumerate(draws):
        lr = lr_at(k, o.lr, o.warmup_steps, o.max_steps, o.schedule)
        peft.step(examples_by_task(recipe, draw), lr, L, pad)
        recipe.train_step(draw)
        for t in names:
            ours, theirs = recipe.prompt(t).detach(), peft.prompt(t)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"step {k + 1}, task {t}")
    for t in {t for d in draws for t, _ in d}:  # the steps moved every drawn prompt far beyond the tolerance
        assert float((recipe.prompt(t).detach() - initial[t]).norm()) > 1e-2, t


def test_tuned_peft_holds_its_slice_out_of_every_draw_and_keeps_each_tasks_best_rate(
    tmp_path, tiny_backbone_dir
):
    """The held-out slices leave the draws; every rate of the grid trains PEFT on those draws; each task
    keeps the rate `choose` picks from the held-out results, whose prompt is that rate's own run
    (direct computation: a `PeftPromptTuning` at that rate on the same draws) and whose held-out loss is
    `mean_target_loss` of that prompt on the slice."""
    from bench.common import PeftPromptTuning, draw_batches, examples_by_task, setup_recipe
    from bench.quality_peft import choose, hold_out_slices, tune_peft
    from tuner.config import load_job_config
    from tuner.evaluate import mean_target_loss
    from tuner.prompts.optim import lr_at

    names = ("pos_neg", "colors")
    job = tiny_job_yaml(tmp_path, tiny_backbone_dir, write_tiny_tasks(tmp_path, n_train=40, names=names))
    ref = setup_recipe(load_job_config(job, ["cluster.num_workers=1"]))
    heldout = hold_out_slices(ref, 6)
    assert {t: len(h.eval) for t, h in heldout.items()} == {"pos_neg": 6, "colors": 6}
    draws = draw_batches(ref, 4)
    held_ids = {t: {tuple(e.input_ids) for e in h.eval} for t, h in heldout.items()}
    assert all(tuple(ref.tasks[t].train[i].input_ids) not in held_ids[t] for d in draws for t, i in d)
    initial = {t: ref.prompt(t).detach().clone() for t in names}
    grid = [0.01, 0.3]
    tuned = tune_peft(ref, draws, initial, heldout, grid, seed=0)
    o, L, pad = ref.cfg.optim, ref.cfg.model.max_seq_len, ref.tokenizer.pad_token_id
    for t in names:
        score = {k: tuned.heldout_score[k][t] for k in tuned.heldout_score}
        loss = {k: tuned.heldout_loss[k][t] for k in tuned.heldout_loss}
        assert set(loss) == {"0.01", "0.3"} and tuned.lr[t] == choose(grid, score, loss)
    t = names[0]
    lr = tuned.lr[t]
    again = PeftPromptTuning(
        ref.lm.backbone, list(names), initial, lr=lr, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip
    )
    for k, draw in enumerate(draws):
        again.step(examples_by_task(ref, draw), lr_at(k, lr, o.warmup_steps, o.max_steps, o.schedule), L, pad)
    torch.testing.assert_close(tuned.prompts[t], again.prompt(t), rtol=1e-5, atol=1e-6)
    direct = mean_target_loss(ref.lm, heldout[t].eval, {t: again.prompt(t)}, max_len=L, pad_id=pad)[t]
    assert tuned.heldout_loss[str(lr)][t] == pytest.approx(direct, rel=1e-4)


def test_one_seed_of_the_new_methods_against_tuned_peft_runs_end_to_end(
    tmp_path, tiny_backbone_dir, monkeypatch
):
    """`SeedBench.run` on the tiny backbone and tasks (the benchmark's own code path, smaller): zero-shot,
    PEFT tuned over a two-rate grid on held-out slices, ulpt and superpos; every score recorded per task,
    the grid's held-out results and choice in the seed result, and the tables render them."""
    import bench.quality as quality
    from bench.common import bench_config

    write_tiny_tasks(tmp_path, n_train=40, names=("pos_neg", "colors"))

    def tiny_config(name, **kw):
        cfg = bench_config(name, **{**kw, "max_seq_len": 64})
        cfg.model.name = str(tiny_backbone_dir)
        cfg.prompt.num_virtual_tokens, cfg.prompt.rank, cfg.prompt.superpos_tokens = 4, 2, 8
        return cfg

    monkeypatch.setattr(quality, "bench_config", tiny_config)
    monkeypatch.setattr(quality, "TASK_DIR", tmp_path)
    argv = ["--tasks", "pos_neg,colors", "--methods", "ulpt,superpos", "--peft-lr-grid", "0.01,0.3"]
    args = parse_args([*argv, "--heldout-examples", "4", "--lr-grid", "0.01,0.3"])[0]
    bench = quality.SeedBench(args, 0, ["pos_neg", "colors"], steps=3, n_eval=8)
    result, metrics = bench.run(["ulpt", "superpos"])
    from bench.quality_peft import choose

    for m in ("ulpt", "superpos"):  # tuned as PEFT is: every rate run, each task's choice by `choose`
        assert set(result.ours_heldout_loss[m]) == {"0.01", "0.3"}
        for t in ("pos_neg", "colors"):
            score = {k: v[t] for k, v in result.ours_heldout_score[m].items()}
            loss = {k: v[t] for k, v in result.ours_heldout_loss[m].items()}
            assert result.ours_lr[m][t] == choose([0.01, 0.3], score, loss)
    assert set(result.scores) == {ZERO_SHOT, PEFT, "ulpt", "superpos"}
    assert all(set(s) == {"pos_neg", "colors"} for s in result.scores.values())
    assert set(result.peft_heldout_loss) == {"0.01", "0.3"} and set(result.peft_lr.values()) <= {0.01, 0.3}
    assert result.heldout_examples == {"pos_neg": 4, "colors": 4}
    assert {"ulpt", "superpos", ZERO_SHOT} <= set(bench.timings)
    setup = setup_of(args, ["pos_neg", "colors"], ["ulpt", "superpos"], 3, 8)
    assert setup["peft_lr_grid"] == [0.01, 0.3] and setup["rank"]["ulpt"] == 32
    tables = result_of(setup, [result], metrics, quick=True)["tables"]
    assert (
        set(tables["ours_grid"]) == {"ulpt", "superpos"}
        and "| lr 0.01 | lr 0.3 |" in tables["ours_grid"]["ulpt"]
    )
    assert "chosen lr" in tables["peft_grid"] and tables["verdict_issue39"].startswith(
        "issue 39, best method"
    )
