"""`promptfleet tune`: search job-level settings with Ray Tune, each trial a whole Ray Train run.

    promptfleet tune configs/quickstart.yaml --param prompt.num_virtual_tokens=8,16 \\
        --param optim.batch_size=16,32 --samples 1 eval_every=25

Settings that are one value for a whole job (prompt length of the bank, steps, batch size) cannot
vary inside one batch the way `search.space` variants do (`tuner.search.space`); here every combination
of the `--param` values (a grid, repeated `--samples` times) is its own job. A Ray Tune `Tuner`
runs a function trainable per trial that starts the job's Ray Train `TorchTrainer` (as Ray
documents for Train inside Tune) with `TuneReportCallback`, so the ranks' periodic evaluations
(`eval_every`) reach Tune as `score` = the mean eval score over tasks; ASHA stops trials whose
score trails at a rung. A job with `search.space` composes: each trial runs its in-batch search.

Trial runs live under `<output_dir>/<name>/tune/<name>-<k>/` (adapters, summary, report, as
`promptfleet train` writes them); `tune/results.json` and the printed table rank the trials.
It does not pick a winner for serving: the best trial's adapters are where the table says.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tuner.config import ConfigError, JobConfig, from_dict, load_job_config, to_dict
from tuner.schema import set_dotted


@dataclass
class TrialResult:
    """One trial of `promptfleet tune`: its settings, how far it got, and its scores."""

    name: str
    params: dict[str, Any]
    status: str  # finished | stopped early at step N | failed: ...
    steps: int
    score: float | None  # mean final eval score over tasks (None when it did not finish)
    task_scores: dict[str, float]
    run_dir: str


def parse_params(items: list[str]) -> dict[str, list]:
    """`["a.b=1,2", "c=x"]` -> `{"a.b": [1, 2], "c": ["x"]}` (values parsed as YAML)."""
    out: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ConfigError(f"--param {item!r} must look like key=value1,value2")
        out[key.strip()] = [yaml.safe_load(v) for v in raw.split(",")]
    return out


def _with(data: dict, key: str, value: Any) -> dict:
    out = copy.deepcopy(data)
    set_dotted(out, key, value, f"--param {key}")
    return out


def trial_configs(base: JobConfig, params: dict[str, list], samples: int = 1) -> list[tuple[dict, JobConfig]]:
    """Every grid point x `samples` as (its params, its validated job config); bad values fail here, in one line."""
    data = to_dict(base)
    out = []
    for combo in itertools.product(*params.values()):  # no params: one trial, the job as it is
        chosen = dict(zip(params, combo))
        for s in range(samples):
            trial = data
            for key, value in chosen.items():
                trial = _with(trial, key, value)
            cfg = from_dict(JobConfig, trial)
            if samples > 1:  # repeated samples differ in their seed (prompt init, data order)
                cfg.data.seed = base.data.seed + s
            cfg.output_dir = str(Path(base.output_dir).resolve() / base.name / "tune")
            cfg.name = f"{base.name}-{len(out)}"
            out.append(({**chosen, **({"data.seed": cfg.data.seed} if samples > 1 else {})}, cfg))
    return out


def _evaluations_to_tune():
    """Ray's `TuneReportCallback`, passing on the ranks' evaluation reports only.

    The ranks also report each checkpoint to Ray Train (for restarts after a failure); those carry no
    score, and Tune refuses results without the metric its scheduler ranks trials by.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "score" in metrics[0]:
                super().after_report(run_context, metrics, None)

    return EvaluationsToTune()


def _trial(config: dict) -> None:
    """Ray Tune's function trainable: one whole job on Ray Train, its evaluations reported to Tune."""
    import ray.tune

    from cluster.launch import make_trainer, mean_score
    from tuner.job import prepare_job
    from tuner.report import read_summary

    cfg = from_dict(JobConfig, config["job"])
    job = prepare_job(cfg, claim=True)
    make_trainer(job.cfg, {"_progress": None, "_tune": True}, callbacks=[_evaluations_to_tune()]).fit()
    summary = read_summary(job.run_dir)
    ray.tune.report({"step": summary.steps, "score": mean_score(summary.tuned_scores()), "finished": 1})


def _trial_dirname(trial) -> str:
    return trial.config["job"]["name"]  # the trial's run name, not its whole config


