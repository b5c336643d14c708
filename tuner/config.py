"""Typed job configuration: one dataclass per concern, YAML maps 1:1 onto them.

`load_job_config(path, overrides)` reads a job YAML, applies `key=value` overrides
(dotted paths, e.g. `optim.lr=0.3`), rejects unknown keys and resolves every task file.
It does not touch torch, Ray or the data files beyond checking that they exist.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


def one_line(e: BaseException) -> str:
    """`e` as one line a user can act on: the innermost cause (Ray and `datasets` wrap the error that
    says what is wrong), its last line, with its type unless it is our own ConfigError."""
    inner = e
    while getattr(inner, "cause", None) is not None or inner.__cause__ is not None:
        inner = getattr(inner, "cause", None) or inner.__cause__
    msg = str(inner).strip().splitlines()
    text = msg[-1] if msg else type(inner).__name__
    return text if isinstance(inner, ConfigError) else f"{type(inner).__name__}: {text}"


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ModelConfig:
    name: str = _f(
        "smollm2-135m", "Backbone: `smollm2-135m` (embedded default), a Hub id, or a local checkpoint dir."
    )
    dtype: str = _f(
        "auto",
        "Compute dtype of the frozen backbone: auto (bf16 on GPUs and AMX CPUs, else fp32), bf16, fp16 or fp32.",
    )
    attn_implementation: str = _f(
        "auto",
        "Kernel for packed rows (tuner.model.attention): auto (varlen on CUDA with torch>=2.10, else "
        "flash_attention_2 with flash-attn, else sdpa), sdpa (span SDPA), eager (dense mask), varlen "
        "(torch's varlen_attn, CUDA), flex (FlexAttention) or flash_attention_2 (flash-attn, CUDA).",
    )
    max_seq_len: int = _f(
        256, "Longest example (virtual tokens + input + target); longer inputs are cut from the left."
    )

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name is empty: give smollm2-135m, a Hub id or a checkpoint directory")
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("auto", "sdpa", "eager", "varlen", "flex", "flash_attention_2"),
        )
        _positive("model.max_seq_len", self.max_seq_len)


@dataclass
class PromptConfig:
    num_virtual_tokens: int = _f(20, "Virtual tokens per task (Lester et al. use 20-100).")
    init: str = _f(
        "class_labels",
        "Initialisation: random, vocab (sampled vocabulary), text, or class_labels (label words, then vocab).",
    )
    init_text: str = _f("", "Text used when init=text (repeated/cut to num_virtual_tokens).")
    init_std: float = _f(0.02, "Std of the normal used when init=random.")
    # --- prompt parameterisations (tuner/prompts/methods.py) and continual training (tuner/prompts/continual.py)
    method: str = _f(
        "independent",
        "How task prompts are parameterised: independent (one free prompt per task), residual (each "
        "task's embedding through one shared MLP with a residual connection, Razdaibiedina et al. 2023) "
        "or multitask (one shared prompt times a per-task rank-r factor, MPT, Wang et al. 2023).",
    )
    rank: int = _f(1, "multitask: rank r of each task's modulation u_k v_k^T (MPT uses 1).")
    bottleneck: int = _f(128, "residual: hidden width of the shared reparameterisation MLP.")
    shared_lr_scale: float = _f(
        1.0, "Learning rate of the shared parts (residual MLP, multitask prompt) as a multiple of optim.lr."
    )
    init_from: str = _f(
        "",
        "A finished run directory: its tasks are carried into this run's adapters unchanged (and not "
        "trained again), its shared parts are loaded and frozen; the job lists only new tasks. Also the "
        "source of init=transfer.",
    )
    transfer_examples: int = _f(
        8,
        "init=transfer: each new task starts from the init_from task whose prompt has the lowest "
        "zero-shot loss on this many of the new task's training examples.",
    )

    def __post_init__(self) -> None:
        _positive("prompt.num_virtual_tokens", self.num_virtual_tokens)
        _choice("prompt.init", self.init, ("random", "vocab", "text", "class_labels", "transfer"))
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt.init=text needs prompt.init_text")
        _choice("prompt.method", self.method, ("independent", "residual", "multitask"))
        _positive("prompt.init_std", self.init_std)
        _positive("prompt.rank", self.rank)
        _positive("prompt.bottleneck", self.bottleneck)
        _positive("prompt.shared_lr_scale", self.shared_lr_scale)
        _positive("prompt.transfer_examples", self.transfer_examples)
        if self.init == "transfer" and not self.init_from:
            raise ConfigError("prompt.init=transfer needs prompt.init_from (a finished run directory)")


@dataclass
class OptimConfig:
    lr: float = _f(
        0.03,
        "Peak learning rate of the prompt bank (Adam moves each coordinate ~lr per step; embeddings here have std ~0.14).",
    )
    betas: list[float] = _f([0.9, 0.999], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    weight_decay: float = _f(0.0, "Decoupled weight decay applied to the rows that are updated.")
    warmup_steps: int = _f(10, "Linear warm-up steps.")
    schedule: str = _f("cosine", "LR schedule after warm-up: constant, linear or cosine (to 10% of peak).")
    grad_clip: float = _f(1.0, "Clip the global norm of the prompt gradient (0 disables).")
    max_steps: int = _f(100, "Optimiser steps to run.")
    batch_size: int = _f(32, "Examples per optimiser step across all ranks (the global batch).")
    grad_accum: int = _f(1, "Micro-batches per optimiser step; each holds batch_size / grad_accum examples.")
    loss_weighting: str = _f(
        "token",
        "How a task's loss in a step averages its examples: token (the mean over all of the task's target "
        "tokens in the step, as PEFT's and Hugging Face's causal-LM loss: long targets weigh more) or example "
        "(the mean over its examples of each one's mean target-token NLL: a 2-token target weighs as much as a "
        "40-token one). The same for single-token verbalisers; it differs for generation and NER tasks "
        "(BENCHMARKS.md: token gave NER +12.4 entity F1 at the quality benchmark's budget).",
    )

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        for key in ("weight_decay", "warmup_steps", "grad_clip"):
            _non_negative(f"optim.{key}", getattr(self, key))
        _positive("optim.max_steps", self.max_steps)
        _positive("optim.batch_size", self.batch_size)
        _positive("optim.grad_accum", self.grad_accum)
        _choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        _choice("optim.loss_weighting", self.loss_weighting, ("example", "token"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas!r}: must be two values in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise ConfigError("optim.batch_size must be divisible by optim.grad_accum")


@dataclass
class DataConfig:
    mixing: str = _f("temperature", "How tasks are mixed into batches: proportional, temperature or uniform.")
    temperature: float = _f(2.0, "T for temperature mixing: p_task ~ n_task^(1/T).")
    packing: bool = _f(
        True, "Pack several examples per row without padding (segments never attend to each other)."
    )
    share_prompts: bool = _f(
        True,
        "Packed examples of one task share one copy of its prompt (exact under causal attention; "
        "SDPA/eager only, FlashAttention-2 gives each example its own copy).",
    )
    row_len: int = _f(
        2048,
        "Packed row capacity in positions (at least model.max_seq_len). Longer rows let more examples "
        "share a prompt copy and waste less padding; SDPA's span attention makes length free (eager "
        "attention pays a dense L x L mask).",
    )
    max_train_examples: int = _f(0, "Cap on train examples read per task (0 = all).")
    max_eval_examples: int = _f(200, "Eval examples per task (0 = the whole eval split).")
    seed: int = _f(0, "Seed for sampling, few-shot demonstrations and prompt init.")

    def __post_init__(self) -> None:
        _choice("data.mixing", self.mixing, ("proportional", "temperature", "uniform"))
        _positive("data.temperature", self.temperature)
        _positive("data.row_len", self.row_len)
        _non_negative("data.max_train_examples", self.max_train_examples)
        _non_negative("data.max_eval_examples", self.max_eval_examples)


@dataclass
class ClusterConfig:
    num_workers: int = _f(
        2, "Ray Train workers (ranks); under ZeRO-3 each holds 1/num_workers of the backbone."
    )
    use_gpu: bool = _f(False, "One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: int = _f(1, "CPUs Ray reserves for each worker.")
    address: str = _f("", "Ray address to join; empty starts an embedded local Ray (RAY_ADDRESS also works).")
    zero_stage: str = _f(
        "auto",
        "Backbone layout: auto (replicate when backbone + activations fit memory_budget_gb, else ZeRO-3; "
        "printed at start), 0 (replicate), or a DeepSpeed ZeRO stage 1-3 (3 partitions the weights).",
    )
    num_nodes: int = _f(1, "Nodes the workers span; auto shares a node's RAM among its ranks and uses hpZ.")
    memory_budget_gb: float = _f(
        0.0,
        "Memory one rank may use, for zero_stage=auto (0: 90% of the GPU, or 80% of host RAM / ranks per node).",
    )
    activation_checkpointing: bool = _f(
        False, "Recompute each frozen decoder layer in backward instead of keeping its activations."
    )
    zero_param_persistence_threshold: int = _f(
        100_000,
        "ZeRO-3: parameters with at most this many elements stay whole on every rank (norms, small "
        "projections): fewer, larger gathers for a few MB. 0 partitions everything.",
    )
    zero_prefetch_bucket_size: int = _f(
        50_000_000, "ZeRO-3: elements gathered ahead of the module that needs them (coalesces gathers)."
    )
    zero_max_live_parameters: int = _f(
        1_000_000_000,
        "ZeRO-3: cap on gathered elements alive at once; the prefetcher runs ahead until it is reached, "
        "so above the backbone's size the whole model stays gathered during a step (fewest gathers).",
    )
    zero_max_reuse_distance: int = _f(
        1_000_000_000,
        "ZeRO-3: keep a gathered weight when its next use (in backward) is within this many elements; "
        ">= 2x the backbone's parameters gathers each weight once per step (peak: the whole model).",
    )
    zero_overlap_comm: bool = _f(True, "ZeRO-3: overlap weight gathers with compute.")
    zero_hpz_partition_size: int = _f(
        0,
        "ZeRO++ hpZ: keep a secondary weight copy partitioned within this many ranks (a node) so "
        "backward gathers stay intra-node; 0 = auto (ranks per node when num_nodes > 1).",
    )
    zero_quantized_weights: bool = _f(
        False, "ZeRO++ qwZ: gather weights as int8 (halves gather bytes; CUDA kernels, GPU only)."
    )
    offload_params: str = _f("none", "ZeRO-3 parameter offload: none, cpu or nvme.")
    nvme_path: str = _f("/local_nvme", "Where ZeRO-3 offloads parameters when offload_params=nvme.")
    max_failures: int = _f(
        0, "Worker-group restarts Ray Train allows; each resumes from the last checkpoint."
    )
    storage: str = _f(
        "",
        "Storage all nodes share, for a multi-node cluster: an absolute path mounted on every node (or "
        "file://...), or a URI Ray Train understands (s3://, gs://). Ray Train's checkpoints go there, and "
        "a relative output_dir lies under a path storage. Empty: both stay in the run dir (one machine).",
    )
    metrics_port: int = _f(0, "Port for the training job's Prometheus metrics on rank 0 (0 = off).")
    worker_logs: bool = _f(
        False,
        "Forward the Ray workers' stdout/stderr to the driver's console (off: they stay in Ray's session logs; "
        "progress and errors reach the driver either way).",
    )

    def __post_init__(self) -> None:
        _positive("cluster.num_workers", self.num_workers)
        self.zero_stage = str(self.zero_stage)  # YAML `3` and Python `3` both mean "3"
        _choice("cluster.zero_stage", self.zero_stage, ("auto", "0", "1", "2", "3"))
        _positive("cluster.num_nodes", self.num_nodes)
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
        _positive("cluster.zero_max_live_parameters", self.zero_max_live_parameters)
        _choice("cluster.offload_params", self.offload_params, ("none", "cpu", "nvme"))
        if self.storage and "://" not in self.storage and not os.path.isabs(os.path.expanduser(self.storage)):
            raise ConfigError(
                f"cluster.storage={self.storage!r}: must be an absolute path shared by the nodes, or a URI"
            )


SEARCH_CRITERIA = ("auto", "metric", "loss", "label_loss")
HELDOUT_SCHEDULES = ("grow", "fixed")
SEARCH_SCORING = ("heldout", "prequential")


@dataclass
class SearchConfig:
    """In-batch hyperparameter search (`tuner.search.state`): every task trains several variants side by side."""

    space: dict[str, Any] = _f(
        {},
        "Per-task variants: setting -> list of values, e.g. {optim.lr: [0.003, 0.01, 0.03], prompt.init: "
        "[class_labels, vocab]}; every task gets the cartesian product. Empty: no search. Settings that cannot "
        "vary inside one job (prompt length, steps, batch) are searched with `promptfleet tune`.",
    )
    eta: int = _f(
        3, "Successive halving: of a task's n variants the best ceil(n / eta^k) are live after rung k."
    )
    rungs: list[int] = _f(
        [],
        "Steps after which weaker variants are dropped; empty: ceil(log_eta(variants)) rungs at "
        "max_steps / eta^k (the last at max_steps / eta).",
    )
    heldout_examples: int = _f(
        64, "Train examples per task held out (never trained on) to score variants at each rung."
    )
    heldout_fraction: float = _f(
        0.2, "Cap on the held-out share of a task's train split (small tasks keep most of it for training)."
    )
    heldout_schedule: str = _f(
        "grow",
        "How many held-out examples a rung scores: grow (the first heldout_examples x step / last-rung step "
        "of the shuffled slice, at least 16: the many variants of early rungs have trained little and are "
        "scored on fewer examples, as successive halving gives them fewer steps, so scoring stays a bounded "
        "share of the run; the last rung and the end score the whole slice) or fixed (every rung, all of it).",
    )
    criterion: str = _f(
        "auto",
        "What ranks a task's variants at a rung, on its held-out slice: metric (the task's eval metric; "
        "generation and NER tasks decode greedily), loss (mean target NLL: one teacher-forced forward per "
        "example, a task's live variants batched together), label_loss (classification: the NLL of the gold "
        "label among the task's labels, from the metric's own forward; other kinds: loss. Smooth, but early on "
        "it favours low learning rates, whose prompts are still unconfident: BENCHMARKS.md, hp_search run 5), "
        "or auto: the metric for classification tasks, the loss for tasks whose metric needs decoding.",
    )
    scoring: str = _f(
        "heldout",
        "What a rung scores variants on: heldout (the task's held-out slice: forwards of every live variant at "
        "each rung) or prequential (the training examples drawn in the latter half of the steps so far, each "
        "scored by the forward that trains on it, before its update: examples no prompt has seen yet, no "
        "extra forwards; a task with fewer than 16 such examples is scored on its held-out slice). Prequential "
        "frees the scoring's share of a run for later rungs (`rungs`): BENCHMARKS.md, hp_search run 13.",
    )
    base_margin: float = _f(
        1.0,
        "The job's own configuration (its optim / prompt values, when the space holds them) stays at a rung "
        "while the leader beats it by no more than this many standard errors of their paired difference on "
        "the held-out examples (bootstrap; the one-standard-error rule). 0: rank by score alone. Not applied "
        "where the criterion decodes (criterion metric on a generation task).",
    )
    base_rungs: str = _f(
        "last",
        "Rungs at which the job's own configuration can be dropped at all (with base_margin > 0): last (the "
        "last rung; at earlier ones it always stays: after a ninth of the schedule a low learning rate still "
        "near its start outranks it by more than sampling noise and ends worse, BENCHMARKS.md hp_search "
        "run 9) or every.",
    )

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ConfigError(f"search.eta={self.eta!r}: must be >= 2")
        _positive("search.heldout_examples", self.heldout_examples)
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"search.heldout_fraction={self.heldout_fraction!r}: must be in (0, 1)")
        if any(r <= 0 for r in self.rungs) or sorted(set(self.rungs)) != list(self.rungs):
            raise ConfigError(f"search.rungs={self.rungs!r}: must be increasing positive steps")
        _choice("search.heldout_schedule", self.heldout_schedule, HELDOUT_SCHEDULES)
        _choice("search.base_rungs", self.base_rungs, ("last", "every"))
        _choice("search.scoring", self.scoring, SEARCH_SCORING)
        if not (isinstance(self.base_margin, int | float) and 0 <= self.base_margin < math.inf):
            raise ConfigError(f"search.base_margin={self.base_margin!r}: must be a finite number >= 0")
        if self.criterion not in SEARCH_CRITERIA:
            raise ConfigError(
                f"search.criterion={self.criterion!r}: must be one of {', '.join(SEARCH_CRITERIA)}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.space)


@dataclass
class JobConfig:
    name: str = _f("promptfleet", "Run name; the output directory is <output_dir>/<name>.")
    output_dir: str = _f(
        "runs",
        "Where run directories are written (relative paths resolve against the CWD, or on a Ray cluster "
        "under cluster.storage when that is a path).",
    )
    tasks: list[str] = _f([], "Task files (YAML under configs/tasks/), relative to this job file.")
    model: ModelConfig = _f(None, "The frozen backbone.")
    prompt: PromptConfig = _f(None, "The per-task soft prompts.")
    optim: OptimConfig = _f(None, "Optimisation of the prompt bank.")
    data: DataConfig = _f(None, "Task mixing, packing and data limits.")
    cluster: ClusterConfig = _f(None, "Ray and DeepSpeed.")
    search: SearchConfig = _f(None, "In-batch hyperparameter variants per task with successive halving.")
    eval_every: int = _f(50, "Evaluate every N steps (0 = only at the end).")
    eval_zero_shot: bool = _f(True, "Also score the untuned backbone (zero-shot) for the report.")
    checkpoint_every: int = _f(50, "Write an atomic checkpoint every N steps (0 = only at the end).")
    log_every: int = _f(1, "Log metrics every N steps.")
    resume: bool = _f(
        True, "Resume from the newest complete checkpoint in the run directory if there is one."
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
        _positive("log_every", self.log_every)
        _non_negative("eval_every", self.eval_every)
        _non_negative("checkpoint_every", self.checkpoint_every)
        if self.search.enabled:
            from tuner.search.state import expand_space

            if self.prompt.method != "independent" or self.prompt.init_from:
                raise ConfigError(
                    "search.space works with prompt.method=independent and no prompt.init_from "
                    "(variants are independent prompt rows)"
                )

            expand_space(self)  # refuses unknown or unsearchable keys and invalid values, in one line

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def validate_name(what: str, value: str) -> str:
    """Names (runs, tasks) become directory names: letters, digits, `_`, `-`, `.`; no paths."""
    import re

    if (
        not isinstance(value, str)
        or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value)
        or ".." in value
    ):
        raise ConfigError(f"{what}={value!r} is not a valid name (letters, digits, '_', '-', '.'; no paths)")
    return value


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r}: must be > 0 (and finite)")


def _non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r}: must be >= 0 (and finite)")


# ---------------------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict; unknown keys and wrong types are `ConfigError`s."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:  # `str | list[str]`: the first type the value fits
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        return _coerce(args[-1], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)  # YAML `key:` / `~` is empty, never "None"
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML (quote a string: {key}='\"...\"')"
            ) from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load_job_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply overrides, validate, and make task paths absolute."""
    data = apply_overrides(read_yaml(path), overrides or [])
    cfg = from_dict(JobConfig, data)
    base = Path(path).resolve().parent
    if not cfg.tasks:
        raise ConfigError(f"{path}: `tasks` lists no task files")
    resolved = []
    for t in cfg.tasks:
        tp = (base / t).resolve() if not os.path.isabs(t) else Path(t)
        if not tp.is_file():
            raise ConfigError(f"task file not found: {t} (resolved to {tp})")
        resolved.append(str(tp))
    cfg.tasks = resolved
    return cfg
