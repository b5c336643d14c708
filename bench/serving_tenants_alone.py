"""acme alone, (a) 32 streams x 512 tokens or (b) 32 loops of ~700-token classifications (one round a
run), today's server and ours alternated: the re-check of the "acme alone within 5 %" target of
`bench/serving.py --tenants`.

Both servers are loaded at once and only one works at a time; the order alternates each round, so a
machine whose speed drifts affects both alike. Prints each run and the median ratio, writes
bench/results/serving_tenants_alone_recheck.json (`_b.json` for (b)).
`python -m bench.serving_tenants_alone [--rounds 3] [--kind b]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from bench.common import write_result
from bench.serving import META, TENANTS, sentences, write_store
from bench.serving_load import Server, warm_tasks, warm_up
from bench.serving_tenants import (
    TOKENS,
    TenantSetup,
    TenantSizes,
    _on_idle,
    attacks,
    classify_inputs,
    source_at,
)
from tuner.export import TaskMeta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="today/ours pairs (default 3)")
    parser.add_argument("--baseline-rev", default="65fe3c7", help="today's commit (default 65fe3c7)")
    parser.add_argument("--port", type=int, default=18900)
    parser.add_argument(
        "--kind", choices=("a", "b"), default="a", help="(a) tokens/s of streams, (b) classifications/s"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="promptfleet-bench-alone-"))
    texts, n_tasks = sentences(400), 8
    store = write_store(root, n_tasks, tuple(TENANTS))
    sizes = TenantSizes(16, 2, 512, 1, 32)
    inputs, lengths = classify_inputs(
        sentences(872), sizes.loops, sizes.input_tokens, TaskMeta.from_dict(META).render
    )
    setup = TenantSetup(sizes, texts, n_tasks, inputs, lengths)
    runs: dict[str, list[dict]] = {"today": [], "ours": []}
    with (
        source_at(args.baseline_rev) as src,
        Server(root, store, args.port + 1, src=src) as today,
        Server(root, store, args.port) as ours,
    ):
        servers = {"today": today, "ours": ours}
        for srv in servers.values():
            warm_up(srv.url, n_tasks, texts)
            warm_tasks(srv.url, n_tasks, texts)
        for i in range(args.rounds):
            for name in ("today", "ours") if i % 2 == 0 else ("ours", "today"):
                srv = servers[name]
                work = attacks(srv.url, setup)[args.kind]
                stats, diff, machine = _on_idle(srv, work(asyncio.Event(), asyncio.Event(), rounds=1))
                done = diff.get((TOKENS, ()), 0.0) if args.kind == "a" else stats["replies_200"]
                rate = done / stats["wall_s"]
                run = {"tokens_per_s" if args.kind == "a" else "classifications_per_s": rate}
                run |= {"rate": rate, "server_cores": machine["server_cores"]}
                run["per_cpu_s"] = rate / run["server_cores"]
                run["cpu_s_per_item"] = machine["server_cpu_s"] / done  # item: a token or a classification
                run["event_loop_cpu_s"] = machine["event_loop_cpu_s"]
                run["load_avg_1m"] = machine["load_avg_1m"]
                runs[name].append(run)
                print(i, name, run, flush=True)
    today_rates = [r["rate"] for r in runs["today"]]
    ours_rates = [r["rate"] for r in runs["ours"]]
    out = {
        "baseline_rev": args.baseline_rev,
        "kind": args.kind,
        "runs": runs,
        "median_ratio": statistics.median(ours_rates) / statistics.median(today_rates),
        "pair_ratios": [o / t for t, o in zip(today_rates, ours_rates)],
        "per_cpu_s_pair_ratios": [
            o["per_cpu_s"] / t["per_cpu_s"] for t, o in zip(runs["today"], runs["ours"])
        ],
    }
    print(f"acme alone ({args.kind}): ours / today {out['median_ratio']:.3f} (pairs {out['pair_ratios']})")
    print(f"  per server CPU second, ours / today by pair: {out['per_cpu_s_pair_ratios']}")
    write_result("serving_tenants_alone_recheck" + ("_b" if args.kind == "b" else ""), out, False)
    return out


if __name__ == "__main__":
    main()
