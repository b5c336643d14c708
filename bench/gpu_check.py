"""`make gpu-check`: the one prepared command for a GPU run; every result lands as JSON in one folder.

    python3 -m bench.gpu_check --out DIR        # on the GPU machine (DIR: --out, else $OUT, else gpu-results)
    python -m bench.gpu_check --prepare gpu-carry   # here, before: what must travel with the repo

Sections run one after another, each in its own process with a hard time limit, so a failure or
a hang in one never stops the next; the total stays under `--budget-s` (default 465 s, inside the
8-minute budget; the 2026-11-30 H200 run took 72 / 45 / 81 s for tests / train / serve on the 135M
and 1.1B configs, and the 8B-shaped config adds ~16 GB of weights built on the device per section).
The serving baselines (PEFT per task, `generate` one at a time) are rates, timed on 4 tasks / 4
requests per config. What the folder holds afterwards (at most 6 files):

* `summary.json`: environment (torch, CUDA device, transformers, kernels available, the varlen
  kernel's causal alignment), per section its status, seconds and exit code, the test counts, and
  the benchmark ratios against their targets. Rewritten after every section.
* `pytest.json`: every GPU test (tests/gpu) with outcome, seconds and failure message, rewritten
  after each test (`bench.gpu_pytest_plugin`), so a killed session keeps what finished.
* `train.json`, `serve.json`: `bench.gpu_train`, `bench.gpu_serve` (each rewritten per measurement).
* `log.txt`: the sections' stdout and stderr.

Wheels: packages missing on the GPU machine travel as wheels in `gpu-carry/wheels/` (carried,
git-ignored) and are installed with pip into a private target before the sections run. The set is
`WHEELS` (`datasets` and two of its packages: nothing else the GPU tier imports is missing there);
`--prepare` downloads it and copies the SmolLM2 tokenizer files (~3.5 MB, no weights) into
`gpu-carry/tokenizer/`. To change the set, edit `WHEELS` and rerun `--prepare` (keep one version per package).

`--dry-run` runs the same pipeline on a CPU at toy sizes (GPU tests skip), to test this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.gpu_record import write_json

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "gpu-carry"
SITE = Path(tempfile.gettempdir()) / "promptfleet-gpu-site"
# name==version of every wheel the GPU machine lacks (pure Python or manylinux cp312 builds): `datasets`
# (+ its two packages not in that image) for the recipe's task loading in tests/gpu/test_train_step.py;
# versions whose pins accept that image's huggingface-hub 1.x. ~0.9 MB in all.
WHEELS: tuple[str, ...] = ("datasets==4.4.1", "dill==0.4.0", "multiprocess==0.70.18")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# tests/gpu files in the order they run: the FlexAttention compile last
TEST_FILES = ("test_kernels.py", "test_train_step.py", "test_serving.py", "test_kernels_flex.py")


@dataclass
class Section:
    """One step of the run: a command with its own time limit."""

    name: str
    argv: list[str]
    budget_s: float
    status: str = "pending"  # pending | ok | failed | timeout | skipped
    returncode: int | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class Plan:
    out: Path
    sections: list[Section] = field(default_factory=list)
    env: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-results", help="results folder")
    ap.add_argument("--budget-s", type=float, default=465.0, help="total seconds for all sections")
    ap.add_argument("--wheels", default=str(CARRY / "wheels"), help="folder of wheels to install first")
    ap.add_argument("--sections", default="tests,train,serve", help="comma-separated: tests, train, serve")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks this script, not the GPU")
    ap.add_argument("--prepare", metavar="DIR", help="write the carried folder (tokenizer, wheels) and exit")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"tests", "train", "serve", ""}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; expected tests, train, serve")
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    return args


def find_wheels(folder: str | os.PathLike) -> list[Path]:
    """The wheels in `folder` (none if it is absent). Two versions of one package stop pip: refused here."""
    folder = Path(folder)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    names: dict[str, Path] = {}
    for w in wheels:
        name = w.name.split("-")[0].lower().replace("_", "-")
        if name in names:
            raise ValueError(f"two wheels of {name} in {folder}: {names[name].name}, {w.name}")
        names[name] = w
    return wheels


def install_wheels(wheels: list[Path], target: Path = SITE) -> str:
    """pip-install `wheels` into `target` (no index, no deps); return a one-line note."""
    if not wheels:
        return "no wheels to install"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    subprocess.run(cmd, check=True, timeout=120)
    return f"installed {len(wheels)} wheel(s) into {target}"


def environment() -> dict:
    """What the machine offers: versions, device, and which packed-attention kernels can run."""
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for pkg in ("transformers", "peft", "safetensors", "flash-attn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    from tuner.model import attention

    env["varlen_attn"] = attention.varlen_available()
    if env["varlen_attn"]:
        env["varlen_params"] = sorted(attention.varlen_params())
    if env["cuda"]:
        device = torch.device("cuda", 0)
        env["device"] = torch.cuda.get_device_name(device)
        env["auto_kernel"] = attention.pick_kernel("auto", device)
        for kernel in ("varlen", "flash_attention_2"):
            try:
                env[f"{kernel}_bottom_right"] = attention.aligns_bottom_right(kernel, device)
            except Exception as e:  # recorded: the tests say what fails
                env[f"{kernel}_bottom_right"] = f"{type(e).__name__}: {e}"[:300]
    return env


def plan(args: argparse.Namespace, out: Path) -> Plan:
    """The sections to run, with their commands and time limits."""
    py, want = sys.executable, args.sections.split(",")
    tests = [str(REPO / "tests" / "gpu" / f) for f in TEST_FILES]
    sections = []
    if "tests" in want:
        argv = [py, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-p", "bench.gpu_pytest_plugin"]
        sections.append(Section("tests", argv + ["--timeout", "90", *tests], 125))
    if "train" in want:
        argv = [py, "-m", "bench.gpu_train", "--out", str(out / "train.json"), "--budget-s", "10"]
        if args.dry_run:
            argv += ["--configs", "tiny", "--device", "cpu", "--kernels", "sdpa", "--steps", "2"]
            argv += ["--matmul-n", "256", "--examples", "12", "--pipeline-configs", "tiny"]
        sections.append(Section("train", argv, 170))
    if "serve" in want:
        argv = [py, "-m", "bench.gpu_serve", "--out", str(out / "serve.json")]
        if args.dry_run:
            argv += ["--configs", "tiny", "--device", "cpu", "--tasks", "3", "--per-task", "1"]
            argv += ["--max-tokens", "2", "--baseline-tasks", "1", "--baseline-requests", "1"]
        else:
            argv += ["--baseline-tasks", "4", "--baseline-requests", "4"]
        sections.append(Section("serve", argv, 170))
    return Plan(out, sections)


def run_section(section: Section, log, env: dict, deadline: float) -> None:
    """Run `section` within min(its budget, what is left before `deadline`); record how it ended."""
    limit = min(section.budget_s, deadline - time.monotonic())
    if limit < 5:
        section.status, section.note = "skipped", "no time left in the total budget"
        return
    log.write(f"\n===== {section.name}: {' '.join(section.argv)} (limit {limit:.0f}s)\n")
    log.flush()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            section.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit
        )
        section.returncode = proc.returncode
        section.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        section.status, section.note = "timeout", f"killed after {limit:.0f}s"
    section.seconds = round(time.monotonic() - t0, 1)


def summarize(p: Plan, started: float) -> dict:
    """The summary: environment, sections, test counts and the benchmarks' ratios vs their targets."""
    summary = {
        "env": p.env,
        "seconds": round(time.monotonic() - started, 1),
        "sections": [asdict(s) for s in p.sections],
    }
    tests = p.out / "pytest.json"
    if tests.is_file():
        summary["tests"] = json.loads(tests.read_text())["counts"]
    for name in ("train", "serve"):
        path = p.out / f"{name}.json"
        if path.is_file():
            sections = json.loads(path.read_text()).get("sections", {})
            summary[name] = {
                "errors": {k: v.get("error") for k, v in sections.items() if v.get("status") == "error"},
                "summaries": {k: v.get("result") for k, v in sections.items() if k.endswith("/summary")},
            }
    return summary


