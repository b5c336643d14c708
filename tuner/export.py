"""Per-task adapters in Hugging Face PEFT's prompt-tuning format, which serving reads too.

A task directory holds:
  adapter_config.json        PEFT `PromptTuningConfig` (peft_type PROMPT_TUNING, CAUSAL_LM)
  adapter_model.safetensors  {"prompt_embeddings": [num_virtual_tokens, hidden]}
  promptfleet_task.json      what serving needs beyond PEFT (`TaskMeta`): kind, template, prefix,
                             verbaliser, metric, stop strings

`peft.PeftModel.from_pretrained(backbone, task_dir)` loads it as is. Only safetensors is ever
read; task names are validated before they become directory names.

Publishing is atomic: each save writes a new version directory `root/.versions/<name>/<version>/`
and then flips ONE pointer, the relative symlink `root/<name>`, with a single `os.replace`. A
reader (the serving registry, a hot reload) sees the old version or the new one, complete, and the
task never disappears in between. The previous version is kept (a reader may still be loading it);
older ones are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuner.config import validate_name
from tuner.tasks import render_input, template_fields

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_META = "promptfleet_task.json"
VERSIONS = ".versions"  # hidden: the registry never mistakes it for a task


@dataclass
class TaskMeta:
    """What serving needs of a task beyond its prompt (`promptfleet_task.json`), written by the
    tuner (`from_spec`) and read by serving (`render` gives the model input of a request with the
    same function training used, `tuner.tasks.render_input`)."""

    kind: str = "generation"  # classification | generation | ner
    description: str = ""
    template: str = ""  # the task's input template; "" = the request text as is
    prefix: str = ""  # description + demonstrations, before every input (as in training)
    verbaliser: dict[str, str] = field(default_factory=dict)  # classification: label -> words
    metric: str = ""
    max_new_tokens: int | None = None
    score: float | None = None  # the tuned headline metric at export
    # Where the task's answer ends (`tuner.stops`); [] = end of sequence only, as in an adapter
    # written before stop strings existed.
    stop: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as written

    @classmethod
    def from_spec(cls, spec, prefix: str, score: float | None = None) -> TaskMeta:
        """The record of a `tuner.tasks.TaskSpec` trained with `prefix`."""
        return cls(
            kind=spec.kind,
            description=spec.description,
            template=spec.template,
            prefix=prefix,
            verbaliser=dict(spec.verbaliser),
            metric=spec.metric,
            max_new_tokens=spec.max_new_tokens,
            score=score,
            stop=list(spec.stop),
        )

    def __post_init__(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @classmethod
    def from_dict(cls, data: dict) -> TaskMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta.extra = {k: v for k, v in data.items() if k not in known and k != "name"}
        return meta

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @property
    def input_fields(self) -> list[str]:
        return template_fields(self.template)

    def render(self, text: str, raw: bool = False) -> str:
        """The model input for a request's `text`, exactly as training rendered a row.

        A template with one field takes `text` as that field; one with several fields takes a JSON
        object of them (e.g. `{"premise": ..., "hypothesis": ...}`). Raises ValueError otherwise.
        """
        if raw:
            return text
        names = self.input_fields
        if not names:
            return self.prefix + text
        if len(names) == 1:
            values = {names[0]: text}
        else:
            try:
                values = json.loads(text)
            except ValueError:
                values = None
            if not isinstance(values, dict) or set(values) != set(names):
                raise ValueError(
                    f"this task's input has the fields {', '.join(names)}: send them as a JSON object"
                )
        try:
            return render_input(self.template, self.prefix, values)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"the task's template cannot be filled: {e}") from None

    # Read access by key, for code written against the former dict (`meta.get("verbaliser")`).
    def get(self, key: str, default=None):
        value = getattr(self, key, None) if key in self._keys() else self.extra.get(key)
        return default if value is None else value

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return self.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _keys(self) -> set[str]:
        return {f.name for f in fields(self)} - {"extra"}


@dataclass
class TaskAdapter:
    """A task's trained prompt and the metadata needed to serve it."""

    name: str
    prompt: torch.Tensor  # [num_virtual_tokens, hidden]
    backbone: str  # base_model_name_or_path as written in adapter_config.json
    meta: TaskMeta = field(default_factory=TaskMeta)  # a dict is read with TaskMeta.from_dict

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):
            self.meta = TaskMeta.from_dict(self.meta)


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
    """Publish `root/<name>` atomically: a new version directory, then one pointer flip.

    Returns `root/<name>` (a symlink to the version directory; read it like a directory).
    """
    validate_name("task name", adapter.name)
    root = Path(root)
    versions = root / VERSIONS / adapter.name
    versions.mkdir(parents=True, exist_ok=True)
    # Names sort by time, so "older than the one we replace" is a string comparison.
    version = Path(tempfile.mkdtemp(prefix=f"{time.time_ns():020d}-", dir=versions))
    cfg = peft_config_dict(adapter.prompt.shape[0], backbone_config, adapter.backbone)
    _write(version / ADAPTER_CONFIG, json.dumps(cfg, indent=2, default=str).encode())
    save_file(
        {"prompt_embeddings": adapter.prompt.detach().float().contiguous().cpu()},
        str(version / ADAPTER_WEIGHTS),
    )
    meta = json.dumps({"name": adapter.name, **adapter.meta.to_dict()}, indent=2, default=str).encode()
    _write(version / TASK_META, meta)
    version.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
    final = root / adapter.name
    previous = os.readlink(final) if final.is_symlink() else None
    if final.exists() and not final.is_symlink():
        # A store written before versioned publishing: move the directory under .versions once
        # (the only moment this task is briefly missing), then flip as usual.
        legacy = versions / f"{0:020d}-legacy"
        shutil.rmtree(legacy, ignore_errors=True)
        os.rename(final, legacy)
        previous = os.path.relpath(legacy, root)
    link = root / f".{adapter.name}.link-{version.name}"
    os.symlink(os.path.relpath(version, root), link)
    os.replace(link, final)  # the one atomic step: readers see the old version or the new one
    _prune(versions, version.name, keep=Path(previous).name if previous else "")
    return final


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _prune(versions: Path, current: str, keep: str) -> None:
    """Delete versions older than `current`, except `keep` (the one it replaced); a newer one
    belongs to a save still running."""
    for child in versions.iterdir():
        if child.name < current and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def load_adapter(task_dir: str | os.PathLike, name: str | None = None) -> TaskAdapter:
    """Read a PEFT prompt-tuning adapter directory (safetensors only).

    Args:
        task_dir: `root/<name>` (or a version directory it points to, then `name` is needed).
        name: the task's name; defaults to the directory's name.
    """
    name = validate_name("task name", name if name is not None else Path(task_dir).name)
    # Resolve the published pointer once: every file then comes from the same version.
    d = Path(os.path.realpath(task_dir))
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
    if not isinstance(meta, dict):
        raise ValueError(f"{d}: {TASK_META} is not a JSON object")
    return TaskAdapter(name, prompt, cfg.get("base_model_name_or_path") or "", TaskMeta.from_dict(meta))
