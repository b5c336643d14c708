"""How the quickstart's settings were chosen: tuned vs zero-shot over seeds, for a few (steps, lr).

Each (lr, seed) runs `configs/quickstart.yaml` in one process (`promptfleet train --no-ray`: the same
updates as the 2-rank demo, which only splits each global batch between ranks) for `--steps` steps,
evaluating every task every `--eval-every` steps on `--eval` held-out examples (seeded subset), so one
run gives the scores at several step counts. Prints, per setting and step count, each task's
tuned - zero-shot gain as mean +- sd over seeds and its minimum; writes bench/results/quickstart_sweep.json.

    .venv/bin/python -m bench.quickstart_sweep --seeds 0 1 2 --lrs 0.03 0.05 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import machine_info, write_result
from cluster.launch import train_local
from tuner.config import load_job_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.03])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval", type=int, default=200, help="eval examples per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="smoke run: results to a temp dir, not recorded")
    args = ap.parse_args()

    runs = []
    for lr in args.lrs:
        for seed in args.seeds:
            out = tempfile.mkdtemp(prefix="pf-sweep-")
            cfg = load_job_config(
                REPO / "configs" / "quickstart.yaml",
                [
                    f"name=sweep-lr{lr}-s{seed}",
                    f"output_dir={out}",
                    "cluster.num_workers=1",
                    f"data.seed={seed}",
                    f"optim.lr={lr}",
                    f"optim.max_steps={args.steps}",
                    f"optim.batch_size={args.batch_size}",
                    f"eval_every={args.eval_every}",
                    f"data.max_eval_examples={args.eval}",
                    "checkpoint_every=0",
                ],
            )
            summary = train_local(cfg, progress=False)
            zero = {t: v["zero_shot"]["score"] for t, v in summary["tasks"].items()}
            evals = {e["step"]: e["scores"] for e in summary["evals"] if not e["zero_shot"]}
            runs.append({"lr": lr, "seed": seed, "zero_shot": zero, "tuned_at_step": evals})
            print(f"lr {lr} seed {seed}: zero-shot {zero}; tuned {evals}", flush=True)

    print("\n| lr | steps | task | gain mean | sd | min |\n|---|---:|---|---:|---:|---:|")
    table = []
    for lr in args.lrs:
        mine = [r for r in runs if r["lr"] == lr]
        for step in sorted(mine[0]["tuned_at_step"]):
            for task in mine[0]["zero_shot"]:
                gains = [r["tuned_at_step"][step][task] - r["zero_shot"][task] for r in mine]
                sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
                table.append({"lr": lr, "steps": step, "task": task, "gains": gains})
                print(
                    f"| {lr} | {step} | {task} | {statistics.mean(gains):+.3f} | {sd:.3f} | {min(gains):+.3f} |"
                )
    write_result(
        "quickstart_sweep",
        {"machine": machine_info(), "args": vars(args), "runs": runs, "gains": table},
        args.quick,
    )


if __name__ == "__main__":
    main()
