"""GPU training throughput: ours vs PEFT prompt tuning, bf16, and model FLOP utilisation.

For each backbone config (`bench.gpu_models.CONFIGS`, random weights) and the synthetic three-task
mix (SST-2 / AG News / TREC lengths), one JSON section per system:

* `ours_<kernel>`: the trainer's step (`PromptTunedLM` on packed rows sharing prompt copies, LM
  head at targets only, prompt bank and Adam on the device) with the packed kernel `varlen`
  (torch's FlashAttention-2 varlen) and `sdpa` (span SDPA);
* `peft`: PEFT prompt tuning as its users run it: one task's examples per padded batch, the
  task's adapter, the full LM head, torch Adam, transformers SDPA (the same FlashAttention /
  memory-efficient SDPA kernel family).

Both see the same examples; tokens/s counts text tokens (input + target), not prompt positions or
padding. Batches (and ours' attention plan) are built before timing, as the recipe's prefetch thread
builds them (`tuner.tasks.prefetch`); collation time is reported apart, and `ours_<kernel>_pipeline`
(on `--pipeline-configs`) times the step with that host work in it (prefetch off) and overlapped
(on), alternated, with one loss read-back per step as the recipe's log has: `critical_host_s` is the
host time per step the device waits for. MFU = 4 x (decoder linear parameters) x text tokens per second / the bf16 matmul peak
measured in the same run (forward 2 FLOPs per parameter per token, backward 2 more for input
gradients only: the backbone is frozen; attention scores and the LM head are not counted, so this
understates the work done).

The 8B-shaped config runs fewer examples per step (its activations for ~7k text tokens take
~40 GB beside 16 GB of weights: it fits an 80 GB H100) and PEFT smaller padded batches (its full
LM head over a 128k vocabulary).

Run: `python3 -m bench.gpu_train --out results/train.json [--configs smollm2-135m,llama-1b,llama-8b]`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from bench.gpu_models import CONFIGS, llama, task_mix
from bench.gpu_record import Recorder
from tuner.model import attention
from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam
from tuner.tasks.batching import collate
from tuner.tasks.prefetch import StepBatches

TASKS = ["sst2", "ag_news", "trec"]
P = 20


@dataclass(frozen=True)
class Size:
    """A config's step: examples, packed row length, PEFT's padded batch, and ours' kernels timed."""

    examples: int
    row_len: int
    peft_micro: int = 64
    kernels: tuple[str, ...] | None = None  # None: --kernels


DEFAULT_CONFIGS = "smollm2-135m,llama-1b,llama-8b"
# ~13k, ~26k and ~7k text tokens a step
SIZES = {
    "smollm2-135m": Size(512, 2048),
    "llama-1b": Size(1024, 4096),
    "llama-8b": Size(256, 2048, peft_micro=16, kernels=("varlen",)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n x n x n matmul on random data (mean of `reps` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def linear_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder layers' Linear modules (the matmuls every token pays)."""
    decoder = getattr(model, model.base_model_prefix)
    return sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))


def _timed(step, steps: int, budget_s: float, device: torch.device) -> tuple[float, int]:
    """Run `step` twice to warm up, then up to `steps` times within `budget_s`: (seconds, steps run)."""
    for _ in range(2):
        step(0)
    sync(device)
    t0, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - t0 < budget_s):
        step(done + 1)
        done += 1
    sync(device)
    return time.perf_counter() - t0, done


