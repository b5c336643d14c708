"""Benchmark: generation evaluation across tasks (issue 37, item 2): one decode per task against every
task's examples decoded together in the server's mixed-task steps.

A family of N EN->DE translation tasks is cut from Multi30k (`../shared/data/multi30k_en_de/val.*`):
the same `--examples` eval sentences in total at every size, split evenly over the N tasks (one TSV
with a task column, one family YAML), each task with its own random prompt (`--virtual-tokens`
rows, seeded) and the stop string "\\n". Both ways run the real evaluation path:
    per task  `evaluate_task` for each task (before issue 37: one small decode per task),
    mixed     `evaluate_tasks` (every task's examples decoded together, `TaskKind.evaluate_many`).
The table gives CPU seconds per example (process CPU time at one torch thread: the work, whatever
else loads the machine; median of `--repeats` runs in alternating order, after an untimed warm-up),
wall examples/s, and how many answers the two ways agree on (all of them: the mixed decode is the
served text of each request, whatever decodes beside it).

    python -m bench.eval_generation_fleet [--backbone tiny|smollm2] [--sizes 1 10 100] [--examples 100]
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

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k_en_de"
MAX_LEN = 128


def write_family(root: Path, n_tasks: int, examples: int) -> Path:
    """A family of `n_tasks` translation tasks sharing `examples` eval sentences; returns its YAML."""
    en = (DATA / "val.en").read_text(encoding="utf-8").splitlines()
    de = (DATA / "val.de").read_text(encoding="utf-8").splitlines()
    rows = ["task\ten\tde"]
    for i in range(examples):
        rows.append(f"t{i % n_tasks:05d}\t{en[i].strip()}\t{de[i].strip()}")
    (root / "eval.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = {
        "name": "translate",
        "kind": "generation",
        "family": {"id_column": "task"},
        "data": {"format": "tsv", "train": "eval.tsv", "eval": "eval.tsv"},
        "template": "English: {en}\nGerman:",
        "target_field": "de",
        "max_new_tokens": 16,
        "stop": ["\n"],
    }
    path = root / "translate.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load_lm(backbone: str):
    from tuner.model.backbone import load_backbone, load_tokenizer
    from tuner.model.model_cache import resolve_backbone
    from tuner.model.prompt_lm import PromptTunedLM

    path = resolve_backbone("smollm2-135m")
    if backbone == "smollm2":
        model = load_backbone(path, torch.float32, "sdpa")
    else:
        from bench.fleet import _tiny

        model = _tiny()
    return PromptTunedLM(model), load_tokenizer(path)


def run_size(lm, tokenizer, n: int, args: argparse.Namespace) -> dict:
    from tuner.config import JobConfig
    from tuner.job import PreparedJob, load_task_specs
    from tuner.tasks.kinds import evaluate_task, evaluate_tasks

    with tempfile.TemporaryDirectory() as tmp:
        fam = write_family(Path(tmp), n, args.examples)
        cfg = JobConfig(tasks=[str(fam)])
        cfg.data.max_eval_examples = 0  # every eval example: the same total at every size
        tasks = PreparedJob(cfg, load_task_specs([str(fam)])).load_data(tokenizer)
    hidden = lm.backbone.config.hidden_size
    g = torch.Generator().manual_seed(0)
    prompts = {t: torch.randn(args.virtual_tokens, hidden, generator=g) * 0.1 for t in tasks}
    total = sum(len(t.eval) for t in tasks.values())
    ways = {
        "per task": lambda: {
            t: evaluate_task(lm, tokenizer, d, prompts[t], MAX_LEN, batch_size=args.batch)
            for t, d in tasks.items()
        },
        "mixed": lambda: evaluate_tasks(lm, tokenizer, tasks, prompts, MAX_LEN, batch_size=args.batch),
    }
    row: dict = {"tasks": n, "examples": total}
    answers, cpus, walls = {}, {w: [] for w in ways}, {w: [] for w in ways}
    for rep in range(args.repeats):
        for way in list(ways)[rep % 2 :] + list(ways)[: rep % 2]:  # alternate which goes first
            t0, c0 = time.perf_counter(), time.process_time()
            scores = ways[way]()
            walls[way].append(time.perf_counter() - t0)
            cpus[way].append(time.process_time() - c0)
            answers[way] = [p["output"] for t in tasks for p in scores[t].predictions]
            print(f"  {n} tasks, {way}: {walls[way][-1]:.1f} s wall, {cpus[way][-1]:.1f} CPU s", flush=True)
    for way in ways:
        cpu, wall = statistics.median(cpus[way]), statistics.median(walls[way])
        row[way] = {"cpu_s_per_example": cpu / total, "examples_per_s": total / wall, "cpu_s": cpus[way]}
    row["same_answers"] = sum(a == b for a, b in zip(answers["per task"], answers["mixed"]))
    row["cpu_ratio"] = row["per task"]["cpu_s_per_example"] / row["mixed"]["cpu_s_per_example"]
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 10, 100])
    ap.add_argument("--examples", type=int, default=100, help="eval examples in total, every size")
    ap.add_argument("--virtual-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="evaluation batch (decoding: half of it)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way per size (median)")
    ap.add_argument("--quick", action="store_true", help="do not record the result")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm, tokenizer = load_lm(args.backbone)
    result: dict = {"machine": machine_info(), "args": vars(args), "sizes": []}
    with torch.no_grad():
        run_size(
            lm, tokenizer, 2, argparse.Namespace(**{**vars(args), "examples": 4, "repeats": 1})
        )  # warm-up
        for n in args.sizes:
            result["sizes"].append(run_size(lm, tokenizer, n, args))
    rows = [
        [
            r["tasks"], r["examples"],
            1000 * r["per task"]["cpu_s_per_example"], 1000 * r["mixed"]["cpu_s_per_example"], r["cpu_ratio"],
            r["per task"]["examples_per_s"], r["mixed"]["examples_per_s"], f"{r['same_answers']}/{r['examples']}",
        ]
        for r in result["sizes"]
    ]  # fmt: skip
    header = ["tasks", "examples", "per task CPU ms/ex", "mixed CPU ms/ex", "ratio", "per task ex/s",
              "mixed ex/s", "same answers"]  # fmt: skip
    print(f"{args.backbone}, fp32, 1 torch thread, machine: {result['machine']['cpu']}")
    print(markdown_table(header, rows))
    write_result(f"eval_generation_fleet_{args.backbone}", result, args.quick)
    return result


if __name__ == "__main__":
    main()
