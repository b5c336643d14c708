"""DeepSpeed ZeRO for a frozen backbone: the config, the engine, and the one gather helper.

Why the prompt bank is not handed to DeepSpeed: ZeRO flattens and partitions every trainable
parameter and its optimiser steps the whole flat buffer, i.e. O(all registered tasks) per step.
Prompts are tiny, so every rank keeps the full bank replicated, gathers only the rows of tasks in
the batch, all-reduces those rows' gradients itself (`allreduce_rows_grad`) and steps them with
`tuner.prompts.optim.SparseRowAdam`. DeepSpeed owns what it is good at: partitioning the large frozen
backbone across ranks (ZeRO-3) and gathering each layer's weights just in time in forward and
backward.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tuner.model.backbone import load_backbone
from tuner.model.memory import GB, BackboneShape, MemoryEstimate, Workload, device_memory_budget, estimate

if TYPE_CHECKING:
    from tuner.config import ClusterConfig


@dataclass(frozen=True)
class ZeroSettings:
    """DeepSpeed ZeRO-3 knobs for a frozen backbone (see `ClusterConfig` for what each one trades)."""

    stage: int = 3
    param_persistence_threshold: int = 100_000  # params this small stay whole on every rank
    prefetch_bucket_size: int = 50_000_000  # elements gathered ahead of use
    max_live_parameters: int = 1_000_000_000  # cap on gathered elements (prefetch runs ahead up to it)
    max_reuse_distance: int = 1_000_000_000  # keep a gathered param if its next use is this close
    overlap_comm: bool = True
    hpz_partition_size: int = 1  # ZeRO++ hpZ: secondary copy partitioned within this many ranks
    quantized_weights: bool = False  # ZeRO++ qwZ: int8 weight gathers (CUDA kernels)
    offload_params: str = "none"
    nvme_path: str = "/local_nvme"
    trace_steps: bool = True  # start a step at every forward so DeepSpeed's trace prefetches and reuses


# What the backbone ran with before these settings were tuned (kept for `bench/zero_scaling.py`).
UNTUNED = ZeroSettings(param_persistence_threshold=0, overlap_comm=False, trace_steps=False)


def deepspeed_config(
    settings: ZeroSettings = ZeroSettings(),
    dtype: torch.dtype = torch.bfloat16,
    micro_batch_size: int = 1,
) -> dict:
    """A DeepSpeed config for inference-style use of a frozen model (no DeepSpeed optimiser)."""
    zero: dict = {"stage": settings.stage}
    if settings.stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": settings.param_persistence_threshold,
                "stage3_prefetch_bucket_size": settings.prefetch_bucket_size,
                "stage3_max_live_parameters": settings.max_live_parameters,
                "stage3_max_reuse_distance": settings.max_reuse_distance,
                "overlap_comm": settings.overlap_comm,
                "zero_hpz_partition_size": settings.hpz_partition_size,
                "zero_quantized_weights": settings.quantized_weights,
            }
        )
        if settings.offload_params != "none":
            zero["offload_param"] = {
                "device": settings.offload_params,
                "pin_memory": torch.cuda.is_available(),
            }
            if settings.offload_params == "nvme":
                zero["offload_param"]["nvme_path"] = settings.nvme_path
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class ZeroChoice:
    """How the backbone is laid out over ranks, and why (printed at start, shown by `plan`)."""

    stage: int  # 0 replicates; 3 partitions the weights
    hpz_partition_size: int
    activation_checkpointing: bool  # recommended (auto) or as configured
    reason: str


def choose_zero(
    mem: MemoryEstimate,
    budget: int,
    num_nodes: int = 1,
    ranks_per_node: int = 1,
    checkpointing: bool | None = None,
) -> ZeroChoice:
    """Replicate when the whole backbone plus activations fit `budget`; ZeRO-3 otherwise.

    Args:
        mem: per-device estimate with the weights split over every rank (`tuner.model.memory.estimate`).
        budget: bytes one rank may use.
        num_nodes, ranks_per_node: with several nodes, ZeRO-3 also keeps a secondary copy
            partitioned within the node (hpZ) when that fits, so gathers stay on the node's links.
        checkpointing: the configured activation checkpointing; None recommends it only when
            activations would not fit without it.
    """

    def fits(sharded: bool, ckpt: bool, extra: int = 0) -> bool:
        return mem.training_total(sharded, ckpt) + extra <= budget

    def pick_ckpt(sharded: bool) -> bool:
        if checkpointing is not None:
            return checkpointing
        return not fits(sharded, False) and fits(sharded, True)

    world = num_nodes * ranks_per_node
    need = f"budget {budget / GB:.1f} GiB per rank"
    if world == 1:
        return ZeroChoice(0, 1, pick_ckpt(False), "one rank: nothing to shard")
    ckpt = pick_ckpt(False)
    if fits(False, ckpt):
        total = mem.training_total(False, ckpt)
        return ZeroChoice(
            0, 1, ckpt, f"replicate: backbone + activations {total / GB:.2f} GiB fit the {need}"
        )
    ckpt = pick_ckpt(True)
    why = (
        f"ZeRO-3: the whole backbone ({mem.weights_replicated / GB:.2f} GiB) + activations exceed the {need}; "
        f"a 1/{world} shard + buffers + activations is {mem.training_total(True, ckpt) / GB:.2f} GiB"
    )
    if not fits(True, ckpt):
        why += " (still over the budget: add ranks, offload_params or activation checkpointing)"
    hpz = 1
    hpz_shard = mem.weights_replicated // ranks_per_node
    if num_nodes > 1 and ranks_per_node > 1 and fits(True, ckpt, hpz_shard):
        hpz = ranks_per_node
        why += f"; hpZ: a secondary 1/{ranks_per_node} copy per node keeps backward gathers inside the node"
    return ZeroChoice(3, hpz, ckpt, why)


@dataclass
class ZeroSetup:
    """The layout chosen for this job; `hf_config` must live until the backbone is loaded and wrapped."""

    choice: ZeroChoice
    settings: ZeroSettings | None  # None: the backbone is replicated (no DeepSpeed)
    hf_config: object | None = None  # transformers' HfDeepSpeedConfig (partitions at load)

    def wrap(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """Start DeepSpeed's hooks on the loaded backbone (nothing to do when replicated)."""
        if self.settings is not None:
            wrap_backbone(backbone, self.hf_config.config, trace_steps=self.settings.trace_steps)
        return backbone

    def load(
        self, path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device
    ) -> torch.nn.Module:
        """The frozen backbone at `path` laid out as chosen: partitioned while it loads and wrapped (ZeRO-3),
        or whole on `device` (`tuner.model.backbone.load_backbone`)."""
        # DeepSpeed print()s while it sets up (op builds, configs): keep the console to the progress bar.
        quiet = (
            contextlib.redirect_stdout(io.StringIO())
            if self.settings is not None
            else contextlib.nullcontext()
        )
        with quiet:
            if self.settings is not None:
                skip_shm_comm_op()  # before DeepSpeed's comm backend starts (in the partitioned load)
            backbone = load_backbone(
                path,
                dtype,
                attn_implementation,
                device,
                activation_checkpointing=self.choice.activation_checkpointing,
            )
            return self.wrap(backbone)


