"""What `bench.quality` records and concludes: seed results, paired differences against PEFT, the
verdicts on issue 14's and issue 39's targets, PEFT's learning-rate grid, the tables, and the result
files (read back, `--add`, `--pool`).

No model and no training here (`bench.quality` runs the seeds); the arithmetic is `bench.stats`'s.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import markdown_table
from bench.stats import PairedDifference, mean_sd, seeds_to_resolve, standard_error

ZERO_SHOT, PEFT = "zero-shot", "PEFT"
LOW_RESOURCE = ("cb", "rte")  # issue 14: >= +5 points here (250 and 2,490 training rows)


@dataclass
class SeedResult:
    """One replicate: every method's score per task, in points (0-100)."""

    seed: int
    scores: dict[str, dict[str, float]]  # method -> task -> score
    examples_per_task: dict[str, int] = field(default_factory=dict)
    updates_per_task: dict[str, int] = field(default_factory=dict)
    transfer_sources: dict[str, str] = field(default_factory=dict)  # task -> the task its prompt started from
    # PEFT's learning rate tuned on each task's held-out slice (`bench.quality_peft`; empty before issue 39)
    peft_lr: dict[str, float] = field(default_factory=dict)  # task -> the chosen learning rate
    peft_heldout_score: dict[str, dict[str, float | None]] = field(
        default_factory=dict
    )  # lr -> task -> points
    peft_heldout_loss: dict[str, dict[str, float]] = field(default_factory=dict)  # lr -> task -> target loss
    heldout_examples: dict[str, int] = field(default_factory=dict)  # task -> its held-out slice's size
    # our joint methods' rates tuned the same way (`--lr-grid`): method -> as the three PEFT fields above
    ours_lr: dict[str, dict[str, float]] = field(default_factory=dict)
    ours_heldout_score: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    ours_heldout_loss: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


@dataclass
class Paired:
    """One of our methods minus PEFT on one task, seed by seed."""

    method: str
    task: str
    diffs: list[float]
    mean: float
    sd: float
    wins: int  # seeds with method >= PEFT
    se: float = 0.0  # standard error of `mean` over seeds (0 with one seed)


@dataclass
class Verdict:
    """Issue 14's targets, checked for the best of our methods (highest mean gain over PEFT)."""

    best: str
    mean_gain: dict[str, float]  # method -> mean over tasks of its mean paired difference
    # method -> standard error of mean_gain over seeds (sd of the per-seed means over tasks / sqrt(seeds));
    # 0 with one seed. Seeds, not tasks, are the replicates: a seed's tasks share its draws.
    mean_gain_se: dict[str, float]
    # method -> seeds for a +2 gain to lie 2 SE from 0 at the per-seed spread seen (None: one seed)
    seeds_to_resolve: dict[str, int | None]
    tasks_below_peft: list[str]  # tasks where the best method's mean is below PEFT's
    low_resource_gain: dict[str, float]  # cb / rte (those run) -> the best method's mean gain
    targets_met: bool
    # issue 39: the best method >= +2 on the mean, >= +5 on CB, >= PEFT on RTE (those of CB / RTE run)
    issue39_met: bool = False


def paired(runs: list[SeedResult], method: str, task: str, baseline: str = PEFT) -> Paired:
    """`method` - `baseline` on `task`, seed by seed."""
    d = PairedDifference.of([r.scores[method][task] for r in runs], [r.scores[baseline][task] for r in runs])
    return Paired(method, task, d.diffs, d.mean, d.sd, d.wins, standard_error(d.diffs))


def seed_gains(runs: list[SeedResult], method: str, tasks: list[str]) -> list[float]:
    """Per seed, the mean over `tasks` of `method` - PEFT: the replicates of the mean-over-tasks gain."""
    return [statistics.mean(r.scores[method][t] - r.scores[PEFT][t] for t in tasks) for r in runs]


