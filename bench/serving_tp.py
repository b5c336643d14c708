"""Tensor-parallel serving: throughput and per-rank memory of one replica of N ranks vs one process.

    python -m bench.serving_tp                 # N=1 and N=3 on SmolLM2-135M (fp32), side by side
    python -m bench.serving_tp --ranks 1 3 --rounds 3 --requests 24 --quick

Each configuration runs in its own fresh process (`--one N`), so its memory numbers start from an
empty process: the engine (rank 0) and, for N > 1, ranks 1..N-1 as child processes over gloo. A
round sends a mixed batch at once (generations of 3 tasks, greedy, and classifications) and times
it to the last answer; the first round warms up and is not counted. Memory per rank: the weights
it holds (its shards; `serving.tensor_parallel.local_bytes`) over the whole model's, the target
being <= 1/N + 10 %, and the private memory its load added at its peak (file pages excluded).
Every configuration's greedy tokens are compared with the first's.

On a 2-core CPU, N=3 runs 3 processes on 2 cores and every layer adds two all-reduces: it is
slower, and this benchmark says by how much. It measures; it does not decide anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_info, markdown_table, write_result

TASKS = {
    "summary": {"kind": "generation", "template": "Dialogue: {dialogue}\nSummary:", "max_new_tokens": 32},
    "answer": {"kind": "generation", "template": "Question: {q}\nAnswer:", "max_new_tokens": 32},
    "sentiment": {
        "kind": "classification",
        "template": "Review: {text}\nSentiment:",
        "verbaliser": {"0": " negative", "1": " positive"},
    },
}
TEXTS = [
    "Anna: lunch at noon? Ben: sure, the usual place",
    "What is the capital of Peru and how high is it above the sea?",
    "Carl: the train is late again. Dina: I will wait at the station cafe",
    "Why do leaves change colour in autumn?",
    "Eve: the meeting moved to three. Finn: fine, I will tell the others",
    "How many legs does a spider have?",
]


def write_store(root: Path, backbone: str) -> Path:
    from transformers import AutoConfig

    from tuner.export import TaskAdapter, save_adapter

    cfg = AutoConfig.from_pretrained(backbone)
    g = torch.Generator().manual_seed(0)
    for name, meta in TASKS.items():
        prompt = torch.randn(16, cfg.hidden_size, generator=g) * 0.05
        save_adapter(root, TaskAdapter(name, prompt, backbone, dict(meta)), cfg)
    return root


async def _round(engine, requests: int, max_tokens: int, tag: str) -> tuple[dict, int]:
    from serving.types import GenerationRequest, SamplingParams

    async def gen(i: int):
        task = "summary" if i % 2 else "answer"
        req = GenerationRequest(
            f"{tag}-{i}", task, TEXTS[i % len(TEXTS)], SamplingParams(max_tokens=max_tokens, temperature=0.0)
        )
        return [t async for out in engine.generate(req) for t in out.token_ids]

    async def cls(i: int):
        return (await engine.classify("sentiment", TEXTS[i % len(TEXTS)])).labels

    n_cls = requests // 3
    outs = await asyncio.gather(*(gen(i) for i in range(requests - n_cls)), *(cls(i) for i in range(n_cls)))
    tokens = outs[: requests - n_cls]
    return {"tokens": tokens, "probs": outs[requests - n_cls :]}, sum(len(t) for t in tokens)


def run_one(ranks: int, rounds: int, requests: int, max_tokens: int, threads: int) -> dict:
    """One configuration in this (fresh) process: load, warm up, time `rounds` rounds."""
    from serving.engine import Engine, EngineConfig
    from serving.tensor_parallel import PeakAnon, full_bytes, local_bytes
    from tuner.model.model_cache import resolve_backbone

    backbone = resolve_backbone("smollm2-135m")
    store = write_store(Path(tempfile.mkdtemp(prefix="tp-bench-")) / "store", backbone)
    cfg = EngineConfig(
        backbone=backbone,
        prompt_store=str(store),
        dtype="fp32",
        threads=threads,
        tensor_parallel=ranks,
        reload_interval_s=3600.0,
        request_timeout_s=3600.0,
    )
    started = time.perf_counter()
    with PeakAnon() as anon:
        engine = Engine(cfg)
    load_s = time.perf_counter() - started
    if ranks == 1:
        model = engine.runner.model
        memory = [
            {
                "rank": 0,
                "weight_bytes": local_bytes(model),
                "full_weight_bytes": full_bytes(model),
                "anon_peak_bytes": anon.peak,
            }
        ]
    else:
        memory = [
            {
                "rank": m.rank,
                "weight_bytes": m.weight_bytes,
                "full_weight_bytes": m.full_weight_bytes,
                "anon_peak_bytes": m.anon_peak_bytes,
            }
            for m in engine.runner.memory
        ]

    import psutil

    procs = [psutil.Process()] + [psutil.Process(pid) for pid in getattr(engine.runner, "pids", [])]

    def cpu_s() -> float:  # every rank's process CPU time: what the other agents' load cannot inflate
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    async def main():
        await engine.start()
        try:
            outputs, _ = await _round(engine, requests, max_tokens, "warm")
            times, counts, cpu = [], [], -cpu_s()
            for r in range(rounds):
                t0 = time.perf_counter()
                _, n = await _round(engine, requests, max_tokens, f"r{r}")
                times.append(time.perf_counter() - t0)
                counts.append(n)
            return outputs, times, counts, cpu + cpu_s()
        finally:
            await engine.stop()

    outputs, times, counts, cpu = asyncio.run(main())
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "load_s": load_s,
        "round_s": times,
        "tokens_per_round": counts,
        "tokens_per_s": sum(counts) / sum(times),
        "requests_per_s": rounds * requests / sum(times),
        "cpu_ms_per_token": 1000 * cpu / sum(counts),  # all ranks' CPU, idle polling included
        "memory": memory,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 3], help="replica sizes to compare")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (after 1 warm-up)")
    p.add_argument(
        "--requests", type=int, default=18, help="requests per round (a third are classifications)"
    )
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per generation")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (0: cores // N, at least 1)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: results go to a temp dir")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child: one configuration
    args = p.parse_args(argv)
    cores = machine_info()["cores"] or 1
    if args.one is not None:
        threads = args.threads or max(1, cores // args.one)
        print(json.dumps(run_one(args.one, args.rounds, args.requests, args.max_tokens, threads)))
        return 0
    results = []
    for n in args.ranks:
        cmd = [sys.executable, "-m", "bench.serving_tp", "--one", str(n), "--rounds", str(args.rounds)]
        cmd += [
            "--requests",
            str(args.requests),
            "--max-tokens",
            str(args.max_tokens),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results[0]
    rows = []
    for r in results:
        worst = max(m["weight_bytes"] / m["full_weight_bytes"] for m in r["memory"])
        peak = max(m["anon_peak_bytes"] / m["full_weight_bytes"] for m in r["memory"])
        same = r["outputs"]["tokens"] == base["outputs"]["tokens"]
        prob = max(
            abs(a[k] - b[k])
            for x, y in zip(r["outputs"]["probs"], base["outputs"]["probs"])
            for a, b in [(x, y)]
            for k in a
        )
        r.update(weight_ratio=worst, peak_ratio=peak, same_tokens=same, max_prob_diff=prob)
        target = 1 / r["ranks"] + 0.10
        rows.append(
            [
                r["ranks"],
                r["threads_per_rank"],
                r["tokens_per_s"],
                r["requests_per_s"],
                r["tokens_per_s"] / base["tokens_per_s"],
                r["cpu_ms_per_token"],
                max(m["weight_bytes"] for m in r["memory"]) / 2**20,
                f"{worst:.3f} (target <= {target:.3f}: {'met' if worst <= target else 'NOT met'})",
                f"{peak:.3f}",
                "yes" if same else "NO",
                f"{prob:.1e}",
            ]
        )
    header = [
        "N",
        "threads/rank",
        "tokens/s",
        "requests/s",
        "vs N=1",
        "CPU ms/token",
        "weights/rank MB",
        "weights/rank ÷ model",
    ]
    header += ["load peak ÷ model", "same greedy tokens", "max prob diff"]
    print(markdown_table(header, rows))
    for r in results:
        del r["outputs"]
    write_result("serving_tp", {"args": vars(args), "results": results}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
