"""`bench.gpu_check` on CPU: arguments, the wheel set, JUnit -> JSON, time limits and the summary file.

The GPU sections themselves run on a GPU machine (`make gpu-check`); here the pipeline runs with
real subprocesses (pytest on a small generated test file, a command that overruns its limit).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_check
from bench.gpu_record import Recorder


def test_arguments_and_defaults(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args([])
    assert args.out == "gpu-results" and args.budget_s == 465 and args.sections == "tests,train,serve"
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gpu_check.parse_args([]).out == "/tmp/device-out"
    assert gpu_check.parse_args(["--out", "x"]).out == "x"
    for bad in (["--sections", "tests,bogus"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2


def test_plan_orders_sections_and_bounds_the_total(tmp_path):
    plan = gpu_check.plan(gpu_check.parse_args(["--out", str(tmp_path)]), tmp_path)
    assert [s.name for s in plan.sections] == ["tests", "train", "serve"]
    assert sum(s.budget_s for s in plan.sections) <= 465 < 8 * 60
    tests = plan.sections[0].argv
    assert tests[-1].endswith("test_kernels_flex.py")  # the slow compile runs last
    assert all((gpu_check.REPO / "tests" / "gpu" / f).is_file() for f in gpu_check.TEST_FILES)
    only = gpu_check.plan(gpu_check.parse_args(["--sections", "serve", "--dry-run"]), tmp_path)
    assert [s.name for s in only.sections] == ["serve"] and "cpu" in only.sections[0].argv


def test_wheel_set(tmp_path):
    assert gpu_check.find_wheels(tmp_path / "absent") == []
    assert gpu_check.install_wheels([]) == "no wheels to install"
    (tmp_path / "peft-0.17.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "safetensors-0.6.2-cp38-abi3-manylinux_2_17_x86_64.whl").write_bytes(b"")
    assert [w.name.split("-")[0] for w in gpu_check.find_wheels(tmp_path)] == ["peft", "safetensors"]
    (tmp_path / "peft-0.18.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="two wheels of peft"):
        gpu_check.find_wheels(tmp_path)
    pinned = [w.split("==")[0] for w in gpu_check.WHEELS]
    assert len(set(pinned)) == len(pinned) and all("==" in w for w in gpu_check.WHEELS)


def test_pytest_results_are_written_after_every_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): assert 1\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skip(): pass\n"
    )
    out = tmp_path / "pytest.json"
    env = dict(os.environ, PROMPTFLEET_PYTEST_JSON=str(out), PYTHONPATH=str(gpu_check.REPO))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_pytest_plugin"]
    subprocess.run(cmd + ["test_sample.py"], cwd=tmp_path, env=env, capture_output=True)
    report = json.loads(out.read_text())
    assert report["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    bad = next(t for t in report["tests"] if t["name"].endswith("test_bad"))
    assert bad["outcome"] == "failed" and "one is not two" in bad["message"]
    assert (
        next(t for t in report["tests"] if t["name"].endswith("test_skip"))["message"] == "Skipped: not here"
    )


def test_a_section_past_its_limit_is_killed_and_the_next_still_runs(tmp_path):
    slow = gpu_check.Section("slow", [sys.executable, "-c", "import time; time.sleep(30)"], budget_s=6)
    fine = gpu_check.Section("fine", [sys.executable, "-c", "print('hi')"], budget_s=30)
    late = gpu_check.Section("late", [sys.executable, "-c", "pass"], budget_s=30)
    with open(tmp_path / "log.txt", "w") as log:
        t0 = time.monotonic()
        gpu_check.run_section(slow, log, {}, deadline=t0 + 60)
        gpu_check.run_section(fine, log, {}, deadline=t0 + 60)
        gpu_check.run_section(late, log, {}, deadline=time.monotonic() + 2)  # total budget spent
    assert (slow.status, fine.status, late.status) == ("timeout", "ok", "skipped")
    assert slow.seconds < 20 and "hi" in (tmp_path / "log.txt").read_text()


def test_recorder_keeps_going_after_a_failing_section(tmp_path):
    rec = Recorder(tmp_path / "r.json", benchmark="x")
    with rec.section("a") as out:
        out["v"] = 1
    with rec.section("b") as out:
        raise RuntimeError("boom\nsecond line")
    with rec.section("c") as out:
        out["v"] = 3
    data = json.loads((tmp_path / "r.json").read_text())
    assert [data["sections"][k]["status"] for k in "abc"] == ["ok", "error", "ok"]
    assert data["sections"]["b"]["error"] == "RuntimeError: boom" and data["sections"]["c"]["result"] == {
        "v": 3
    }


def test_summary_reads_the_section_files(tmp_path):
    plan = gpu_check.plan(gpu_check.parse_args(["--sections", "train"]), tmp_path)
    rec = Recorder(tmp_path / "train.json")
    with rec.section("tiny/summary") as out:
        out["speedup_varlen_vs_peft"] = 3.5
    with rec.section("tiny/peft"):
        raise ValueError("no peft")
    summary = gpu_check.summarize(plan, time.monotonic())
    assert summary["train"]["summaries"] == {"tiny/summary": {"speedup_varlen_vs_peft": 3.5}}
    assert summary["train"]["errors"] == {"tiny/peft": "ValueError: no peft"}
    assert summary["sections"][0]["name"] == "train" and summary["sections"][0]["status"] == "pending"


def test_the_8b_config_has_llama_3_8b_shape_and_parameter_count():
    """Built on the meta device (no memory); the count is computed here from the shape, layer by layer."""
    import torch

    from bench import gpu_train
    from bench.gpu_models import CONFIGS, llama

    model = llama("llama-8b", torch.bfloat16, "meta")
    V, H, F, layers, heads, kv, D = 128256, 4096, 14336, 32, 32, 8, 128
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (V, H, F, layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (heads, kv, D)
    attention = H * heads * D + 2 * H * kv * D + heads * D * H  # q, k, v, o
    mlp = 3 * H * F  # gate, up, down
    norms = 2 * H
    expected = V * H + layers * (attention + mlp + norms) + H + V * H  # embeddings, final norm, untied head
    assert sum(p.numel() for p in model.parameters()) == expected == 8_030_261_248
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "meta" and not p.requires_grad for p in model.parameters())
    assert not CONFIGS["llama-8b"]["tie_word_embeddings"]
    assert "llama-8b" in gpu_train.DEFAULT_CONFIGS.split(",")  # measured by default
