"""`promptfleet`: the command line. The CLI is the config: a job YAML plus `key=value` overrides.

    promptfleet train configs/quickstart.yaml optim.max_steps=50      # embedded local Ray, 2 ranks
    promptfleet train configs/quickstart.yaml --address auto          # join a running Ray cluster
    promptfleet eval runs/quickstart                                  # re-score a finished run
    promptfleet eval --config configs/quickstart.yaml --zero-shot     # the untuned backbone
    promptfleet validate configs/*.yaml configs/tasks/*.yaml          # check job and task files
    promptfleet tune configs/quickstart.yaml --param prompt.num_virtual_tokens=8,16   # Ray Tune
    promptfleet export runs/fleet --task sst2 --peft out/sst2        # one task of a packed store, for PEFT
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

# Sub-commands other modules add through `register(subparsers)`, and the line `promptfleet --help` lists
# for each. A module is imported only to run (or show the --help of) one of its commands: several pull in
# torch, transformers or Ray (seconds) that `--help`, `train`'s argument checks and `validate` do not need.
# (tests/unit/test_cli_args.py checks these lines against each module's own.)
COMMANDS = {
    "serve": (
        "serving.cli",
        "serve every task of a prompt store from one backbone (OpenAI-compatible HTTP API)",
    ),
    "submit": ("cluster.jobs", "submit a training job to a Ray cluster (Ray Jobs API)"),
    "jobs": ("cluster.jobs", "list, inspect, follow or stop Ray jobs"),
    "k8s": ("cluster.k8s", "Kubernetes (KubeRay) manifests"),
    "plan": ("cluster.plan", "per-device memory of a job on N nodes x D devices, and the settings to use"),
    "export": (
        "tuner.export_cli",
        "write a run's task as a PEFT adapter, or its adapters as a packed store or per-task directories",
    ),
    "tune": (
        "cluster.tune",
        "search job-level settings (prompt length, steps, batch) with Ray Tune, one Ray Train run per trial",
    ),
}


def _train(args: argparse.Namespace) -> int:
    cfg = load_job_config(args.config, args.overrides)
    cfg.model.check_local_path()  # before torch, Ray or the model load (seconds to minutes)
    from tuner.run_dir import released_on_failure

    with released_on_failure():  # a start that fails leaves no claimed run directory behind
        if args.no_ray:
            from cluster.launch import train_local

            train_local(cfg)
        else:
            from cluster.launch import train_on_ray

            train_on_ray(cfg, address=args.address)
    return 0


def _eval_arguments(run_dir: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """(run directory, overrides) from `eval`'s positionals, read as `train` reads them: a `key=value`
    token is an override wherever it stands (argparse hands the first positional to `run_dir`, so
    `eval --config CFG --zero-shot a=1` would take `a=1` for a directory), anything else is the one
    run directory, which must exist."""
    tokens = [run_dir] if run_dir else []
    tokens += overrides
    dirs = [t for t in tokens if "=" not in t or Path(t).is_dir()]
    if len(dirs) > 1:
        raise ConfigError(
            f"eval: unexpected argument {dirs[1]!r}: give one run directory, then key=value overrides"
        )
    if dirs and not Path(dirs[0]).is_dir():
        raise ConfigError(
            f"eval: {dirs[0]!r} is not a run directory (no such directory); overrides look like key=value"
        )
    return (dirs[0] if dirs else None), [t for t in tokens if t not in dirs]


def _eval(args: argparse.Namespace) -> int:
    run_dir, overrides = _eval_arguments(args.run_dir, args.overrides)
    from tuner.evaluate_cli import evaluate_command, render_results

    results = evaluate_command(
        run_dir=run_dir, config=args.config, overrides=overrides, zero_shot=args.zero_shot
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `promptfleet` parser; of the other modules' sub-commands (`COMMANDS`) only `command`'s module is
    imported and registers its real parser (None: every module), the others are listed by name and help."""
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

    modules = dict.fromkeys(m for m, _ in COMMANDS.values())
    for module in modules if command is None else [COMMANDS[command][0]] if command in COMMANDS else []:
        importlib.import_module(module).register(sub)
    for name, (_, line) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=line, add_help=False)
    return parser


def _command(argv: list[str]) -> str:
    """The sub-command `argv` names (its first token that is not an option; "" if none)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    # Overrides may come before or after flags (`train cfg.yaml --no-ray a=1`): argparse stops the
    # positional list at the first flag, so collect stray key=value tokens ourselves.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        token = (bad or extra)[0]
        print(
            f"promptfleet: error: unrecognized argument {token!r}"
            + ("" if token.startswith("-") else ": overrides look like key=value (e.g. optim.max_steps=20)"),
            file=sys.stderr,
        )
        return 2
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
