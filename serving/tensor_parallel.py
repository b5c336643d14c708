"""Tensor-parallel serving, the model side: N ranks, each holding 1/N of every layer's heads and MLP columns.

A backbone too large for one device is served by N processes (ranks) of one replica. Each loads its
shard with transformers' own tensor-parallel plan (DTensor over `torch.distributed`): q/k/v and
gate/up projections keep 1/N of their output columns, o and down projections 1/N of their input
rows (one all-reduce after each), so a rank computes heads/N attention heads over kv_heads/N KV
heads. The embedding is vocabulary-parallel (each rank holds 1/N of the rows; the lookups are
summed) and the LM head, tied to it or not, is sharded the same way, its logits gathered. So no
rank ever holds more than about 1/N of the weights, and the request and task-prefix KV caches each
rank keeps are those of its own heads (the runner sizes them by `local_kv_heads`).

Every collective runs on one process group whose timeout is `engine.collective_timeout_s`: a rank
that dies breaks the group at once (gloo and NCCL see the closed connection), one that stalls
breaks it when the timeout passes. Either way the runner raises `RankLost`, which the engine turns
into a 503 for every request in flight.

This module holds the checks made at start (`check_shards`), the process group (`init_group`), the
sharded load (`load_sharded_backbone`) and fp32 logits of a sharded LM head. It does not decide
what a step runs nor carry the plan between ranks (`serving.step_plan`, `serving.tp_worker`).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from serving.types import RetryableError
from tuner.schema import ConfigError


class RankLost(RetryableError):
    """A rank of this replica died or stalled (a collective failed): every request in flight ends
    with 503, and the replica exits (standalone) or is restarted (Ray Serve)."""

    status, type, code = 503, "server_error", "replica_rank_lost"


def check_shards(model_config, n: int, device: str) -> None:
    """Refuse, in one line, an N that does not divide the backbone's attention and KV heads, or one
    larger than the GPUs present. On a CPU the ranks share its cores: any N that divides the heads runs."""
    if n == 1:
        return
    cfg = model_config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % n or kv_heads % n:
        raise ConfigError(
            f"engine.tensor_parallel={n} does not divide the backbone's {heads} attention heads and "
            f"{kv_heads} KV heads (each rank must hold whole heads); "
            f"choose one of {[k for k in range(1, heads + 1) if heads % k == 0 and kv_heads % k == 0]}"
        )
    if not getattr(cfg, "base_model_tp_plan", None):
        raise ConfigError(
            f"engine.tensor_parallel={n}: the backbone ({cfg.model_type}) has no tensor-parallel plan"
        )
    if device.startswith("cuda"):
        found = torch.cuda.device_count()
        if n > found:
            raise ConfigError(f"engine.tensor_parallel={n} needs {n} GPUs, {found} present")


def local_kv_heads(model_config, n: int) -> int:
    """KV heads one rank of `n` holds (all of them when n == 1)."""
    cfg = model_config.get_text_config(decoder=True)
    return (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // n


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now on `host` (rank 0 binds it for the group's store right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


START_TIMEOUT_S = 900.0  # ranks wait this long for each other while they start and load


@dataclass
class GroupSpec:
    """Where the ranks of one replica meet: what rank 0 hands every other rank at start."""

    world: int
    host: str
    port: int
    timeout_s: float
    device: str  # the engine's device setting: cpu, cuda or cuda:k (rank r uses the r-th GPU)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    """The device rank `rank` computes on: the CPU, or one GPU per rank (the r-th visible one; under
    Ray each rank sees only its own GPU, which is then index 0)."""
    if not device.startswith("cuda"):
        return torch.device("cpu")
    return torch.device("cuda", rank % max(1, torch.cuda.device_count()))


def init_group(spec: GroupSpec, rank: int) -> torch.device:
    """Join the replica's process group as `rank` (every collective times out after `spec.timeout_s`)."""
    device = rank_device(spec.device, rank)
    _saved_env.update({k: os.environ.get(k) for k in _GROUP_ENV})
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(spec.world), LOCAL_RANK=str(device.index or 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        spec.backend,
        init_method=f"tcp://{spec.host}:{spec.port}",
        rank=rank,
        world_size=spec.world,
        # Loading differs between ranks (a child imports torch first): the start has its own bound.
        timeout=timedelta(seconds=max(START_TIMEOUT_S, spec.timeout_s)),
    )
    return device