def tune_job(
    base: JobConfig,
    params: dict[str, list],
    samples: int = 1,
    address: str | None = None,
    concurrent: int = 1,
    grace_steps: int = 0,
) -> list[TrialResult]:
    """Run every trial of the grid with Ray Tune (ASHA on the periodic evals); returns them best first."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cluster.launch import init_ray
    from tuner.model.model_cache import resolve_backbone
    from tuner.report import SUMMARY_FILE, read_summary

    trials = trial_configs(base, params, samples)
    root = Path(trials[0][1].output_dir)
    root.mkdir(parents=True, exist_ok=True)
    init_ray(base, address)
    resolve_backbone(base.model.name)  # convert the embedded backbone once, before trials run at once
    by_name = {cfg.name: (p, cfg) for p, cfg in trials}
    # One past the last step of the longest trial: ASHA stops a trial that reaches max_t, and a trial
    # at its last evaluation is still writing its adapters (stopping it would kill its ranks mid-write).
    max_t = max(cfg.optim.max_steps for _, cfg in trials) + 1
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=max_t,
        grace_period=min(grace_steps or base.eval_every or max_t, max_t),
        reduction_factor=base.search.eta,
    )
    tuner = tune.Tuner(
        # The trial function only waits for its Ray Train run: a sliver of a CPU (Tune refuses none), the ranks hold the rest.
        tune.with_resources(_trial, {"CPU": 0.01}),
        param_space={"job": tune.grid_search([to_dict(cfg) for _, cfg in trials])},
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            scheduler=scheduler,
            num_samples=1,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(root / "ray"), verbose=0),
    )
    grid = tuner.fit()
    results = []
    for r in grid:
        name = Path(r.path).name  # `_trial_dirname`: the trial's run name (a failed trial has no config)
        chosen, cfg = by_name[name]
        run_dir = Path(cfg.output_dir) / cfg.name
        summary_path = run_dir / SUMMARY_FILE
        metrics = r.metrics or {}
        if summary_path.is_file() and metrics.get("finished"):
            s = read_summary(run_dir)
            results.append(
                TrialResult(
                    name, chosen, "finished", s.steps, metrics["score"], s.tuned_scores(), str(run_dir)
                )
            )
        else:
            status = f"failed: {r.error}" if r.error else f"stopped early at step {metrics.get('step', 0)}"
            last = metrics.get("score")
            results.append(TrialResult(name, chosen, status, metrics.get("step", 0), last, {}, str(run_dir)))
    results.sort(key=lambda t: (t.status != "finished", -(t.score or 0.0), t.name))
    (root / "results.json").write_text(json.dumps([asdict(t) for t in results], indent=2, default=float))
    return results


def render_results(results: list[TrialResult]) -> str:
    keys = list(dict.fromkeys(k for t in results for k in t.params))
    lines = ["| trial | " + " | ".join(keys) + " | steps | mean score | status |"]
    lines.append("|---" * (len(keys) + 4) + "|")
    for t in results:
        cells = [str(t.params.get(k, "")) for k in keys]
        score = "" if t.score is None else f"{t.score:.4f}"
        lines.append(f"| {t.name} | " + " | ".join(cells) + f" | {t.steps} | {score} | {t.status} |")
    return "\n".join(lines)


def _tune_command(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.concurrent < 1:
        raise ConfigError("--samples and --concurrent must be >= 1")
    base = load_job_config(args.config, args.overrides)
    params = parse_params(args.param or [])
    results = tune_job(base, params, args.samples, args.address, args.concurrent, args.grace_steps)
    if args.json:
        print(json.dumps([asdict(t) for t in results], indent=2, default=float))
    else:
        sys.stdout.write(render_results(results) + "\n\n")
        sys.stdout.write(f"results: {Path(results[0].run_dir).parent / 'results.json'}\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search job-level settings (prompt length, steps, batch) with Ray Tune, one Ray Train run per trial",
        description="Every combination of the --param values (x --samples, each sample another data.seed) is "
        "one whole training job run on Ray Train inside a Ray Tune trial. Trials report the mean eval score "
        "over tasks at every evaluation (set eval_every); ASHA stops trials that trail. Per-task settings "
        "(learning rate, init) are cheaper to search inside one job: `search.space` in the job YAML. "
        "Outputs: <output_dir>/<name>/tune/<name>-<k>/ per trial and tune/results.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="job YAML, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=V1,V2",
        help="a setting and its values, e.g. prompt.num_virtual_tokens=8,16 (repeatable: a grid)",
    )
    p.add_argument(
        "--samples", type=int, default=1, help="runs of each grid point, seeds data.seed+0.. (default 1)"
    )
    p.add_argument("--concurrent", type=int, default=1, help="trials running at once (default 1)")
    p.add_argument(
        "--grace-steps",
        type=int,
        default=0,
        help="ASHA: steps before a trial can be stopped (default eval_every)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_tune_command)
