"""A tenant within its quota (`acme`) against another tenant (`globex`): three attacks, today vs ours.

Run by `bench/serving.py --tenants`. Each attack alternates with clean runs (clean, attacked, clean,
attacked: `pairs`), on today's server (the tree of `--baseline-rev`, extracted with `git archive`)
and then on ours (this checkout), never both at once:
* (a) acme holds 32 streaming completions (its max_concurrent = engine.max_batch_size) of
  max_tokens 512 on a prompt that keeps generating, each reopened as soon as it ends: a full batch;
* (b) acme runs 32 closed loops of /v1/classify on ~700-token inputs (SST-2 sentences joined),
  within its token quota;
* (c) 20 loopback addresses (127.0.0.2-21) x 60 connections, half idle and half with a request
  line sent and nothing more, each reopened when the server closes it (or after 9 s).
globex's load is the same list in every run: 4-token completions and short classifications on SST-2
sentences, greedy, 4 clients (closed loop). An attack starts first, reaches full strength (every
stream has its first token; the first classification is back; every connection opened once), and
is stopped when globex's list is done, so a run lasts as long as globex's requests take.

Measured per attack and server: globex's statuses, p50 / p99 latency over the pooled runs of each
condition and their ratio, its outputs against the server's first clean run; acme's statuses and
throughput (tokens/s under (a): engine tokens minus globex's; classifications/s under (b)); and the
engine's own numbers, from /metrics scraped before and after each run with the operator key:
globex's p99 queue wait in engine steps (`promptfleet_tenant_queue_wait_steps`), the mean engine
step (`promptfleet_engine_step_seconds`) and preemptions per tenant. A series the server does not
export (today's server) is None. And acme alone, (a) and (b) one round per client: its throughput
on ours against today's (run last on today's server and first on ours, so that the two lie close in
time on a machine whose speed drifts). Every run also records the cores the server process kept
busy and the load average, to tell a slow engine from a machine shared with other work.

This module neither writes results nor runs the older two-tenant run (a flood past its quota and
hostile requests, `bench.serving_attacks.two_tenant_runs`): `bench.serving.tenants_main` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from bench.common import REPO, markdown_table
from bench.serving_attacks import closed_loops, hold_connections
from bench.serving_load import (
    ACME_KEY,
    ACME_LIMITS,
    GLOBEX_KEY,
    Series,
    Server,
    load_async,
    make_requests,
    warm_tasks,
    warm_up,
)
from bench.stats import median, percentile

QUEUE_WAIT = "promptfleet_tenant_queue_wait_steps"  # histogram, label tenant
STEP_SECONDS = "promptfleet_engine_step_seconds"  # histogram, no labels
PREEMPTIONS = "promptfleet_tenant_preemptions_total"  # counter, label tenant
TOKENS = "promptfleet_tokens_generated_total"
GLOBEX_CLIENTS, GLOBEX_MAX_TOKENS = 4, 4
STREAM_PROMPT = "Once upon a time"  # sent raw: a greedy story that runs on (tokens per stream are reported)
ATTACKS = ("a", "b", "c")

Attack = Callable[..., Awaitable[dict]]  # (stop, ready, rounds=None) -> the attacker's numbers


@dataclass
class TenantSizes:
    """How much each run sends."""

    globex_requests: int  # globex's fixed request list, per run
    pairs: int  # clean / attacked pairs per attack
    stream_tokens: int  # max_tokens of acme's streams in (a)
    alone_reps: int  # repetitions of acme alone, (a) and (b) each
    loops: int  # acme's closed loops of classifications in (b)
    streams: int = ACME_LIMITS["max_concurrent"]  # acme's streams in (a): a full batch
    input_tokens: int = 700  # acme's classification inputs in (b)
    addresses: int = 20  # (c): source addresses 127.0.0.2, ...
    per_address: int = 60  # (c): connections from each

    @classmethod
    def of(cls, args) -> TenantSizes:
        if args.quick:  # a smoke run: shorter streams, fewer long classifications
            return cls(8, 1, 64, 1, 8)
        return cls(args.globex_requests, args.attack_pairs, 512, 2, 32)


@dataclass
class TenantSetup:
    """What every server of the comparison is sent."""

    sizes: TenantSizes
    texts: list[str]  # SST-2 sentences, for globex's requests and the warm-up
    n_tasks: int
    inputs: list[str]  # acme's long classification inputs
    input_tokens: list[int]  # their prompt tokens after the task template

    def requests(self) -> list[tuple[str, str, str]]:
        return make_requests(self.sizes.globex_requests, self.n_tasks, self.texts, seed=34)


# ------------------------------------------------------------------------------------ setup


@contextlib.contextmanager
def source_at(rev: str) -> Iterator[Path]:
    """The repository's tree at `rev` in a temporary directory, removed afterwards. `git archive`
    reads the object store only: no worktree is registered, nothing in the repository changes."""
    tmp = Path(tempfile.mkdtemp(prefix="promptfleet-baseline-"))
    try:
        tree = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True)
        if tree.returncode:
            raise RuntimeError(f"--baseline-rev {rev}: git archive failed: {tree.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=tree.stdout, check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def classify_inputs(
    sentences: list[str], n: int, tokens: int, render: Callable[[str], str]
) -> tuple[list[str], list[int]]:
    """`n` inputs of at least `tokens` tokens, SST-2 sentences joined (input j starts at sentence
    7j), each checked against the server's limits. Returns the inputs and their templated lengths."""
    from serving.config import ApiConfig, EngineConfig
    from tuner.model.backbone import load_tokenizer
    from tuner.model.model_cache import resolve_backbone

    tok = load_tokenizer(resolve_backbone("smollm2-135m"))
    max_tokens, max_chars = EngineConfig().max_prompt_tokens, ApiConfig().max_prompt_chars
    inputs, lengths = [], []
    for j in range(n):
        parts, i = [], 7 * j
        while len(tok(" ".join(parts), add_special_tokens=False).input_ids) < tokens:
            parts.append(sentences[i % len(sentences)])
            i += 1
        text = " ".join(parts)
        length = len(tok(render(text), add_special_tokens=False).input_ids)
        if length > max_tokens or len(text) > max_chars:
            raise ValueError(f"input {j}: {length} tokens, {len(text)} chars: over the server's limits")
        inputs.append(text)
        lengths.append(length)
    return inputs, lengths