def verdict(runs: list[SeedResult], methods: list[str], tasks: list[str]) -> Verdict:
    """Issue 14's targets for the best of `methods` over `runs` (see `Verdict`)."""
    gains = {m: statistics.mean(paired(runs, m, t).mean for t in tasks) for m in methods}
    per_seed = {m: seed_gains(runs, m, tasks) for m in methods}
    se = {m: standard_error(per_seed[m]) for m in methods}
    needed = {m: seeds_to_resolve(mean_sd(per_seed[m])[1], len(runs)) for m in methods}
    best = max(methods, key=lambda m: gains[m])  # ties: the first (bench.quality lists them in OURS order)
    per_task = {t: paired(runs, best, t).mean for t in tasks}
    below = [t for t, g in per_task.items() if g < 0]
    low = {t: per_task[t] for t in LOW_RESOURCE if t in per_task}
    met = not below and gains[best] >= 2.0 and all(g >= 5.0 for g in low.values())
    met39 = gains[best] >= 2.0 and low.get("cb", 5.0) >= 5.0 and low.get("rte", 0.0) >= 0.0
    return Verdict(best, gains, se, needed, below, low, met, met39)


def render(
    runs: list[SeedResult], methods: list[str], tasks: list[str], metrics: dict[str, str]
) -> dict[str, str]:
    """The per-seed, mean +- sd and paired-difference tables, and the verdict line."""
    shown = [ZERO_SHOT, PEFT, *methods]
    per_seed = markdown_table(
        ["seed", "task", "metric", *shown, *(f"{m} - PEFT" for m in methods)],
        [
            [
                r.seed,
                t,
                metrics[t],
                *(f"{r.scores[m][t]:.1f}" for m in shown),
                *(f"{r.scores[m][t] - r.scores[PEFT][t]:+.1f}" for m in methods),
            ]
            for r in runs
            for t in tasks
        ],
    )
    means = markdown_table(
        ["task", "metric", *shown],
        [
            [
                t,
                metrics[t],
                *("{:.1f} +- {:.1f}".format(*mean_sd([r.scores[m][t] for r in runs])) for m in shown),
            ]
            for t in tasks
        ],
    )
    n = len(runs)
    diff_rows = []
    for t in tasks:
        cells = [paired(runs, m, t) for m in methods]
        diff_rows.append([t, *(f"{p.mean:+.1f} +- {p.sd:.1f}, SE {p.se:.1f} ({p.wins}/{n})" for p in cells)])
    v = verdict(runs, methods, tasks)
    diff_rows.append(["mean over tasks", *(f"{v.mean_gain[m]:+.1f}" for m in methods)])
    per_seed_cells = []
    for m in methods:
        g = seed_gains(runs, m, tasks)
        per_seed_cells.append(
            " ".join(f"{x:+.1f}" for x in g) + f" (sd {mean_sd(g)[1]:.1f}, SE {v.mean_gain_se[m]:.1f})"
        )
    diff_rows.append(["mean over tasks, per seed", *per_seed_cells])
    diffs = markdown_table(["task", *(f"{m} - PEFT, sd, SE (seeds >= PEFT)" for m in methods)], diff_rows)
    low = ", ".join(f"{t} {g:+.1f}" for t, g in v.low_resource_gain.items()) or "none run"
    line = (
        f"best method: {v.best}; mean gain over PEFT {v.mean_gain[v.best]:+.1f} points "
        f"({resolve(v, n)}; target >= +2); "
        f">= PEFT on every task: {'yes' if not v.tasks_below_peft else 'no, below on ' + ', '.join(v.tasks_below_peft)}; "
        f"low-resource gains (target >= +5): {low}; targets met: {'yes' if v.targets_met else 'no'} ({n} seed(s))"
    )
    line39 = issue39_line(runs, v, tasks)
    out = {"per_seed": per_seed, "means": means, "paired": diffs, "verdict": line, "verdict_issue39": line39}
    if any(r.peft_lr for r in runs):
        out["peft_grid"] = grid_table(
            runs, tasks, lambda r: (r.peft_lr, r.peft_heldout_score, r.peft_heldout_loss)
        )
    tuned = [m for m in methods if any(m in r.ours_lr for r in runs)]
    if tuned:
        out["ours_grid"] = {
            m: grid_table(
                runs,
                tasks,
                lambda r, m=m: (
                    r.ours_lr.get(m, {}),
                    r.ours_heldout_score.get(m, {}),
                    r.ours_heldout_loss.get(m, {}),
                ),
            )
            for m in tuned
        }
    return out


