"""A pytest plugin (`-p bench.gpu_pytest_plugin`) that keeps `$PROMPTFLEET_PYTEST_JSON` up to date.

After every test the file holds {"counts": {...}, "tests": [{name, outcome, seconds, message}]}, so a
test session killed by `bench.gpu_check`'s time limit still leaves the results of every test that
finished. Without the environment variable it does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.gpu_record import write_json

_tests: list[dict] = []


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("PROMPTFLEET_PYTEST_JSON")
    if not path:
        return
    # One entry per test: its call, or the setup that failed or skipped it.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "error" if report.when == "setup" and report.failed else report.outcome
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.failed:
            message = report.longreprtext[-2000:]
        _tests.append(
            {
                "name": report.nodeid,
                "outcome": outcome,
                "seconds": round(report.duration, 3),
                "message": message,
            }
        )
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for t in _tests:
            counts[t["outcome"]] += 1
        write_json(Path(path), {"counts": counts, "tests": _tests})
