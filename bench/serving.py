"""Benchmark: many tasks served from one SmolLM2 backbone over HTTP, vs PEFT per-task serving and HF generate.

Setup: a prompt store of 512 task adapters (20 virtual tokens each, random prompts: speed does not
depend on their values), every task an SST-2-style classifier (template + verbaliser), so one
request list works for any number of tasks. Requests are real SST-2 dev sentences; each picks a
task uniformly and is, with equal odds, a short completion (max_tokens=8) or a classification.

* ours: `promptfleet serve` in a subprocess (uvicorn, real engine, API keys on), driven by an
  httpx async load generator with many concurrent clients on 127.0.0.1 (closed loop).
  - mixed-task (64 tasks) vs single-task throughput; the sweep over 1 / 8 / 64 / 512 tasks (PNG);
  - prefix KV cache on vs off: prefill tokens per request and streamed time to first token;
  - robustness: the same valid requests alone (A) and with 1,000 malformed requests spread evenly
    over the run (B), A/B/A/B, p99 over each condition's pooled latencies (`robustness_runs`). The
    malformed requests are pre-encoded bytes sent open loop on raw sockets: an httpx client spends
    more CPU per request than the server does rejecting it, on the same 2 cores.
* tenants (`--tenants`, run on its own, ~35 minutes; `--quick` ~4): first `acme`, within its quota,
  against `globex`: (a) 32 long streams that keep the batch full, (b) 32 loops of ~700-token
  classifications, (c) 20 loopback addresses x 60 idle and half-sent connections, each alternated
  with clean runs, on today's server (`--baseline-rev`, its tree from `git archive`) and then on
  ours, and acme alone on both (`bench.serving_tenants`, one side-by-side table). Then, on ours,
  tenant B's valid load beside tenant A flooding past its quota (max_concurrent) with valid
  requests and sending malformed and hostile-but-well-formed requests (extreme seeds and
  temperatures, oversized prompts, lone surrogates, unsupported parameters) plus slow-header
  clients, open loop on raw sockets: B alone and B under A, A/B/A/B, p99 over pooled latencies;
  B's outputs compared with its clean run (`two_tenant_runs`).
* a second, decode-heavier workload beside the issue's: the same 64-task requests with
  max_tokens=32 instead of 8, against the same two baselines, to show how the ratios move when
  batched decode dominates the work.
* PEFT per-task serving (in process, no HTTP: favours the baseline): one `PeftModel` holding every
  adapter in use; requests are grouped by task, `set_adapter(task)`, then one batched `generate`
  (left padding) for its completions and one batched forward for its classifications.
* HF generate one request at a time (in process): `generate(inputs_embeds=[prompt; text])`, and one
  forward for a classification; on a balanced half of the requests (as many completions as
  classifications, the mix of the whole run).

Before each measured run the server gets one classification per task in the mix, so the task
prefix KV cache is warm (steady state) as far as its LRU bound holds; the baselines likewise load
every adapter before their clocks start. Classification forwards compute logits at the last
position only (`logits_to_keep=1`), in the baselines as in the engine.

Baselines run after the server has stopped, so nothing else competes for the 2 cores. fp32, SDPA,
same threads everywhere. This module is not a test: it asserts nothing, it prints and records.
It holds the store, the baselines and the run; the server and the valid load are
`bench.serving_load`, the malformed, hostile and two-tenant load `bench.serving_attacks`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import REPO, machine_info, markdown_table, write_result
from bench.serving_attacks import robustness_runs, two_tenant_runs
from bench.serving_load import (
    ACME_LIMITS,
    FLOOD_LIMITS,
    MAX_TOKENS,
    TENANTS,
    Server,
    balanced,
    load,
    make_requests,
    tenants_yaml,
    warm_tasks,
    warm_up,
)
from bench.serving_tenants import (
    TenantSetup,
    TenantSizes,
    classify_inputs,
    server_runs,
    source_at,
    tenants_table,
)

DATA = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
META = {
    "kind": "classification",
    "template": "Review: {sentence}\nSentiment:",
    "verbaliser": {"0": " negative", "1": " positive"},
    "max_new_tokens": 8,
}
DECODE_HEAVY_MAX_TOKENS = 32  # the second, decode-heavier workload (same requests otherwise)
P = 20


# ------------------------------------------------------------------------------------ setup


def sentences(n: int) -> list[str]:
    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows[:n]]


def write_store(root: Path, n_tasks: int, tenants: tuple[str, ...] = ("bench", "flood")) -> Path:
    """`n_tasks` random task adapters under `root`/store, and `root`/tenants.yaml with `tenants`."""
    from transformers import AutoConfig

    from tuner.export import TaskAdapter, TaskMeta, save_adapter
    from tuner.model.model_cache import resolve_backbone

    cfg = AutoConfig.from_pretrained(resolve_backbone("smollm2-135m"))
    gen = torch.Generator().manual_seed(0)
    for i in range(n_tasks):
        prompt = torch.randn(P, cfg.hidden_size, generator=gen) * 0.02
        save_adapter(
            root / "store", TaskAdapter(f"task{i:03d}", prompt, "smollm2-135m", TaskMeta.from_dict(META)), cfg
        )
    (root / "tenants.yaml").write_text(tenants_yaml(tenants))
    return root / "store"


# ------------------------------------------------------------------------------------ in-process baselines


def baseline_requests(requests, tokenizer):
    from tuner.export import TaskMeta

    meta = TaskMeta.from_dict(META)
    return [
        (kind, task, tokenizer(meta.render(text), add_special_tokens=False).input_ids)
        for kind, task, text in requests
    ]


def peft_serving(store: Path, requests: list, backbone, tokenizer, max_tokens: int = MAX_TOKENS) -> dict:
    """One PeftModel with every adapter in use; per task: set_adapter, batched generate / forward."""
    from peft import PeftModel

    tasks = sorted({t for _, t, _ in requests})
    model = PeftModel.from_pretrained(backbone, str(store / tasks[0]), adapter_name=tasks[0])
    for t in tasks[1:]:
        model.load_adapter(str(store / t), adapter_name=t)
    model.eval()
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in META["verbaliser"].values()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups: dict[str, list] = {}
    for kind, task, ids in baseline_requests(requests, tokenizer):
        groups.setdefault(task, []).append((kind, ids))

    def left_padded(seqs):
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return ids, mask

    t0 = time.perf_counter()
    with torch.inference_mode():
        for task, items in groups.items():
            model.set_adapter(task)
            gen = [ids for kind, ids in items if kind == "complete"]
            cls = [ids for kind, ids in items if kind == "classify"]
            if gen:
                ids, mask = left_padded(gen)
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            if cls:
                ids, mask = left_padded(cls)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
                torch.softmax(logits[:, label_ids], dim=-1)
    return _throughput(len(requests), time.perf_counter() - t0, max_tokens)


def _throughput(requests: int, wall: float, max_tokens: int) -> dict:
    return {"requests": requests, "wall_s": wall, "req_s": requests / wall, "max_tokens": max_tokens}


def hf_one_at_a_time(store: Path, requests: list, backbone, tokenizer, max_tokens: int = MAX_TOKENS) -> dict:
    """Plain `generate` per request: [task prompt; text] as inputs_embeds, no batching, no cache reuse."""
    from tuner.export import load_adapter

    embed = backbone.get_input_embeddings()
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in META["verbaliser"].values()]
    prompts = {t: load_adapter(store / t).prompt for t in {t for _, t, _ in requests}}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        for kind, task, ids in baseline_requests(requests, tokenizer):
            x = torch.cat([prompts[task], embed(torch.tensor(ids))])[None]
            if kind == "complete":
                backbone.generate(
                    inputs_embeds=x,
                    attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            else:
                torch.softmax(backbone(inputs_embeds=x, logits_to_keep=1).logits[0, -1, label_ids], dim=-1)
    return _throughput(len(requests), time.perf_counter() - t0, max_tokens)


# ------------------------------------------------------------------------------------ the benchmark


def plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in sweep)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [sweep[str(k)]["req_s"] for k in ks], "o-", label="promptfleet (HTTP, mixed batches)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tasks in the request mix")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M, 2-core CPU, max_tokens=8")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: few requests and tasks, nothing recorded"
    )
    ap.add_argument("--requests", type=int, default=64, help="requests per measured run")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--port", type=int, default=18777)
    ap.add_argument(
        "--robust-requests", type=int, default=400, help="valid requests per robustness run (p99 needs many)"
    )
    ap.add_argument("--robust-pairs", type=int, default=2, help="clean/malformed run pairs (A/B/A/B)")
    ap.add_argument(
        "--tenants",
        action="store_true",
        help="only the tenant runs: acme's three attacks on globex (today vs ours), then the two-tenant run",
    )
    ap.add_argument("--tenant-requests", type=int, default=120, help="tenant B's valid requests per run")
    ap.add_argument("--globex-requests", type=int, default=16, help="globex's requests per run (4 clients)")
    ap.add_argument("--attack-pairs", type=int, default=2, help="clean / attacked pairs per attack")
    ap.add_argument(
        "--baseline-rev",
        default="65fe3c7",
        help="today's server for the attacks (a git revision; '' skips it)",
    )
    return ap


@dataclass
class Sizes:
    """How much the run sends: the requests per measured run and the task mixes it measures."""

    requests: int  # valid requests per measured run
    task_counts: list[int]  # the task sweep: tasks in the request mix
    mixed_tasks: int  # the mixed-task run compared with the baselines
    malformed: int  # malformed requests per robustness run
    robust_requests: int  # valid requests per robustness run

    @classmethod
    def of(cls, args) -> Sizes:
        if args.quick:
            return cls(24, [1, 8], 8, 50, 24)
        return cls(args.requests, [1, 8, 64, 512], 64, 1000, args.robust_requests)


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.tenants:
        return tenants_main(args)
    size = Sizes.of(args)
    n, mixed_k = size.requests, size.mixed_tasks
    root = Path(tempfile.mkdtemp(prefix="promptfleet-bench-serving-"))
    texts = sentences(400)
    store = write_store(root, max(size.task_counts))
    print(f"prompt store: {max(size.task_counts)} tasks under {store}")
    out: dict = {
        "benchmark": "serving",
        "quick": args.quick,
        "requests_per_run": n,
        "concurrency": args.concurrency,
        "max_tokens": MAX_TOKENS,
        "num_virtual_tokens": P,
    }
    sweep, heavy, robustness, prefix_cache = ours_runs(args, size, root, store, texts)
    hf, peft, hf_heavy, peft_heavy = baseline_runs(store, make_requests(n, mixed_k, texts, seed=mixed_k))
    ours = sweep[str(mixed_k)]
    out.update(
        {
            "task_sweep": sweep,
            "mixed_tasks": mixed_k,
            "mixed_vs_single": ours["req_s"] / sweep["1"]["req_s"],
            "peft_per_task": peft,
            "vs_peft": ours["req_s"] / peft["req_s"],
            "hf_one_at_a_time": hf,
            "vs_hf_generate": ours["req_s"] / hf["req_s"],
            "prefix_cache": prefix_cache,
            "robustness": robustness,
            "decode_heavy": {
                "max_tokens": DECODE_HEAVY_MAX_TOKENS,
                "ours": heavy,
                "peft_per_task": peft_heavy,
                "hf_one_at_a_time": hf_heavy,
                "vs_peft": heavy["req_s"] / peft_heavy["req_s"],
                "vs_hf_generate": heavy["req_s"] / hf_heavy["req_s"],
            },
        }
    )
    print(comparison_table(out))
    if not args.quick:
        png = REPO / "bench" / "results" / "serving_tasks.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(sweep, png)
        out["plot"] = str(png.relative_to(REPO))
    write_result("serving", out, args.quick)
    return out


def ours_runs(args, size: Sizes, root: Path, store: Path, texts: list[str]) -> tuple[dict, dict, dict, dict]:
    """Our server over HTTP: the task sweep, the decode-heavy workload, robustness and prefill / TTFT
    with the prefix KV cache on; then prefill / TTFT with it off (a second server).

    Returns (sweep by task count, decode-heavy run, robustness, prefix cache {"on", "off"}).
    """
    n, mixed_k = size.requests, size.mixed_tasks
    with Server(root, store, args.port) as srv:
        warm_up(srv.url, max(size.task_counts), texts)
        sweep = {}
        for k in size.task_counts:
            warm_tasks(srv.url, k, texts)
            before = srv.metrics()
            run = load(srv.url, make_requests(n, k, texts, seed=k), args.concurrency)
            after = srv.metrics()
            run["prefix_cache_hit_rate"] = _rate(before, after)
            run.pop("_latencies"), run.pop("_junk"), run.pop("_outputs")
            sweep[str(k)] = run
            print(
                f"  {k:>3} tasks: {run['req_s']:.2f} req/s  p50 {run['p50_ms']:.0f} ms  p99 {run['p99_ms']:.0f} ms  "
                f"statuses {run['statuses']}  prefix hit rate {run['prefix_cache_hit_rate']:.2f}"
            )
        warm_tasks(srv.url, mixed_k, texts)  # the 512-task run evicted some of them
        heavy = load(
            srv.url,
            make_requests(n, mixed_k, texts, seed=mixed_k),
            args.concurrency,
            max_tokens=DECODE_HEAVY_MAX_TOKENS,
        )
        heavy.pop("_latencies"), heavy.pop("_junk"), heavy.pop("_outputs")
        print(
            f"  {mixed_k} tasks, max_tokens {DECODE_HEAVY_MAX_TOKENS}: {heavy['req_s']:.2f} req/s  "
            f"p50 {heavy['p50_ms']:.0f} ms  p99 {heavy['p99_ms']:.0f} ms  statuses {heavy['statuses']}  "
            f"{heavy['tokens_per_completion']:.1f} tokens/completion"
        )
        robustness = robustness_runs(
            srv,
            texts,
            mixed_k,
            max(size.task_counts),
            size.robust_requests,
            size.malformed,
            args.robust_pairs,
            args.concurrency,
        )
        print(f"  robustness: { {k: v for k, v in robustness.items() if k != 'runs'} }")
        ttft_on = _prefill_and_ttft(srv, n, mixed_k, texts)
    with Server(root, store, args.port + 1, "engine.prefix_cache=false") as srv:
        warm_up(srv.url, mixed_k, texts)
        ttft_off = _prefill_and_ttft(srv, n, mixed_k, texts)
    print(f"  prefix cache on: {ttft_on}\n  prefix cache off: {ttft_off}")
    return sweep, heavy, robustness, {"on": ttft_on, "off": ttft_off}


def baseline_runs(store: Path, mixed_requests: list) -> tuple[dict, dict, dict, dict]:
    """The in-process baselines, after the server has gone, at both workloads' max_tokens.

    Returns (HF one at a time, PEFT per task, the same two at the decode-heavy max_tokens).
    """
    from tuner.model.backbone import load_backbone, load_tokenizer
    from tuner.model.model_cache import resolve_backbone

    path = resolve_backbone("smollm2-135m")
    tokenizer = load_tokenizer(path)
    backbone = load_backbone(path, torch.float32, "sdpa", torch.device("cpu"))
    hf_n = max(8, len(mixed_requests) // 2)
    hf = hf_one_at_a_time(store, balanced(mixed_requests, hf_n), backbone, tokenizer)
    print(f"  HF generate, one at a time ({hf_n} requests): {hf['req_s']:.2f} req/s")
    peft = peft_serving(store, mixed_requests, backbone, tokenizer)
    print(f"  PEFT per-task serving: {peft['req_s']:.2f} req/s")
    hf_heavy = hf_one_at_a_time(
        store, balanced(mixed_requests, hf_n), backbone, tokenizer, DECODE_HEAVY_MAX_TOKENS
    )
    peft_heavy = peft_serving(store, mixed_requests, backbone, tokenizer, DECODE_HEAVY_MAX_TOKENS)
    print(
        f"  max_tokens {DECODE_HEAVY_MAX_TOKENS}: HF one at a time {hf_heavy['req_s']:.2f} req/s, "
        f"PEFT per task {peft_heavy['req_s']:.2f} req/s"
    )
    return hf, peft, hf_heavy, peft_heavy


def comparison_table(out: dict) -> str:
    """Ours mixed and single-task against both baselines, at both workloads, with the targets."""
    sweep, dh, mixed_k = out["task_sweep"], out["decode_heavy"], out["mixed_tasks"]
    ours, heavy, peft, hf = sweep[str(mixed_k)], dh["ours"], out["peft_per_task"], out["hf_one_at_a_time"]
    rows = [
        [
            f"ours, {mixed_k} tasks mixed (HTTP)",
            ours["req_s"],
            f"{ours['p50_ms']:.0f} / {ours['p99_ms']:.0f}",
            "1.00x",
            heavy["req_s"],
            f"{heavy['p50_ms']:.0f} / {heavy['p99_ms']:.0f}",
            "1.00x",
        ],
        [
            "ours, 1 task (HTTP)",
            sweep["1"]["req_s"],
            f"{sweep['1']['p50_ms']:.0f} / {sweep['1']['p99_ms']:.0f}",
            f"mixed/single {out['mixed_vs_single']:.2f} (target >= 0.9)",
            "",
            "",
            "",
        ],
        [
            "PEFT, set_adapter + batched generate per task (in process)",
            peft["req_s"],
            "",
            f"ours/PEFT {out['vs_peft']:.1f}x (target >= 5x)",
            dh["peft_per_task"]["req_s"],
            "",
            f"ours/PEFT {dh['vs_peft']:.1f}x",
        ],
        [
            "HF generate, one request at a time (in process)",
            hf["req_s"],
            "",
            f"ours/HF {out['vs_hf_generate']:.1f}x (target >= 10x)",
            dh["hf_one_at_a_time"]["req_s"],
            "",
            f"ours/HF {dh['vs_hf_generate']:.1f}x",
        ],
    ]
    heads = [f"max_tokens {MAX_TOKENS}: req/s", "p50 / p99 ms", "ratio"]
    heads += [f"max_tokens {DECODE_HEAVY_MAX_TOKENS}: req/s", "p50 / p99 ms", "ratio"]
    return markdown_table(["method", *heads], rows)


def tenants_main(args) -> dict:
    """The tenant runs on 8 tasks, written to bench/results/serving_tenants.json: acme's attacks on
    globex on today's server and on ours (never both at once), then the two-tenant run on ours."""
    from tuner.export import TaskMeta

    n = 16 if args.quick else args.tenant_requests
    root = Path(tempfile.mkdtemp(prefix="promptfleet-bench-tenants-"))
    texts, n_tasks = sentences(400), 8
    store = write_store(root, n_tasks, tuple(TENANTS))
    sizes = TenantSizes.of(args)
    inputs, lengths = classify_inputs(
        sentences(872), sizes.loops, sizes.input_tokens, TaskMeta.from_dict(META).render
    )
    setup = TenantSetup(sizes, texts, n_tasks, inputs, lengths)
    print(f"machine: {machine_info()['cpu']}; acme's inputs {min(lengths)}-{max(lengths)} tokens; {sizes}")
    today = None
    if args.baseline_rev:
        with source_at(args.baseline_rev) as src, Server(root, store, args.port + 1, src=src) as srv:
            today = server_runs(srv, setup, args.baseline_rev)
    with Server(root, store, args.port) as srv:
        ours = server_runs(srv, setup, "ours", alone_first=True)
        result = two_tenant_runs(
            srv, texts, n_tasks, n, 1 if args.quick else args.robust_pairs, args.concurrency, args.quick
        )
    out = {"benchmark": "serving_tenants", "quick": args.quick, "flood_limits": FLOOD_LIMITS, **result}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    out["attacks"] = {
        "baseline_rev": args.baseline_rev,
        "acme_limits": ACME_LIMITS,
        "sizes": vars(sizes),
        "acme_input_tokens": lengths,
        "today": today,
        "ours": ours,
        "globex_outputs_same_as_today": today
        and sum(a == b for a, b in zip(ours["globex_outputs"], today["globex_outputs"])),
    }
    print(tenants_table(today, ours, args.baseline_rev or "not run", sizes))
    write_result("serving_tenants", out, args.quick)
    return out


