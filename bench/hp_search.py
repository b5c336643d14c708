"""Benchmark: per-task hyperparameters by in-batch search vs one hand-set configuration vs one job per variant.

On the job's tasks (default: every task of configs/multitask_all.yaml, the eight shared tasks and
CoNLL-2003 NER), the same steps and the same global batch for every run, one process each (`tuner.recipe.run`, as `promptfleet train --no-ray`):

* (a) hand-set: today's default, one configuration for every task (the job's optim.lr / prompt.init);
* (b) in-batch: `search.space` variants per task (default 3 learning rates x 2 initialisations = 6)
  trained side by side with successive halving on a held-out slice of each task's train split;
* (c) naive: one job per variant (`search.space` with that one value per setting: the same held-out
  slice is taken out and scored at the end), then each task takes the variant whose job scored best
  on its held-out slice: the same search, every variant trained for all the steps;
* (a') hand-set on (b)'s draws: (a)'s configuration as a one-variant search, so it holds out the same
  slice and trains on exactly the examples (b)'s variants train on (a variant steps as its
  configuration alone would, `tests/unit/test_search.py`). (b) - (a') is the effect of (b)'s choices
  alone: 0 where (b) chose the hand-set configuration. The held-out slice is the end of each task's
  first-epoch order, which training skips, so (a') draws what (a) draws as long as no task runs past
  its first epoch: (a) - (a') is then 0 up to float rounding (the one-variant search test), and a
  non-zero value says a task did (a small pool), i.e. (b) - (a) holds the noise of another draw. It is
  one of the (c) jobs when the hand-set configuration is in the space, an extra run otherwise.

Several seeds (`data.seed=N` as an override; seed N > 0 writes hp_search_ab_seedN.json) are paired per task
by `--pool FILE ...` (no runs): (b) - (a) per seed, mean, sd and seeds with (b) >= (a), in hp_search_pooled.json.

Scores are each task's eval metric (accuracy / macro-F1 / chrF as its task file says, in points) on
the same seeded eval subset; rungs rank variants by `search.criterion` (pass `search.criterion=...`
as an override to change it for (b) and (c) alike). `--skip-naive` runs (a), (b), (a'), (a) only. Cost: wall time of training + final evaluation of each run (setup, i.e. loading
the backbone and tokenising, is reported apart: it does not depend on the method); (a) runs first
and again last, and its cost is the mean of the two (their spread is the machine's load drift). The table shows
per task (a), (a'), (b), (c), (b) - (a), (b) - (a'), the configuration (b) and (c) chose; then the means and
the costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, markdown_table, points, write_result
from bench.stats import PairedDifference
from tuner.config import JobConfig, load_job_config
from tuner.recipe import MultiTaskPromptTuningRecipe
from tuner.search.space import expand_space

DEFAULT_SPACE = ["optim.lr=0.003,0.01,0.03", "prompt.init=class_labels,vocab"]


def timed_run(cfg: JobConfig) -> dict:
    """Run `cfg` in this process; returns its summary (as summary.json holds it) with setup and
    train(+final eval) wall times."""
    t0 = time.perf_counter()
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=False)
    try:
        recipe.setup()
        t1, c1 = time.perf_counter(), time.process_time()
        recipe.train()
        summary = recipe.finish().to_json()
    finally:
        recipe.cleanup()
    t2, c2 = time.perf_counter(), time.process_time()
    # CPU seconds of this process beside wall time: far less sensitive to other processes on a shared machine
    summary["setup_s"], summary["train_s"], summary["train_cpu_s"] = t1 - t0, t2 - t1, c2 - c1
    shutil.rmtree(Path(cfg.output_dir) / cfg.name, ignore_errors=True)
    return summary


def parse_space(items: list[str]) -> dict[str, list]:
    import yaml

    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        out[key] = [yaml.safe_load(v) for v in raw.split(",")]
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(REPO / "configs" / "multitask_all.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--max-train", type=int, default=4000, help="train examples per task (before the held-out slice)"
    )
    ap.add_argument("--eval-examples", type=int, default=200, help="seeded eval subset per task")
    ap.add_argument(
        "--heldout", type=int, default=64, help="held-out train examples per task for (b) and (c)"
    )
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--space", nargs="*", default=DEFAULT_SPACE, help="KEY=V1,V2 ... (per-task settings)")
    ap.add_argument(
        "--tasks", default="", help="comma-separated task names to keep (default: all of the job's)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, nothing recorded")
    ap.add_argument(
        "--skip-naive",
        action="store_true",
        help="run (a), (b), (a') and (a) again only: (b)'s cost and scores against (a) without the six (c) jobs "
        "(written to hp_search_ab.json)",
    )
    ap.add_argument(
        "--ab-only",
        action="store_true",
        help="with --skip-naive: (a) and (b) once each, no (a') and no second (a). (a') has equalled (a) on every "
        "task since the held-out slice stopped changing the draws (BENCHMARKS.md, hp_search run 4), and the "
        "second (a) only measures the load's drift: 40 %% less time for a paired (b) - (a)",
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        metavar="RESULT",
        help="no runs: pool recorded --skip-naive results of one setup at several seeds (data.seed=N) into "
        "paired (b) - (a) per task over the seeds (written to hp_search_pooled.json)",
    )
    ap.add_argument(
        "--name",
        default="",
        type=_stem,
        help="result file stem (default: hp_search, hp_search_ab with --skip-naive, hp_search_pooled with "
        "--pool; _seedN is appended for seed N > 0): keeps a variant setup's results beside the default's",
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.ab_only and not args.skip_naive:
        ap.error("--ab-only needs --skip-naive: (c)'s six jobs are what the naive search costs")
    if args.pool:
        try:
            return pool([load_result(Path(p)) for p in args.pool], quick=args.quick, name=args.name)
        except ValueError as e:
            ap.error(str(e))
    if args.quick:
        args.steps, args.batch_size, args.max_train = 6, 8, 60
        args.eval_examples, args.heldout, args.max_seq_len = 8, 6, 128
    space = parse_space(args.space)
    out_dir = tempfile.mkdtemp(prefix="promptfleet-hp-search-")
    base = base_config(args, out_dir)
    hand = hand_set(base, list(space))
    runs = run_jobs(args, base, space, hand)
    names = list(runs.a["tasks"])
    score = {m: {t: _points(run, t) for t in names} for m, run in runs.compared().items()}
    chosen_b = {t: runs.b["search"][t]["chosen"] for t in names}
    chosen_c, heldout_c = {}, {}
    if runs.naive:
        chosen_c, score["c"], heldout_c = naive_choice(names, runs.naive, runs.variants)
    table, mean = score_table(runs, score, chosen_b, chosen_c)
    cost = costs(runs, args.ab_only)
    same = sum(chosen_b[t] == chosen_c[t] for t in names) if runs.naive else None
    print(table)
    print_costs(runs, cost, same, len(names), args.ab_only)
    draw_noise = {t: score["a"][t] - score["a_held"][t] for t in names} if runs.a_held is not None else None
    if draw_noise is not None:
        print(
            "(a) - (a'), the same configuration without and with the held-out slice (0 unless a task ran past "
            "its first epoch): " + ", ".join(f"{t} {d:+.1f}" for t, d in draw_noise.items())
        )
    result = {
        "benchmark": "hp_search",
        "quick": args.quick,
        "setup": setup_record(args, base, runs, space, hand),
        "scores": score,
        "mean": mean,
        "chosen": {"b": chosen_b, "c": chosen_c},
        "heldout_c": heldout_c,
        "search_b": runs.b["search"],
        "cost": cost,
        "same_choice": same,
        "draw_noise": draw_noise,  # (a) - (a'): one configuration, two draws of the same number of examples
        "table": table,
    }
    name = args.name or ("hp_search_ab" if args.skip_naive else "hp_search")
    write_result(name + (f"_seed{base.data.seed}" if base.data.seed else ""), result, args.quick)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def base_config(args, out_dir: str) -> JobConfig:
    """The job every run starts from: `--job` at the benchmark's sizes, one process, fp32, no checkpoints."""
    common = [
        f"output_dir={out_dir}",
        f"optim.max_steps={args.steps}",
        f"optim.batch_size={args.batch_size}",
        f"data.max_train_examples={args.max_train}",
        f"data.max_eval_examples={args.eval_examples}",
        f"model.max_seq_len={args.max_seq_len}",
        "model.dtype=fp32",
        "model.attn_implementation=sdpa",
        "cluster.num_workers=1",
        "cluster.zero_stage=0",
        "eval_every=0",
        "eval_zero_shot=false",
        "checkpoint_every=0",
        "resume=false",
        f"search.heldout_examples={args.heldout}",
        f"search.eta={args.eta}",
        *args.overrides,
    ]
    base = load_job_config(args.job, common)
    if args.tasks:
        keep = set(args.tasks.split(","))
        base.tasks = [t for t in base.tasks if Path(t).stem in keep]
    return base