def attacks(url: str, setup: TenantSetup) -> dict[str, Attack]:
    """Each attack as `attack(stop, ready, rounds=None)` (rounds: per client, for acme alone)."""
    size = setup.sizes
    stream = {"prompt": STREAM_PROMPT, "raw": True, "max_tokens": size.stream_tokens, "stream": True}
    stream |= {"temperature": 0.0, "stop": [], "stream_options": {"include_usage": True}}
    streams = [{"model": f"task{i % setup.n_tasks:03d}", **stream} for i in range(size.streams)]
    classify = [
        {"model": f"task{i % setup.n_tasks:03d}", "input": setup.inputs[i % len(setup.inputs)]}
        for i in range(size.loops)
    ]
    host, port = httpx.URL(url).host, httpx.URL(url).port
    addresses = [f"127.0.0.{2 + i}" for i in range(size.addresses)]
    return {
        "a": partial(closed_loops, url, ACME_KEY, "/v1/completions", streams, ready_after=len(streams)),
        "b": partial(closed_loops, url, ACME_KEY, "/v1/classify", classify, ready_after=1),
        "c": partial(hold_connections, host, port, addresses, size.per_address),
    }


# ------------------------------------------------------------------------------------ engine numbers


def series_diff(before: Series, after: Series) -> Series:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def histogram_buckets(series: Series, name: str, **labels: str) -> dict[float, float] | None:
    """Cumulative counts by upper bound (`le`, +Inf included) of histogram `name`, summed over the
    series whose labels include `labels`; None when the server exports no such series."""
    want, out = set(labels.items()), {}
    for (sample, lab), value in series.items():
        if sample == f"{name}_bucket" and want <= set(lab):
            le = float(dict(lab)["le"])
            out[le] = out.get(le, 0.0) + value
    return out or None


def merge_buckets(histograms: list[dict[float, float] | None]) -> dict[float, float] | None:
    """The sum of several runs' bucket counts (None when none of them has the series)."""
    present = [h for h in histograms if h is not None]
    if not present:
        return None
    return {le: sum(h.get(le, 0.0) for h in present) for le in sorted({le for h in present for le in h})}


