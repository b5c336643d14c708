"""`promptfleet`: the command line. The CLI is the config: a job YAML plus `key=value` overrides.

    promptfleet train configs/quickstart.yaml optim.max_steps=50      # embedded local Ray, 2 ranks
    promptfleet train configs/quickstart.yaml --address auto          # join a running Ray cluster
    promptfleet eval runs/quickstart                                  # re-score a finished run
    promptfleet eval --config configs/quickstart.yaml --zero-shot     # the untuned backbone
    promptfleet validate configs/*.yaml                               # check job files
    promptfleet tune configs/quickstart.yaml --param prompt.num_virtual_tokens=8,16   # Ray Tune
    promptfleet serve | submit | jobs | k8s ...                       # see --help of each

Errors in what the user gave (config, paths, names) print one line and exit 2; set
PROMPTFLEET_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from tuner.config import ConfigError, load_job_config, one_line

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
    from tuner.job import load_task_specs, prepare_job

    for path in args.configs:
        if Path(path).parent.name == "tasks":
            load_task_specs([path])
        else:
            prepare_job(load_job_config(path))
        print(f"ok  {path}")
    return 0


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
        "words. Generation: chrF and exact match.",
    )
    p.add_argument("run_dir", nargs="?", help="a finished run directory (reads its adapters/)")
    p.add_argument("--config", help="job YAML (for --zero-shot, or to evaluate a run with other limits)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to the job config")
    p.add_argument("--zero-shot", action="store_true", help="score the untuned backbone (no prompt)")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("validate", help="check job and task YAML files (keys, types, data files)")
    p.add_argument("configs", nargs="+", help="job YAMLs, or task YAMLs under a tasks/ directory")
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