@dataclass
class Runs:
    """The summaries (`timed_run`) of the benchmark's runs."""

    a: dict  # (a) hand-set
    b: dict  # (b) in-batch search
    a_again: dict  # (a) once more at the end (with --ab-only: (a) itself)
    naive: list[dict]  # (c): one job per variant of the space, in `variants` order (none with --skip-naive)
    variants: list  # the space's variants (`expand_space`)
    a_held: dict | None  # (a') hand-set on (b)'s draws (None with --ab-only)

    def compared(self) -> dict[str, dict]:
        """The runs whose scores the table shows beside (c), by their key in the result."""
        return {"a": self.a, **({"a_held": self.a_held} if self.a_held else {}), "b": self.b}


def run_jobs(args, base: JobConfig, space: dict[str, list], hand: dict) -> Runs:
    """(a), (b), (c)'s jobs, (a') where no (c) job is it, and (a) again, in that order."""

    def job(name: str, search: dict | None) -> JobConfig:
        cfg = copy.deepcopy(base)
        cfg.name = name
        cfg.search.space = search or {}
        return cfg

    def timed(cfg: JobConfig) -> dict:
        summary = timed_run(cfg)
        print(f"    {summary['train_s']:.0f} s", flush=True)
        return summary

    print(f"(a) hand-set: optim.lr={base.optim.lr}, prompt.init={base.prompt.init}", flush=True)
    a = timed(job("hand-set", None))
    print(f"(b) in-batch search over {space}", flush=True)
    b = timed(job("in-batch", space))
    variants = expand_space(job("probe", space))
    naive = []
    for k, v in enumerate([] if args.skip_naive else variants):
        print(f"(c) job {k + 1}/{len(variants)}: {v.label()}", flush=True)
        naive.append(timed(job(f"naive-{k}", {key: [val] for key, val in v.values.items()})))
    same_as_hand = [k for k, v in enumerate(variants) if v.values == hand] if naive else []
    a_held = None
    if same_as_hand:
        a_held = naive[same_as_hand[0]]
        print(f"(a') hand-set on (b)'s draws: (c) job {same_as_hand[0] + 1}", flush=True)
    elif not args.ab_only:  # --ab-only: no (a'), whose draws are (a)'s
        print("(a') hand-set on (b)'s draws (one-variant search: the same held-out slice)", flush=True)
        a_held = timed(job("hand-set-heldout", {key: [val] for key, val in hand.items()}))
    # (a) once more at the end: on a shared machine the load drifts over a long benchmark, and the
    # spread of the two (a) runs (same work) shows how much.
    a_again = a
    if not args.ab_only:
        print("(a) again, to see the load's drift", flush=True)
        a_again = timed(job("hand-set-again", None))
    return Runs(a, b, a_again, naive, variants, a_held)


