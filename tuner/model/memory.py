"""Per-device memory of a prompt-tuning job on a frozen decoder: the arithmetic, nothing else.

`BackboneShape` holds the few dimensions that size a Llama-style decoder (read from a
`config.json`, or one of the built-in named shapes for planning without network). `estimate()`
turns a shape, a workload and a device count into a `MemoryEstimate`: the weights a rank holds
replicated or as a ZeRO-3 shard, the gathered-layer buffers, activations with and without
activation checkpointing, the prompt bank with its optimiser state, and the serving KV cache per
request. `tuner.model.zero.choose_zero` decides from it (the same numbers drive `cluster.zero_stage:
auto` at train time and `promptfleet plan`).

Activation arithmetic for a *frozen* backbone: a Linear whose weight needs no gradient saves
nothing for backward (dX = dY W^T needs W, not X), so what autograd keeps per token and layer is
the two RMSNorms' fp32 inputs and normalised values (16 H bytes), SDPA's q, k, v and output, and
the MLP's gate, SiLU and up tensors. With checkpointing each layer keeps only its input (H per
token), and one layer's activations live at a time while backward recomputes it.

It does not measure anything (`bench/zero_scaling.py` does) nor configure DeepSpeed (`tuner.model.zero`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class BackboneShape:
    """The dimensions that size a Llama-style decoder."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads

    @classmethod
    def from_config(cls, cfg: dict) -> BackboneShape:
        """From a Hugging Face `config.json` mapping (Llama, Mistral, Qwen2 and SmolLM keys)."""
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=int(cfg.get("head_dim") or 0),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}: not a Llama-style decoder") from None

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of one of k or v per token."""
        return self.num_kv_heads * self.dim_per_head

    @property
    def layer_params(self) -> int:
        H, q = self.hidden_size, self.num_heads * self.dim_per_head
        return 2 * H + 2 * H * q + 2 * H * self.kv_size + 3 * H * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + head

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        """Bytes autograd keeps per token in one decoder layer when only the inputs need gradients."""
        H = self.hidden_size
        norms = 2 * 4 * (2 * H)  # two RMSNorms: fp32 input and normalised value each
        attention = dtype_bytes * (2 * self.num_heads * self.dim_per_head + 2 * self.kv_size)  # q, out, k, v
        mlp = dtype_bytes * 3 * self.intermediate_size  # gate (SiLU input), SiLU output, up
        return norms + attention + mlp


# Named shapes for planning without network or a downloaded config (dimensions from the models'
# published config.json files).
BUILTIN_SHAPES: dict[str, BackboneShape] = {
    "llama-3.2-1b": BackboneShape(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True, head_dim=64),
    "llama-3.2-3b": BackboneShape(3072, 8192, 28, 24, 8, 128256, tie_word_embeddings=True, head_dim=128),
    "llama-3-8b": BackboneShape(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": BackboneShape(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-405b": BackboneShape(16384, 53248, 126, 128, 8, 128256),
}


def load_shape(name: str) -> BackboneShape:
    """A built-in name, a directory holding `config.json`, or a backbone `tuner.model.backbone` resolves."""
    if name in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name]
    path = Path(name)
    if not path.is_dir():
        from tuner.model.model_cache import EMBEDDED, resolve_backbone

        if name not in EMBEDDED:
            raise ValueError(
                f"backbone {name!r}: no such directory and not a built-in shape "
                f"({', '.join(sorted(BUILTIN_SHAPES))}); give a directory with config.json"
            )
        path = Path(resolve_backbone(name))
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"backbone {name!r}: {config} not found")
    return BackboneShape.from_config(json.loads(config.read_text()))


@dataclass(frozen=True)
class Workload:
    """What one training step asks of each rank, and the serving shape."""

    seq_len: int  # tokens per example, virtual tokens included
    micro_batch: int  # examples per rank per forward/backward
    num_tasks: int
    num_virtual_tokens: int = 20
    dtype: str = "bf16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. `weights` is what a rank holds between steps under the chosen stage."""

    weights_replicated: int
    weight_shard: int  # 1/partition of the weights (ZeRO-3)
    gathered_buffers: int  # ZeRO-3: gathered layers alive at once (current + prefetch)
    activations: int
    activations_checkpointed: int
    prompt_bank_and_optimiser: int
    kv_per_request: int  # serving: one request of seq_len tokens

    def training_total(self, sharded: bool, checkpointing: bool) -> int:
        weights = self.weight_shard + self.gathered_buffers if sharded else self.weights_replicated
        acts = self.activations_checkpointed if checkpointing else self.activations
        return weights + acts + self.prompt_bank_and_optimiser


def estimate(
    shape: BackboneShape,
    work: Workload,
    partition: int,
    max_live_parameters: int = 1_000_000_000,
) -> MemoryEstimate:
    """Per-device memory for `work` on `shape`, the weights split over `partition` devices under ZeRO-3.

    Gathered buffers: DeepSpeed's prefetcher runs ahead along its trace until the gathered elements
    reach `max_live_parameters` (measured: with the cap above the model's size the whole model is
    gathered during a step), plus the module being fetched; the embedding is gathered whole.
    """
    b = work.dtype_bytes
    tokens = work.seq_len * work.micro_batch
    per_layer = shape.activation_bytes_per_token_layer(b)
    live = max(min(max_live_parameters, shape.num_params) + shape.layer_params, shape.embedding_params)
    live = min(live, shape.num_params)
    return MemoryEstimate(
        weights_replicated=shape.num_params * b,
        weight_shard=-(-shape.num_params // partition) * b,
        gathered_buffers=live * b,
        activations=tokens * shape.num_layers * per_layer,
        activations_checkpointed=tokens * (shape.num_layers * b * shape.hidden_size + per_layer),
        prompt_bank_and_optimiser=3 * 4 * work.num_tasks * work.num_virtual_tokens * shape.hidden_size,
        kv_per_request=2 * shape.num_layers * shape.kv_size * b * work.seq_len,
    )


def device_memory_budget(ranks_per_node: int) -> tuple[int, str]:
    """(bytes, where from): a GPU's memory, or 80 % of host RAM shared by this node's ranks."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return int(0.9 * total), f"90% of {torch.cuda.get_device_name()} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(
        0.8 * ram / max(1, ranks_per_node)
    ), f"80% of {ram / GB:.0f} GiB host RAM / {ranks_per_node} ranks"
