"""Benchmark: a fleet of tasks on the training side (issue 37): set-up, checkpoints, evaluation.

Synthetic task families are cut from SST-2 (`../shared/data/sst2/train.tsv`): task i of N takes
`--train-rows` consecutive train rows and `--eval-rows` more as its eval split (wrapping round the
file), all in one TSV per split with a `task` column and one family YAML (`tuner.tasks.family`).

    setup       job set-up of N tasks: `load_task_specs` (the table read once, every row checked)
                and `PreparedJob.load_data` (every task's examples, tokenised with SmolLM2's
                tokenizer); seconds and ms per task.
    eval        evaluation examples/s with the same eval examples in total over N tasks: every task at
                once (`evaluate_tasks`, examples of many tasks in each forward) and, up to
                `--per-task-up-to` tasks, one task at a time as before; SmolLM2-135M in fp32, or
                (`--eval-backbone tiny`) a random 2-layer Llama with its vocabulary; wall time and CPU
                time (one torch thread: CPU time is the work, whatever else loads the machine), and the
                positions the forwards computed beside the least any layout must (`bench.fleet_eval`).
    checkpoint  checkpoint bytes and seconds with N registered tasks and the same batch: a bank of
                N rows (SmolLM2's width, `--virtual-tokens` rows each), Adam state for every row (as
                after a long run), then `--steps-between` steps of `--batch` drawn tasks between
                checkpoints; deltas (`tuner.checkpoint`) and the full snapshot timed apart.

    export      a fleet's prompts (20 x 576) written as one packed store vs a PEFT directory per task:
                seconds, CPU seconds, bytes, files; the index's open time and a one-task re-export
                (`bench.fleet_export`; sizes up to 100,000, directories up to 10,000).

    serve       one server (`promptfleet serve`, SmolLM2) over a packed store of `--serve-tasks` tasks vs
                the backbone alone: seconds to ready, resident memory, p50/p99 /v1/classify latency
                to warm and never-seen tasks, alternated (`bench.fleet_serve`; 100,000 tasks).

Sizes default to 100, 1,000 and 10,000 tasks (and 10 for checkpoints, the baseline). One run per
size; medians over `--repeats` where a part repeats. Results go to `bench/results/fleet.json`.

    python -m bench.fleet                  # all parts
    python -m bench.fleet --parts setup --sizes 100 1000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import machine_info, markdown_table, write_result

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
HIDDEN = 576  # SmolLM2-135M's width


def write_family(root: Path, n_tasks: int, train_rows: int = 8, eval_rows: int = 2) -> Path:
    """A family of `n_tasks` SST-2 tasks under `root` (two TSVs and the YAML); returns the YAML's path."""
    lines = SST2.read_text(encoding="utf-8").splitlines()[1:]
    per = train_rows + eval_rows
    splits = {"train": ["task\tsentence\tlabel"], "eval": ["task\tsentence\tlabel"]}
    for t in range(n_tasks):
        for j in range(per):
            split = "train" if j < train_rows else "eval"
            splits[split].append(f"c{t:06d}\t{lines[(t * per + j) % len(lines)]}")
    for split, rows in splits.items():
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = {
        "name": "reviews",
        "kind": "classification",
        "family": {"id_column": "task"},
        "data": {"format": "tsv", "train": "train.tsv", "eval": "eval.tsv"},
        "template": "Review: {sentence}\nSentiment:",
        "verbaliser": {"0": " negative", "1": " positive"},
    }
    path = root / "reviews.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bench_setup(sizes: list[int]) -> list[dict]:
    from tuner.config import JobConfig
    from tuner.job import PreparedJob, load_task_specs
    from tuner.model.backbone import load_tokenizer
    from tuner.model.model_cache import resolve_backbone

    tokenizer = load_tokenizer(resolve_backbone("smollm2-135m"))
    out = []
    for n in [10, *sizes]:  # the first, untimed: imports (pandas, datasets) and the tokenizer's warm-up
        with tempfile.TemporaryDirectory() as tmp:
            path = write_family(Path(tmp), n)
            t0 = time.perf_counter()
            specs = load_task_specs([str(path)])
            t1 = time.perf_counter()
            data = PreparedJob(JobConfig(tasks=[str(path)]), specs).load_data(tokenizer)
            t2 = time.perf_counter()
        assert len(data) == n
        row = {"tasks": n, "specs_s": t1 - t0, "load_data_s": t2 - t1, "total_s": t2 - t0}
        row["ms_per_task"] = 1000 * row["total_s"] / n
        print(row, flush=True)
        out.append(row)
    out = out[1:]
    return out