def _points(run: dict, task: str) -> float:
    """`task`'s final score in `run`, in points: accuracy and F1 x 100, chrF as it is."""
    return points(run["tasks"][task]["metric"], run["tasks"][task]["tuned"]["score"])


def naive_choice(names: list[str], naive: list[dict], variants: list) -> tuple[dict, dict, dict]:
    """(c): per task, the variant whose job scored best on the task's held-out slice.

    Returns (task -> chosen settings, task -> that job's score in points, task -> held-out score by variant).
    """
    chosen, score, heldout = {}, {}, {}
    for t in names:
        held = [(r["search"][t]["variants"][0]["heldout"][-1][1], k) for k, r in enumerate(naive)]
        best = max(held, key=lambda x: (x[0], -x[1]))[1]  # ties: the first variant, as (b) breaks them
        chosen[t], score[t] = variants[best].values, _points(naive[best], t)
        heldout[t] = {variants[k].label(): h for h, k in held}
    return chosen, score, heldout


def score_table(runs: Runs, score: dict, chosen_b: dict, chosen_c: dict) -> tuple[str, dict[str, float]]:
    """The Markdown table of every task's scores, differences and choices; and each method's mean."""
    names, naive, held = list(score["a"]), bool(runs.naive), runs.a_held is not None
    methods = list(score)
    rows = []
    for t in names:
        rows.append(
            [
                t,
                runs.a["tasks"][t]["metric"],
                *(f"{score[m][t]:.1f}" for m in methods),
                f"{score['b'][t] - score['a'][t]:+.1f}",
                *([f"{score['b'][t] - score['a_held'][t]:+.1f}"] if held else []),
                _short(chosen_b[t]),
                *([_short(chosen_c[t])] if naive else []),
            ]
        )
    mean = {m: sum(score[m].values()) / len(names) for m in score}
    rows.append(
        [
            "mean",
            "",
            *(f"{mean[m]:.1f}" for m in methods),
            f"{mean['b'] - mean['a']:+.1f}",
            *([f"{mean['b'] - mean['a_held']:+.1f}"] if held else []),
            "",
            *([""] if naive else []),
        ]
    )
    header = ["task", "metric", "(a) hand-set", *(["(a') on (b)'s draws"] if held else []), "(b) in-batch"]
    header += [*(["(c) naive"] if naive else []), "(b) - (a)", *(["(b) - (a')"] if held else []), "(b) chose"]
    header += ["(c) chose"] if naive else []
    return markdown_table(header, rows), mean