def issue39_line(runs: list[SeedResult], v: Verdict, tasks: list[str]) -> str:
    """Issue 39's targets for the best method, each with its shortfall and standard error where missed."""

    def part(label: str, gain: float, se: float, target: float) -> str:
        miss = "" if gain >= target else f", short by {target - gain:.1f}"
        return f"{label} {gain:+.1f} (SE {se:.1f}; target >= {target:+.0f}{miss})"

    parts = [part("mean", v.mean_gain[v.best], v.mean_gain_se[v.best], 2.0)]
    for task, target in (("cb", 5.0), ("rte", 0.0)):
        if task in tasks:
            p = paired(runs, v.best, task)
            parts.append(part(task.upper(), p.mean, p.se, target))
    met = "yes" if v.issue39_met else "no"
    return f"issue 39, best method {v.best} against tuned PEFT: " + "; ".join(parts) + f"; met: {met}"


def grid_table(runs: list[SeedResult], tasks: list[str], of) -> str:
    """A learning-rate grid (`of(run)`: its chosen rates, held-out scores and losses, PEFT's or one of
    our methods'): per seed and task, each rate's held-out score (or loss where the task is chosen by
    loss) and the rate chosen."""
    grid = sorted({lr for r in runs for lr in of(r)[2]}, key=float)
    rows = []
    for r in runs:
        chosen, score, losses = of(r)
        for t in tasks:
            cells = []
            for lr in grid:
                s, loss = score.get(lr, {}).get(t), losses.get(lr, {}).get(t)
                cells.append("-" if loss is None else f"{s:.1f}" if s is not None else f"loss {loss:.3f}")
            rows.append([r.seed, t, r.heldout_examples.get(t, ""), *cells, chosen.get(t, "")])
    return markdown_table(["seed", "task", "held out", *(f"lr {lr}" for lr in grid), "chosen lr"], rows)


def resolve(v: Verdict, n: int) -> str:
    """The mean gain's standard error and, where more seeds are needed, how many would tell +2 from 0."""
    if n < 2:
        return "one seed: no standard error"
    se, k = v.mean_gain_se[v.best], v.seeds_to_resolve[v.best]
    return f"SE {se:.1f} over {n} seeds" + (
        f"; about {k} seeds would put +2 two SE from 0 at this spread" if k > n else ""
    )


def read_result(path: Path, option: str) -> tuple[dict, list[SeedResult], dict[str, str], dict]:
    """A recorded result: (setup without its seeds, runs, metrics, machine).

    ValueError with a one-line message, prefixed by the `option` that asked for it, when the file is
    missing, unreadable or not a result of this benchmark (a half-written file, another benchmark's).
    """
    try:
        old = json.loads(path.read_text())
        setup = {k: v for k, v in old["setup"].items() if k not in ("seeds", "metrics")}
        if "transfer_halves" in setup:  # written before --transfer existed: the halves protocol
            setup.setdefault("transfer_protocol", "halves")
        runs = [SeedResult(**r) for r in old["runs"]]
        return setup, runs, old["setup"]["metrics"], old.get("machine", {})
    except FileNotFoundError:
        raise ValueError(f"{option}: no earlier result {path}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{option}: {path} is not a result of this benchmark ({type(e).__name__}: {e})"
        ) from None


