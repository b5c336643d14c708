"""Benchmark: a ~3B-parameter Llama, ZeRO-3 over 2 CPU ranks, with and without parameter offload to CPU.

    python -m bench.zero_large [--steps 2] [--layers 28]

A randomly initialised Llama shaped like Llama-3.2-3B (hidden 3072, MLP 8192, 28 layers, 24/8 heads;
32k vocabulary to keep the embedding small) in bf16: about 2.9 B parameters, 5.8 GB. Each rank
builds it inside `deepspeed.zero.Init`, so every module is partitioned as it is created and no
rank ever holds the whole model; then the recipe's own pieces (`tuner.model.zero.wrap_backbone`,
`PromptTunedLM`, `collate`) run a few prompt-tuning steps on one short synthetic example per rank.

Recorded per rank: the RSS after partitioned construction and the peak RSS (VmHWM) over the steps,
both above the RSS before construction; step time; all-gather calls and bytes per step. The
benchmark checks that each rank's peak stays below 75 % of the full weights (half of them, plus
gather buffers bounded by `max_live_parameters`) and compares it with `tuner.model.memory.estimate` (what `promptfleet plan`
prints). Results: bench/results/zero_large.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.common import write_result
from bench.ranks import GatherCounter, join_gloo, leave_gloo, reset_peak_rss, rss, run_ranks

GiB = 1024**3
SEQ, VIRTUAL = 48, 8
LIVE = 150_000_000


def llama_3b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )


def _rank_main(rank: int, port: int, out: str, offload: str, steps: int, layers: int) -> None:
    counter = GatherCounter()
    counter.install()
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.model.zero import ZeroSettings, deepspeed_config, partitioned_numel, wrap_backbone
    from tuner.tasks.batching import TokenizedExample, collate

    torch.set_num_threads(1)
    join_gloo(rank, 2, port)
    # Gathers bounded to ~1.5 layers: with the default 1e9-element caps the prefetcher would run
    # ahead and keep up to 2 GB gathered.
    settings = ZeroSettings(max_live_parameters=LIVE, max_reuse_distance=0, offload_params=offload)
    ds = deepspeed_config(settings, torch.bfloat16)
    base = rss("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds, dtype=torch.bfloat16):
        model = AutoModelForCausalLM.from_config(llama_3b_config(layers), dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.eval()
    init_s = time.perf_counter() - t0
    wrap_backbone(model, ds)
    local, total = partitioned_numel(model)
    after_init, init_peak = rss("VmRSS"), rss("VmHWM")
    lm = PromptTunedLM(model)
    g = torch.Generator().manual_seed(rank)
    example = TokenizedExample("t", torch.randint(3, 32000, (SEQ - VIRTUAL - 1,), generator=g).tolist(), [5])
    batch = collate([example], {"t": 0}, VIRTUAL, max_len=SEQ, pad_id=0, packing=True, share_prompts=True)
    prompts = torch.randn(1, VIRTUAL, 3072, generator=g) * 0.02
    reset_peak_rss()
    times, calls, nbytes = [], [], []
    for step in range(steps + 1):  # step 0 records DeepSpeed's trace
        leaf = prompts.clone().requires_grad_(True)
        dist.barrier()
        c, b = counter.calls, counter.bytes
        t = time.perf_counter()
        lm(batch, leaf).loss.backward()
        dist.all_reduce(leaf.grad)
        if step:
            times.append(time.perf_counter() - t)
            calls.append(counter.calls - c)
            nbytes.append(counter.bytes - b)
    result = {
        "params_total": total,
        "params_held": local,
        "init_s": init_s,
        "rss_base_gib": base / GiB,
        "init_peak_above_base_gib": (init_peak - base) / GiB,
        "after_init_above_base_gib": (after_init - base) / GiB,
        "steps_peak_above_base_gib": (rss("VmHWM") - base) / GiB,
        "step_times_s": times,
        "allgather_calls_per_step": statistics.mean(calls),
        "allgather_gib_per_step": statistics.mean(nbytes) / GiB,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    leave_gloo()


def run(offload: str, steps: int, layers: int) -> list[dict]:
    # A fixed mmap threshold: freed gather buffers go back to the OS, so RSS follows the live tensors
    # instead of what glibc's heap keeps after its dynamic threshold has grown (read at process start).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return run_ranks(_rank_main, 2, (offload, steps, layers), timeout_s=1500, what=f"offload={offload}")


def main(argv: list[str] | None = None) -> None:
    from tuner.model.memory import BackboneShape, Workload, estimate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--offload", choices=("none", "cpu", "both"), default="both", help="parameter offload")
    ap.add_argument("--quick", action="store_true", help="4 layers, 1 step; result not recorded")
    args = ap.parse_args(argv)
    layers, steps = (4, 1) if args.quick else (args.layers, args.steps)
    shape = BackboneShape.from_config(llama_3b_config(layers).to_dict())
    mem = estimate(shape, Workload(SEQ, 1, 1, VIRTUAL, "bf16"), partition=2, max_live_parameters=LIVE)
    planned = (mem.weight_shard + mem.gathered_buffers + mem.activations) / GiB
    weights = mem.weights_replicated / GiB
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    runs = {}
    for offload in ("none", "cpu") if args.offload == "both" else (args.offload,):
        ranks = run(offload, steps, layers)
        peak = max(r["steps_peak_above_base_gib"] for r in ranks)
        runs[offload] = {
            "ranks": ranks,
            "s_per_step": statistics.median(max(r["step_times_s"][i] for r in ranks) for i in range(steps)),
            "max_rank_peak_gib": peak,
            "peak_over_weights": peak / weights,
            "plan_estimate_gib": planned,
            "measured_over_plan": peak / planned,
            "no_rank_near_whole_model": peak < 0.75 * weights,
        }
        print(
            f"offload={offload}: {runs[offload]['s_per_step']:.1f} s/step, peak/rank {peak:.2f} GiB "
            f"(weights {weights:.2f} GiB, plan {planned:.2f} GiB), init peaks "
            f"{[round(r['init_peak_above_base_gib'], 2) for r in ranks]} GiB, "
            f"{ranks[0]['allgather_calls_per_step']:.0f} gathers {ranks[0]['allgather_gib_per_step']:.2f} GiB/step",
            flush=True,
        )
    write_result(
        "zero_large" if args.offload == "both" else f"zero_large_offload_{args.offload}",
        {
            "model": f"random Llama, {shape.num_params / 1e9:.2f} B params, bf16, {layers} layers",
            "example": f"1 x {SEQ} tokens per rank ({VIRTUAL} virtual)",
            "uptime_before": load,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "weights_gib": weights,
            "runs": runs,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
