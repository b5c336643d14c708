"""`promptfleet plan`: per-device memory of a job on a cluster, and the settings to run it with.

    promptfleet plan llama-3-70b --nodes 4 --devices-per-node 8 --seq-len 2048 --batch 4 --tasks 100
    promptfleet plan ~/models/my-llama --nodes 1 --devices-per-node 2 --memory-gb 9 --dtype fp32

The backbone is a directory holding `config.json`, `smollm2-135m`, or one of the built-in named
shapes (`tuner.model.memory.BUILTIN_SHAPES`: llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-3-70b,
llama-3.1-405b), so planning needs no network. The numbers come from `tuner.model.memory.estimate`
and the recommendation from `tuner.model.zero.choose_zero`: the same function that resolves
`cluster.zero_stage: auto` when a job starts.

It starts nothing and reads no weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict

from cluster import plan_serving
from tuner.config import ConfigError
from tuner.model.memory import DTYPE_BYTES, GB, MemoryEstimate, Workload, estimate, load_shape
from tuner.model.zero import ZeroChoice, choose_zero


def plan(args: argparse.Namespace) -> tuple[MemoryEstimate, ZeroChoice, int]:
    """(estimate, recommendation, budget in bytes) for the parsed `plan` arguments."""
    for name in ("nodes", "devices_per_node", "seq_len", "batch", "tasks", "virtual_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.memory_gb < math.inf:  # NaN fails this too
        raise ConfigError(f"--memory-gb must be a finite number > 0, got {args.memory_gb}")
    try:
        shape = load_shape(args.backbone)
    except ValueError as e:  # a bad backbone name is the user's input: one line, no exception type
        raise ConfigError(str(e)) from None
    world = args.nodes * args.devices_per_node
    work = Workload(args.seq_len, args.batch, args.tasks, args.virtual_tokens, args.dtype)
    mem = estimate(shape, work, world)
    budget = int(args.memory_gb * GB)
    ckpt = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
    return mem, choose_zero(mem, budget, args.nodes, args.devices_per_node, ckpt), budget


def render(args: argparse.Namespace, mem: MemoryEstimate, choice: ZeroChoice, budget: int) -> str:
    shape = load_shape(args.backbone)
    world = args.nodes * args.devices_per_node

    def gib(n: int) -> str:
        return f"{n / GB:9.2f} GiB"

    rows = [
        ("weights, replicated", mem.weights_replicated),
        (f"weight shard (ZeRO-3, 1/{world})", mem.weight_shard),
        ("gathered-layer buffers (ZeRO-3)", mem.gathered_buffers),
        ("activations", mem.activations),
        ("activations, checkpointed", mem.activations_checkpointed),
        (f"prompt bank + Adam ({args.tasks} tasks)", mem.prompt_bank_and_optimiser),
        (f"serving KV cache per request ({args.seq_len} tokens)", mem.kv_per_request),
    ]
    lines = [
        f"backbone {args.backbone}: {shape.num_params / 1e9:.2f} B parameters, {shape.num_layers} layers, "
        f"hidden {shape.hidden_size}, {args.dtype}",
        f"cluster {args.nodes} node(s) x {args.devices_per_node} device(s); per device: {args.batch} x "
        f"{args.seq_len} tokens, budget {budget / GB:.1f} GiB",
        "",
        "per device",
    ]
    lines += [f"  {name:48s}{gib(n)}" for name, n in rows]
    lines += [
        "",
        "training total per device",
        f"  {'replicated':48s}{gib(mem.training_total(False, False))}",
        f"  {'replicated, checkpointed':48s}{gib(mem.training_total(False, True))}",
        f"  {'ZeRO-3':48s}{gib(mem.training_total(True, False))}",
        f"  {'ZeRO-3, checkpointed':48s}{gib(mem.training_total(True, True))}",
        "",
        f"recommended: {choice.reason}",
        f"  cluster.zero_stage={choice.stage}",
        f"  cluster.num_workers={world}",
        f"  cluster.num_nodes={args.nodes}",
        f"  cluster.activation_checkpointing={str(choice.activation_checkpointing).lower()}",
    ]
    if choice.stage == 3:
        lines.append(f"  cluster.zero_hpz_partition_size={choice.hpz_partition_size}")
    return "\n".join(lines)


def _plan_command(args: argparse.Namespace) -> int:
    # `plan` runs nothing on a device. The first `plan smollm2-135m` converts the embedded backbone, which
    # imports DeepSpeed, and its accelerator probe would warn that it fell back to the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mem, choice, budget = plan(args)
    serving = plan_serving.resolve(args)  # None without --serve-ranks
    if args.json:
        extra = {"serving": plan_serving.as_json(serving)} if serving else {}
        print(
            json.dumps(
                {"memory_bytes": asdict(mem), "recommended": asdict(choice), "budget_bytes": budget, **extra}
            )
        )
    else:
        print(
            render(args, mem, choice, budget)
            + (f"\n\n{plan_serving.render(args, serving)}" if serving else "")
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="per-device memory of a job on N nodes x D devices, and the settings to use",
        description=__doc__.split("\n\n")[0] + " The backbone: a directory with config.json, "
        "smollm2-135m, or a built-in shape (llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-3-70b, llama-3.1-405b).",
    )
    p.add_argument("backbone", help="directory with config.json, smollm2-135m, or a built-in shape name")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--devices-per-node", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per example, prompt included")
    p.add_argument("--batch", type=int, default=4, help="examples per device per forward (micro-batch)")
    p.add_argument("--tasks", type=int, default=100, help="tasks in the prompt bank")
    p.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt length per task")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="backbone dtype")
    p.add_argument(
        "--memory-gb", type=float, default=72.0, help="memory one device may use (default 72: 90%% of 80 GB)"
    )
    p.add_argument(
        "--activation-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto recommends it only when activations would not fit without it",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    plan_serving.add_arguments(p)
    p.set_defaults(func=_plan_command)
