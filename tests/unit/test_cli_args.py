"""The `promptfleet` command line's arguments: overrides wherever they stand, one-line refusals, a light
`--help`.

`eval` reads `key=value` tokens as overrides the way `train` does (before, `eval --config CFG
--zero-shot a=1` took `a=1` for a run directory and dropped it) and refuses any other stray token in
one line; a stray token after a flag is one line too, not argparse's usage; `promptfleet --help`
imports none of the modules that pull in torch or Ray (`cluster.cli.COMMANDS`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import write_tiny_job

from cluster.cli import COMMANDS, _eval_arguments, build_parser, main
from tuner.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_a_stray_token_after_a_flag_is_one_line_naming_it(tmp_path, capsys):
    job = write_tiny_job(tmp_path, tmp_path)
    assert main(["train", str(job), "--no-ray", "optim.max_steps"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "promptfleet: error: unrecognized argument 'optim.max_steps': overrides look like key=value "
        "(e.g. optim.max_steps=20)"
    ]
    assert main(["validate", str(job), "--bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == ["promptfleet: error: unrecognized argument '--bogus'"]


def test_help_imports_neither_torch_nor_ray_and_lists_every_command():
    code = (
        "import sys; from cluster.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    for name in ["train", "eval", "validate", *COMMANDS]:
        assert f"    {name} " in proc.stdout, name


def test_listed_help_lines_are_the_modules_own():
    """`--help` lists the commands from `COMMANDS` without importing them: the lines must be theirs."""
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]  # every module imported
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert {name: line for name, (_, line) in COMMANDS.items()} == {n: helps[n] for n in COMMANDS}
    # A command runs with its module's parser, never the listing's.
    assert build_parser("k8s").parse_args(["k8s", "render", "x.yaml", "--image", "i"]).func.__module__ == (
        "cluster.k8s"
    )


def test_eval_reads_overrides_wherever_they_stand(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    assert _eval_arguments("data.max_eval_examples=2", []) == (None, ["data.max_eval_examples=2"])
    assert _eval_arguments(str(run), ["a=1", "b=2"]) == (str(run), ["a=1", "b=2"])
    with pytest.raises(ConfigError, match="^eval: unexpected argument 'runs/b': give one run directory"):
        _eval_arguments(str(run), ["runs/b"])
    with pytest.raises(ConfigError, match="^eval: 'typo' is not a run directory \\(no such directory\\)"):
        _eval_arguments("typo", ["a=1"])


def test_zero_shot_eval_takes_its_override_and_shows_no_tuned_score(tmp_path, tiny_backbone_dir, capsys):
    job = write_tiny_job(tmp_path, tiny_backbone_dir, data={"max_eval_examples": 4})
    argv = ["eval", "--config", str(job), "--zero-shot", "data.max_eval_examples=2"]
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for task in results["tasks"].values():
        assert task["zero_shot"]["n"] == 2 and task["tuned"] == {}  # the override was applied
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert "nan" not in "\n".join(table)
    assert [line.rsplit("|", 2)[1].strip() for line in table if line.startswith("| tone")] == ["-"]
    assert main(["eval", "--config", str(job), "--zero-shot", "stray"]) == 2
