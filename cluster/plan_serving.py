"""`promptfleet plan --serve-ranks N`: what one rank of a tensor-parallel serving replica holds.

    promptfleet plan llama-3-8b --serve-ranks 2 --serve-batch 32 --seq-len 4096 --memory-gb 22
    promptfleet plan llama-3-70b --serve-ranks auto --devices-per-node 8 --tasks 1000

A serving replica of N ranks (`engine.tensor_parallel: N`, `serving.tensor_parallel`) splits every
layer's attention heads and MLP columns, the embedding and the LM head over its ranks; the norms
stay whole on each. So per rank: weights about 1/N, and the KV caches (each running request's, and
the task prefix cache of every task's soft-prompt KV) hold kv_heads/N heads. The step's transient
memory (hidden states of the step's tokens, the fp32 logits every rank gathers) is added as an
estimate. `auto` picks the smallest N that divides the heads and fits the budget, so a user can
choose N before renting the devices.

It reads `config.json` (or a built-in shape) and nothing else; `cluster.plan` prints it beside the
training plan.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from tuner.config import ConfigError
from tuner.model.memory import GB, BackboneShape, load_shape

STEP_TOKENS = 512  # engine.max_step_tokens' default: the tokens whose activations one step holds
KV_HEADROOM = 64  # serving.runner: free KV columns kept when the batch's KV is (re)allocated
DTYPE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ServingPlan:
    """Bytes per rank of one replica of `ranks` ranks."""

    ranks: int
    weights: int
    kv_cache: int  # `batch` running requests of `seq_len` tokens (task prompt included)
    prefix_cache_all_tasks: int  # every task's prompt KV (what an unbounded cache would hold)
    prefix_cache: int  # what the LRU keeps: the above, at most engine.prefix_cache_bytes / ranks
    step_transient: int  # one step's hidden states and the fp32 logits of its rows
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prefix_cache + self.step_transient

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def divisors(shape: BackboneShape) -> list[int]:
    """The rank counts a replica may have: those dividing both the attention and the KV heads."""
    return [
        n for n in range(1, shape.num_heads + 1) if shape.num_heads % n == 0 and shape.num_kv_heads % n == 0
    ]


def serving_plan(
    shape: BackboneShape,
    ranks: int,
    batch: int,
    seq_len: int,
    tasks: int,
    virtual_tokens: int,
    dtype: str,
    prefix_cache_bytes: int,
    budget: int,
) -> ServingPlan:
    if ranks not in divisors(shape):
        raise ConfigError(
            f"--serve-ranks {ranks} does not divide the backbone's {shape.num_heads} attention heads and "
            f"{shape.num_kv_heads} KV heads; choose one of {divisors(shape)}"
        )
    b, H, n = DTYPE[dtype], shape.hidden_size, ranks
    q = shape.num_heads * shape.dim_per_head
    sharded_layer = 2 * H * q + 2 * H * shape.kv_size + 3 * H * shape.intermediate_size
    embeddings = shape.embedding_params * (1 if shape.tie_word_embeddings else 2)
    # Sharded parameters round up: a rank holds ceil(size / N) of a dimension that N does not divide.
    weights = b * (shape.num_layers * (2 * H + -(-sharded_layer // n)) + -(-embeddings // n) + H)
    kv_token = 2 * shape.num_layers * (shape.kv_size // n) * b  # k and v of one token, this rank's heads
    all_prompts = tasks * virtual_tokens * kv_token
    per_token = b * (4 * H + (q + 2 * shape.kv_size + 2 * shape.intermediate_size) // n)
    return ServingPlan(
        ranks=n,
        weights=weights,
        kv_cache=batch * (seq_len + KV_HEADROOM) * kv_token,
        prefix_cache_all_tasks=all_prompts,
        prefix_cache=min(all_prompts, prefix_cache_bytes // n),
        step_transient=STEP_TOKENS * per_token + batch * shape.vocab_size * 4 * 2,
        budget=budget,
    )


def resolve(args: argparse.Namespace) -> ServingPlan | None:
    """The serving plan the `plan` arguments ask for (None without --serve-ranks)."""
    if args.serve_ranks is None:
        return None
    try:
        shape = load_shape(args.backbone)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.serve_batch < 1:
        raise ConfigError(f"--serve-batch must be >= 1, got {args.serve_batch}")
    if not args.prefix_cache_gb >= 0:
        raise ConfigError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")
    budget = int(args.memory_gb * GB)

    def make(n: int) -> ServingPlan:
        return serving_plan(
            shape,
            n,
            args.serve_batch,
            args.seq_len,
            args.tasks,
            args.virtual_tokens,
            args.dtype,
            int(args.prefix_cache_gb * GB),
            budget,
        )

    if args.serve_ranks == "auto":
        options = [n for n in divisors(shape) if n <= args.devices_per_node]
        fitting = [p for p in map(make, options) if p.fits]
        return fitting[0] if fitting else make(options[-1])
    try:
        ranks = int(args.serve_ranks)
    except ValueError:
        raise ConfigError(f"--serve-ranks must be a number or auto, got {args.serve_ranks!r}") from None
    planned = make(ranks)  # refuses an N that does not divide the heads first
    if ranks > args.devices_per_node:
        raise ConfigError(
            f"--serve-ranks {ranks}: a replica's ranks share one node, which has {args.devices_per_node} devices"
        )
    return planned


def render(args: argparse.Namespace, p: ServingPlan) -> str:
    def gib(n: int) -> str:
        return f"{n / GB:9.2f} GiB"

    replicas = args.nodes * (args.devices_per_node // p.ranks)
    rows = [
        (f"weights (1/{p.ranks} of each layer, embedding, head)", p.weights),
        (f"KV cache: {args.serve_batch} requests x {args.seq_len} tokens", p.kv_cache),
        (f"prefix cache: {args.tasks} tasks x {args.virtual_tokens} tokens", p.prefix_cache_all_tasks),
        (f"prefix cache kept (LRU, {args.prefix_cache_gb:g} GiB / {p.ranks})", p.prefix_cache),
        (f"step transient ({STEP_TOKENS} tokens, logits)", p.step_transient),
    ]
    lines = [f"serving, engine.tensor_parallel={p.ranks}: per rank"]
    lines += [f"  {name:48s}{gib(n)}" for name, n in rows]
    verdict = "fits" if p.fits else "does NOT fit"
    lines += [
        f"  {'total':48s}{gib(p.total)}  ({verdict} in {p.budget / GB:.1f} GiB)",
        f"  {replicas} replica(s) of {p.ranks} rank(s) on {args.nodes} node(s) x {args.devices_per_node} device(s)",
    ]
    if args.serve_ranks == "auto":
        lines.append(f"  recommended: engine.tensor_parallel={p.ranks}" if p.fits else "  no rank count fits")
    return "\n".join(lines)


def as_json(p: ServingPlan) -> dict:
    return {**asdict(p), "total": p.total, "fits": p.fits}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--serve-ranks",
        default=None,
        metavar="N|auto",
        help="also size a tensor-parallel serving replica of N ranks (auto: the fewest that fit)",
    )
    p.add_argument(
        "--serve-batch", type=int, default=32, help="requests decoded together (engine.max_batch_size)"
    )
    p.add_argument(
        "--prefix-cache-gb", type=float, default=0.25, help="engine.prefix_cache_bytes in GiB (default 0.25)"
    )