def prepare_zero(
    cluster: ClusterConfig,
    workload: Workload,
    world_size: int,
    *,
    backbone: str,
    dtype: torch.dtype,
    settings: ZeroSettings | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> ZeroSetup:
    """Resolve `cluster.zero_stage` (auto or a stage) for `world_size` ranks and prepare DeepSpeed before
    loading the backbone at directory `backbone` in `dtype`.

    Call it *before* `from_pretrained`: under ZeRO-3 it creates `HfDeepSpeedConfig`, so weights are
    partitioned while they load and no rank materialises the whole model. `workload` (what one step
    asks of each rank) sizes the activations `auto` weighs against the memory budget. Logs the choice
    once (`log` prints on rank 0). `settings` replaces the ZeRO-3 knobs read from `cluster` (benchmarks).
    """
    c = cluster
    nodes = max(1, c.num_nodes)
    per_node = max(1, world_size // nodes)
    if c.memory_budget_gb > 0:
        budget, source = int(c.memory_budget_gb * GB), "cluster.memory_budget_gb"
    else:
        budget, source = device_memory_budget(per_node)
    if world_size == 1:
        choice = ZeroChoice(0, 1, c.activation_checkpointing, "one rank: nothing to shard")
    elif c.zero_stage == "auto":
        from transformers import AutoConfig

        shape = BackboneShape.from_config(AutoConfig.from_pretrained(backbone).to_dict())
        mem = estimate(shape, workload, world_size, c.zero_max_live_parameters)
        choice = choose_zero(mem, budget, nodes, per_node, c.activation_checkpointing)
    else:
        stage = int(c.zero_stage)
        choice = ZeroChoice(
            stage, 1, c.activation_checkpointing, f"cluster.zero_stage={stage} (set in the config)"
        )
    log(f"backbone layout: {choice.reason} [{source}: {budget / GB:.1f} GiB]")
    if choice.stage == 0:
        return ZeroSetup(choice, None)
    settings = settings or ZeroSettings(
        stage=choice.stage,
        param_persistence_threshold=c.zero_param_persistence_threshold,
        prefetch_bucket_size=c.zero_prefetch_bucket_size,
        max_live_parameters=c.zero_max_live_parameters,
        max_reuse_distance=c.zero_max_reuse_distance,
        overlap_comm=c.zero_overlap_comm,
        hpz_partition_size=c.zero_hpz_partition_size or choice.hpz_partition_size,
        quantized_weights=c.zero_quantized_weights,
        offload_params=c.offload_params,
        nvme_path=c.nvme_path,
    )
    from transformers.integrations import HfDeepSpeedConfig

    return ZeroSetup(choice, settings, HfDeepSpeedConfig(deepspeed_config(settings, dtype)))


def wrap_backbone(model: torch.nn.Module, ds_config: dict, trace_steps: bool = True) -> torch.nn.Module:
    """Register DeepSpeed's ZeRO hooks on `model` (already partitioned at load) and return it.

    The engine is created without an optimiser: nothing in the backbone trains. We keep calling
    the Hugging Face module itself (hooks fire on every submodule), so callers can use
    `get_input_embeddings()` / `get_output_embeddings()` directly.

    `trace_steps`: DeepSpeed starts a "step" (records, then follows, its trace of module order) in
    a forward pre-hook on the top module, but `tuner.model.prompt_lm` calls the embedding, decoder and LM
    head directly, so without this the trace never completes: no prefetch, and every weight
    gathered in forward is freed and gathered again in backward. Starting the step at the input
    embedding (the first module of every forward) lets DeepSpeed prefetch along the trace and keep
    weights whose backward use lies within `stage3_max_reuse_distance` elements.
    """
    import deepspeed

    skip_shm_comm_op()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    model._promptfleet_engine = engine  # keep the engine (and its hooks) alive with the model
    if trace_steps:
        coordinator = engine.optimizer.get_param_coordinator()
        model.get_input_embeddings().register_forward_pre_hook(lambda *_: coordinator.reset_step())
    return model


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its `shm_comm` op, which nothing here uses.

    On CPU, DeepSpeed's comm backend JIT-builds `deepspeed_shm_comm` with g++ when it starts, on every
    rank (about 2 minutes on first use, into a ~/.cache/torch_extensions that every environment of the
    machine shares and rebuilds for its own torch). The op serves one collective, `inference_all_reduce`
    (tensor-parallel inference); ZeRO-3's gathers and our prompt-row all-reduce go through
    torch.distributed. DeepSpeed builds it only when its compatibility table says so
    (`deepspeed.comm.torch.build_shm_op`), so marking it incompatible there skips the build: a pod
    with a read-only root filesystem and no compiler starts at once, and nothing is cached anywhere.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def partitioned_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model) for a ZeRO-3 partitioned model."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


@contextlib.contextmanager
def gathered(*params: torch.nn.Parameter) -> Iterator[None]:
    """Make ZeRO-3-partitioned `params` whole for a read outside `forward` (no-op otherwise).

    Every read of sharded backbone weights outside forward goes through here (as PEFT's
    `gather_params_ctx`); the weights are read-only, so nothing is written back.
    """
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_rows_grad(rows: torch.Tensor) -> None:
    """Sum a replicated tensor's gradient over ranks (each rank saw a different shard of the batch):
    the batch's prompt rows, and a prompt method's shared part."""
    if rows.grad is not None and world()[1] > 1:
        dist.all_reduce(rows.grad, op=dist.ReduceOp.SUM)
