"""Benchmark: what sharding the frozen backbone costs. One process vs 2 ranks replicated vs 2 ranks ZeRO-3.

    python -m bench.zero_scaling [--steps 5] [--quick]

Each setting runs the real recipe (`configs/quickstart.yaml`'s shapes: SST-2 + AG News + TREC on
SmolLM2-135M, global batch 16, 160 tokens) in fresh processes: one, or two gloo ranks started with
torch.multiprocessing (as `tests/distributed/test_zero3_equivalence.py` does; Ray adds nothing to
the step itself). Every setting draws the same global batches (same sampler seed), so the losses
must agree; the benchmark checks that they do. Every process runs one torch thread: on a shared
2-core machine a 2-thread process spends its time waiting for OpenMP hand-offs (measured 80 s/step
under load against 13 s for two 1-thread ranks), so "1 process" is one core's worth of work.

Settings of one world size run side by side in the same processes, one step of each in turn, so
the load other users put on the machine falls on all of them alike.

Settings:
* `1 process` and `1 process + activation checkpointing` (the activation memory saved);
* `2 ranks, replicated` (`cluster.zero_stage=0`);
* `2 ranks, ZeRO-3 untuned`: what the recipe ran before (`tuner.model.zero.UNTUNED`: every weight
  partitioned, no DeepSpeed trace, so no prefetch and a second gather of every weight in backward);
* `2 ranks, ZeRO-3 tuned, bounded gathers` (`zero_max_live_parameters=2e7`,
  `zero_max_reuse_distance=0`): small weights resident and traced prefetch, but at most ~6 layers
  gathered at a time, so backward gathers every weight again (what a backbone far larger than a
  rank runs with);
* `2 ranks, ZeRO-3 tuned`: the `ClusterConfig` defaults (small weights resident, traced prefetch
  running ahead up to 1e9 elements: SmolLM2 is gathered once per step and stays whole during it).

Measured per setting: seconds per step (median of the timed steps, after one warm-up step), text
tokens/s, all-gather calls and bytes per step and rank (every `torch.distributed` all-gather is
wrapped and counted), the weights each rank holds (`partitioned_numel`), and, for the one-setting
processes (1 process, with and without checkpointing), the peak RSS during the steps above the RSS
after setup (VmHWM reset through /proc/self/clear_refs): the step's activation memory. Results: bench/results/zero_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common import REPO, write_result
from bench.ranks import GatherCounter, join_gloo, leave_gloo, reset_peak_rss, rss, run_ranks
from tuner.recipe import MultiTaskPromptTuningRecipe

MiB = 1024**2


@dataclass
class Setting:
    name: str
    world_size: int
    overrides: dict = field(default_factory=dict)  # cluster.* keys
    untuned: bool = False  # ZeRO-3 with tuner.model.zero.UNTUNED instead of the config's settings


SETTINGS = [
    Setting("1 process", 1),
    Setting("1 process + activation checkpointing", 1, {"activation_checkpointing": True}),
    Setting("2 ranks, replicated", 2, {"zero_stage": 0}),
    Setting("2 ranks, ZeRO-3 untuned (before)", 2, {"zero_stage": 3}, untuned=True),
    Setting(
        "2 ranks, ZeRO-3 tuned, bounded gathers",
        2,
        {"zero_stage": 3, "zero_max_live_parameters": 20_000_000, "zero_max_reuse_distance": 0},
    ),
    Setting("2 ranks, ZeRO-3 tuned", 2, {"zero_stage": 3}),
]


def _build(setting: Setting, rank: int, out: str, max_train: int) -> MultiTaskPromptTuningRecipe:
    from tuner.config import load_job_config
    from tuner.model.zero import UNTUNED

    overrides = [f"cluster.{k}={v}" for k, v in setting.overrides.items()] + [
        f"cluster.num_workers={setting.world_size}",
        f"output_dir={out}/runs",
        f"name=s{SETTINGS.index(setting)}r{rank}",
        f"data.max_train_examples={max_train}",
        "data.max_eval_examples=8",
        "eval_zero_shot=false",
        "model.dtype=fp32",
    ]
    recipe = MultiTaskPromptTuningRecipe(
        load_job_config(REPO / "configs" / "quickstart.yaml", overrides),
        progress=False,
        # the settings before tuning are not a config value
        zero_settings=UNTUNED if setting.untuned else None,
    )
    recipe.setup()
    return recipe


def _rank_main(rank: int, port: int, out: str, settings: list[Setting], steps: int, max_train: int) -> None:
    """Set up one recipe per setting in this process, then step them in turn (noise hits all alike)."""
    counter = GatherCounter()
    counter.install()  # before DeepSpeed binds its all-gather function
    import torch.distributed as dist

    from tuner.model.zero import partitioned_numel

    world_size = settings[0].world_size
    torch.set_num_threads(1)
    if world_size > 1:
        join_gloo(rank, world_size, port)
    rss_before_setup = rss("VmRSS")
    # Replicated first: a live HfDeepSpeedConfig would make transformers partition later loads.
    recipes = [_build(s, rank, out, max_train) for s in settings]
    results = []
    for recipe in recipes:
        local, total = partitioned_numel(recipe.lm.backbone)
        results.append(
            {
                "losses": [],
                "step_times_s": [],
                "step_cpu_s": [],
                "tokens": [],
                "gather_calls": 0,
                "gather_bytes": 0,
                "weights_held_mib": local * 4 / MiB,
                "weights_total_mib": total * 4 / MiB,
                "layout": recipe.backbone_layout.reason if recipe.backbone_layout else "",
            }
        )
    rss_after_setup = rss("VmRSS")
    reset_peak_rss()  # the peak below is the steps' own
    for step in range(steps + 1):  # step 0 warms up (DeepSpeed records its trace there)
        for recipe, res in zip(recipes, results):
            if world_size > 1:
                dist.barrier()
            calls, nbytes = counter.calls, counter.bytes
            t0, c0 = time.perf_counter(), time.process_time()
            m = recipe.train_step(recipe.sampler.next_batch())
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if step:
                res["step_times_s"].append(dt)
                res["step_cpu_s"].append(dc)
                res["losses"].append(float(m.loss))
                res["tokens"].append(int(m.tokens))
                res["gather_calls"] += counter.calls - calls
                res["gather_bytes"] += counter.bytes - nbytes
    for res in results:
        res["allgather_calls_per_step"] = res.pop("gather_calls") / steps
        res["allgather_mib_per_step"] = res.pop("gather_bytes") / steps / MiB
    process = {
        "rss_before_setup_mib": rss_before_setup / MiB,
        "rss_after_setup_mib": rss_after_setup / MiB,
        "peak_rss_during_steps_mib": rss("VmHWM") / MiB,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps({"settings": results, "process": process}))
    if world_size > 1:
        leave_gloo()


def run_group(settings: list[Setting], steps: int, max_train: int) -> list[dict]:
    """Run `settings` (same world size) side by side in one set of processes; one result per setting."""
    ranks = run_ranks(
        _rank_main,
        settings[0].world_size,
        (settings, steps, max_train),
        timeout_s=1800,
        what=str([s.name for s in settings]),
    )
    runs = []
    for k, setting in enumerate(settings):
        per_rank = [r["settings"][k] for r in ranks]
        step_s = statistics.median(max(r["step_times_s"][i] for r in per_rank) for i in range(steps))
        runs.append(
            {
                "setting": asdict(setting),
                "s_per_step": step_s,
                "text_tokens_per_s": statistics.median(per_rank[0]["tokens"]) / step_s,
                # CPU seconds of all ranks (gloo's threads included): steadier than wall time under load.
                "cpu_s_per_step_all_ranks": statistics.median(
                    sum(r["step_cpu_s"][i] for r in per_rank) for i in range(steps)
                ),
                "losses": per_rank[0]["losses"],
                "allgather_calls_per_step_per_rank": per_rank[0]["allgather_calls_per_step"],
                "allgather_mib_per_step_per_rank": per_rank[0]["allgather_mib_per_step"],
                "weights_held_mib_per_rank": [r["weights_held_mib"] for r in per_rank],
                "layout": per_rank[0]["layout"],
                "ranks": per_rank,
                "processes": [r["process"] for r in ranks],
            }
        )
    return runs


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--max-train", type=int, default=400, help="training examples loaded per task")
    ap.add_argument("--quick", action="store_true", help="2 steps, 3 settings; result not recorded")
    args = ap.parse_args(argv)
    steps = 2 if args.quick else args.steps
    settings = [SETTINGS[0], SETTINGS[1], SETTINGS[2], SETTINGS[-1]] if args.quick else SETTINGS
    load_before = _sh(["uptime"])
    groups = [
        [s for s in settings if s.world_size == 1 and not s.overrides],
        [s for s in settings if s.world_size == 2],
    ]
    # Activation memory is read from the process's peak RSS, so checkpointing gets its own process.
    groups += [[s] for s in settings if s.world_size == 1 and s.overrides]
    runs = []
    for group in groups:
        t0 = time.perf_counter()
        runs += run_group(group, steps, args.max_train)
        print(f"ran {[s.name for s in group]} in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in runs:
        p = r["processes"][0]
        r["step_memory_mib_rank0"] = p["peak_rss_during_steps_mib"] - p["rss_after_setup_mib"]
        print(
            f"{r['setting']['name']:46s} {r['s_per_step']:6.2f} s/step  "
            f"{r['cpu_s_per_step_all_ranks']:6.2f} CPU s  {r['allgather_calls_per_step_per_rank']:6.0f} gathers {r['allgather_mib_per_step_per_rank']:8.1f} MiB/step "
            f" weights held {r['weights_held_mib_per_rank'][0]:.0f} MiB",
            flush=True,
        )
    reference = runs[0]["losses"]
    for r in runs:
        # Same examples in every setting: only the reduction order differs between 1 and 2 ranks.
        r["max_loss_diff_vs_1_process"] = max(abs(a - b) for a, b in zip(r["losses"], reference))
    by_name = {r["setting"]["name"]: r for r in runs}
    replicated = by_name.get("2 ranks, replicated")
    tuned = by_name.get("2 ranks, ZeRO-3 tuned")
    summary = {}
    for name, r in by_name.items():
        if replicated and r["setting"]["world_size"] == 2 and r is not replicated:
            # Interleaved steps: the median of per-step ratios cancels most of the machine's load swings.
            ratios = [
                max(a["step_times_s"][i] for a in r["ranks"])
                / max(b["step_times_s"][i] for b in replicated["ranks"])
                for i in range(steps)
            ]
            summary[f"{name} / replicated, wall (median per-step ratio)"] = statistics.median(ratios)
            summary[f"{name} / replicated, CPU s"] = (
                r["cpu_s_per_step_all_ranks"] / replicated["cpu_s_per_step_all_ranks"]
            )
    if replicated and tuned:
        summary["target_met (tuned <= 1.5x replicated, wall)"] = (
            summary["2 ranks, ZeRO-3 tuned / replicated, wall (median per-step ratio)"] <= 1.5
        )
    summary["losses_identical (abs diff <= 1e-4)"] = all(
        r["max_loss_diff_vs_1_process"] <= 1e-4 for r in runs
    )
    print(json.dumps(summary, indent=2))
    write_result(
        "zero_scaling",
        {
            "steps": steps,
            "config": "configs/quickstart.yaml (global batch 16, max_seq_len 160, 16 virtual tokens), fp32",
            "uptime_before": load_before,
            "uptime_after": _sh(["uptime"]),
            "lscpu": _sh(["lscpu"]).splitlines()[:20],
            "summary": summary,
            "runs": runs,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
