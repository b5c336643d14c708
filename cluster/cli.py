"""`promptfleet`: the command line. The CLI is the config: a job YAML plus `key=value` overrides.

    promptfleet train configs/quickstart.yaml optim.max_steps=50      # embedded local Ray, 2 ranks
    promptfleet train configs/quickstart.yaml --address auto          # join a running Ray cluster
    promptfleet eval runs/quickstart                                  # re-score a finished run
    promptfleet eval --config configs/quickstart.yaml --zero-shot     # the untuned backbone
    promptfleet validate configs/*.yaml configs/tasks/*.yaml          # check job and task files
    promptfleet tune configs/quickstart.yaml --param prompt.num_virtual_tokens=8,16   # Ray Tune
    promptfleet serve | submit | jobs | k8s ...                       # see --help of each

Errors in what the user gave (config, paths, names) print one line and exit 2; set
PROMPTFLEET_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from tuner.config import ConfigError, DataConfig, JobConfig, load_job_config, one_line, read_yaml

# Modules that add their own sub-commands through `register(subparsers)`.
COMMAND_MODULES = ["serving.cli", "cluster.jobs", "cluster.k8s", "cluster.plan", "cluster.tune"]


def _train(args: argparse.Namespace) -> int:
    cfg = load_job_config(args.config, args.overrides)
    if args.no_ray:
        from cluster.launch import train_local

        train_local(cfg)
    else:
        from cluster.launch import train_on_ray

        train_on_ray(cfg, address=args.address)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tuner.evaluate_cli import evaluate_command, render_results

    results = evaluate_command(
        run_dir=args.run_dir, config=args.config, overrides=args.overrides, zero_shot=args.zero_shot
    )
    # stdout carries one format: JSON alone with --json (pipe it to jq), else the table.
    print(json.dumps(results, indent=2, default=float) if args.json else render_results(results))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Check each file and print `ok  PATH`, or every problem it has on stderr, one line each."""
    failed = False
    for path in args.configs:
        try:
            problems = _problems(path)
        except Exception as e:  # noqa: BLE001 - one line per problem, then the next file
            problems = [_one_line(e)]
        for problem in problems:
            print(f"promptfleet: error: {path}: {problem}", file=sys.stderr)
        if not problems:
            print(f"ok  {path}")
        failed = failed or bool(problems)
    return 2 if failed else 0


def _one_line(e: Exception) -> str:
    if os.environ.get("PROMPTFLEET_DEBUG"):
        raise e
    return one_line(e)


def _problems(path: str) -> list[str]:
    """What is wrong with one job or task file (empty: nothing). A job's own keys stop at their first
    error; after them every task the job lists is checked, and each bad one is a line of its own."""
    from tuner.job import load_task_specs, prepare_job

    data = read_yaml(path)
    if not _is_job(data):
        load_task_specs([path])
        return []
    cfg = load_job_config(path, check_task_files=False)
    problems = []
    for entry, task in zip(data["tasks"], cfg.tasks):
        try:
            if not Path(task).is_file():
                raise ConfigError(f"task file not found (resolved to {task})")
            load_task_specs([task])
        except Exception as e:  # noqa: BLE001 - every bad task is reported, not only the first
            problems.append(f"task {entry}: {_one_line(e)}")
    if not problems:
        prepare_job(cfg)  # what only the tasks together can break: unique names, init_from's tasks
    return problems


def _is_job(data: dict) -> bool:
    """Whether a YAML mapping is a job file (else a task file), read from what it holds, wherever it
    lives: a job lists `tasks`; otherwise the file is what more of its keys, and of its `data:`
    section's keys, belong to only (a task's `kind`, `template`, `verbaliser`, `data.format`...; a
    job's `optim`, `checkpoint_every`, `data.mixing`...), so a stray key is reported as unknown."""
    if "tasks" in data:
        return True
    from tuner.tasks.spec import DataSource, TaskSpec

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    votes = {"job": 0, "task": 0}
    section = data.get("data")
    pairs = [(data, names(JobConfig), names(TaskSpec))]
    if isinstance(section, dict):
        pairs.append((section, names(DataConfig), names(DataSource)))
    for keys, job_keys, task_keys in pairs:
        keys = {str(k) for k in keys}
        votes["job"] += len(keys & (job_keys - task_keys))
        votes["task"] += len(keys & (task_keys - job_keys))
    if votes["job"] == votes["task"]:
        raise ConfigError(
            "cannot tell a job file (it lists `tasks`) from a task file (it has `kind`, `template`, "
            "`data.format`...)"
        )
    return votes["job"] > votes["task"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptfleet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train soft prompts for the job's tasks (Ray Train + DeepSpeed ZeRO-3)",
        description="Train one soft prompt per task on a frozen backbone. Starts an embedded local "
        "Ray unless --address / RAY_ADDRESS / cluster.address names a cluster. Results land "
        "in <output_dir>/<name>/: adapters/ (PEFT format), summary.json, report.md, curves.png.",
    )
    p.add_argument("config", help="job YAML, e.g. configs/quickstart.yaml")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optim.max_steps=20 cluster.num_workers=1"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.add_argument(
        "--no-ray", action="store_true", help="run in this process as a single rank (no Ray, no DeepSpeed)"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval",
        help="score a run's prompts (or the zero-shot backbone) on its tasks' eval splits",
        description="Classification: accuracy, macro-F1 and per-label P/R/F1 by scoring verbaliser "
        "words. Generation: chrF, ROUGE-L F1 (both 0-100) and exact match, against the best of a "
        "task's references. NER: entity-level precision, recall and entity F1 (seqeval), per "
        "entity type too.",
    )
    p.add_argument("run_dir", nargs="?", help="a finished run directory (reads its adapters/)")
    p.add_argument("--config", help="job YAML (for --zero-shot, or to evaluate a run with other limits)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to the job config")
    p.add_argument("--zero-shot", action="store_true", help="score the untuned backbone (no prompt)")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "validate",
        help="check job and task YAML files (keys, types, data files, their columns)",
        description="Each file is a job (it lists `tasks`) or a task (it has `kind`, `template`...), "
        "whatever folder it is in. Prints `ok  FILE`, or every problem on stderr, one line each (a "
        "job: each bad task it lists); exits 2 if any file has a problem.",
    )
    p.add_argument("configs", nargs="+", help="job and task YAML files")
    p.set_defaults(func=_validate)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train cfg.yaml --no-ray a=1`): argparse stops the
    # positional list at the first flag, so collect stray key=value tokens ourselves.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("promptfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line, not a traceback
        if os.environ.get("PROMPTFLEET_DEBUG"):
            raise
        print(f"promptfleet: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, FileNotFoundError, KeyError, ValueError)) else 1


if __name__ == "__main__":
    sys.exit(main())
