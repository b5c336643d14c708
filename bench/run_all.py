"""Run every benchmark in `bench/` in sequence: `python -m bench.run_all [--quick]`.

Benchmarks are the modules `bench/<name>.py` that define `main(argv)`, less the GPU run's
(`bench/gpu_*.py`: `make gpu-check` runs those on a GPU machine); the known ones run in the order
below (cheapest first), any others after them alphabetically. `--quick` is passed
through: a smoke run of a minute or two per benchmark whose numbers are not recorded.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

ORDER = ["train_throughput", "task_scaling", "quality", "serving"]
NOT_BENCHMARKS = {"__init__", "run_all", "common"}


def discover() -> list[str]:
    found = {p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("gpu_")}
    found -= NOT_BENCHMARKS
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: small and fast, results not recorded")
    ap.add_argument("--only", nargs="*", help="run only these benchmarks (module names)")
    args = ap.parse_args(argv)
    names = [n for n in discover() if not args.only or n in args.only]
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "main"):
            continue
        print(f"\n=== bench.{name} {'(quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        module.main(["--quick"] if args.quick else [])
        print(f"=== bench.{name} done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