def costs(runs: Runs, ab_only: bool) -> dict:
    """Wall and CPU seconds of training + final evaluation per method, and their ratios."""
    a, a_again, naive = runs.a, runs.a_again, runs.naive
    cost = {
        "a_train_s_first_last": [a["train_s"], *([] if ab_only else [a_again["train_s"]])],
        "a_train_s": (a["train_s"] + a_again["train_s"]) / 2,
        "b_train_s": runs.b["train_s"],
        "b_rung_scoring_s": runs.b["search_scoring_s"],  # part of b_train_s
        "c_train_s": sum(r["train_s"] for r in naive),
        "setup_s_each": a["setup_s"],
        "a_cpu_s": (a["train_cpu_s"] + a_again["train_cpu_s"]) / 2,
        "b_cpu_s": runs.b["train_cpu_s"],
        "c_cpu_s": sum(r["train_cpu_s"] for r in naive),
    }
    if not naive:
        del cost["c_train_s"], cost["c_cpu_s"]
    cost["b_over_a_cpu"] = cost["b_cpu_s"] / cost["a_cpu_s"]
    cost["b_over_a"] = cost["b_train_s"] / cost["a_train_s"]
    if naive:
        cost["c_over_b_cpu"] = cost["c_cpu_s"] / cost["b_cpu_s"]
        cost["c_over_b"] = cost["c_train_s"] / cost["b_train_s"]
    return cost


def print_costs(runs: Runs, cost: dict, same: int | None, num_tasks: int, ab_only: bool) -> None:
    wall = (
        f"wall time (train + final eval): (a) {cost['a_train_s']:.0f} s "
        + (
            "(one run)"
            if ab_only
            else f"(first {runs.a['train_s']:.0f} s, last {runs.a_again['train_s']:.0f} s)"
        )
        + f", (b) {cost['b_train_s']:.0f} s "
        f"= {cost['b_over_a']:.2f}x (a)"
    )
    cpu = f"CPU time: (a) {cost['a_cpu_s']:.0f} s, (b) {cost['b_cpu_s']:.0f} s = {cost['b_over_a_cpu']:.2f}x (a)"
    if runs.naive:
        wall += f", (c) {cost['c_train_s']:.0f} s = {cost['c_over_b']:.2f}x (b); "
        wall += f"(b) and (c) chose the same configuration for {same}/{num_tasks} tasks"
        cpu += f", (c) {cost['c_cpu_s']:.0f} s = {cost['c_over_b_cpu']:.2f}x (b)"
    print(wall)
    print(f"{cpu}; of (b)'s wall time, {cost['b_rung_scoring_s']:.0f} s scored variants at rungs")


def setup_record(args, base: JobConfig, runs: Runs, space: dict, hand: dict) -> dict:
    """What the result records of its setup (what `--pool` compares between seeds, plus the load)."""
    search = runs.b["config"]["search"]
    names = list(runs.a["tasks"])
    return {
        "job": _repo_relative(args.job),  # comparable between clones (--pool)
        "tasks": names,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_train": args.max_train,
        "eval_examples": args.eval_examples,
        "heldout": args.heldout,
        "criterion": search["criterion"],
        "heldout_schedule": search.get("heldout_schedule", "fixed"),
        "max_seq_len": args.max_seq_len,
        "eta": args.eta,
        "space": space,
        "hand_set": hand,
        "rungs": search["rungs"] or "auto",
        "base_margin": search.get("base_margin", 0.0),
        "base_rungs": search.get("base_rungs", "every"),
        "scoring": search.get("scoring", "heldout"),
        "seed": base.data.seed,
        # variants each task trains: fewer than the space's where some train alike on it
        # (`tuner.search.state.effective`: a generation task's class_labels is its vocab init)
        "trained_variants": {
            t: sum(not v.get("outcome", "").startswith("trains as") for v in runs.b["search"][t]["variants"])
            for t in names
        },
        "load_avg": list(os.getloadavg()),
    }


