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
older ones are deleted. `load_adapter` resolves the pointer once and opens every file of that one
version before reading any: an open file outlives its deletion, and a version deleted before its
files were opened is given up for the one now published, so a reader gets one whole version.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load, save_file

from tuner.schema import ReadByKey, validate_name
from tuner.tasks.kinds import kind_of
from tuner.tasks.templates import check_template, render_input, template_fields

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_META = "promptfleet_task.json"
VERSIONS = ".versions"  # hidden: the registry never mistakes it for a task
MAX_JSON_BYTES = 16 << 20  # adapter_config.json / promptfleet_task.json (a prefix holds demonstrations)
MAX_WEIGHTS_BYTES = 1 << 30  # e.g. 2,048 virtual tokens x 16,384 wide in fp32 is 128 MiB
_LIMITS = {ADAPTER_CONFIG: MAX_JSON_BYTES, ADAPTER_WEIGHTS: MAX_WEIGHTS_BYTES, TASK_META: MAX_JSON_BYTES}
_OPEN_ATTEMPTS = 5  # a reader whose resolved version is pruned under it resolves the pointer again


@dataclass
class TaskMeta(ReadByKey):
    """What serving needs of a task beyond its prompt (`promptfleet_task.json`), written by the
    tuner (`from_spec`) and read by serving (`render` gives the model input of a request with the
    same function training used, `tuner.tasks.templates.render_input`)."""

    kind: str = "generation"  # classification | generation | ner
    description: str = ""
    template: str = ""  # the task's input template; "" = the request text as is
    prefix: str = ""  # description + demonstrations, before every input (as in training)
    verbaliser: dict[str, str] = field(default_factory=dict)  # classification: label -> words
    metric: str = ""
    max_new_tokens: int | None = None
    score: float | None = None  # the tuned headline metric at export
    # Where the task's answer ends (`tuner.tasks.stops`); [] = end of sequence only, as in an adapter
    # written before stop strings existed.
    stop: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as written

    @classmethod
    def from_spec(cls, spec, prefix: str, score: float | None = None) -> TaskMeta:
        """The record of a `tuner.tasks.spec.TaskSpec` trained with `prefix`."""
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
        """A `promptfleet_task.json` is read from a prompt store that others write: every field is
        checked here, so a bad one refuses the adapter at load instead of failing each request."""
        for name in ("kind", "description", "template", "prefix", "metric"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        label_words = kind_of(self.kind).label_scored  # ValueError naming the kinds for an unknown one
        if not isinstance(self.verbaliser, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and (v or not label_words)
            for k, v in self.verbaliser.items()
        ):
            raise ValueError("verbaliser must map labels to non-empty strings")
        if self.max_new_tokens is not None and not _positive_int(self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.score is not None and not _finite_number(self.score):
            raise ValueError(f"score must be a finite number, got {self.score!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.extra, dict):
            raise ValueError("extra must be a mapping")
        check_template(self.template)

    @classmethod
    def from_dict(cls, data: dict) -> TaskMeta:
        if not isinstance(data, dict):
            raise ValueError(f"{TASK_META} is not a JSON object")
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
            except (ValueError, RecursionError):  # RecursionError: arrays nested a thousand deep
                values = None
            if not isinstance(values, dict) or set(values) != set(names):
                raise ValueError(
                    f"this task's input has the fields {', '.join(names)}: send them as a JSON object"
                )
        try:
            rendered = render_input(self.template, self.prefix, values)
            rendered.encode("utf-8")  # JSON may spell a lone surrogate ("\\ud800") inside a field
        except UnicodeEncodeError:
            raise ValueError("the input is not valid unicode (it contains a lone surrogate)") from None
        except (KeyError, IndexError, ValueError, RecursionError) as e:
            raise ValueError(f"the task's template cannot be filled: {e}") from None
        return rendered


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    with ExitStack() as files:
        d, opened = _open_version(task_dir, files)
        weights = _read_open(opened, ADAPTER_WEIGHTS)
        if weights is None:
            raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
        cfg = json.loads(_read_open(opened, ADAPTER_CONFIG) or b"null")
        meta = _read_open(opened, TASK_META)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "PROMPT_TUNING":
        peft_type = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ValueError(f"{d}: peft_type {peft_type!r} is not PROMPT_TUNING")
    tensors = load(weights)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{d}: {ADAPTER_WEIGHTS} has no `prompt_embeddings`")
    prompt = tensors["prompt_embeddings"]
    if prompt.ndim != 2 or prompt.shape[0] != cfg.get("num_virtual_tokens"):
        raise ValueError(
            f"{d}: prompt_embeddings shape {tuple(prompt.shape)} does not match adapter_config.json"
        )
    if not prompt.is_floating_point() or not torch.isfinite(prompt).all():
        raise ValueError(f"{d}: prompt_embeddings holds non-finite (or non-float) values")
    meta = TaskMeta.from_dict(json.loads(meta) if meta is not None else {})
    return TaskAdapter(name, prompt, cfg.get("base_model_name_or_path") or "", meta)


def _resolve_version(task_dir: str | os.PathLike) -> Path:
    """The directory `task_dir` names now: the version `root/<name>` points to, or itself."""
    return Path(os.path.realpath(task_dir))


def _open_version(task_dir: str | os.PathLike, files: ExitStack) -> tuple[Path, dict[str, BinaryIO | None]]:
    """Resolve the published pointer once and open every adapter file of that one version (None
    for a missing one); `files` closes them.

    An open file stays readable after it is unlinked, so once opened a version cannot be lost. Two
    publishes between resolving and opening prune the resolved version (only the live one and the
    one before are kept): then the pointer has moved on, and the new version is opened instead.
    """
    for _ in range(_OPEN_ATTEMPTS):
        d = _resolve_version(task_dir)
        attempt = ExitStack()
        files.enter_context(attempt)
        opened = {}
        for fname, limit in _LIMITS.items():
            opened[fname] = _open_regular(d / fname, limit)
            if opened[fname] is not None:
                attempt.enter_context(opened[fname])
        if all(f is not None for f in opened.values()) or _resolve_version(task_dir) == d:
            if not d.is_dir():  # a dangling pointer (or path), not a race: it will not come back
                link = os.path.islink(task_dir)
                raise FileNotFoundError(
                    f"{task_dir} points to {d}, which does not exist" if link else f"{d} does not exist"
                )
            return d, opened
        attempt.close()  # this version was replaced and pruned meanwhile: open the one now published
    raise FileNotFoundError(
        f"{task_dir}: each of the last {_OPEN_ATTEMPTS} versions it pointed to was deleted before "
        "its files could be opened (published faster than it can be read?)"
    )


def _open_regular(path: Path, limit: int) -> BinaryIO | None:
    """`path` opened, or None if it does not exist; ValueError unless it is a regular file of at most
    `limit` bytes. Opened non-blocking and checked on the open descriptor: a FIFO or device swapped
    in would otherwise block the reader (the serving engine's thread) or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise ValueError(
                f"{path.name} has {st.st_size} bytes, more than the {limit} an adapter file may have"
            )
    except BaseException:
        f.close()
        raise
    return f


def _read_open(opened: dict[str, BinaryIO | None], fname: str) -> bytes | None:
    """The bytes of the adapter file `fname` as `_open_version` opened it (None: it is missing)."""
    if opened[fname] is None:
        return None
    limit = _LIMITS[fname]
    data = opened[fname].read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{fname} grew past {limit} bytes while it was read")
    return data
