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
padding. Batches are built before timing (a data loader prefetches them); collation time is reported
apart. MFU = 4 x (decoder linear parameters) x text tokens per second / the bf16 matmul peak
measured in the same run (forward 2 FLOPs per parameter per token, backward 2 more for input
gradients only: the backbone is frozen; attention scores and the LM head are not counted, so this
understates the work done).

Run: `python3 -m bench.gpu_train --out results/train.json [--configs smollm2-135m,llama-1b]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.gpu_models import CONFIGS, llama, task_mix
from bench.gpu_record import Recorder
from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam
from tuner.tasks.batching import collate

TASKS = ["sst2", "ag_news", "trec"]
P = 20
# examples per step and packed row length, per config (~13k and ~26k text tokens a step)
SIZES = {"smollm2-135m": (512, 2048), "llama-1b": (1024, 4096)}


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
    ap.add_argument("--configs", default="smollm2-135m,llama-1b")
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
        n, row_len = SIZES.get(name, (64, 512))
        examples = task_mix(args.examples or n, seed=0, vocab=CONFIGS[name]["vocab_size"])
        model = llama(name, torch.bfloat16, device)
        flops_per_token = 4 * linear_params(model)
        for kernel in kernels:
            with rec.section(f"{name}/ours_{kernel}", args.budget_s) as out:
                out.update(bench_ours(model, examples, row_len, kernel, args.steps, args.budget_s))
                if peak:
                    out["mfu"] = out["tokens_per_s"] * flops_per_token / (peak * 1e12)
        with rec.section(f"{name}/peft", args.budget_s) as out:
            out.update(bench_peft(model, examples, args.steps, args.budget_s))
            if peak:
                out["mfu"] = out["tokens_per_s"] * flops_per_token / (peak * 1e12)
        sections = rec.data["sections"]
        with rec.section(f"{name}/summary") as out:
            peft = sections[f"{name}/peft"]["result"].get("tokens_per_s")
            for kernel in kernels:
                ours = sections[f"{name}/ours_{kernel}"]["result"].get("tokens_per_s")
                if ours and peft:
                    out[f"speedup_{kernel}_vs_peft"] = ours / peft
            out["target_speedup"] = 3.0
            out["mfu"] = {k: sections[f"{name}/ours_{k}"]["result"].get("mfu") for k in kernels}
            out["target_mfu"] = 0.40 if name == "llama-1b" else None
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