def _stem(name: str) -> str:
    """A result file stem: letters, digits, `_`, `-` (a name, never a path)."""
    if name and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):  # "": the default stem
        raise argparse.ArgumentTypeError(f"{name!r}: letters, digits, _ and - only (a name, not a path)")
    return name


def load_result(path: Path) -> dict:
    """A recorded (b)-vs-(a) result, or ValueError naming the file."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable result ({e})") from None
    if result.get("benchmark") != "hp_search" or "a" not in result.get("scores", {}):
        raise ValueError(f"{path}: not an hp_search result")
    if "seed" not in result.get("setup", {}):
        raise ValueError(f"{path}: records no seed (a result from before seeds were recorded)")
    return result


def pool(results: list[dict], quick: bool = False, name: str = "") -> dict:
    """(b) - (a) per task over several seeds of one setup: mean, sample sd, seeds with (b) >= (a); the
    mean over tasks per seed; (b)'s cost per seed. One seed cannot resolve the targets: a task's score
    moves by several points between float orders of the same configuration (BENCHMARKS.md, run 8)."""

    def comparable(r: dict) -> dict:
        setup = {"scoring": "heldout", **r["setup"]}  # results from before scoring was recorded
        return {k: v for k, v in setup.items() if k not in ("seed", "load_avg")}

    seeds = [r["setup"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"--pool needs results of two or more distinct seeds, got seeds {seeds}")
    first = comparable(results[0])
    for r in results[1:]:
        if (other := comparable(r)) != first:
            diff = sorted(k for k in other.keys() | first.keys() if other.get(k) != first.get(k))
            raise ValueError(
                f"--pool: seeds {seeds[0]} and {r['setup']['seed']} differ in setup ({', '.join(diff)})"
            )
    tasks = results[0]["setup"]["tasks"]
    by_task = {
        t: PairedDifference.of([r["scores"]["b"][t] for r in results], [r["scores"]["a"][t] for r in results])
        for t in tasks
    }
    diff = {t: d.diffs for t, d in by_task.items()}
    per_seed = [statistics.mean(d[i] for d in diff.values()) for i in range(len(results))]
    over_tasks = PairedDifference.from_diffs(per_seed)
    rows = [
        [name, *(f"{x:+.1f}" for x in d.diffs), f"{d.mean:+.1f}", f"{d.sd:.1f}", f"{d.wins}/{len(d.diffs)}"]
        for name, d in [*by_task.items(), ("mean over tasks", over_tasks)]
    ]
    rows.append(
        [
            "(b) / (a) wall time",
            *(f"{r['cost']['b_over_a']:.2f}x" for r in results),
            f"{statistics.mean(r['cost']['b_over_a'] for r in results):.2f}x",
            "",
            "",
        ]
    )
    table = markdown_table(
        ["(b) - (a)", *(f"seed {s}" for s in seeds), "mean", "sd", "seeds (b) >= (a)"], rows
    )
    print(table)
    mean_gain = over_tasks.mean
    verdict = {
        "mean_gain": mean_gain,
        "tasks_below_a": [t for t, d in by_task.items() if d.mean < 0],
        "b_over_a": [r["cost"]["b_over_a"] for r in results],
        "targets_met": mean_gain >= 2
        and all(d.mean >= 0 for d in by_task.values())
        and all(r["cost"]["b_over_a"] <= 2 for r in results),
    }
    print(f"mean (b) - (a) over {len(seeds)} seeds: {mean_gain:+.2f}; targets met: {verdict['targets_met']}")
    out = {
        "benchmark": "hp_search_pooled",
        "quick": quick,
        "setup": comparable(results[0]) | {"seeds": seeds},
        "diff": diff,
        "per_seed_mean": per_seed,
        "verdict": verdict,
        "table": table,
    }
    write_result(f"{name}_pooled" if name else "hp_search_pooled", out, quick)
    return out


def _repo_relative(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO.resolve())) if p.is_relative_to(REPO.resolve()) else str(p)


def hand_set(cfg: JobConfig, keys: list[str]) -> dict:
    """The job's own value of each searched setting (`optim.lr` -> cfg.optim.lr): the hand-set configuration."""
    out = {}
    for key in keys:
        section, _, name = key.partition(".")
        out[key] = getattr(getattr(cfg, section), name)
    return out


def _short(values: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())


if __name__ == "__main__":
    main()
