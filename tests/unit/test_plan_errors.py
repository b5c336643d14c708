"""`promptfleet plan`'s refusals are the user's input, said in one clean line: no Python exception type
in front (`ValueError: --nodes must be >= 1`), exit 2."""

from __future__ import annotations

import pytest

from cluster.cli import main as cli_main


@pytest.mark.parametrize(
    "argv,says",
    [
        (["plan", "no-such-model"], "backbone 'no-such-model': no such directory"),
        (["plan", "llama-3-8b", "--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["plan", "llama-3-8b", "--memory-gb", "nan"], "--memory-gb must be a finite number > 0"),
    ],
)
def test_plan_errors_carry_no_exception_type(argv, says, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"promptfleet: error: {says}"), err
    assert "Error:" not in err and "\n" not in err


def test_a_directory_without_config_json_is_one_clean_line(tmp_path, capsys):
    assert cli_main(["plan", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"promptfleet: error: backbone {str(tmp_path)!r}: {tmp_path / 'config.json'} not found"