def set_group_timeout(seconds: float, *groups) -> None:
    """From now on every collective of the default group (and of `groups`) waits at most `seconds`."""
    for group in (None, *groups):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_saved_env: dict[str, str | None] = {}


def leave_group() -> None:
    """Leave the process group (a broken one too) and restore the environment `init_group` changed,
    so the process (a test, a Serve replica) can start another replica later."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peers are gone: nothing left to release cleanly
            pass
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()


def tp_plan(model_config) -> dict[str, str]:
    """The backbone's own tensor-parallel plan, with the embedding vocabulary-parallel: otherwise
    every rank would hold the whole embedding (a fifth of a small model's weights) and, when the
    LM head is tied to it, the whole head too."""
    cfg = model_config.get_text_config(decoder=True)
    plan = {f"model.{k}": v for k, v in cfg.base_model_tp_plan.items()}
    plan["model.embed_tokens"] = "embedding_rowwise"
    plan["lm_head"] = "colwise_gather_output"
    return plan


def load_sharded_backbone(path: str, dtype: torch.dtype, attn_implementation: str):
    """This rank's shard of the backbone at `path`, frozen, in eval mode (the group is initialised).

    transformers reads each weight's slice from the safetensors files, so the rank never
    materialises the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from tuner.model.model_cache import no_progress_bars

    plan = tp_plan(AutoConfig.from_pretrained(path))
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            distributed_config=DistributedConfig(tp_plan=plan),
        )
    model.requires_grad_(False)
    model.eval()
    return model


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank holds (its shards, and whatever is replicated)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if is_sharded(p) else p
        total += t.numel() * t.element_size()
    return total


@dataclass
class RankMemory:
    """What one rank's backbone costs: the weights it holds and its process's private memory growth."""

    rank: int
    weight_bytes: int  # its shards and whatever is replicated (norms)
    full_weight_bytes: int  # the whole model's
    anon_growth_bytes: int  # private (anonymous) memory the load added; file pages of the checkpoint excluded
    anon_peak_bytes: int  # the most private memory the load held above the start, sampled every 5 ms

    @property
    def ratio(self) -> float:
        return self.weight_bytes / self.full_weight_bytes


def anon_bytes() -> int:
    """This process's private resident memory (Linux `RssAnon`; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnon:
    """`with PeakAnon() as peak:` samples `anon_bytes()` every `every_s` on a thread; then
    `peak.growth` is the last sample's rise over the start and `peak.peak` the highest rise seen.
    (A CPU process's peak: on a GPU the device's own counters say more.)"""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.growth, self.peak = every_s, 0, 0

    def __enter__(self) -> PeakAnon:
        self._start, self._stop = anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, anon_bytes() - self._start)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = anon_bytes() - self._start
        self.peak = max(self.peak, self.growth)


def full_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole model's weights (every shard counted at its global shape)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sharded_fp32_logits(lm_head: torch.nn.Module, hidden: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """fp32 logits `[n, vocab]` of a vocabulary-sharded LM head: this rank's slice of the vocabulary
    computed in fp32 a block at a time, then gathered from every rank (one collective)."""
    from transformers.distributed.tensor_parallel import TensorParallelLayer

    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    w_local = weight.to_local()
    h = hidden.float()
    out = torch.empty(h.shape[0], w_local.shape[0], dtype=torch.float32, device=h.device)
    b_local = None if bias is None else (bias.to_local() if is_sharded(bias) else bias)
    for start in range(0, w_local.shape[0], block):
        w = w_local[start : start + block].float()
        out[:, start : start + block] = h @ w.T + (
            0 if b_local is None else b_local[start : start + block].float()
        )
    full = TensorParallelLayer._from_local_last_dim_shard(out, weight.device_mesh, weight.shape[0])
    return full.full_tensor()
