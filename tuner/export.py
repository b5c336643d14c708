"""Per-task adapters in Hugging Face PEFT's prompt-tuning format, which serving reads too.

A task directory holds:
  adapter_config.json        PEFT `PromptTuningConfig` (peft_type PROMPT_TUNING, CAUSAL_LM)
  adapter_model.safetensors  {"prompt_embeddings": [num_virtual_tokens, hidden]}
  promptfleet_task.json      what serving needs beyond PEFT: kind, template, verbaliser, metrics

`peft.PeftModel.from_pretrained(backbone, task_dir)` loads it as is. Only safetensors is ever
read; task names are validated before they become directory names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuner.config import validate_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_META = "promptfleet_task.json"


@dataclass
class TaskAdapter:
    """A task's trained prompt and the metadata needed to serve it."""

    name: str
    prompt: torch.Tensor  # [num_virtual_tokens, hidden]
    backbone: str  # base_model_name_or_path as written in adapter_config.json
    meta: dict = field(default_factory=dict)  # kind, prefix, template, verbaliser, metrics...


def peft_config_dict(num_virtual_tokens: int, backbone_config, base_model: str) -> dict:
    from peft import PromptTuningConfig

    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=backbone_config.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=backbone_config.num_attention_heads,
        num_layers=backbone_config.num_hidden_layers,
        base_model_name_or_path=base_model,
    )
    return cfg.to_dict()


def save_adapter(root: str | os.PathLike, adapter: TaskAdapter, backbone_config) -> Path:
    """Write `root/<name>/` atomically (temp dir + rename; an existing dir is replaced)."""
    validate_name("task name", adapter.name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter.name}-", dir=root))
    cfg = peft_config_dict(adapter.prompt.shape[0], backbone_config, adapter.backbone)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    save_file(
        {"prompt_embeddings": adapter.prompt.detach().float().contiguous().cpu()}, str(tmp / ADAPTER_WEIGHTS)
    )
    (tmp / TASK_META).write_text(json.dumps({"name": adapter.name, **adapter.meta}, indent=2, default=str))
    final = root / adapter.name
    old = root / f".{adapter.name}.old"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_adapter(task_dir: str | os.PathLike) -> TaskAdapter:
    """Read a PEFT prompt-tuning adapter directory (safetensors only)."""
    d = Path(task_dir)
    name = validate_name("task name", d.name)
    cfg_path, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{d}: peft_type {cfg.get('peft_type')!r} is not PROMPT_TUNING")
    tensors = load_file(str(weights))
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{d}: {ADAPTER_WEIGHTS} has no `prompt_embeddings`")
    prompt = tensors["prompt_embeddings"]
    if prompt.ndim != 2 or prompt.shape[0] != cfg.get("num_virtual_tokens"):
        raise ValueError(
            f"{d}: prompt_embeddings shape {tuple(prompt.shape)} does not match adapter_config.json"
        )
    meta = json.loads((d / TASK_META).read_text()) if (d / TASK_META).is_file() else {}
    meta.pop("name", None)
    return TaskAdapter(name, prompt, cfg.get("base_model_name_or_path") or "", meta)