def check_same_setup(path: Path, recorded: dict, setup: dict, option: str, against: str = "this run") -> None:
    """ValueError naming the first setting in which `path`'s `recorded` setup differs from `setup`
    (the setup of `against`)."""
    differ = sorted(  # the transfer protocol first: it explains a difference in transfer_halves too
        (k for k in set(setup) | set(recorded) if setup.get(k) != recorded.get(k)),
        key=lambda k: (k != "transfer_protocol", k),
    )
    if differ:
        k = differ[0]
        raise ValueError(
            f"{option}: {path} was run with {k}={recorded.get(k)!r}, {against} has {setup.get(k)!r}; "
            "seeds of different setups do not pool"
        )


def earlier_seeds(path: Path, setup: dict, rerun: list[int]) -> tuple[list[SeedResult], dict[str, str]]:
    """`--add`: the seeds of an earlier result at `path` with the same setup, less those run again now.

    A long benchmark can so be run a few seeds at a time (one session each); ValueError with a
    one-line message when the file is missing, unreadable or was run with a different setup.
    """
    recorded, runs, metrics, _ = read_result(path, "--add")
    check_same_setup(path, recorded, setup, "--add")
    return [r for r in runs if r.seed not in rerun], metrics


def pooled(paths: list[Path]) -> tuple[dict, list[SeedResult], dict[str, str], list[dict]]:
    """`--pool`: the seeds of several result files of one setup, as if one run had made them all
    (e.g. two processes side by side, each on its own seeds).

    Returns (setup, runs, metrics, sources: file, seeds and machine of each); ValueError with a
    one-line message when a file is missing or unreadable, the setups differ, or a seed is in two
    files (two draws under one name would count as two replicates of one).
    """
    setup, runs, metrics, sources = None, [], {}, []
    for path in paths:
        recorded, kept, metrics, machine = read_result(path, "--pool")
        if setup is None:
            setup = recorded  # every other file must have the first one's setup
        check_same_setup(path, recorded, setup, "--pool", against=str(paths[0]))
        twice = sorted({r.seed for r in kept} & {r.seed for r in runs})
        if twice:
            raise ValueError(
                f"--pool: seed(s) {twice} of {path} are in an earlier file too; seeds must be distinct"
            )
        runs += kept
        sources.append({"file": path.name, "seeds": sorted(r.seed for r in kept), "machine": machine})
    if setup is None:
        raise ValueError("--pool needs at least one result file")
    return setup, runs, metrics, sources


def result_of(setup: dict, runs: list[SeedResult], metrics: dict[str, str], quick: bool) -> dict:
    """The JSON record and the printed tables of `runs` (sorted by seed)."""
    runs = sorted(runs, key=lambda r: r.seed)
    methods, tasks = setup["methods"][2:], setup["tasks"]
    return {
        "benchmark": "quality_methods",
        "quick": quick,
        "setup": {**setup, "metrics": metrics, "seeds": [r.seed for r in runs]},
        "verdict": asdict(verdict(runs, methods, tasks)),
        "paired": [asdict(paired(runs, m, t)) for m in methods for t in tasks],
        "runs": [asdict(r) for r in runs],
        "tables": render(runs, methods, tasks, metrics),
    }


def print_result(out: dict, runs: list[SeedResult], steps: int, batch_size: int) -> None:
    """The tables, the verdict line and each seed's budget, on the console."""
    tables = out["tables"]
    print(tables["per_seed"])
    print(f"mean +- sd over {len(runs)} seed(s) {out['setup']['seeds']}:")
    print(tables["means"])
    print("paired differences vs PEFT, mean +- sd (seeds with method >= PEFT):")
    print(tables["paired"])
    print(tables["verdict"])
    print(tables["verdict_issue39"])
    if "peft_grid" in tables:
        print("PEFT's learning rate per task, chosen on its held-out slice (held-out score per rate):")
        print(tables["peft_grid"])
    for m, table in tables.get("ours_grid", {}).items():
        print(f"{m}'s learning rate per task, chosen on the same slices:")
        print(table)
    print(f"budget per seed: {steps} steps x {batch_size} examples; per task examples / updates by seed:")
    for r in sorted(runs, key=lambda r: r.seed):
        print(
            f"  seed {r.seed}: {r.examples_per_task} / {r.updates_per_task}; transfer sources {r.transfer_sources}"
        )