def bench_checkpoint(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    from tuner import checkpoint as ckpt
    from tuner.prompts.bank import PromptBank
    from tuner.prompts.optim import SparseRowAdam
    from tuner.tasks.data import MultiTaskSampler

    out = []
    P = args.virtual_tokens
    for n in sizes:
        names = [f"reviews.c{i:06d}" for i in range(n)]
        bank = PromptBank(names, P, HIDDEN)
        bank.weight.normal_()
        opt = SparseRowAdam(lr=0.01)
        zeros = torch.zeros(P, HIDDEN)
        opt.state = {t: {"step": 1, "exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone()} for t in names}
        sampler = MultiTaskSampler(dict.fromkeys(names, 8), args.batch, mixing="uniform")
        delta_s, delta_b, full_s, full_b = [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            step = 0
            for _ in range(args.repeats * args.full_every):
                for _ in range(args.steps_between):
                    drawn = sorted({t for t, _ in sampler.next_batch()})
                    rows = bank.rows_of(drawn)
                    new = opt.step(drawn, bank.weight[rows], torch.randn(len(drawn), P, HIDDEN))
                    bank.scatter_(rows, new)
                    step += 1
                t0 = time.perf_counter()
                path = ckpt.save_checkpoint(
                    tmp, step, bank=bank, optimizer=opt, sampler=sampler, history={},
                    keep_last=2, full_every=args.full_every,
                )  # fmt: skip
                took = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in path.iterdir())
                full = ckpt.is_full(path)
                (full_s if full else delta_s).append(took)
                (full_b if full else delta_b).append(size)
        row = {
            "tasks": n,
            "delta_s": statistics.median(delta_s) if delta_s else None,
            "delta_bytes": statistics.median(delta_b) if delta_b else None,
            "full_s": statistics.median(full_s),
            "full_bytes": statistics.median(full_b),
        }
        print(row, flush=True)
        out.append(row)
    return out


def _tiny():
    """A random Llama with SmolLM2's vocabulary (hidden 64, 2 layers): the packing and per-batch costs of
    evaluation without SmolLM2's compute, which a loaded 2-core machine cannot give 10,000 examples of."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa", pad_token_id=2,
        eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float().eval().requires_grad_(False)


def bench_eval(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per size: `args.eval_examples` eval examples in total over N tasks (a tuned pass), with
    what the forwards computed (`bench.fleet_eval.counted_forwards`) and the least they must."""
    from bench.fleet_eval import counted_forwards
    from tuner.config import JobConfig
    from tuner.job import PreparedJob, load_task_specs
    from tuner.model.backbone import load_backbone, load_tokenizer
    from tuner.model.model_cache import resolve_backbone
    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.tasks.kinds import evaluate_task, evaluate_tasks

    path = resolve_backbone("smollm2-135m")
    tokenizer = load_tokenizer(path)
    lm = PromptTunedLM(
        load_backbone(path, torch.float32, "sdpa") if args.eval_backbone == "smollm2" else _tiny()
    )
    hidden = lm.backbone.config.hidden_size
    P = args.virtual_tokens
    out = []
    for n in sizes:
        per = max(1, args.eval_examples // n)
        with tempfile.TemporaryDirectory() as tmp:
            fam = write_family(Path(tmp), n, train_rows=1, eval_rows=per)
            specs = load_task_specs([str(fam)])
            cfg = JobConfig(tasks=[str(fam)])
            cfg.data.max_eval_examples = 0  # every eval example: the same total at every size
            tasks = PreparedJob(cfg, specs).load_data(tokenizer)
        g = torch.Generator().manual_seed(0)
        prompts = {t: torch.randn(P, hidden, generator=g) * 0.1 for t in tasks}
        total = sum(len(t.eval) for t in tasks.values())
        with counted_forwards() as seen:
            t0, c0 = time.perf_counter(), time.process_time()
            evaluate_tasks(lm, tokenizer, tasks, prompts, 128, batch_size=args.eval_batch)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {
            "tasks": n,
            "examples": total,
            "virtual_tokens": P,
            "mean_input_tokens": seen["text"] / total,
            **seen,
            "least_positions": seen["text"] + n * P,  # every task's prompt through the backbone once
            "mixed_examples_per_s": total / wall,
            "mixed_examples_per_cpu_s": total / cpu,  # one torch thread
        }
        if n <= args.per_task_up_to:
            t0, c0 = time.perf_counter(), time.process_time()
            for name, data in tasks.items():
                evaluate_task(lm, tokenizer, data, prompts[name], 128, batch_size=args.eval_batch)
            row["per_task_examples_per_s"] = total / (time.perf_counter() - t0)
            row["per_task_examples_per_cpu_s"] = total / (time.process_time() - c0)
        print(row, flush=True)
        out.append(row)
    for row in out:  # side by side with the first (smallest) size
        row["cpu_ratio"] = row["mixed_examples_per_cpu_s"] / out[0]["mixed_examples_per_cpu_s"]
        row["bound_ratio"] = out[0]["least_positions"] / row["least_positions"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["setup", "checkpoint", "eval", "export", "serve"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    ap.add_argument("--checkpoint-sizes", nargs="+", type=int, default=[10, 10000])
    ap.add_argument("--virtual-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps-between", type=int, default=1, help="training steps between checkpoints")
    ap.add_argument("--full-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="full-every cycles of checkpoints per size")
    ap.add_argument("--eval-sizes", nargs="+", type=int, default=[10, 100, 1000, 10000])
    ap.add_argument("--eval-examples", type=int, default=10000, help="eval examples in total, every size")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--eval-backbone", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--per-task-up-to", type=int, default=1000, help="also time task by task up to this size")
    ap.add_argument("--export-sizes", nargs="+", type=int, default=[100, 1000, 10000, 100000])
    ap.add_argument(
        "--export-dirs-up-to", type=int, default=10000, help="per-task directories up to this size"
    )
    ap.add_argument("--serve-tasks", type=int, default=100000, help="tasks in the served packed store")
    ap.add_argument(
        "--serve-requests", type=int, default=200, help="requests of each kind (warm, never-seen)"
    )
    ap.add_argument("--serve-warm", type=int, default=16, help="warm tasks the warm requests cycle over")
    ap.add_argument("--serve-threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--quick", action="store_true", help="do not record the result")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"args": vars(args)}
    if "setup" in args.parts:
        result["setup"] = bench_setup(args.sizes)
        print(markdown_table(["tasks", "set-up s", "ms / task"], [
            [r["tasks"], r["total_s"], r["ms_per_task"]] for r in result["setup"]
        ]))  # fmt: skip
    if "checkpoint" in args.parts:
        result["checkpoint"] = bench_checkpoint(args.checkpoint_sizes, args)
        print(markdown_table(["tasks", "delta s", "delta bytes", "full s", "full bytes"], [
            [r["tasks"], r["delta_s"], r["delta_bytes"], r["full_s"], r["full_bytes"]]
            for r in result["checkpoint"]
        ]))  # fmt: skip
    if "eval" in args.parts:
        from bench.fleet_eval import HEADER as EVAL_HEADER
        from bench.fleet_eval import table_rows as eval_rows

        result["eval"] = bench_eval(args.eval_sizes, args)
        print(markdown_table(EVAL_HEADER, eval_rows(result["eval"])))
    if "export" in args.parts:
        from bench.fleet_export import HEADER, bench_export, table_rows

        result["export"] = bench_export(args.export_sizes, args.export_dirs_up_to)
        print(markdown_table(HEADER, table_rows(result["export"])))
    if "serve" in args.parts:
        from bench.fleet_serve import HEADER as SERVE_HEADER
        from bench.fleet_serve import bench_serve
        from bench.fleet_serve import table_rows as serve_rows

        result["serve"] = bench_serve(
            args.serve_tasks, args.virtual_tokens, args.serve_requests, args.serve_warm, args.serve_threads
        )
        print(markdown_table(SERVE_HEADER, serve_rows(result["serve"])))
    print(machine_info())
    write_result("fleet", result, args.quick)


if __name__ == "__main__":
    main()