def download_wheels(wheels: tuple[str, ...], folder: Path) -> None:
    """pip-download `wheels` (name==version) for the GPU image's CPython 3.12 on x86-64 into `folder`."""
    if not wheels:
        return
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", platform]
    subprocess.run([*cmd, "-d", str(folder), *wheels], check=True)


def prepare(folder: str) -> int:
    """Fill the carried folder: SmolLM2 tokenizer files, and the wheels in `WHEELS` (downloaded with pip)."""
    from tuner.model.model_cache import resolve_backbone

    root = Path(folder)
    src = Path(resolve_backbone("smollm2-135m"))
    tok = root / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tok / name)
    download_wheels(WHEELS, root / "wheels")
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"{root}: {size / 2**20:.1f} MiB (carry limit 64 MiB)")
    return 0 if size < 60 * 2**20 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    started = time.monotonic()
    deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(REPO)]
    try:
        note = install_wheels(find_wheels(args.wheels))
        if SITE.is_dir():
            paths.insert(0, str(SITE))
    except (ValueError, subprocess.SubprocessError) as e:
        note = f"wheels not installed: {e}"
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PROMPTFLEET_PYTEST_JSON"] = str(out / "pytest.json")  # bench.gpu_pytest_plugin: after every test
    if (CARRY / "tokenizer" / "tokenizer.json").is_file():
        env["PROMPTFLEET_GPU_TOKENIZER"] = str(CARRY / "tokenizer")
    p = plan(args, out)
    try:
        p.env = environment()
    except Exception as e:  # the sections still run and say more
        p.env = {"error": f"{type(e).__name__}: {e}"[:500]}
    p.env.update(wheels=note, dry_run=args.dry_run, budget_s=args.budget_s)
    write_json(out / "summary.json", summarize(p, started))
    with open(out / "log.txt", "a") as log:
        for section in p.sections:
            section.status = "running"
            write_json(out / "summary.json", summarize(p, started))
            run_section(section, log, env, deadline)
            write_json(out / "summary.json", summarize(p, started))
    summary = summarize(p, started)
    write_json(out / "summary.json", summary)
    print(
        json.dumps({k: summary.get(k) for k in ("seconds", "tests", "train", "serve")}, indent=1, default=str)
    )
    return 0 if all(s.status == "ok" for s in p.sections) else 1


if __name__ == "__main__":
    raise SystemExit(main())
