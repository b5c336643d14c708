"""`bench.gpu_quality` on CPU: the GGUF's two halves join to the same bytes or are refused, the data lands
where the task configs look, the seeds' command is issue 39's 300 x 16 setup, and the seed loop keeps
every finished seed's result in `--out` within its budget (real subprocesses standing in for
`bench.quality`, which the GPU machine runs), and a second call skips the seeds already recorded.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from bench import gpu_quality
from bench.quality import parse_args as quality_args


def test_halves_join_to_the_same_bytes_or_are_refused(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 1001)
    a, b = tmp_path / "a" / "m.1", tmp_path / "b" / "m.2"
    cut = gpu_quality.split_file(src, (a, b))
    assert a.stat().st_size == cut and a.stat().st_size + b.stat().st_size == src.stat().st_size
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert gpu_quality.sha256(src) == digest
    target = tmp_path / "pkg" / "model.gguf"
    gpu_quality.join_file((a, b), target, src.stat().st_size, digest)
    assert target.read_bytes() == src.read_bytes()
    b.write_bytes(b.read_bytes()[:-1])  # cut short: refused, nothing left behind
    with pytest.raises(ValueError, match="expected"):
        gpu_quality.join_file((a, b), tmp_path / "other.gguf", src.stat().st_size, digest)
    assert not list((tmp_path).glob("other.gguf*"))
    a.unlink()  # the first call's half never arrived (the machine went cold in between)
    with pytest.raises(FileNotFoundError, match="carry gpu-quality/part-a in the call before"):
        gpu_quality.join_file((a, b), target, src.stat().st_size, digest)


def test_data_is_placed_only_where_absent(tmp_path):
    carried = tmp_path / "carried"
    for task in gpu_quality.TASKS:
        (carried / task).mkdir(parents=True)
        (carried / task / "train.jsonl").write_text(f'{{"task": "{task}"}}\n')
    shared = tmp_path / "shared"
    (shared / "data" / "cb").mkdir(parents=True)  # a checkout with ../shared keeps its own
    assert gpu_quality.place_data(carried, shared) == f"placed rte in {shared / 'data'}"
    assert not (shared / "data" / "cb" / "train.jsonl").exists()
    assert (shared / "data" / "rte" / "train.jsonl").read_text() == '{"task": "rte"}\n'
    assert gpu_quality.place_data(carried, shared).endswith("already has them")


def test_each_seed_runs_issue_39s_second_size():
    args = gpu_quality.parse_args(["--seeds", "3"])
    argv = gpu_quality.quality_argv(args, 3)
    assert argv[1:3] == ["-m", "bench.quality"]
    q, tasks, methods, seeds = quality_args(argv[3:])
    assert (tasks, methods, seeds) == (["cb", "rte"], ["ulpt"], [3])
    assert (q.steps, q.batch_size, q.lr_grid, q.peft_lr_grid) == (300, 16, [0.03, 0.1, 0.3], [0.03, 0.1])
    assert q.out == gpu_quality.RESULT and q.resume  # a seed cut off by one call continues in the next
    dry = gpu_quality.parse_args(["--dry-run"])
    q = quality_args(gpu_quality.quality_argv(dry, 1)[3:])[0]
    assert (q.steps, q.batch_size, q.out) == (2, 2, "gpu_quality_dry_run")  # never the real result
    for bad in (["--seeds", "x"], ["--seeds", ","], ["--budget-s", "0"]):
        with pytest.raises(SystemExit):
            gpu_quality.parse_args(bad)


class StepClock:
    """A clock that advances one second each time it is read: the budget the seed loop counts is the
    test's, whatever the machine's load makes of the stand-in processes' real time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_seed_loop_keeps_each_finished_seed_and_stops_inside_its_budget(tmp_path, monkeypatch):
    """A stand-in for bench.quality that adds its seed to the result file (seed 2 fails, seed 3 never
    ends): the results folder holds the file after each seed, and the summary says how each ended.
    With the step clock, seed 1 starts with 12 s of its 13 s budget left, seed 2 with 9, seed 3 with 6
    (its real timeout: it hangs, so it always times out) and seed 4 with 3, under the 5 s any seed needs."""
    result = tmp_path / "repo" / "bench" / "results" / f"{gpu_quality.RESULT}.json"
    result.parent.mkdir(parents=True)
    script = (
        "import json, os, sys, time; seed = int(sys.argv[1]); path = sys.argv[2]\n"
        "if seed == 2: sys.exit(3)\n"
        "if seed == 3: time.sleep(3600)\n"
        "old = json.load(open(path))['setup']['seeds'] if os.path.exists(path) else []\n"
        "json.dump({'setup': {'seeds': old + [seed]}}, open(path, 'w'))\n"
    )
    monkeypatch.setattr(gpu_quality, "REPO", tmp_path / "repo")
    monkeypatch.setattr(
        gpu_quality, "quality_argv", lambda a, s: [sys.executable, "-c", script, str(s), str(result)]
    )
    args = gpu_quality.parse_args(["--seeds", "1,2,3,4", "--budget-s", "13"])
    out, summary = tmp_path / "out", {"seeds": []}
    out.mkdir()
    gpu_quality.run_seeds(args, {}, out, summary, 0.0, clock=StepClock())
    status = [(s["seed"], s["status"]) for s in summary["seeds"]]
    assert status == [(1, "ok"), (2, "failed"), (3, "failed"), (4, "skipped")]
    assert summary["seeds"][1]["rc"] == 3 and summary["seeds"][2]["rc"] == "timeout"
    assert summary["seeds"][3]["note"] == "3 s left"
    assert json.loads((out / result.name).read_text())["setup"]["seeds"] == [1]
    assert json.loads((out / "summary.json").read_text())["seeds"][:2] == summary["seeds"][:2]
    assert "===== seed 3" in (out / "log.txt").read_text()

    again = {"seeds": []}  # the next call: seed 1 is kept, not run again
    gpu_quality.run_seeds(
        gpu_quality.parse_args(["--seeds", "1,4"]), {}, out, again, gpu_quality.time.monotonic()
    )
    assert [(s["seed"], s["status"]) for s in again["seeds"]] == [(1, "ok"), (4, "ok")]
    assert "earlier call" in again["seeds"][0]["note"]
    assert json.loads(result.read_text())["setup"]["seeds"] == [1, 4]
