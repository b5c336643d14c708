"""DeepSpeed ZeRO for a frozen backbone: the config, the engine, and the one gather helper.

Why the prompt bank is not handed to DeepSpeed: ZeRO flattens and partitions every trainable
parameter and its optimiser steps the whole flat buffer, i.e. O(all registered tasks) per step.
Prompts are tiny, so every rank keeps the full bank replicated, gathers only the rows of tasks in
the batch, all-reduces those rows' gradients itself (`allreduce_rows_grad`) and steps them with
`tuner.optim.SparseRowAdam`. DeepSpeed owns what it is good at: partitioning the large frozen
backbone across ranks (ZeRO-3) and gathering each layer's weights just in time in forward and
backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def deepspeed_config(
    stage: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    micro_batch_size: int = 1,
    offload_params: str = "none",
    nvme_path: str = "/local_nvme",
) -> dict:
    """A DeepSpeed config for inference-style use of a frozen model (no DeepSpeed optimiser)."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": 0,  # partition every weight, even small norms
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_max_live_parameters": 1e9,
            }
        )
        if offload_params != "none":
            zero["offload_param"] = {"device": offload_params, "pin_memory": torch.cuda.is_available()}
            if offload_params == "nvme":
                zero["offload_param"]["nvme_path"] = nvme_path
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def wrap_backbone(model: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
    """Register DeepSpeed's ZeRO hooks on `model` (already partitioned at load) and return it.

    The engine is created without an optimiser: nothing in the backbone trains. We keep calling
    the Hugging Face module itself (hooks fire on every submodule), so callers can use
    `get_input_embeddings()` / `get_output_embeddings()` directly.
    """
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    model._promptfleet_engine = engine  # keep the engine (and its hooks) alive with the model
    return model


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
    """Sum the prompt-row gradients over ranks (each rank saw a different shard of the batch)."""
    if rows.grad is not None and world()[1] > 1:
        dist.all_reduce(rows.grad, op=dist.ReduceOp.SUM)