def bucket_percentile(buckets: dict[float, float] | None, q: float) -> float | None:
    """The smallest bucket bound whose cumulative count is at least q % of all observations (an upper
    bound on the q-th percentile); None for no series or no observations."""
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return None
    return next(le for le in sorted(buckets) if buckets[le] * 100 >= q * total)


def by_label(series: Series, name: str, label: str) -> dict[str, float] | None:
    """Counter `name` by the value of `label` (e.g. preemptions by tenant); None when not exported."""
    out = {
        dict(lab)[label]: v for (sample, lab), v in series.items() if sample == name and label in dict(lab)
    }
    return out or None


def engine_numbers(diff: Series) -> dict:
    """What one run did in the engine, from the /metrics difference across it."""
    steps = diff.get((f"{STEP_SECONDS}_count", ()))
    return {
        "queue_wait_steps": {t: histogram_buckets(diff, QUEUE_WAIT, tenant=t) for t in ("globex", "acme")},
        "step_seconds_sum": diff.get((f"{STEP_SECONDS}_sum", ())),
        "steps": steps,
        "preemptions": by_label(diff, PREEMPTIONS, "tenant"),
        "tokens_generated": diff.get((TOKENS, ()), 0.0),
    }


def mean_step_s(runs: list[dict]) -> float | None:
    """Mean engine step over runs (their step-time sums over their step counts)."""
    numbers = [r["engine"] for r in runs if r["engine"]["steps"]]
    if not numbers:
        return None
    return sum(e["step_seconds_sum"] for e in numbers) / sum(e["steps"] for e in numbers)


# ------------------------------------------------------------------------------------ runs

READY_TIMEOUT_S = 300.0  # an attack that is not at full strength by then is measured as it is