def bench_ours(model, examples, row_len: int, kernel: str, steps: int, budget_s: float) -> dict:
    device = model.device
    lm = PromptTunedLM(model, kernel=kernel)
    hidden = model.config.hidden_size
    bank = PromptBank(TASKS, P, hidden)
    bank.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    bank.to(device)
    opt = SparseRowAdam(1e-3)
    rows = bank.rows_of(TASKS).to(device)
    t0 = time.perf_counter()
    batch = collate(examples, {t: i for i, t in enumerate(TASKS)}, P, max_len=256, pad_id=2, row_len=row_len)
    batch = attention.host_layout(lm.kernel_for(device), batch, device)  # as the prefetch thread does
    collate_s = time.perf_counter() - t0
    gpu_batch = batch.to(device)

    def step(_):
        prompts = bank.gather(rows)
        lm(gpu_batch, prompts).loss.backward()
        bank.scatter_(rows, opt.step(TASKS, prompts.detach(), prompts.grad))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, done = _timed(step, steps, budget_s, device)
    return {
        "kernel": lm.kernel_for(device),
        "tokens_per_s": batch.num_text_tokens * done / seconds,
        "step_s": seconds / done,
        "steps": done,
        "text_tokens_per_step": batch.num_text_tokens,
        "rows": batch.input_ids.shape[0],
        "row_len": batch.input_ids.shape[1],
        "prompt_copies": batch.num_prompts,
        "collate_s": collate_s,
        "max_memory_allocated": peak_memory(device),
    }


def bench_pipeline(model, examples, row_len: int, kernel: str, steps: int, rounds: int = 2) -> dict:
    """Ours' step with its host work (collate + attention plan + copy) in it, prefetch off and on,
    alternated `rounds` times for `steps` steps each, one loss read-back per step (the recipe's log)."""
    device = model.device
    lm = PromptTunedLM(model, kernel=kernel)
    bank = PromptBank(TASKS, P, model.config.hidden_size)
    bank.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    bank.to(device)
    opt = SparseRowAdam(1e-3)
    rows = bank.rows_of(TASKS).to(device)
    resolved = lm.kernel_for(device)
    if resolved in ("varlen", "flash_attention_2"):
        attention.aligns_bottom_right(resolved, device)  # probed once, before any worker starts
    task_rows = {t: i for i, t in enumerate(TASKS)}

    def build(micro_batches):
        return [
            attention.host_layout(
                resolved,
                collate([examples[i] for i in mb], task_rows, P, max_len=256, pad_id=2, row_len=row_len),
                device,
            )
            for mb in micro_batches
        ]

    step_key = [list(range(len(examples)))]  # every step trains the same examples: the same host work
    out = {"off": {"step_s": [], "critical_host_s": []}, "on": {"step_s": [], "critical_host_s": []}}
    for r in range(rounds + 1):  # round 0 warms up
        for mode in ("off", "on"):
            batches = StepBatches(lambda g: g, build, device)
            batches.start([step_key] * steps, depth=1 if mode == "on" else 0)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                (batch,) = batches.get(step_key)
                prompts = bank.gather(rows)
                loss = lm(batch, prompts).loss
                loss.backward()
                bank.scatter_(rows, opt.step(TASKS, prompts.detach(), prompts.grad))
                float(loss)  # the step's one read-back
            seconds = time.perf_counter() - t0
            batches.close()
            if r:
                out[mode]["step_s"].append(seconds / steps)
                out[mode]["critical_host_s"].append(batches.critical_s / steps)
    for mode in ("off", "on"):
        for k in ("step_s", "critical_host_s"):
            out[mode][f"mean_{k}"] = sum(out[mode][k]) / len(out[mode][k])
    out["kernel"], out["steps_per_round"], out["rounds"] = resolved, steps, rounds
    return out