def _rate(before: dict, after: dict) -> float:
    hits = after.get("promptfleet_prefix_cache_hits_total", 0) - before.get(
        "promptfleet_prefix_cache_hits_total", 0
    )
    miss = after.get("promptfleet_prefix_cache_misses_total", 0) - before.get(
        "promptfleet_prefix_cache_misses_total", 0
    )
    return hits / (hits + miss) if hits + miss else float("nan")


def _prefill_and_ttft(srv: Server, n: int, n_tasks: int, texts: list[str]) -> dict:
    """Prefill tokens per request (server counter) and streamed TTFT at moderate load (8 clients)."""
    reqs = [(kind, task, text) for kind, task, text in make_requests(n, n_tasks, texts, seed=7)]
    before = srv.metrics()
    load(srv.url, reqs, 8)
    after = srv.metrics()
    prefill = after["promptfleet_prefill_tokens_total"] - before["promptfleet_prefill_tokens_total"]
    # The engine counts text tokens; a prefix-cache miss also runs the task's P prompt positions.
    misses = after.get("promptfleet_prefix_cache_misses_total", 0) - before.get(
        "promptfleet_prefix_cache_misses_total", 0
    )
    streamed = [
        ("complete", task, text, True) for _, task, text in make_requests(n // 2, n_tasks, texts, seed=8)
    ]
    run = load(srv.url, streamed, 8)
    return {
        "prefill_text_tokens_per_request": prefill / n,
        "prefill_positions_per_request": (prefill + P * misses) / n,
        "ttft_p50_ms": run["ttft_p50_ms"],
        "stream_p50_ms": run["p50_ms"],
        "req_s": run["req_s"],
        "hit_rate": _rate(before, after),
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