async def _beside(url: str, requests: list, attack: Attack | None) -> tuple[dict, dict | None]:
    """globex's list, alone, or once `attack` is at full strength (stopped when the list is done)."""
    globex = partial(load_async, url, requests, GLOBEX_CLIENTS, max_tokens=GLOBEX_MAX_TOKENS, key=GLOBEX_KEY)
    if attack is None:
        return await globex(), None
    stop, ready = asyncio.Event(), asyncio.Event()
    attacker = asyncio.ensure_future(attack(stop, ready))
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait([attacker, waiter], timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if attacker.done():
        attacker.result()  # what ended it early is raised here
    if not ready.is_set():
        print(
            f"  warning: the attack is not at full strength after {READY_TIMEOUT_S:.0f} s; measuring anyway"
        )
    run = await globex()
    stop.set()
    return run, await attacker


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid`'s main thread: in the server, uvicorn's event loop
    (HTTP, the API's awaits); the engine, torch's workers and the store loader run in other threads.
    Linux /proc; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _on_idle(srv: Server, work: Awaitable) -> tuple[object, Series, dict]:
    """Run `work` on an idle engine. Returns its result, the /metrics difference across it, and the
    cores the server process kept busy meanwhile (CPU seconds / wall seconds: about 2 on this 2-core
    machine while the engine is saturated and nothing else runs), its CPU seconds and its event loop's
    share of them (`main_thread_cpu_s`), with the 1-minute load average."""
    srv.wait_idle()
    before, cpu, t0 = srv.series(), srv.cpu_seconds(), time.perf_counter()
    loop_cpu = main_thread_cpu_s(srv.proc.pid)
    result = asyncio.run(work)
    cpu_s = srv.cpu_seconds() - cpu
    machine = {"server_cores": cpu_s / (time.perf_counter() - t0), "server_cpu_s": cpu_s}
    machine["event_loop_cpu_s"] = main_thread_cpu_s(srv.proc.pid) - loop_cpu
    return result, series_diff(before, srv.series()), {**machine, "load_avg_1m": os.getloadavg()[0]}


def measure(srv: Server, setup: TenantSetup, condition: str, attack: Attack | None = None) -> dict:
    """One run of globex's list (beside `attack`), with the engine's numbers across it."""
    (globex, attacker), diff, machine = _on_idle(srv, _beside(srv.url, setup.requests(), attack))
    return {
        "condition": condition,
        "globex": globex,
        "attack": attacker,
        "engine": engine_numbers(diff),
        **machine,
    }


def attack_runs(srv: Server, setup: TenantSetup, name: str, attack: Attack, label: str) -> list[dict]:
    """clean, attacked, clean, attacked, ... (`setup.sizes.pairs` pairs)."""
    runs = []
    for i in range(setup.sizes.pairs):
        clean, hit = measure(srv, setup, "clean"), measure(srv, setup, name, attack)
        runs += [clean, hit]
        print(
            f"  [{label}] ({name}) pair {i + 1}: globex clean p50/p99 {clean['globex']['p50_ms']:.0f}/"
            f"{clean['globex']['p99_ms']:.0f} ms | attacked {hit['globex']['p50_ms']:.0f}/"
            f"{hit['globex']['p99_ms']:.0f} ms, statuses {hit['globex']['statuses']} | server cores "
            f"{clean['server_cores']:.2f}/{hit['server_cores']:.2f} | attacker "
            f"{ {k: v for k, v in hit['attack'].items() if k not in ('stream_tokens', 'errors')} }",
            flush=True,
        )
    return runs


def acme_alone(srv: Server, kinds: dict[str, Attack], reps: int) -> dict:
    """acme's (a) and (b) with nothing else on the server, one round per client, `reps` times each:
    tokens/s (engine tokens over the wall time) and classifications/s, medians over reps; also per
    CPU second of the server (less sensitive to a neighbour taking cores, not to its cache use)."""

    async def one_round(attack: Attack) -> dict:
        return await attack(asyncio.Event(), asyncio.Event(), rounds=1)

    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(reps):
        for kind in runs:
            stats, diff, machine = _on_idle(srv, one_round(kinds[kind]))
            done = diff.get((TOKENS, ()), 0.0) if kind == "a" else stats["replies_200"]
            rate = done / stats["wall_s"]
            runs[kind].append({**stats, **machine, "rate": rate, "per_cpu_s": rate / machine["server_cores"]})
    a_tokens = [t for r in runs["a"] for t in r["stream_tokens"]]
    out = {
        "tokens_per_s": median([r["rate"] for r in runs["a"]]),
        "classifications_per_s": median([r["rate"] for r in runs["b"]]),
        "tokens_per_cpu_s": median([r["per_cpu_s"] for r in runs["a"]]),
        "classifications_per_cpu_s": median([r["per_cpu_s"] for r in runs["b"]]),
        "tokens_per_stream": sum(a_tokens) / len(a_tokens) if a_tokens else float("nan"),
        "statuses": dict(sum((Counter(r["statuses"]) for rs in runs.values() for r in rs), Counter())),
        "runs": runs,
    }
    print(
        f"  acme alone: {out['tokens_per_s']:.1f} tokens/s ({out['tokens_per_stream']:.0f} per stream), "
        f"{out['classifications_per_s']:.3f} classifications/s, statuses {out['statuses']}, server cores "
        f"{[round(r['server_cores'], 2) for rs in runs.values() for r in rs]}",
        flush=True,
    )
    return out


def server_runs(srv: Server, setup: TenantSetup, label: str, alone_first: bool = False) -> dict:
    """Every attack against one server and acme alone (after them, or before with `alone_first`:
    the second server starts with it, so that both servers' acme-alone runs lie close in time);
    summaries by attack ("a", "b", "c") and "acme_alone"."""
    warm_up(srv.url, setup.n_tasks, setup.texts)
    warm_tasks(srv.url, setup.n_tasks, setup.texts)
    kinds = attacks(srv.url, setup)
    out: dict = {}
    runs: list[dict] = []
    if alone_first:
        out["acme_alone"] = acme_alone(srv, kinds, setup.sizes.alone_reps)
    for name in ATTACKS:
        these = attack_runs(srv, setup, name, kinds[name], label)
        reference = runs[0]["globex"]["_outputs"] if runs else these[0]["globex"]["_outputs"]
        out[name] = summarize(name, these, reference)
        runs += these
    if not alone_first:
        out["acme_alone"] = acme_alone(srv, kinds, setup.sizes.alone_reps)
    out["globex_outputs"] = runs[0]["globex"]["_outputs"]
    out["up_after"] = httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    for r in runs:  # what goes to the JSON: no per-request lists
        r["globex"] = {k: v for k, v in r["globex"].items() if not k.startswith("_")}
    out["runs"] = runs
    return out


# ------------------------------------------------------------------------------------ summaries


def _statuses(runs: list[dict], who: str) -> dict:
    return dict(sum((Counter(r[who]["statuses"]) for r in runs), Counter()))


def summarize(name: str, runs: list[dict], reference: list) -> dict:
    """One attack's clean and attacked runs of one server: globex, acme and the engine."""
    clean = [r for r in runs if r["condition"] == "clean"]
    hit = [r for r in runs if r["condition"] == name]
    lat = {
        k: [x for r in rs for x in r["globex"]["_latencies"]]
        for k, rs in (("clean", clean), ("attacked", hit))
    }
    p = {(k, q): 1e3 * percentile(v, q) for k, v in lat.items() for q in (50, 99)}
    waits = {
        k: bucket_percentile(merge_buckets([r["engine"]["queue_wait_steps"]["globex"] for r in rs]), 99)
        for k, rs in (("clean", clean), ("attacked", hit))
    }
    preempted = [r["engine"]["preemptions"] for r in hit if r["engine"]["preemptions"] is not None]
    statuses = _statuses(hit, "globex")
    same = [o == ref for r in hit for o, ref in zip(r["globex"]["_outputs"], reference)]
    return {
        "globex_statuses_clean": _statuses(clean, "globex"),
        "globex_statuses_attacked": statuses,
        "globex_200_share_attacked": statuses.get(200, 0) / max(1, sum(statuses.values())),
        "globex_p50_ms_clean": p["clean", 50],
        "globex_p99_ms_clean": p["clean", 99],
        "globex_p50_ms_attacked": p["attacked", 50],
        "globex_p99_ms_attacked": p["attacked", 99],
        "globex_p50_ratio": p["attacked", 50] / p["clean", 50],
        "globex_p99_ratio": p["attacked", 99] / p["clean", 99],
        "globex_outputs_same_as_clean": sum(same),
        "globex_outputs_compared": len(same),
        "globex_queue_wait_p99_steps_clean": waits["clean"],
        "globex_queue_wait_p99_steps_attacked": waits["attacked"],
        "step_s_clean": mean_step_s(clean),
        "step_s_attacked": mean_step_s(hit),
        "server_cores_clean": median([r["server_cores"] for r in clean]),
        "server_cores_attacked": median([r["server_cores"] for r in hit]),
        "preemptions_attacked": dict(sum((Counter(x) for x in preempted), Counter())) if preempted else None,
        "acme": attacker_numbers(name, hit),
    }


def attacker_numbers(name: str, runs: list[dict]) -> dict:
    """acme's side of the attacked runs: statuses and throughput; (c): the connections' fate."""
    wall = sum(r["attack"]["wall_s"] for r in runs if "wall_s" in r["attack"])
    if name == "c":
        total = Counter()
        for r in runs:
            total.update({k: v for k, v in r["attack"].items() if isinstance(v, int)})
        answers = sum((Counter(r["attack"]["server_answers"]) for r in runs), Counter())
        return {**total, "server_answers": dict(answers)}
    out = {
        "statuses": _statuses(runs, "attack"),
        "transport_errors": sum(r["attack"]["transport_errors"] for r in runs),
        "errors": sum(len(r["attack"]["errors"]) for r in runs),
    }
    if name == "b":
        return {**out, "classifications_per_s": sum(r["attack"]["replies_200"] for r in runs) / wall}
    tokens = sum(r["engine"]["tokens_generated"] - r["globex"]["completion_tokens"] for r in runs)
    finished = [t for r in runs for t in r["attack"]["stream_tokens"]]
    return {
        **out,
        "tokens_per_s": tokens / wall,
        "streams_finished": len(finished),
        "tokens_per_finished_stream": sum(finished) / len(finished) if finished else None,
    }


def _num(x, spec: str = ".0f") -> str:
    return "None" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _attack_rows(name: str, s: dict) -> list[tuple[str, str, str]]:
    """(measure, value, target) for one server's summary `s` of attack `name`."""
    ms = lambda x: _num(x and 1e3 * x)  # noqa: E731 (seconds, or None, as ms)
    rows = [
        ("globex statuses, attacked", f"{s['globex_statuses_attacked']}", "all 200"),
        (
            "globex p50 / p99 ms, clean -> attacked",
            f"{s['globex_p50_ms_clean']:.0f} / {s['globex_p99_ms_clean']:.0f} -> "
            f"{s['globex_p50_ms_attacked']:.0f} / {s['globex_p99_ms_attacked']:.0f}",
            "",
        ),
        (
            "globex p99 (p50) attacked / clean",
            f"{s['globex_p99_ratio']:.2f}x ({s['globex_p50_ratio']:.2f}x)",
            "unchanged" if name == "c" else "<= 3x",
        ),
        (
            "globex outputs as clean",
            f"{s['globex_outputs_same_as_clean']}/{s['globex_outputs_compared']}",
            "all",
        ),
        (
            "server CPU cores busy, median (clean / attacked)",
            f"{s['server_cores_clean']:.2f} / {s['server_cores_attacked']:.2f}",
            "",
        ),
    ]
    acme = s["acme"]
    if name == "c":
        return rows + [
            (
                "attacker: connections opened / closed by server (answers)",
                f"{acme['opened']} / {acme['closed_by_server']} ({acme['server_answers']})",
                "",
            )
        ]
    rate = "tokens_per_s" if name == "a" else "classifications_per_s"
    rows += [
        (
            "globex queue wait p99, engine steps (clean / attacked)",
            f"{_num(s['globex_queue_wait_p99_steps_clean'])} / {_num(s['globex_queue_wait_p99_steps_attacked'])}",
            "attacked <= 2",
        ),
        (
            "mean engine step ms (clean / attacked)",
            f"{ms(s['step_s_clean'])} / {ms(s['step_s_attacked'])}",
            "",
        ),
        ("preemptions by tenant, attacked", f"{s['preemptions_attacked']}", ""),
        (
            f"acme {rate.replace('_per_s', '/s')} under attack (statuses)",
            f"{_num(acme[rate], '.2f')} ({acme['statuses']})",
            "",
        ),
    ]
    if name == "a":
        rows.append(("acme tokens per finished stream", _num(acme["tokens_per_finished_stream"]), ""))
    return rows


def tenants_table(today: dict | None, ours: dict, rev: str, size: TenantSizes) -> str:
    """Today's server and ours side by side, attack by attack, then acme alone."""
    names = {
        "a": f"(a) acme holds {size.streams} streams of max_tokens {size.stream_tokens}",
        "b": f"(b) acme: {size.loops} loops of ~{size.input_tokens}-token classifications",
        "c": f"(c) {size.addresses} addresses x {size.per_address} idle / half-sent connections",
    }
    rows = []
    for name in ATTACKS:
        rows.append([f"**{names[name]}**", "", "", ""])
        mine = _attack_rows(name, ours[name])
        theirs = _attack_rows(name, today[name]) if today else [(m, "-", t) for m, _, t in mine]
        rows += [[m, t, o, target] for (m, o, target), (_, t, _) in zip(mine, theirs)]
    alone = (
        ("tokens_per_s", "tokens_per_cpu_s", "(a) tokens/s"),
        ("classifications_per_s", "classifications_per_cpu_s", "(b) classifications/s"),
    )
    for key, per_cpu, what in alone:
        t, o = (today or {}).get("acme_alone", {}), ours["acme_alone"]
        ratio = f"; ours / today {o[key] / t[key]:.3f}, per CPU s {o[per_cpu] / t[per_cpu]:.3f}" if t else ""
        rows.append(
            [
                f"acme alone, {what} (per server CPU s)",
                f"{_num(t.get(key), '.2f')} ({_num(t.get(per_cpu), '.2f')})",
                f"{_num(o[key], '.2f')} ({_num(o[per_cpu], '.2f')})",
                f"within 5 %{ratio}",
            ]
        )
    tokens = [
        (today or {}).get("acme_alone", {}).get("tokens_per_stream"),
        ours["acme_alone"]["tokens_per_stream"],
    ]
    rows.append(
        ["acme alone, (a) tokens per finished stream", *(_num(t) for t in tokens), f"{size.stream_tokens}"]
    )
    if today:
        same = sum(a == b for a, b in zip(ours["globex_outputs"], today["globex_outputs"]))
        rows.append(
            [
                "globex outputs, first clean run, ours as today's",
                "",
                f"{same}/{len(ours['globex_outputs'])}",
                "",
            ]
        )
    return markdown_table(["measure", f"today ({rev})", "ours", "target"], rows)