def bench_peft(model, examples, steps: int, budget_s: float, micro: int = 64) -> dict:
    """PEFT prompt tuning: per task, padded batches of `micro` examples, labels on the target only."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    device = model.device
    peft_model = get_peft_model(
        model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    ).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    batches, text_tokens = [], 0
    for task in TASKS:
        mine = [e for e in examples if e.task == task]
        for i in range(0, len(mine), micro):
            chunk = mine[i : i + micro]
            seqs = [e.input_ids + e.target_ids for e in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), 2, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for r, (e, s) in enumerate(zip(chunk, seqs)):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
                labels[r, len(e.input_ids) : len(s)] = torch.tensor(e.target_ids)
                text_tokens += len(s)
            batches.append(tuple(t.to(device) for t in (ids, mask, labels)))

    def step(_):
        for ids, mask, labels in batches:  # one task's adapter per batch, as PEFT trains
            peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, done = _timed(step, steps, budget_s, device)
    return {
        "tokens_per_s": text_tokens * done / seconds,
        "step_s": seconds / done,
        "steps": done,
        "text_tokens_per_step": text_tokens,
        "padded_batches": len(batches),
        "max_memory_allocated": peak_memory(device),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (rewritten after every section)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument(
        "--pipeline-configs", default="llama-1b", help="configs whose step is also timed with its host work"
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=20.0, help="timed seconds per system and config")
    ap.add_argument("--kernels", default="varlen,sdpa", help="packed-attention kernels of ours to time")
    ap.add_argument("--examples", type=int, default=0, help="examples per step (0: the config's default)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run on a tiny config")
    ap.add_argument("--matmul-n", type=int, default=8192)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kernels = [k for k in args.kernels.split(",") if k]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; expected some of {sorted(CONFIGS)}")
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rec = Recorder(args.out, benchmark="gpu_train", device=name_of, torch=torch.__version__, args=vars(args))
    with rec.section("matmul_peak") as out:
        out["bf16_tflops"] = matmul_peak(device, args.matmul_n)
    peak = rec.data["sections"]["matmul_peak"]["result"].get("bf16_tflops")
    for name in configs:
        size = SIZES.get(name, Size(64, 512))
        examples = task_mix(args.examples or size.examples, seed=0, vocab=CONFIGS[name]["vocab_size"])
        with rec.section(f"{name}/model") as out:
            t0 = time.perf_counter()
            model = llama(name, torch.bfloat16, device)
            sync(device)
            out.update(init_s=time.perf_counter() - t0, parameters=sum(p.numel() for p in model.parameters()))
            out["weights_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if rec.data["sections"][f"{name}/model"]["status"] != "ok":
            continue
        flops_per_token = 4 * linear_params(model)
        mine = [k for k in (size.kernels or kernels) if k in kernels] or kernels
        for kernel in mine:
            with rec.section(f"{name}/ours_{kernel}", args.budget_s) as out:
                out.update(bench_ours(model, examples, size.row_len, kernel, args.steps, args.budget_s))
                if peak:
                    out["mfu"] = out["tokens_per_s"] * flops_per_token / (peak * 1e12)
        if name in args.pipeline_configs.split(","):
            with rec.section(f"{name}/ours_{mine[0]}_pipeline", args.budget_s) as out:
                out.update(bench_pipeline(model, examples, size.row_len, mine[0], max(2, args.steps // 2)))
        with rec.section(f"{name}/peft", args.budget_s) as out:
            out.update(bench_peft(model, examples, args.steps, args.budget_s, size.peft_micro))
            if peak:
                out["mfu"] = out["tokens_per_s"] * flops_per_token / (peak * 1e12)
        sections = rec.data["sections"]
        with rec.section(f"{name}/summary") as out:
            peft = sections[f"{name}/peft"]["result"].get("tokens_per_s")
            for kernel in mine:
                ours = sections[f"{name}/ours_{kernel}"]["result"].get("tokens_per_s")
                if ours and peft:
                    out[f"speedup_{kernel}_vs_peft"] = ours / peft
            out["target_speedup"] = 3.0
            out["mfu"] = {k: sections[f"{name}/ours_{k}"]["result"].get("mfu") for k in mine}
            out["target_mfu"] = {"llama-1b": 0.40, "llama-8b": 0.45}.get(name)
            out["peak_memory"] = {
                k: sections[f"{name}/{k}"]["result"].get("max_memory_allocated")
                for k in [f"ours_{k}" for k in mine] + ["peft"]
            }
            pipeline = sections.get(f"{name}/ours_{mine[0]}_pipeline", {}).get("result", {})
            if "on" in pipeline:
                out["critical_host_s_per_step"] = {
                    m: pipeline[m]["mean_critical_host_s"] for m in ("off", "on")
                }
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
