"""Typed job configuration: one dataclass per concern, YAML maps 1:1 onto them.

`load_job_config(path, overrides)` reads a job YAML, applies `key=value` overrides
(dotted paths, e.g. `optim.lr=0.3`), rejects unknown keys and resolves every task file.
It does not touch torch, Ray or the data files beyond checking that they exist.

The job's sections live here; the `search:` section is the search's own (`tuner.search.config`), and
how any section is built from YAML and checked is `tuner.schema`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tuner.schema import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_non_negative,
    check_positive,
    documented,
    from_dict,
    read_yaml,
    validate_name,
)

# Importers of the configuration read the schema's names from here too (the CLI, tasks, serving, tests).
from tuner.schema import one_line as one_line
from tuner.schema import shown as shown
from tuner.schema import to_dict as to_dict
from tuner.search.config import SearchConfig


@dataclass
class ModelConfig:
    name: str = documented(
        "smollm2-135m", "Backbone: `smollm2-135m` (embedded default), a Hub id, or a local checkpoint dir."
    )
    dtype: str = documented(
        "auto",
        "Compute dtype of the frozen backbone: auto (bf16 on GPUs and AMX CPUs, else fp32), bf16, fp16 or fp32.",
    )
    attn_implementation: str = documented(
        "auto",
        "Kernel for packed rows (tuner.model.attention): auto (varlen on CUDA with torch>=2.10, else "
        "flash_attention_2 with flash-attn, else sdpa), sdpa (span SDPA), eager (dense mask), varlen "
        "(torch's varlen_attn, CUDA), flex (FlexAttention) or flash_attention_2 (flash-attn, CUDA).",
    )
    max_seq_len: int = documented(
        256, "Longest example (virtual tokens + input + target); longer inputs are cut from the left."
    )

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name is empty: give smollm2-135m, a Hub id or a checkpoint directory")
        check_choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        check_choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("auto", "sdpa", "eager", "varlen", "flex", "flash_attention_2"),
        )
        check_positive("model.max_seq_len", self.max_seq_len)

    def check_local_path(self) -> None:
        """A `name` that is a path (starts with / . ~, or has a separator and is no Hub id `org/name`)
        must be a directory here: one line now instead of a Hub error after the model starts loading.
        Run where the job runs (not by `submit`: the cluster may hold paths this machine has not)."""
        name = self.name.strip()
        hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and ".." not in name
        if (name.startswith(("/", ".", "~")) or os.sep in name) and not hub_id:
            if not Path(name).expanduser().is_dir():
                raise ConfigError(
                    f"model.name={name}: no such directory (a local backbone is a checkpoint directory; "
                    "a Hub id looks like org/name)"
                )


# The prompt parameterisations (`tuner.prompts.methods`, one layout class each) and the rank that
# `prompt.rank=0` means for each; kept here, with the config that checks them, so reading a job's
# config (a Ray job's driver, the run directory's fingerprint) loads no torch.
PROMPT_METHODS = ("independent", "residual", "multitask", "ulpt", "superpos")
DEFAULT_RANK = {"multitask": 1, "ulpt": 32}


@dataclass
class PromptConfig:
    num_virtual_tokens: int = documented(20, "Virtual tokens per task (Lester et al. use 20-100).")
    init: str = documented(
        "class_labels",
        "Initialisation: random, vocab (sampled vocabulary), text, or class_labels (label words, then vocab).",
    )
    init_text: str = documented("", "Text used when init=text (repeated/cut to num_virtual_tokens).")
    init_std: float = documented(0.02, "Std of the normal used when init=random.")
    # --- prompt parameterisations (tuner/prompts/methods.py) and continual training (tuner/prompts/continual.py)
    method: str = documented(
        "independent",
        "How task prompts are parameterised: independent (one free prompt per task), residual (each "
        "task's embedding through one shared MLP with a residual connection, Razdaibiedina et al. 2023) "
        "or multitask (one shared prompt times a per-task rank-r factor, MPT, Wang et al. 2023), ulpt "
        "(each task's prompt in r dimensions lifted by one fixed random projection, with a per-task "
        "scale and shift, ULPT, Wu et al. 2025) or superpos (each prompt token a per-task mix of a fixed "
        "sample of vocabulary embeddings, SuperPos-Prompt 2024); ulpt and superpos draw their fixed part "
        "from data.seed and keep it in the checkpoint.",
    )
    rank: int = documented(
        0,
        "multitask: rank r of each task's modulation u_k v_k^T; ulpt: the dimension r of each task's prompt. "
        "0: the method's default (multitask 1 as MPT, ulpt 32: P*r + 2H per task, 0.16 of a free prompt's at "
        "20 x 576).",
    )
    bottleneck: int = documented(128, "residual: hidden width of the shared reparameterisation MLP.")
    superpos_tokens: int = documented(
        128, "superpos: m, the sampled vocabulary embeddings each prompt token mixes (the paper's 128)."
    )
    shared_lr_scale: float = documented(
        1.0, "Learning rate of the shared parts (residual MLP, multitask prompt) as a multiple of optim.lr."
    )
    init_from: str = documented(
        "",
        "A finished run directory: its tasks are carried into this run's adapters unchanged (and not "
        "trained again), its shared parts are loaded and frozen; the job lists only new tasks. Also the "
        "source of init=transfer.",
    )
    transfer_examples: int = documented(
        8,
        "init=transfer: each new task starts from the init_from task whose prompt has the lowest "
        "zero-shot loss on this many of the new task's training examples.",
    )
    transfer_check_steps: int = documented(
        10,
        "init=transfer: before training, each new task trains this many probe steps from the transferred "
        "start and from its own (class-label) start and keeps the transferred one only if its held-out "
        "loss is not worse (tuner/prompts/transfer_guard.py); 0 keeps every transferred start unchecked.",
    )
    transfer_heldout: int = documented(
        32, "init=transfer: the held-out training examples (at most a quarter) the check scores on."
    )

    def __post_init__(self) -> None:
        check_positive("prompt.num_virtual_tokens", self.num_virtual_tokens)
        check_choice("prompt.init", self.init, ("random", "vocab", "text", "class_labels", "transfer"))
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt.init=text needs prompt.init_text")
        check_choice("prompt.method", self.method, PROMPT_METHODS)
        check_positive("prompt.init_std", self.init_std)
        check_non_negative("prompt.rank", self.rank)
        check_positive("prompt.bottleneck", self.bottleneck)
        check_positive("prompt.superpos_tokens", self.superpos_tokens)
        check_non_negative("prompt.transfer_check_steps", self.transfer_check_steps)
        check_positive("prompt.transfer_heldout", self.transfer_heldout)
        check_positive("prompt.shared_lr_scale", self.shared_lr_scale)
        check_positive("prompt.transfer_examples", self.transfer_examples)
        if self.init == "transfer" and not self.init_from:
            raise ConfigError("prompt.init=transfer needs prompt.init_from (a finished run directory)")


@dataclass
class OptimConfig:
    lr: float = documented(
        0.03,
        "Peak learning rate of the prompt bank (Adam moves each coordinate ~lr per step; embeddings here have std ~0.14).",
    )
    betas: list[float] = documented([0.9, 0.999], "Adam betas.")
    eps: float = documented(1e-8, "Adam epsilon.")
    weight_decay: float = documented(0.0, "Decoupled weight decay applied to the rows that are updated.")
    warmup_steps: int = documented(10, "Linear warm-up steps.")
    schedule: str = documented(
        "cosine", "LR schedule after warm-up: constant, linear or cosine (to 10% of peak)."
    )
    grad_clip: float = documented(1.0, "Clip the global norm of the prompt gradient (0 disables).")
    max_steps: int = documented(100, "Optimiser steps to run.")
    batch_size: int = documented(32, "Examples per optimiser step across all ranks (the global batch).")
    grad_accum: int = documented(
        1, "Micro-batches per optimiser step; each holds batch_size / grad_accum examples."
    )
    loss_weighting: str = documented(
        "token",
        "How a task's loss in a step averages its examples: token (the mean over all of the task's target "
        "tokens in the step, as PEFT's and Hugging Face's causal-LM loss: long targets weigh more) or example "
        "(the mean over its examples of each one's mean target-token NLL: a 2-token target weighs as much as a "
        "40-token one). The same for single-token verbalisers; it differs for generation and NER tasks "
        "(BENCHMARKS.md: token gave NER +12.4 entity F1 at the quality benchmark's budget).",
    )

    def __post_init__(self) -> None:
        check_positive("optim.lr", self.lr)
        check_positive("optim.eps", self.eps)
        for key in ("weight_decay", "warmup_steps", "grad_clip"):
            check_non_negative(f"optim.{key}", getattr(self, key))
        check_positive("optim.max_steps", self.max_steps)
        check_positive("optim.batch_size", self.batch_size)
        check_positive("optim.grad_accum", self.grad_accum)
        check_choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        check_choice("optim.loss_weighting", self.loss_weighting, ("example", "token"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas!r}: must be two values in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise ConfigError("optim.batch_size must be divisible by optim.grad_accum")


@dataclass
class DataConfig:
    mixing: str = documented(
        "temperature", "How tasks are mixed into batches: proportional, temperature or uniform."
    )
    temperature: float = documented(2.0, "T for temperature mixing: p_task ~ n_task^(1/T).")
    packing: bool = documented(
        True, "Pack several examples per row without padding (segments never attend to each other)."
    )
    share_prompts: bool = documented(
        True,
        "Packed examples of one task share one copy of its prompt (exact under causal attention; "
        "SDPA/eager only, FlashAttention-2 gives each example its own copy).",
    )
    row_len: int = documented(
        2048,
        "Packed row capacity in positions (at least model.max_seq_len). Longer rows let more examples "
        "share a prompt copy and waste less padding; SDPA's span attention makes length free (eager "
        "attention pays a dense L x L mask).",
    )
    prefetch: int = documented(
        1,
        "Steps whose batches are collated ahead in a background thread while the current step runs "
        "(0: in the step). Identical results either way; takes host work off the device's critical path.",
    )
    max_train_examples: int = documented(0, "Cap on train examples read per task (0 = all).")
    max_eval_examples: int = documented(200, "Eval examples per task (0 = the whole eval split).")
    seed: int = documented(0, "Seed for sampling, few-shot demonstrations and prompt init.")

    def __post_init__(self) -> None:
        check_choice("data.mixing", self.mixing, ("proportional", "temperature", "uniform"))
        check_positive("data.temperature", self.temperature)
        check_positive("data.row_len", self.row_len)
        check_non_negative("data.prefetch", self.prefetch)
        check_non_negative("data.max_train_examples", self.max_train_examples)
        check_non_negative("data.max_eval_examples", self.max_eval_examples)


@dataclass
class ClusterConfig:
    num_workers: int = documented(
        2, "Ray Train workers (ranks); under ZeRO-3 each holds 1/num_workers of the backbone."
    )
    use_gpu: bool = documented(False, "One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: int = documented(1, "CPUs Ray reserves for each worker.")
    address: str = documented(
        "", "Ray address to join; empty starts an embedded local Ray (RAY_ADDRESS also works)."
    )
    zero_stage: str = documented(
        "auto",
        "Backbone layout: auto (replicate when backbone + activations fit memory_budget_gb, else ZeRO-3; "
        "printed at start), 0 (replicate), or a DeepSpeed ZeRO stage 1-3 (3 partitions the weights).",
    )
    num_nodes: int = documented(
        1, "Nodes the workers span; auto shares a node's RAM among its ranks and uses hpZ."
    )
    memory_budget_gb: float = documented(
        0.0,
        "Memory one rank may use, for zero_stage=auto (0: 90% of the GPU, or 80% of host RAM / ranks per node).",
    )
    activation_checkpointing: bool = documented(
        False, "Recompute each frozen decoder layer in backward instead of keeping its activations."
    )
    zero_param_persistence_threshold: int = documented(
        100_000,
        "ZeRO-3: parameters with at most this many elements stay whole on every rank (norms, small "
        "projections): fewer, larger gathers for a few MB. 0 partitions everything.",
    )
    zero_prefetch_bucket_size: int = documented(
        50_000_000, "ZeRO-3: elements gathered ahead of the module that needs them (coalesces gathers)."
    )
    zero_max_live_parameters: int = documented(
        1_000_000_000,
        "ZeRO-3: cap on gathered elements alive at once; the prefetcher runs ahead until it is reached, "
        "so above the backbone's size the whole model stays gathered during a step (fewest gathers).",
    )
    zero_max_reuse_distance: int = documented(
        1_000_000_000,
        "ZeRO-3: keep a gathered weight when its next use (in backward) is within this many elements; "
        ">= 2x the backbone's parameters gathers each weight once per step (peak: the whole model).",
    )
    zero_overlap_comm: bool = documented(True, "ZeRO-3: overlap weight gathers with compute.")
    zero_hpz_partition_size: int = documented(
        0,
        "ZeRO++ hpZ: keep a secondary weight copy partitioned within this many ranks (a node) so "
        "backward gathers stay intra-node; 0 = auto (ranks per node when num_nodes > 1).",
    )
    zero_quantized_weights: bool = documented(
        False, "ZeRO++ qwZ: gather weights as int8 (halves gather bytes; CUDA kernels, GPU only)."
    )
    offload_params: str = documented("none", "ZeRO-3 parameter offload: none, cpu or nvme.")
    nvme_path: str = documented("/local_nvme", "Where ZeRO-3 offloads parameters when offload_params=nvme.")
    max_failures: int = documented(
        0, "Worker-group restarts Ray Train allows; each resumes from the last checkpoint."
    )
    storage: str = documented(
        "",
        "Storage all nodes share, for a multi-node cluster: an absolute path mounted on every node (or "
        "file://...), or a URI Ray Train understands (s3://, gs://). Ray Train's checkpoints go there, and "
        "a relative output_dir lies under a path storage. Empty: both stay in the run dir (one machine).",
    )
    path_map: dict[str, str] = documented(
        {},
        "For `submit` to a remote cluster: where files of this machine are on the cluster, {path here (relative "
        "to this job file, or absolute): absolute path there}, e.g. {../../shared/data: /workspace/shared/data}.",
    )
    metrics_port: int = documented(0, "Port of the job's Prometheus metrics, on the driver (0 = off).")
    worker_logs: bool = documented(
        False,
        "Forward the Ray workers' stdout/stderr and a crashed raylet's log dump to the driver's console "
        "(off: they stay in Ray's session logs; progress, errors and a lost worker group's line reach it "
        "either way).",
    )

    def __post_init__(self) -> None:
        check_positive("cluster.num_workers", self.num_workers)
        self.zero_stage = str(self.zero_stage)  # YAML `3` and Python `3` both mean "3"
        check_choice("cluster.zero_stage", self.zero_stage, ("auto", "0", "1", "2", "3"))
        check_positive("cluster.num_nodes", self.num_nodes)
        if self.memory_budget_gb < 0:
            raise ConfigError(
                f"cluster.memory_budget_gb={self.memory_budget_gb!r}: must be >= 0 (0 = from the device)"
            )
        for key in (
            "zero_param_persistence_threshold",
            "zero_prefetch_bucket_size",
            "zero_hpz_partition_size",
            "zero_max_reuse_distance",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.{key}={getattr(self, key)!r}: must be >= 0")
        check_positive("cluster.zero_max_live_parameters", self.zero_max_live_parameters)
        check_choice("cluster.offload_params", self.offload_params, ("none", "cpu", "nvme"))
        if self.storage and "://" not in self.storage and not os.path.isabs(os.path.expanduser(self.storage)):
            raise ConfigError(
                f"cluster.storage={self.storage!r}: must be an absolute path shared by the nodes, or a URI"
            )
        for here, there in self.path_map.items():
            if not str(here).strip() or not isinstance(there, str) or not there.startswith("/"):
                raise ConfigError(
                    f"cluster.path_map: {here!r}: {there!r}: map a path here to an absolute path on the cluster"
                )


@dataclass
class JobConfig:
    name: str = documented("promptfleet", "Run name; the output directory is <output_dir>/<name>.")
    output_dir: str = documented(
        "runs",
        "Where run directories are written (relative paths resolve against the CWD, or on a Ray cluster "
        "under cluster.storage when that is a path).",
    )
    tasks: list[str] = documented([], "Task files (YAML under configs/tasks/), relative to this job file.")
    model: ModelConfig = documented(None, "The frozen backbone.")
    prompt: PromptConfig = documented(None, "The per-task soft prompts.")
    optim: OptimConfig = documented(None, "Optimisation of the prompt bank.")
    data: DataConfig = documented(None, "Task mixing, packing and data limits.")
    cluster: ClusterConfig = documented(None, "Ray and DeepSpeed.")
    search: SearchConfig = documented(
        None, "In-batch hyperparameter variants per task with successive halving."
    )
    eval_every: int = documented(50, "Evaluate every N steps (0 = only at the end).")
    eval_zero_shot: bool = documented(True, "Also score the untuned backbone (zero-shot) for the report.")
    checkpoint_every: int = documented(50, "Write an atomic checkpoint every N steps (0 = only at the end).")
    checkpoint_full_every: int = documented(
        10,
        "Every Nth checkpoint is a full snapshot; those between hold only the prompt rows, Adam moments and "
        "sampler positions changed since the one before (1 = every checkpoint full). The final one is full.",
    )
    log_every: int = documented(1, "Log metrics every N steps.")
    resume: bool = documented(
        True, "Resume from the newest complete checkpoint in the run directory if there is one."
    )
    export_format: str = documented(
        "auto",
        "How <run>/adapters is written: dirs (a PEFT directory per task), packed (sharded safetensors + "
        "index.json, tuner.prompt_store) or auto (packed for task families or more than 64 tasks).",
    )

    def __post_init__(self) -> None:
        for name, cls in (
            ("model", ModelConfig),
            ("prompt", PromptConfig),
            ("optim", OptimConfig),
            ("data", DataConfig),
            ("cluster", ClusterConfig),
            ("search", SearchConfig),
        ):
            if getattr(self, name) is None:
                setattr(self, name, cls())
        validate_name("name", self.name)
        check_positive("log_every", self.log_every)
        check_non_negative("eval_every", self.eval_every)
        check_non_negative("checkpoint_every", self.checkpoint_every)
        check_positive("checkpoint_full_every", self.checkpoint_full_every)
        check_choice("export_format", self.export_format, ("auto", "packed", "dirs"))
        self.search.check(self)  # refuses unknown or unsearchable keys and invalid values, in one line

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_job_config(
    path: str | os.PathLike, overrides: list[str] | None = None, *, check_task_files: bool = True
) -> JobConfig:
    """Read a job YAML, apply overrides, validate, and make task paths absolute.

    `check_task_files=False` leaves a missing task file to the caller (`promptfleet validate`
    reports every bad task of a job, not the first).
    """
    data = apply_overrides(read_yaml(path), overrides or [])
    cfg = from_dict(JobConfig, data)
    base = Path(path).resolve().parent
    if not cfg.tasks:
        raise ConfigError(f"{path}: `tasks` lists no task files")
    cfg.tasks = [str(task_file(base, t, check=check_task_files)) for t in cfg.tasks]
    return cfg


def task_file(base: Path, task: str, check: bool = True) -> Path:
    """A job's `tasks` entry as an absolute path (relative to the job file's folder `base`);
    with `check`, a `ConfigError` if there is no such file."""
    tp = (base / task).resolve() if not os.path.isabs(task) else Path(task)
    if check and not tp.is_file():
        raise ConfigError(f"task file not found: {task} (resolved to {tp})")
    return tp
